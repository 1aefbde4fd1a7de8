"""Two faster int formats than fastkv's int8 weights, and what they cost in fidelity.

1. **An int4 output layer.** torch's CPU int4 kernel reads the output layer (151936 x 896, the largest
   single read of a decode step) about 2.4x faster than the int8 one (`benchmarks/int8_matmul.py`). The
   float32 hidden states of one prompt go through three output layers: float32 (the reference), fastkv's
   Int8Linear (per-row int8), int4 with asymmetric codes per group of 32 inputs (the kernel's format).
2. **int8 activations too** (torch's dynamic quantization, `torch.ao.quantization.quantize_dynamic`:
   int8 weights per channel and activations quantized per tensor at run time, VNNI kernels; about 2x faster
   than the int8 weight-only kernel for one row). The whole model in float32, with fastkv's int8 weights,
   and dynamically quantized (every linear, the output layer untied).

Each prints the KL divergence from float32 and top-1 agreement over every position of the README's text.

    python benchmarks/quantized_fidelity.py --tokens 1024
"""

from __future__ import annotations

import argparse
import copy
import warnings
from pathlib import Path

import torch
from int8_matmul import int4_kernel

from fastkv.eval.metrics import first_token_kl
from fastkv.models import load
from fastkv.precision import header
from fastkv.quantize import KERNEL_ROWS, Int8Linear, quantize_int8


def row(name: str, reference: torch.Tensor, logits: torch.Tensor) -> str:
    """reference, logits [positions, V]: KL at every position (the eval's own measure), top-1 agreement."""
    kl = torch.tensor([first_token_kl(a, b) for a, b in zip(reference, logits, strict=True)])
    agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    return f"| {name} | {kl.mean().item():.5f} | {kl.max().item():.4f} | {agree:.2%} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-0.5b")
    parser.add_argument("--tokens", type=int, default=1024, help="positions scored (the README's own text)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(header("float32 unless named"))
    model, tokenizer = load(args.model, dtype=torch.float32, quantize="none")
    text = (Path(__file__).parents[1] / "README.md").read_text()
    ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.tokens]
    print(f"# {args.model}, {ids.shape[1]} positions of README.md")
    table = "| {} | KL mean | KL max | top-1 agreement |\n|---|---|---|---|"
    with torch.no_grad():
        hidden = model.model(ids).last_hidden_state[0]
        reference = hidden @ model.lm_head.weight.T
        print("\n1. The output layer alone (float32 decoder):\n\n" + table.format("output layer"))
        int8, int4 = Int8Linear(model.lm_head), int4_kernel(model.lm_head.weight.data)
        heads = {"int8 per row (fastkv)": int8}
        if int4 is not None:
            heads["int4 group 32"] = lambda x: int4(x.bfloat16()).float()
        for name, head in heads.items():
            print(
                row(
                    name,
                    reference,
                    torch.cat([head(hidden[i : i + KERNEL_ROWS]) for i in range(0, len(hidden), KERNEL_ROWS)]),
                )
            )
        print("\n2. The whole model:\n\n" + table.format("weights"))
        reference = model(ids).logits[0]
        weights_only = copy.deepcopy(model)
        quantize_int8(weights_only)
        print(row("int8 weights, float32 activations (fastkv)", reference, weights_only(ids).logits[0]))
        del weights_only
        dynamic = copy.deepcopy(model)
        dynamic.lm_head.weight = torch.nn.Parameter(dynamic.lm_head.weight.detach().clone())  # untie
        torch.backends.quantized.engine = "x86"
        with warnings.catch_warnings():  # torch marks its quantized tensors deprecated: said in the docs
            warnings.simplefilter("ignore")
            dynamic = torch.ao.quantization.quantize_dynamic(dynamic, {torch.nn.Linear}, dtype=torch.qint8)
            print(row("int8 weights and activations (dynamic, x86 engine)", reference, dynamic(ids).logits[0]))


if __name__ == "__main__":
    main()
