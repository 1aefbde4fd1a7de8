"""Per-model FastKV defaults, found by `fastkv calibrate` and stored as small JSON profiles.

A profile is looked up by model name: first in the user's cache (`$FASTKV_CACHE/profiles/NAME.json`,
written by `fastkv calibrate`), then among the profiles shipped in the package (`fastkv/profiles/`).
A profile's `source` names it by model, origin ("shipped" or "user") and date, never by its file: it
travels in results and in the server's answers, and a path there would tell clients about this machine.

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
    path: str  # where it lives on this machine: for local display only (`source` leaves it out)
    record: dict  # everything calibration measured, for reports
    origin: str = ""  # "shipped" (in the package), "user" (the user's cache), "" (a file read from elsewhere)

    @property
    def source(self) -> str:
        """Where FastKV's defaults came from, as results and the server report it: no path (`path` has it)."""
        created = self.record.get("created", "?")
        origin = f"{self.origin}, " if self.origin else ""
        # A knob changed by hand after calibration, on evidence calibration's prompts could not give
        # (`amended`: date, knobs, what they were, why, where the evidence is), is said with its date.
        amended = self.record.get("amended") or []
        since = f", amended {amended[-1]['date']}" if amended else ""
        return f"profile {label(self.model)} ({origin}calibrated {created}{since})"


def label(model: str) -> str:
    """A model's name as `source` shows it: for a local model named by its path, the last folder's name
    (a hub id such as "Qwen/Qwen2.5-0.5B" stays whole)."""
    name = str(model)
    if not name.startswith(("/", "~", ".")) and "\\" not in name:
        return name
    return name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] or "local model"


def user_path(model: str) -> Path:
    return cache_root() / "profiles" / f"{safe(model)}.json"


def shipped_dir() -> Path:
    return Path(str(resources.files("fastkv") / "profiles"))


def origin_of(path) -> str:
    """Whose profile file this is: "shipped" (among the package's profiles), "user" (the user's cache), or ""."""
    where = Path(str(path)).resolve().parent
    for origin, folder in (("shipped", shipped_dir()), ("user", user_path("x").parent)):
        if where == folder.resolve():
            return origin
    return ""


def safe(model: str) -> str:
    return model.replace("/", "_")


def find(model: str | None) -> Profile | None:
    """The profile of `model`: the user's, else the shipped one, else None."""
    if not model:
        return None
    shipped = shipped_dir() / f"{safe(model)}.json"
    for path, origin in ((user_path(model), "user"), (shipped, "shipped")):
        if path.is_file():
            return read(path, origin)
    return None


def read(path, origin: str | None = None) -> Profile:
    """The profile in a file; origin: "shipped" or "user" (None: told by the folder it is in, `origin_of`)."""
    record = json.loads(Path(str(path)).read_text())
    origin = origin_of(path) if origin is None else origin
    return Profile(model=record["model"], knobs=record["knobs"], path=str(path), record=record, origin=origin)
