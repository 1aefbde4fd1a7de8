"""Measured prefill time of each method alone, for evaluations that share one prefill among methods.

A shared prefill (`generate_many`) answers every method at a fraction of the cost, but it cannot say how
long each method's own prefill takes. So a run times each method once, alone and one after the other in
the same process, on its first item (after a warm-up), and keeps the times in `timings.json` beside the
predictions. The summaries then show each method's prefill seconds and its speedup over FullKV's from
those side-by-side measurements. A resumed run times only methods not timed yet.

timings.json: {run label (model | setting dtype | spec): {"prefill_s", "prompt_tokens", "item"}}.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..cache import KVCache
from ..decode import decode_step
from ..engine import prefill
from ..methods import Method

FILE = "timings.json"


def load(out: Path) -> dict[str, dict]:
    path = out / FILE
    return json.loads(path.read_text()) if path.exists() else {}


@torch.inference_mode()
def time_prefills(adapter, input_ids: list[int], methods: dict[str, Method]) -> dict[str, float]:
    """Seconds of `prefill` for each method alone on one prompt, FullKV first, after a short warm-up."""
    ids = torch.tensor([input_ids], device=adapter.device)
    first = next(iter(methods.values()))
    prefill(adapter, ids[:, :256], first)  # warm kernels and the allocator: the first timed run is not penalised
    times = {}
    for spec, method in methods.items():
        start = time.perf_counter()
        prefill(adapter, ids, method)
        if adapter.device.type == "cuda":
            torch.cuda.synchronize(adapter.device)
        times[spec] = time.perf_counter() - start
    return times


def record(out: Path, labels: dict[str, str], times: dict[str, float], prompt_tokens: int, item: str) -> None:
    """Add measured times (by spec) to timings.json under their run labels (`labels`: spec -> label)."""
    found = load(out)
    for spec, seconds in times.items():
        found[labels[spec]] = {"prefill_s": round(seconds, 3), "prompt_tokens": prompt_tokens, "item": item}
    (out / FILE).write_text(json.dumps(found, indent=2, sort_keys=True) + "\n")


@dataclass(frozen=True)
class DecodeTiming:
    """Seconds per decode step: the median of the timed steps, and their spread: the interquartile range over
    the median (a rare stall of the host, which the median ignores, does not count as spread)."""

    median: float
    spread: float
    steps: int


@torch.inference_mode()
def time_decode(adapter, cache: KVCache, steps: int, warmup: int = 4, compiled: bool = False) -> DecodeTiming:
    """Time `steps` decode steps on `cache` (which they fill: give a copy), after `warmup` untimed ones that
    warm the kernels and the allocator. The same token every step: its value does not change the work."""
    if steps < 2 or warmup < 0 or cache.room < steps + warmup:
        raise ValueError(f"need steps >= 2, warmup >= 0 and room for both in the cache ({cache.room})")
    device = adapter.device
    token = torch.zeros(cache.keys[0].shape[0], dtype=torch.long, device=device)
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        decode_step(adapter, cache, token, cache.position_base + cache.steps, compiled)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    quartiles = statistics.quantiles(times, n=4)
    median = statistics.median(times)
    return DecodeTiming(median, (quartiles[-1] - quartiles[0]) / median, steps)
