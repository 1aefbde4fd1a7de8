"""Run evaluation items under many methods, resumably, with fidelity to FullKV.

Output directory (see `store`, `report`, `provenance`):
- `predictions.jsonl`: one row per `RunKey`, appended as it is produced; `method` is the canonical spec
  (every knob resolved) and `settings` the run's other choices (dtype, chat template, seed, ...);
- `metrics.json`, `summary.md`, `summary.csv`: mean score per task and on average, fidelity to FullKV and
  paired differences, per run label;
- `run.json`: config, the commands that produced the directory, package versions, machine, duration;
- `logits/`: FullKV first-token logits per item, so fidelity survives a resume;
- `timings.json`: each method's prefill timed alone, side by side (`timing`).

Methods run exactly as their canonical specs say: a model's calibrated profile is not applied here.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..methods import FullKV, Method
from . import timing
from .metrics import first_token_kl
from .provenance import update_record
from .report import summarize, write_reports
from .store import FULL, RunKey, Store


@dataclass
class Item:
    """One prompt to answer: already rendered (chat template applied or not), with its scorer."""

    task: str
    index: int
    prompt: str
    special_tokens: bool  # add the tokenizer's special tokens when encoding (False after a chat template)
    max_tokens: int
    references: list[str]
    scorer: Callable[[str], float]
    meta: dict = field(default_factory=dict)


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

    from ..console import err

    out = Path(out_dir)
    store = Store(out)
    settings = settings or {}
    tag = json.dumps(settings, sort_keys=True)
    specs = [FULL] + [m for m in methods if m != FULL]
    methods = {FULL: methods.get(FULL, FullKV()), **methods}

    def key(spec: str, item: Item) -> RunKey:
        return RunKey(model_name, setting, tag, spec, item.task, item.index)

    started = time.time()
    update_record(out, config, started, new_command=True)
    if shared and time_prefill and items:
        labels = {spec: key(spec, items[0]).run().label for spec in specs}
        _time_missing(llm, out, items[0], labels, methods)
    todo = sum(not store.has(key(spec, it)) for it in items for spec in specs)
    jobs = []
    for item in items:
        logits_path = store.logits_path(model_name, setting, settings, item.task, item.index)
        pending = [
            spec
            for spec in specs
            if not store.has(key(spec, item)) or (spec == FULL and not logits_path.exists() and len(specs) > 1)
        ]
        if pending:
            ids = llm.tokenizer(item.prompt, add_special_tokens=item.special_tokens)["input_ids"]
            options = {"max_tokens": item.max_tokens, "seed": seed}
            jobs.append(Job(item, ids, pending, [methods[spec] for spec in pending], options, logits_path))
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn())  # fmt: skip
    answer = answer or LocalAnswer(llm, shared)
    with Progress(*columns, disable=not progress, console=err) as bar:
        name = Path(model_name).name  # a local model's folder, not its whole path: the bar keeps its columns
        task_id = bar.add_task(f"{name} {setting}", total=todo)
        for job, results in answer(jobs, lambda j: bar.update(task_id, description=f"{name} {setting} {j}")):
            item = job.item
            full_answer = (store.get(key(FULL, item)) or {}).get("prediction")
            full_logits = torch.load(job.logits_path) if job.logits_path.exists() else None
            for spec, result in zip(job.specs, results, strict=True):  # FullKV first, when pending
                row = _row(model_name, setting, settings, spec, item, result)
                if spec == FULL:
                    full_answer, full_logits = result.text, result.first_logits.cpu()
                    torch.save(full_logits, job.logits_path)
                else:
                    row["agrees_with_fullkv"] = result.text.strip() == (full_answer or "").strip()
                    row["first_token_kl"] = first_token_kl(full_logits, result.first_logits.cpu())
                if store.put(row):
                    bar.advance(task_id)
    metrics = summarize(list(store.rows.values()), timing.load(out))
    write_reports(out, metrics, config, started)
    return metrics


def _row(model: str, setting: str, settings: dict, spec: str, item: Item, result) -> dict:
    s = result.stats
    return {
        "model": model,
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


def _time_missing(llm, out: Path, item: Item, labels: dict[str, str], methods: dict[str, Method]) -> None:
    """If a method has no time in timings.json yet, time all of this run's methods again, side by side."""
    known = timing.load(out)
    if all(label in known for label in labels.values()):
        return
    ids = llm.tokenizer(item.prompt, add_special_tokens=item.special_tokens)["input_ids"]
    times = timing.time_prefills(llm.adapter, ids, {spec: methods[spec] for spec in labels})
    timing.record(out, labels, times, len(ids), f"{item.task}/{item.index}")
