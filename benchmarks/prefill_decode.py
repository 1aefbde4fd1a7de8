"""Prefill and decode speed of fastkv's engine against transformers' own forward, measured side by side.

    python benchmarks/prefill_decode.py                      # qwen2.5-0.5b at 4K and 8K tokens
    python benchmarks/prefill_decode.py --lengths 2048 --decode-lengths 4096 --steps 8

For each prompt length it times, in one process and one after the other:
- transformers: `model(ids, logits_to_keep=1)` for prefill, then its own decode loop (DynamicCache);
- the engine under FullKV, SnapKV (retain 0.1) and FastKV (tsp_rate 0.2, retain 0.1).
Then it times single decode steps over caches filled directly (no prefill) at several lengths, for a
full cache and a 10% cache. Ratios are computed within the run, since this machine is noisy.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from fastkv import FastKV, FullKV, KVCache, SnapKV, adapter_for, decode_step, prefill
from fastkv.models import load


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def prompt(vocab: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (1, length), generator=g)


@torch.inference_mode()
def bench_transformers(model, ids: torch.Tensor, steps: int) -> tuple[float, float]:
    out, prefill_s = timed(lambda: model(ids, logits_to_keep=1))
    cache, token = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
    times = []
    for _ in range(steps):
        out, t = timed(lambda c=cache, tok=token: model(tok, cache=c))
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        times.append(t)
    return prefill_s, statistics.median(times) * 1e3


def bench_engine(parts, ids: torch.Tensor, method, steps: int) -> tuple[float, float, float]:
    (cache, logits, _), prefill_s = timed(lambda: prefill(parts, ids, method, max_new_tokens=steps))
    token, times = logits.argmax(-1), []
    for step in range(steps):
        logits, t = timed(lambda s=step, tok=token: decode_step(parts, cache, tok, ids.shape[1] + s))
        token = logits.argmax(-1)
        times.append(t)
    return prefill_s, statistics.median(times) * 1e3, cache.nbytes() / 2**20


def filled_cache(parts, length: int, steps: int) -> KVCache:
    """A cache holding `length` random entries per layer, as if a prefill had kept them."""
    cache = KVCache(prompt_len=length, max_new_tokens=steps)
    shape = (1, parts.num_kv_heads, length, parts.head_dim)
    positions = torch.arange(length).expand(1, parts.num_kv_heads, length)
    for _ in range(parts.num_layers):
        cache.store(torch.randn(shape, dtype=parts.dtype), torch.randn(shape, dtype=parts.dtype), positions)
    return cache


def bench_decode_at(parts, prompt_len: int, kept: int, steps: int) -> float:
    cache = filled_cache(parts, kept, steps)
    token, times = torch.tensor([1000]), []
    for step in range(steps):
        _, t = timed(lambda s=step: decode_step(parts, cache, token, prompt_len + s))
        times.append(t)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--lengths", default="4096,8192", help="prompt lengths in tokens")
    ap.add_argument("--decode-lengths", default="4096,16384,32704", help="cache lengths for decode timing")
    ap.add_argument("--steps", type=int, default=16, help="decode steps timed (median reported)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model, _ = load(args.model, progress=False)
    parts = adapter_for(model)
    vocab = model.config.vocab_size
    print(
        f"# {args.model} float32 on {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    # Warm up kernels and allocator so that the first timed run is not penalised.
    bench_engine(parts, prompt(vocab, 256), FullKV(), 2)
    bench_transformers(model, prompt(vocab, 256), 2)

    methods = {
        "fullkv": FullKV(),
        "snapkv": SnapKV(retain_rate=0.1),
        "fastkv": FastKV(tsp_rate=0.2, retain_rate=0.1),
    }
    results: dict = {"prefill": [], "decode_at": []}
    print(
        "\nt/HF: this run's time divided by transformers' (<= 1.05 means no slower); "
        "speedup: the inverse; t/Full: time divided by the engine's FullKV"
    )
    print(
        f"\n{'tokens':>7} {'run':<13} {'prefill s':>9} {'t/HF':>6} {'speedup':>7} {'t/Full':>6} "
        f"{'decode ms':>9} {'t/HF':>6} {'speedup':>7} {'KV MiB':>7}"
    )
    for length in [int(x) for x in args.lengths.split(",")]:
        ids = prompt(vocab, length)
        hf_prefill, hf_decode = bench_transformers(model, ids, args.steps)
        print(
            f"{length:>7} {'transformers':<13} {hf_prefill:>9.2f} {1:>6.2f} {1:>7.2f} {'':>6} "
            f"{hf_decode:>9.1f} {1:>6.2f} {1:>7.2f}"
        )
        row = {"tokens": length, "transformers": {"prefill_s": hf_prefill, "decode_ms": hf_decode}}
        full_prefill = None
        for name, method in methods.items():
            p, dms, mib = bench_engine(parts, ids, method, args.steps)
            full_prefill = full_prefill or p
            print(
                f"{length:>7} {name:<13} {p:>9.2f} {p / hf_prefill:>6.2f} {hf_prefill / p:>7.2f} "
                f"{p / full_prefill:>6.2f} {dms:>9.1f} {dms / hf_decode:>6.2f} {hf_decode / dms:>7.2f} {mib:>7.1f}"
            )
            row[name] = {
                "prefill_s": p,
                "decode_ms": dms,
                "kv_mib": mib,
                "prefill_speedup": hf_prefill / p,
                "decode_speedup": hf_decode / dms,
            }
        results["prefill"].append(row)

    print(f"\n{'cache':>7} {'full ms':>8} {'10% ms':>8} {'speedup':>8}")
    for length in [int(x) for x in args.decode_lengths.split(",")]:
        full = bench_decode_at(parts, length, length, args.steps)
        small = bench_decode_at(parts, length, length // 10, args.steps)
        print(f"{length:>7} {full:>8.1f} {small:>8.1f} {full / small:>8.2f}")
        results["decode_at"].append({"cache": length, "full_ms": full, "ten_percent_ms": small})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
