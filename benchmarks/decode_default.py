"""Decode speed at the CPU default (what `fastkv info` picks: bfloat16 with int8 weights where bfloat16 is
native, float32 with int8 weights where it is not; with and without torch.compile) against transformers'
own float32 (and, where native, bfloat16) decoding, in one run.

    python benchmarks/decode_default.py                    # qwen2.5-0.5b, 4K-token prompt, FastKV
    python benchmarks/decode_default.py --length 8192 --method fullkv

One process loads the model in float32, in bfloat16 where it is native, and in the default precision
(`fastkv.precision.auto`, what `LLM.load` and `fastkv generate|serve` use by default). It then times, one
after the other on the same random-token prompt: transformers' prefill and decode loop in float32 and in
bfloat16 where native, and the engine's prefill and decode steps under --method in each precision, and in
the last under torch.compile (compiled in a warm-up, not timed; its time and the resident memory it added
are printed: int8 weights are frozen into the graph, which holds them repacked, a second int8 copy).
Decode is the median of --steps steps. Ratios are to transformers in float32 and in the fastest dtype it
has here.
"""

from __future__ import annotations

import argparse
import time

import prefill_decode as pd  # this directory's benchmark: its timing helpers
import torch

from fastkv import adapter_for
from fastkv.methods import format_spec, parse
from fastkv.models import DTYPES, MODELS, default_dtype, load, model_config, precision_auto, prepare
from fastkv.precision import header


def weight_mib(model: torch.nn.Module) -> float:
    """MiB of a model's parameters and buffers, each tensor counted once (tied weights share one)."""
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--method", default="fastkv", help="the engine's method (retain 0.1, tsp_rate 0.2)")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    best = default_dtype("cpu")
    dtypes = [torch.float32] + ([best] if best != torch.float32 else [])
    name = {d: str(d).removeprefix("torch.") for d in dtypes}
    models, load_s = {}, {}
    variants = [(name[d], d, "none") for d in dtypes]
    choice = precision_auto(model_config(args.model, progress=False))
    if choice.quantize == "int8":
        variants.append((f"{choice.dtype}+int8", DTYPES[choice.dtype], "int8"))
    for label, d, quantize in variants:
        if args.model in MODELS:
            prepare(MODELS[args.model], d, progress=False)  # the dtype's cache, written once, untimed
        start = time.perf_counter()
        models[label] = load(args.model, dtype=d, progress=False, quantize=quantize)[0]
        load_s[label] = time.perf_counter() - start
    hf = {name[d]: models[name[d]] for d in dtypes}  # transformers' own runs: its weights in each dtype
    default = list(models)[-1]
    method = parse(args.method, knobs={"retain_rate": 0.1, "tsp_rate": 0.2})
    ids = pd.prompt(models["float32"].config.vocab_size, args.length)
    warm = ids[:, :256]
    print(header(f"CPU default: {default} ({choice.why})"))
    print(f"# {args.model}, {args.length}-token prompt, {args.steps} decode steps (median)")
    print(f"# engine method: {format_spec(method.bind(adapter_for(models[default]).num_layers))}")
    held = (f"{label} {weight_mib(m):.0f} MiB (loaded in {load_s[label]:.1f} s)" for label, m in models.items())
    print("# weights held: " + ", ".join(held))
    rows = {}
    for label, model in hf.items():
        pd.bench_transformers(model, warm, 2)
        rows[f"transformers {label}"] = pd.bench_transformers(model, ids, args.steps)[:2]
    for label, model in models.items():
        adapter = adapter_for(model)
        pd.COMPILE = False
        pd.bench_engine(adapter, warm, method, 2)
        rows[f"fastkv {label}"] = pd.bench_engine(adapter, ids, method, args.steps)[:2]
    adapter = adapter_for(models[default])
    pd.COMPILE = True
    before = pd.rss()
    start = time.perf_counter()
    pd.bench_engine(adapter, warm, method, 4)  # compiles, once per process (per model, for int8 weights)
    compile_s, grown = time.perf_counter() - start, (pd.rss() - before) / 2**20
    rows[f"fastkv {default} compiled"] = pd.bench_engine(adapter, ids, method, args.steps)[:2]
    print(f"# compiling the {default} decode step took {compile_s:.0f} s and grew resident memory by {grown:.0f} MiB")
    hf32, hfbest = rows["transformers float32"], rows[f"transformers {name[best]}"]
    print()
    print(f"| run | prefill s | decode ms/token | decode x transformers float32 | decode x transformers {name[best]} |")
    print("|---|---|---|---|---|")
    for label, (prefill_s, decode_ms) in rows.items():
        vs32, vsbest = hf32[1] / decode_ms, hfbest[1] / decode_ms
        print(f"| {label} | {prefill_s:.2f} | {decode_ms:.1f} | {vs32:.2f}x | {vsbest:.2f}x |")


if __name__ == "__main__":
    main()
