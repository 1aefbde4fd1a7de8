"""Per-model FastKV defaults, found by `fastkv calibrate` and stored as small JSON profiles.

A profile is looked up by model name: first in the user's cache (`$FASTKV_CACHE/profiles/NAME.json`,
written by `fastkv calibrate`), then among the profiles shipped in the package (`fastkv/profiles/`).

The rule: on a model with a profile, every knob of the `fastkv` preset that you leave unset takes the
profile's value, whether the method is a spec string or a preset object (`"fastkv"`, `FastKV()`, and the
left side of `fastkv+adakv` or `FastKV() + AdaKV()` alike); knobs you set always win.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .paths import cache_root

PRESET = "fastkv"


@dataclass
class Profile:
    model: str
    knobs: dict  # knobs of the fastkv preset
    path: str
    record: dict  # everything calibration measured, for reports

    @property
    def source(self) -> str:
        created = self.record.get("created", "?")
        return f"profile {self.model} (calibrated {created}, {self.path})"


def user_path(model: str) -> Path:
    return cache_root() / "profiles" / f"{safe(model)}.json"


def safe(model: str) -> str:
    return model.replace("/", "_")


def find(model: str | None) -> Profile | None:
    """The profile of `model`: the user's, else the shipped one, else None."""
    if not model:
        return None
    shipped = resources.files("fastkv") / "profiles" / f"{safe(model)}.json"
    for path in (user_path(model), shipped):
        if path.is_file():
            return read(path)
    return None


def read(path) -> Profile:
    record = json.loads(Path(str(path)).read_text())
    return Profile(model=record["model"], knobs=record["knobs"], path=str(path), record=record)
