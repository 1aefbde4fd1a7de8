"""Paired differences: a method against a reference on the same samples, with a bootstrap 95% interval.

Comparing two averages over few samples is noisy; the difference per sample is much less so. The
difference is macro-averaged like the scores (mean over tasks of the mean difference per task), and the
interval resamples the samples of each task with replacement (stratified bootstrap, fixed seed).
"""

from __future__ import annotations

import random
import re
from collections import defaultdict

ROUNDS = 2000


def paired_difference(rows: list[dict], reference: list[dict]) -> dict | None:
    """Mean difference in points (method - reference) over samples both have, and its 95% interval."""
    ref = {(r["task"], r["index"]): r["score"] for r in reference}
    by_task: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        if (r["task"], r["index"]) in ref:
            by_task[r["task"]].append(100 * (r["score"] - ref[(r["task"], r["index"])]))
    if not by_task:
        return None

    def macro(samples: dict[str, list[float]]) -> float:
        return sum(sum(v) / len(v) for v in samples.values()) / len(samples)

    rng = random.Random(0)
    rounds = sorted(macro({t: [rng.choice(v) for _ in v] for t, v in by_task.items()}) for _ in range(ROUNDS))
    return {
        "diff": macro(by_task),
        "low": rounds[int(0.025 * ROUNDS)],
        "high": rounds[int(0.975 * ROUNDS) - 1],
        "pairs": sum(len(v) for v in by_task.values()),
    }


def reference_for(spec: str, specs: list[str], preset: str) -> str | None:
    """The `preset` run to pair `spec` with: the one at the same KV budget if there is one, else the first."""
    candidates = [s for s in specs if s == preset or s.startswith(f"{preset}(")]
    budget = re.search(r"(retain_rate|budget)=[0-9.]+", spec.split("+")[-1])
    same = [s for s in candidates if budget and budget.group(0) in s]
    return (same or candidates or [None])[0]
