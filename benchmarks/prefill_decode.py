"""Prefill and decode speed and memory of fastkv's methods against transformers, measured side by side.

    python benchmarks/prefill_decode.py                      # qwen2.5-0.5b at 4K and 8K tokens
    python benchmarks/prefill_decode.py --methods all        # every preset
    python benchmarks/prefill_decode.py --lengths 16384 --methods fullkv,h2o --decode-lengths ""
    python benchmarks/prefill_decode.py --methods 'fastkv(kernel_size=13),fastkv+adakv'   # any method specs
    python benchmarks/prefill_decode.py --memory --lengths 32704 --methods fullkv,fastkv --prefill-chunks 0,2048
    python benchmarks/prefill_decode.py --dtype bfloat16                  # weights, activations and cache

For each prompt length it times, in one process and one after the other:
- transformers: `model(ids, logits_to_keep=1)` for prefill, then its own decode loop (DynamicCache);
- the engine under each method (default: FullKV, SnapKV and FastKV), every KV budget at retain 0.1
  and FastKV at tsp_rate 0.2; PyramidInfer follows its own schedule.
For each it prints prefill seconds, decode ms/token, KV MiB and peak memory (the most the process
held during prefill and decoding beyond what it held before), with ratios to transformers and to the
engine's FullKV. Then it times single decode steps over caches filled directly (no prefill) at several
lengths, for a full cache and a 10% cache. Ratios are computed within the run: the machine is noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import statistics
import threading
import time

import torch

from fastkv import KVCache, PrefillOptions, adapter_for, decode_step, prefill
from fastkv.methods import FullKV, format_spec, parse, split_specs
from fastkv.models import load
from fastkv.precision import header


class PeakMemory:
    """Peak memory beyond the level at entry: CUDA allocator stats, or RSS sampled every 2 ms on CPU.

    Off unless `PeakMemory.enabled` (--memory): on CPU it needs every large allocation to be a fresh
    mmap, which slows the run, so timings and peaks come from separate runs.
    """

    enabled = False

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak, self.base = device, 0, 0

    def __enter__(self) -> PeakMemory:
        if not self.enabled:
            return self
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        self.base = self.peak = rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        if not self.enabled:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.running = False
            self.thread.join()
            self.peak = max(self.peak, rss())

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20 if self.enabled else float("nan")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def return_freed_memory_to_the_os() -> None:
    """Serve large allocations with mmap (glibc), so that freed tensors leave RSS and peaks are honest."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB, fixed


COMPILE = False  # --compile: decode steps under torch.compile


def timed(fn):
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


def sync() -> None:
    """Wait for queued GPU work, so that a time covers the work and not its launch."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def prompt(vocab: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (1, length), generator=g)


@torch.inference_mode()
def bench_transformers(model, ids: torch.Tensor, steps: int) -> tuple[float, float, float]:
    with PeakMemory(ids.device) as peak:
        out, prefill_s = timed(lambda: model(ids, logits_to_keep=1))
        cache, token = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
        times = []
        for _ in range(steps):
            out, t = timed(lambda c=cache, tok=token: model(tok, cache=c))
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            times.append(t)
        del out, cache
    return prefill_s, statistics.median(times) * 1e3, peak.mib


def bench_engine(adapter, ids: torch.Tensor, method, steps: int, chunk: int | None = None) -> tuple[float, ...]:
    with PeakMemory(adapter.device) as peak:
        (cache, logits, _), prefill_s = timed(lambda: prefill(adapter, ids, method, PrefillOptions(steps, chunk)))
        token, times = logits.argmax(-1), []
        for step in range(steps):
            logits, t = timed(
                lambda s=step, tok=token: decode_step(adapter, cache, tok, cache.position_base + s, compiled=COMPILE)
            )
            token = logits.argmax(-1)
            times.append(t)
    return prefill_s, statistics.median(times) * 1e3, cache.nbytes() / 2**20, peak.mib


def filled_cache(adapter, length: int, steps: int) -> KVCache:
    """A cache holding `length` random entries per layer, as if a prefill had kept them (a layer with a sliding
    window: its window's worth, the last entries, in its ring)."""
    cache = KVCache(prompt_len=length, max_tokens=steps)
    options = {"dtype": adapter.dtype, "device": adapter.device}
    for window in getattr(adapter, "windows", [None] * adapter.num_layers):  # (earlier commits: no windows)
        kept = length if window is None else min(length, window - 1)
        shape = (1, adapter.num_kv_heads, kept, adapter.head_dim)
        positions = torch.arange(length - kept, length, device=adapter.device).expand(1, adapter.num_kv_heads, kept)
        ring = {} if window is None else {"window": window}  # (earlier commits' caches take no window: side_by_side)
        cache.store(torch.randn(shape, **options), torch.randn(shape, **options), positions, **ring)
    return cache


def bench_decode_at(adapter, prompt_len: int, kept: int, steps: int) -> float:
    cache = filled_cache(adapter, kept, steps)
    token, times = torch.tensor([1000], device=adapter.device), []
    for step in range(steps):
        _, t = timed(lambda s=step: decode_step(adapter, cache, token, prompt_len + s, compiled=COMPILE))
        times.append(t)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument(
        "--methods",
        default="fullkv,snapkv,fastkv",
        help="comma-separated method specs, or 'all' (presets); KV budgets default to retain 0.1, TSP to rate 0.2",
    )
    ap.add_argument("--lengths", default="4096,8192", help="prompt lengths in tokens")
    ap.add_argument("--decode-lengths", default="4096,16384,32704", help="cache lengths for decode timing")
    ap.add_argument("--steps", type=int, default=16, help="decode steps timed (median reported)")
    ap.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--memory", action="store_true", help="measure peak memory (slows the timings: run apart)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--quantize", default="none", choices=["none", "int8", "auto"],
                    help="int8 weight-only linears (transformers then runs through the same ones)")  # fmt: skip
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    ap.add_argument("--compile", action="store_true", help="decode under torch.compile (compiled in the warm-up)")
    ap.add_argument(
        "--prefill-chunks",
        default="0",
        help="comma-separated prefill chunk sizes to run every method with (0: unchunked), e.g. 0,2048",
    )
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    global COMPILE
    COMPILE = args.compile
    if args.memory:
        PeakMemory.enabled = True
        return_freed_memory_to_the_os()
    try:
        chosen = [parse(s, defaults={"retain_rate": 0.1, "tsp_rate": 0.2}) for s in split_specs(args.methods)]
    except ValueError as e:
        ap.error(str(e))
    chunks = [int(x) or None for x in args.prefill_chunks.split(",") if x]
    try:
        model, _ = load(args.model, dtype=args.dtype, device=args.device, progress=False, quantize=args.quantize)
    except ValueError as e:  # a device that is not there, int8 where it cannot run
        ap.error(str(e))
    adapter = adapter_for(model)
    # The model's own binding (on a hybrid model TSP ranks at a global layer); earlier commits bind by layer count.
    bind = getattr(adapter, "bind", lambda m: m.bind(adapter.num_layers))
    # FullKV first: the other ratios need it. Labels are the short names (variants numbered: fastkv#2);
    # the full specs are printed above the table.
    methods: dict = {}
    for method in [FullKV(), *(m for m in chosen if not m.same_parts(FullKV()))]:
        label = method.name if method.name not in methods else f"{method.name}#{len(methods)}"
        methods[label] = bind(method)
    # each method at each chunk size: fastkv/c2048 is FastKV's prefill over chunks of 2048 queries
    runs = {(f"{name}/c{chunk}" if chunk else name): (m, chunk) for chunk in chunks for name, m in methods.items()}
    vocab = model.config.vocab_size
    print(header())
    print(
        f"# {args.model} {args.dtype}{'' if args.quantize == 'none' else ' quantize=' + args.quantize}"
        f"{' compiled decode' if COMPILE else ''}, {args.steps} decode steps (median)"
    )
    for name, method in methods.items():
        print(f"#   {name}: {format_spec(method)}")
    # Warm up kernels and allocator so that the first timed run is not penalised.
    warm = prompt(vocab, 256).to(adapter.device)
    bench_engine(adapter, warm, methods["fullkv"], 2, chunks[0])
    bench_transformers(model, warm, 2)

    results: dict = {"prefill": [], "decode_at": []}
    print(
        "\n/HF: time divided by transformers' (<= 1.05: no slower); x HF: speedup over transformers; "
        "/Full: divided by the engine's FullKV; peak: most memory held beyond the start of the run (--memory)"
    )
    columns = (
        f"{'tokens':>7} {'run':<13} {'prefill s':>9} {'/HF':>5} {'x HF':>5} {'/Full':>5} {'decode ms':>9} "
        f"{'/HF':>5} {'/Full':>5} {'KV MiB':>7} {'/Full':>5} {'peak MiB':>8} {'/Full':>5}"
    )
    print("\n" + columns)
    for length in [int(x) for x in args.lengths.split(",") if x]:
        ids = prompt(vocab, length).to(adapter.device)
        row: dict = {"tokens": length}
        hf_prefill = hf_decode = None
        if not args.no_transformers:
            hf_prefill, hf_decode, hf_peak = bench_transformers(model, ids, args.steps)
            row["transformers"] = {"prefill_s": hf_prefill, "decode_ms": hf_decode, "peak_mib": hf_peak}
            print(
                f"{length:>7} {'transformers':<13} {hf_prefill:>9.2f} {1:>5.2f} {1:>5.2f} {'':>5} {hf_decode:>9.1f} "
                f"{1:>5.2f} {'':>5} {'':>7} {'':>5} {hf_peak:>8.0f}"
            )
        full = None
        for name, (method, chunk) in runs.items():
            p, dms, kv, peak = bench_engine(adapter, ids, method, args.steps, chunk)
            full = full or (p, dms, kv, peak)
            vs_hf = (p / hf_prefill, hf_prefill / p, dms / hf_decode) if hf_prefill else (float("nan"),) * 3
            print(
                f"{length:>7} {name:<13} {p:>9.2f} {vs_hf[0]:>5.2f} {vs_hf[1]:>5.2f} {p / full[0]:>5.2f} "
                f"{dms:>9.1f} {vs_hf[2]:>5.2f} {dms / full[1]:>5.2f} {kv:>7.1f} {kv / full[2]:>5.2f} "
                f"{peak:>8.0f} {peak / full[3]:>5.2f}"
            )
            row[name] = {
                "spec": format_spec(method),
                "chunk": chunk,
                "prefill_s": p,
                "decode_ms": dms,
                "kv_mib": kv,
                "peak_mib": peak,
            }
        results["prefill"].append(row)

    decode_lengths = [int(x) for x in args.decode_lengths.split(",") if x]
    if decode_lengths:
        print(f"\n{'cache':>7} {'full ms':>8} {'10% ms':>8} {'speedup':>8}")
    for length in decode_lengths:
        full_ms = bench_decode_at(adapter, length, length, args.steps)
        small_ms = bench_decode_at(adapter, length, length // 10, args.steps)
        print(f"{length:>7} {full_ms:>8.1f} {small_ms:>8.1f} {full_ms / small_ms:>8.2f}")
        results["decode_at"].append({"cache": length, "full_ms": full_ms, "ten_percent_ms": small_ms})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
