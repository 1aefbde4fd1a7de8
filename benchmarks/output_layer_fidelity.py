"""Can the output layer (151936 x 896, the largest single read of a decode step) go to int4?

torch's CPU int4 kernel reads it about 2.4x faster than the int8 one (`benchmarks/int8_matmul.py`), so the
question is fidelity. This runs one float32 prompt through qwen2.5-0.5b's decoder once, then applies three
output layers to the same final hidden states: float32 (the reference), fastkv's Int8Linear (per-row
int8), and int4 with asymmetric codes per group of 32 inputs (the kernel's format, bfloat16 scales and
zeros). It prints the KL divergence from the reference and top-1 agreement over every position.

    python benchmarks/output_layer_fidelity.py --tokens 1024
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from int8_matmul import int4_kernel

from fastkv.models import load
from fastkv.precision import header
from fastkv.quantize import KERNEL_ROWS, Int8Linear


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-0.5b")
    parser.add_argument("--tokens", type=int, default=1024, help="positions scored (the README's own text)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(header("float32 decoder; the output layer as named"))
    model, tokenizer = load(args.model, dtype=torch.float32, quantize="none")
    text = (Path(__file__).parents[1] / "README.md").read_text()
    ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.tokens]
    print(f"# {args.model}, {ids.shape[1]} positions of README.md")
    with torch.no_grad():
        hidden = model.model(ids).last_hidden_state[0]
        reference = (hidden @ model.lm_head.weight.T).log_softmax(-1)
        int8, int4 = Int8Linear(model.lm_head), int4_kernel(model.lm_head.weight.data)
        heads = {"int8 per row": int8}
        if int4 is not None:
            heads["int4 group 32"] = lambda x: int4(x.bfloat16()).float()
        print("| output layer | KL mean | KL max | top-1 agreement |\n|---|---|---|---|")
        for name, head in heads.items():
            logits = torch.cat([head(hidden[i : i + KERNEL_ROWS]) for i in range(0, len(hidden), KERNEL_ROWS)])
            kl = (reference.exp() * (reference - logits.log_softmax(-1))).sum(-1)
            agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
            print(f"| {name} | {kl.mean().item():.5f} | {kl.max().item():.4f} | {agree:.2%} |")


if __name__ == "__main__":
    main()
