"""Summaries of an evaluation: metrics.json (per run label), summary.md and summary.csv.

A run label is `model | setting dtype | canonical spec` (`store.Run.label`); every run is compared with
FullKV and SnapKV run on the same samples and settings (paired differences with bootstrap intervals).
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

from ..methods.spec import short_spec
from .paired import paired_difference, reference_for
from .provenance import update_record
from .store import FULL, Run, RunKey


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(rows: list[dict], timings: dict[str, dict] | None = None) -> dict:
    """{run label: {"tasks": {task: mean score %}, "average": ..., "agreement": %, "kl": mean, ...}}.

    prefill_s: the mean over rows that timed the method alone, else its time in `timings` (timings.json);
    prefill_speedup: FullKV's prefill_s over the method's, in the same model and setting.
    """
    timings = timings or {}
    groups: dict[Run, list[dict]] = defaultdict(list)
    for row in rows:
        groups[RunKey.of(row).run()].append(row)
    contexts: dict[str, list[dict]] = defaultdict(list)
    for run, group in groups.items():
        contexts[run.context] += group
    out: dict[Run, dict] = {}
    for run, group in sorted(groups.items(), key=lambda kv: kv[0].label):
        by_task: dict[str, list[float]] = defaultdict(list)
        for row in group:
            by_task[row["task"]].append(row["score"])
        tasks = {t: 100 * sum(v) / len(v) for t, v in sorted(by_task.items())}
        entry = {
            "tasks": tasks,
            "average": sum(tasks.values()) / len(tasks),
            "samples": len(group),
            "kv_ratio": sum(r["kv_ratio"] for r in group) / len(group),
            "kv_bytes": mean([r["kv_bytes"] for r in group if "kv_bytes" in r]),  # rows before it was recorded
            # prefill time of a method alone; rows from a shared prefill do not tell it
            "prefill_s": mean([r["prefill_s"] for r in group if r.get("prefill_shared_by", 1) == 1])
            or timings.get(run.label, {}).get("prefill_s"),
        }
        compared = [r for r in group if "agrees_with_fullkv" in r]
        if compared:
            entry["agreement"] = 100 * sum(r["agrees_with_fullkv"] for r in compared) / len(compared)
            entry["first_token_kl"] = sum(r["first_token_kl"] for r in compared) / len(compared)
        # paired differences against FullKV and SnapKV run on the same samples and settings
        context = contexts[run.context]
        specs = list(dict.fromkeys(r["method"] for r in context))
        for preset in (FULL, "snapkv"):
            ref = reference_for(run.method, specs, preset)
            if ref is not None and ref != run.method:
                diff = paired_difference(group, [r for r in context if r["method"] == ref])
                if diff is not None:
                    entry[f"vs_{preset}"] = diff
        out[run] = entry
    for run, entry in out.items():
        full = out.get(run.with_method(FULL), {}).get("prefill_s")
        if full and entry["prefill_s"]:
            entry["prefill_speedup"] = full / entry["prefill_s"]
    return {run.label: entry for run, entry in out.items()}


def interval(diff: dict | None) -> str:
    return "-" if diff is None else f"{diff['diff']:+.1f} [{diff['low']:+.1f}, {diff['high']:+.1f}]"


OVERALL = ["average", "vs SnapKV [95% CI]", "vs FullKV [95% CI]", "agreement %", "first-token KL", "KV share"]
OVERALL += ["prefill s", "prefill x FullKV"]


def overall(m: dict) -> list[str]:
    """A run's cells under OVERALL."""
    return [
        f"{m['average']:.1f}",
        interval(m.get("vs_snapkv")),
        interval(m.get("vs_fullkv")),
        f"{m['agreement']:.0f}" if "agreement" in m else "-",
        f"{m['first_token_kl']:.4f}" if "first_token_kl" in m else "-",
        f"{m['kv_ratio']:.3f}",
        f"{m['prefill_s']:.1f}" if m["prefill_s"] is not None else "shared",
        f"{m['prefill_speedup']:.2f}" if "prefill_speedup" in m else "-",
    ]


def shorter(spec: str) -> str:
    """short_spec, or the spec as it is where it does not parse (rows from before canonical specs)."""
    try:
        return short_spec(spec)
    except (ValueError, KeyError):
        return spec


def markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table (labels and specs hold no "|")."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def write_reports(out: Path, metrics: dict, config: dict, started: float | None) -> None:
    """Write metrics.json, summary.md/.csv and run.json; `started` None rebuilds without adding time."""
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    tasks = sorted({t for m in metrics.values() for t in m["tasks"]})
    header = ["model", "setting", "method", *tasks, *OVERALL]
    rows, compact = [], []
    for label, m in metrics.items():
        model, setting, method = Run.parse(label)
        cells = [f"{m['tasks'][t]:.1f}" if t in m["tasks"] else "" for t in tasks]
        rows.append([model, setting, method, *cells, *overall(m)])
        compact.append([setting, shorter(method), *overall(m)])
    with open(out / "summary.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    # summary.md: a compact table first (specs without their default knobs), then every task and full spec
    lines = ["## Summary", "", *markdown(["setting", "method", *OVERALL], compact), ""]
    lines += ["## Per task, with canonical specs", "", *markdown(header, rows)]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    if started is not None or not (out / "run.json").exists():
        update_record(out, config, started, new_command=False)
