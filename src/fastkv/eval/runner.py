"""Run evaluation items under many methods, with resume, fidelity to FullKV, and summaries.

Output directory:
- `predictions.jsonl`: one line per (model, setting, settings, method, task, index), appended as it is
  produced; `method` is the canonical spec (every knob resolved) and `settings` the run's other choices
  (dtype, chat template, seed, ...). A rerun skips exactly what is there, so an interrupted run resumes
  where it stopped, and a run with another knob or setting is computed and labelled apart.
- `metrics.json`: mean score per task and on average, plus fidelity to FullKV, per run label.
- `summary.md`, `summary.csv`: the same as tables.
- `run.json`: config, the commands that produced the directory, package versions, machine, duration.
- `logits/`: FullKV first-token logits per item, so fidelity survives a resume.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import platform
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from ..methods import FullKV, Method
from ..methods.spec import short_spec
from . import timing
from .paired import paired_difference, reference_for


@dataclass
class Item:
    """One prompt to answer: already rendered (chat template applied or not), with its scorer."""

    task: str
    index: int
    prompt: str
    special_tokens: bool  # add the tokenizer's special tokens when encoding (False after a chat template)
    max_new_tokens: int
    references: list[str]
    scorer: Callable[[str], float]
    meta: dict = field(default_factory=dict)


def first_token_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """KL(P_ref || P) of two next-token distributions given as logits [V]."""
    ref = reference_logits.float().log_softmax(-1)
    other = logits.float().log_softmax(-1)
    return float((ref.exp() * (ref - other)).sum())


def versions() -> dict[str, str]:
    found = {}
    for name in ("fastkv", "torch", "transformers", "gguf", "safetensors"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": sys.version.split()[0],
    }


def _key(row: dict) -> tuple:
    settings = json.dumps(row.get("settings", {}), sort_keys=True)
    return (row["model"], row["setting"], settings, row["method"], row["task"], row["index"])


def logits_name(model: str, setting: str, settings: dict, task: str, index: int) -> str:
    """The file in logits/ that holds FullKV's first-token logits for one item of a run."""
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return f"{model.replace('/', '_')}-{setting}-{digest}-{task}-{index}.pt"


def label_of(model: str, setting: str, settings: dict, spec: str) -> str:
    """A run's label in the summaries: model | setting (and dtype) | canonical method spec."""
    dtype = settings.get("dtype")
    return f"{model} | {setting}{f' {dtype}' if dtype else ''} | {spec}"


def run_label(row: dict) -> str:
    return label_of(row["model"], row["setting"], row.get("settings", {}), row["method"])


@dataclass
class Job:
    """One item's pending methods: what a worker computes (ids, methods, options) and what the rows need."""

    item: Item
    ids: list[int]
    specs: list[str]  # canonical specs, FullKV first when pending
    methods: list[Method]
    options: dict
    logits_path: Path

    def __str__(self) -> str:
        return f"{self.item.task} {self.item.index}"


# answer(jobs, on_start) yields (job, one GenerationResult per spec) as jobs finish, in any order;
# on_start(job) is called when a job begins (progress display).
Answer = Callable[[list[Job], Callable[[Job], None]], Iterator[tuple[Job, list]]]


class LocalAnswer:
    """Compute jobs in this process, in order: one shared prefill per item (`LLM.generate_many`), or each
    method alone (shared=False)."""

    def __init__(self, llm, shared: bool = True) -> None:
        self.llm, self.shared = llm, shared

    def __call__(self, jobs: list[Job], on_start: Callable[[Job], None]) -> Iterator[tuple[Job, list]]:
        for job in jobs:
            on_start(job)
            if self.shared:
                yield job, self.llm.generate_many(job.ids, job.methods, **job.options)
            else:
                yield job, [self.llm.generate(job.ids, m, **job.options) for m in job.methods]


def run(
    llm,
    model_name: str,
    setting: str,
    methods: dict[str, Method],
    items: Sequence[Item],
    out_dir: str | Path,
    config: dict,
    progress: bool = True,
    seed: int = 0,
    settings: dict | None = None,
    shared: bool = True,
    time_prefill: bool = True,
    answer: Answer | None = None,
) -> dict:
    """Answer every item under every method (FullKV first, for fidelity); return the metrics.

    `methods` maps canonical specs to bound methods; `settings` (JSON-able) is part of every result's key.
    shared: one prefill serves all methods of an item (`generate_many`; the same answers, a fraction of
    the time); each row's prefill_s is then the shared prefill's. False times every method alone.
    time_prefill (shared runs): time each method's prefill alone once, on the first item (`timing.py`).
    answer: what computes the pending (item, methods) jobs; default: this process, one job after the other
    (`LocalAnswer`); `fastkv.eval.distributed.RayAnswer` spreads them over a Ray cluster. Rows are written
    here, as each job's results come back, so a job lost with its worker is simply not done yet.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    out = Path(out_dir)
    (out / "logits").mkdir(parents=True, exist_ok=True)
    pred_path = out / "predictions.jsonl"
    done: dict[tuple, dict] = {}
    if pred_path.exists():
        for line in pred_path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                done[_key(row)] = row
    settings = settings or {}
    tag = json.dumps(settings, sort_keys=True)
    labels = ["fullkv"] + [m for m in methods if m != "fullkv"]
    methods = {"fullkv": methods.get("fullkv", FullKV()), **methods}
    started = time.time()
    update_record(out, config, started, new_command=True)
    if shared and time_prefill and items:
        specs = {spec: label_of(model_name, setting, settings, spec) for spec in labels}
        _time_missing(llm, out, items[0], specs, methods)
    todo = sum((model_name, setting, tag, m, it.task, it.index) not in done for it in items for m in labels)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    jobs = []
    for item in items:
        logits_path = out / "logits" / logits_name(model_name, setting, settings, item.task, item.index)
        has_logits = logits_path.exists()
        pending = [
            spec
            for spec in labels
            if (model_name, setting, tag, spec, item.task, item.index) not in done
            or (spec == "fullkv" and not has_logits and len(labels) > 1)
        ]
        if pending:
            ids = llm.tokenizer(item.prompt, add_special_tokens=item.special_tokens)["input_ids"]
            options = {"max_new_tokens": item.max_new_tokens, "seed": seed}
            jobs.append(Job(item, ids, pending, [methods[spec] for spec in pending], options, logits_path))
    answer = answer or LocalAnswer(llm, shared)
    with Progress(*columns, disable=not progress) as bar, open(pred_path, "a") as sink:
        task_id = bar.add_task(f"{model_name} {setting}", total=todo)
        for job, results in answer(jobs, lambda j: bar.update(task_id, description=f"{model_name} {setting} {j}")):
            item = job.item
            full_answer = done.get((model_name, setting, tag, "fullkv", item.task, item.index), {}).get("prediction")
            full_logits = torch.load(job.logits_path) if job.logits_path.exists() else None
            for spec, result in zip(job.specs, results, strict=True):  # FullKV first, when pending
                key = (model_name, setting, tag, spec, item.task, item.index)
                s = result.stats
                row = {
                    "model": model_name,
                    "setting": setting,
                    "settings": settings,
                    "method": spec,
                    "task": item.task,
                    "index": item.index,
                    "prediction": result.text,
                    "references": item.references,
                    "score": item.scorer(result.text),
                    "prompt_tokens": s.prompt_tokens,
                    "prefill_s": round(s.prefill_seconds, 3),
                    "prefill_shared_by": s.prefill_shared_by,
                    "decode_tok_s": round(s.decode_tokens_per_s, 3),
                    "kv_ratio": round(s.kv_ratio, 4),
                    "kv_bytes": s.kv_bytes,
                    **item.meta,
                }
                if spec == "fullkv":
                    full_answer, full_logits = result.text, result.first_logits.cpu()
                    torch.save(full_logits, job.logits_path)
                else:
                    row["agrees_with_fullkv"] = result.text.strip() == (full_answer or "").strip()
                    row["first_token_kl"] = first_token_kl(full_logits, result.first_logits.cpu())
                if key not in done:
                    bar.advance(task_id)
                done[key] = row
                sink.write(json.dumps(row) + "\n")
                sink.flush()
    metrics = summarize(list(done.values()), timing.load(out))
    write_reports(out, metrics, config, started)
    return metrics


def _time_missing(llm, out: Path, item: Item, labels: dict[str, str], methods: dict[str, Method]) -> None:
    """If a method has no time in timings.json yet, time all of this run's methods again, side by side."""

    known = timing.load(out)
    if all(label in known for label in labels.values()):
        return
    ids = llm.tokenizer(item.prompt, add_special_tokens=item.special_tokens)["input_ids"]
    times = timing.time_prefills(llm.parts, ids, {spec: methods[spec] for spec in labels})
    timing.record(out, labels, times, len(ids), f"{item.task}/{item.index}")


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(rows: list[dict], timings: dict[str, dict] | None = None) -> dict:
    """{run label: {"tasks": {task: mean score %}, "average": ..., "agreement": %, "kl": mean, ...}}.

    prefill_s: the mean over rows that timed the method alone, else its time in `timings` (timings.json);
    prefill_speedup: FullKV's prefill_s over the method's, in the same model and setting.
    """
    timings = timings or {}
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[run_label(row)].append(row)
    out = {}
    for label, group in sorted(groups.items()):
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
            or timings.get(label, {}).get("prefill_s"),
        }
        compared = [r for r in group if "agrees_with_fullkv" in r]
        if compared:
            entry["agreement"] = 100 * sum(r["agrees_with_fullkv"] for r in compared) / len(compared)
            entry["first_token_kl"] = sum(r["first_token_kl"] for r in compared) / len(compared)
        # paired differences against FullKV and SnapKV run on the same samples and settings
        context = [r for r in rows if run_label(r).rsplit(" | ", 1)[0] == label.rsplit(" | ", 1)[0]]
        specs = list(dict.fromkeys(r["method"] for r in context))
        for preset in ("fullkv", "snapkv"):
            ref = reference_for(group[0]["method"], specs, preset)
            if ref is not None and ref != group[0]["method"]:
                diff = paired_difference(group, [r for r in context if r["method"] == ref])
                if diff is not None:
                    entry[f"vs_{preset}"] = diff
        out[label] = entry
    for label, entry in out.items():
        full = out.get(label.rsplit(" | ", 1)[0] + " | fullkv", {}).get("prefill_s")
        if full and entry["prefill_s"]:
            entry["prefill_speedup"] = full / entry["prefill_s"]
    return out


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
    rows = [
        label.split(" | ") + [f"{m['tasks'][t]:.1f}" if t in m["tasks"] else "" for t in tasks] + overall(m)
        for label, m in metrics.items()
    ]
    with open(out / "summary.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    # summary.md: a compact table first (specs without their default knobs), then every task and full spec
    compact = [
        [*label.rsplit(" | ", 2)[1:2], shorter(label.rsplit(" | ", 1)[1]), *overall(m)] for label, m in metrics.items()
    ]
    lines = ["## Summary", "", *markdown(["setting", "method", *OVERALL], compact), ""]
    lines += ["## Per task, with canonical specs", "", *markdown(header, rows)]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    if started is not None or not (out / "run.json").exists():
        update_record(out, config, started, new_command=False)


def update_record(out: Path, config: dict, started: float | None, new_command: bool) -> None:
    """run.json: the commands that added to this directory, versions, machine, and the time spent.

    A run records its command when it starts (so that a stopped run still says how it was made) and adds
    its duration when it ends.
    """
    previous = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
    now = time.time()
    commands = previous.get("commands", [])
    record = {
        # every invocation that added to this directory, in order (a resume with more methods adds one)
        "commands": [*commands, " ".join(sys.argv)] if new_command or not commands else commands,
        "config": config,
        "versions": versions(),
        "machine": machine(),
        "started": previous.get("started", time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started or now))),
        "duration_s": previous.get("duration_s", 0.0) + (0 if new_command else now - (started or now)),
    }
    (out / "run.json").write_text(json.dumps(record, indent=2) + "\n")
