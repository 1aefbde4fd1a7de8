"""Decode throughput of a ragged batch against a single sequence, measured side by side in one run.

    python benchmarks/batch_decode.py                          # qwen2.5-0.5b, 4K context, FastKV caches
    python benchmarks/batch_decode.py --dtype bfloat16 --compile --batches 1,8,16
    python benchmarks/batch_decode.py --dtype bfloat16 --quantize none,int8 --batches 1,8   # bf16 vs int8 weights

One 4K-token prompt is prefilled once per method; its cache is merged into batches of B copies
(`fastkv.batch.merge`: the same buffers a batch of B different prompts would have), and decode steps
are timed for each B. Tokens/s = B / (median step time). Each row prints the speedup of its tokens/s
over the single sequence's.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fastkv import PrefillOptions, adapter_for, decode_step, prefill
from fastkv.cache import merge
from fastkv.methods import format_spec, parse, split_specs
from fastkv.models import load
from fastkv.precision import header


def step_ms(adapter, cache, tokens, steps: int, compiled: bool) -> float:
    times = []
    for step in range(steps):
        start = time.perf_counter()
        decode_step(adapter, cache, tokens, cache.position_base + step, compiled=compiled)
        if adapter.device.type == "cuda":
            torch.cuda.synchronize(adapter.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--methods", default="fastkv,fullkv", help="comma-separated method specs (retain 0.1)")
    ap.add_argument("--length", type=int, default=4096, help="prompt tokens")
    ap.add_argument("--batches", default="1,2,4,8", help="batch sizes")
    ap.add_argument("--steps", type=int, default=16, help="decode steps timed (median)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument(
        "--quantize", default="none", help="comma-separated: none, int8 (weight-only linears), auto; each in turn"
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", action="store_true", help="decode under torch.compile")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",") if b]
    weights = [q.strip() for q in args.quantize.split(",") if q.strip()]
    try:
        methods = [parse(s, defaults={"retain_rate": 0.1, "tsp_rate": 0.2}) for s in split_specs(args.methods)]
        models = {
            q: load(args.model, dtype=args.dtype, device=args.device, progress=False, quantize=q)[0] for q in weights
        }
    except ValueError as e:
        ap.error(str(e))
    print(
        header() + f"\n# {args.model} {args.dtype}{' compiled' if args.compile else ''}, "
        f"{args.length}-token prompt, {args.steps} decode steps (median); tok/s x: over the first row of its "
        "method, and over the same row with the first --quantize"
    )
    print(
        f"{'method':<10} {'weights':>8} {'batch':>5} {'KV MiB':>8} {'step ms':>8} {'tok/s':>8} {'x batch 1':>9} "
        f"{'x weights':>9}"
    )
    first: dict[tuple[str, int], float] = {}
    for quantize, model in models.items():
        adapter = adapter_for(model)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(100, model.config.vocab_size - 100, (1, args.length), generator=g).to(adapter.device)
        for method in methods:
            bound = method.bind(adapter.num_layers)
            cache, logits, _ = prefill(adapter, ids, bound, PrefillOptions(max_tokens=args.steps + 4))
            token = logits.argmax(-1)
            single = None
            for b in batches:
                batch = merge([cache] * b)
                tokens = token.expand(b).contiguous()
                step_ms(adapter, merge([cache] * b), tokens, 2, args.compile)  # warm up (and compile) this shape
                ms = step_ms(adapter, batch, tokens, args.steps, args.compile)
                rate = b * 1e3 / ms
                single = single or rate
                base = first.setdefault((method.name, b), rate)
                kv = sum(k.numel() * k.element_size() * 2 for k in batch.keys) / 2**20
                cells = f"{kv:>8.1f} {ms:>8.1f} {rate:>8.1f} {rate / single:>9.2f} {rate / base:>9.2f}"
                print(f"{method.name:<10} {quantize:>8} {b:>5} {cells}")
            print(f"#   {format_spec(bound)}")


if __name__ == "__main__":
    main()
