"""Where an evaluation's results live, and how a run resumes: one row per `RunKey` in predictions.jsonl.

A row's key is everything that would change it: the model, the setting (a length, "niah", ...), the run's
other choices (`settings`: dtype, chat template, seed, ...), the canonical method spec, the task and the
item. A rerun skips every key that is there, so an interrupted run resumes where it stopped, and a run with
another knob or setting is computed and labelled apart. FullKV's first-token logits of each item are kept
in logits/, so that fidelity to FullKV survives a resume.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

FULL = "fullkv"


def digest(settings: dict, length: int = 8) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:length]


@dataclass(frozen=True)
class RunKey:
    """What identifies one result row."""

    model: str
    setting: str
    settings: str  # the run's other choices, as sorted JSON (hashable)
    method: str  # canonical spec
    task: str
    index: int

    @classmethod
    def of(cls, row: dict) -> RunKey:
        settings = json.dumps(row.get("settings", {}), sort_keys=True)
        return cls(row["model"], row["setting"], settings, row["method"], row["task"], row["index"])

    def run(self) -> Run:
        return Run(self.model, self.setting, json.loads(self.settings).get("dtype"), self.method)


@dataclass(frozen=True, order=True)
class Run:
    """One method's run within a model and setting: what the summaries group by. Its `label` is how
    metrics.json and the tables name it."""

    model: str
    setting: str
    dtype: str | None
    method: str

    @property
    def context(self) -> str:
        """model | setting (and dtype): the runs that compare with each other."""
        return f"{self.model} | {self.setting}{f' {self.dtype}' if self.dtype else ''}"

    @property
    def label(self) -> str:
        return f"{self.context} | {self.method}"

    def with_method(self, method: str) -> Run:
        return Run(self.model, self.setting, self.dtype, method)

    @staticmethod
    def parse(label: str) -> tuple[str, str, str]:
        """(model, setting with its dtype, method) of a label that `label` wrote."""
        model, rest = label.split(" | ", 1)
        setting, method = rest.rsplit(" | ", 1)
        return model, setting, method


class Store:
    """An output directory's predictions.jsonl and logits/."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        (self.out / "logits").mkdir(parents=True, exist_ok=True)
        self.path = self.out / "predictions.jsonl"
        self.rows: dict[RunKey, dict] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    self.rows[RunKey.of(row)] = row

    def has(self, key: RunKey) -> bool:
        return key in self.rows

    def get(self, key: RunKey) -> dict | None:
        return self.rows.get(key)

    def put(self, row: dict) -> bool:
        """Append a row (a newer row for the same key wins on reading); True if its key is new."""
        key = RunKey.of(row)
        new = key not in self.rows
        self.rows[key] = row
        with open(self.path, "a") as sink:
            sink.write(json.dumps(row) + "\n")
        return new

    def logits_path(self, model: str, setting: str, settings: dict, task: str, index: int) -> Path:
        """The file that holds FullKV's first-token logits for one item of a run."""
        return self.out / "logits" / logits_name(model, setting, settings, task, index)


def logits_name(model: str, setting: str, settings: dict, task: str, index: int) -> str:
    return f"{model.replace('/', '_')}-{setting}-{digest(settings)}-{task}-{index}.pt"
