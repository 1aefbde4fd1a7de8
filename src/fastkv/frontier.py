"""A model's measured speed/fidelity frontier, and `max_loss`: accuracy as the knob users set.

A frontier is built from evaluation directories (`fastkv eval ruler`, ...: their metrics.json) by
`fastkv eval frontier`. For every setting that ran in all of them it records the loss against FullKV (points
of the suites' average score, FullKV minus the setting, paired over the same samples, with its 95% interval)
and the cost: prefill speed-up over FullKV (each method timed alone, side by side) and the KV cache's share
of the prompt. A setting is on the Pareto frontier when no other one is both faster and loses less.

`fastkv(max_loss=0.02)` runs the fastest FastKV setting of the model's shipped (or the user's) frontier whose
measured loss is at most 2 points: among those within 5% of the highest prefill speed-up (one timing each),
the one that loses least, then the one with the smallest cache.
A bound that no FastKV setting meets is refused, naming the closest; a model with no frontier says so and
runs the paper's settings.

Files: `fastkv/profiles/NAME.frontier.json` (shipped) or `$FASTKV_CACHE/profiles/NAME.frontier.json` (the
user's, which wins), beside the model's profile.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from .profiles import safe, shipped_dir, user_path

SUFFIX = ".frontier.json"
# Speed-ups within 5% of the fastest count as equal when picking: each is one timing (1.76x against 1.78x is
# noise), and among equally fast settings the one that loses least is the one to run.
SAME_SPEED = 0.95
MAX_LOSS = re.compile(r"(?:(?<=\()|,\s*)max_loss\s*=\s*([^,()]+)")


@dataclass(frozen=True)
class Setting:
    """One method setting as measured: the loss is in points of the suites' average score (0-100)."""

    spec: str  # canonical spec, every knob as it ran
    score: float
    loss: float  # FullKV's average minus this one's, paired
    loss_low: float  # the loss's 95% interval
    loss_high: float
    prefill_speedup: float  # x FullKV, each alone, side by side
    kv_share: float  # the cache after prefill, as a share of FullKV's

    @property
    def preset(self) -> str:
        return self.spec.split("(")[0]

    def describe(self) -> str:
        return (
            f"{self.spec}: loss {self.loss:.1f} points (95% CI {self.loss_low:.1f} to {self.loss_high:.1f}), "
            f"prefill {self.prefill_speedup:.2f}x, KV {100 * self.kv_share:.0f}%"
        )


@dataclass(frozen=True)
class Frontier:
    model: str
    suite: str  # what the losses were measured on (suites, length, samples, dtype)
    machine: str  # where the speed-ups were measured
    created: str
    settings: tuple[Setting, ...]

    def fastest_first(self) -> list[Setting]:
        """Every setting by prefill speed-up, then the smaller cache, then the smaller loss."""
        return sorted(self.settings, key=lambda s: (-s.prefill_speedup, s.kv_share, s.loss))

    def pareto(self) -> list[Setting]:
        """The settings no other one beats on both loss and prefill speed-up, fastest first."""
        kept: list[Setting] = []
        for s in self.fastest_first():
            if not kept or s.loss < min(k.loss for k in kept):
                kept.append(s)
        return kept

    def pick(self, max_loss: float, preset: str = "fastkv") -> Setting:
        """The fastest `preset` setting whose loss is at most `max_loss` (a share: 0.02 is 2 points).
        ValueError names the closest setting when none qualifies."""
        check_bound(max_loss)
        candidates = [s for s in self.settings if s.preset == preset]
        if not candidates:
            raise ValueError(f"the frontier of {self.model} holds no {preset} setting")
        within = [s for s in candidates if s.loss <= 100 * max_loss + 1e-9]
        if within:
            top = max(s.prefill_speedup for s in within)
            fastest = [s for s in within if s.prefill_speedup >= SAME_SPEED * top]
            return min(fastest, key=lambda s: (s.loss, s.kv_share, -s.prefill_speedup))
        closest = min(candidates, key=lambda s: (s.loss, s.kv_share))
        enough = math.ceil(closest.loss * 10) / 1000  # a bound that admits it, rounded up
        raise ValueError(
            f"no measured {preset} setting of {self.model} loses at most {100 * max_loss:.1f} points "
            f"({self.suite}); the closest is {closest.describe()}: ask for max_loss >= "
            f"{enough:.3f}, or run fullkv"
        )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        record = {**asdict(self), "settings": [asdict(s) for s in self.settings]}
        path.write_text(json.dumps(record, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Frontier:
        record = json.loads(Path(path).read_text())
        settings = tuple(Setting(**s) for s in record.pop("settings"))
        return cls(**record, settings=settings)


def user_file(model: str) -> Path:
    """Where `fastkv eval frontier --install` puts a model's frontier: beside the user's profiles."""
    return user_path(model).with_name(safe(model) + SUFFIX)


def find(model: str | None) -> Frontier | None:
    """The model's frontier: the user's, else the shipped one, else None."""
    if not model:
        return None
    for path in (user_file(model), shipped_dir() / f"{safe(model)}{SUFFIX}"):
        if path.is_file():
            return Frontier.load(path)
    return None


def split_max_loss(spec: str) -> tuple[str, float | None]:
    """(the spec without its max_loss knob, the bound) for a string spec; (spec, None) when it has none."""
    found = MAX_LOSS.findall(spec)
    if not found:
        return spec, None
    if len(found) > 1:
        raise ValueError(f"max_loss is given twice in {spec!r}")
    try:
        bound = float(found[0])
    except ValueError:
        raise ValueError(f"max_loss must be a number, got {found[0]!r}") from None
    rest = MAX_LOSS.sub("", spec).replace("(, ", "(").replace("()", "")
    if "+" in rest:
        raise ValueError(f"max_loss picks a whole fastkv setting: it does not combine with '+' ({spec!r})")
    if rest.strip() != "fastkv":
        raise ValueError(
            f"max_loss picks every knob of a fastkv setting from the model's frontier: give it alone, as "
            f"fastkv(max_loss={bound}), not with other knobs ({spec!r})"
        )
    return rest, bound


def check_bound(max_loss: float) -> None:
    if not 0 <= max_loss <= 1:
        raise ValueError(f"max_loss must be a share of the score in [0, 1] (0.02: 2 points), got {max_loss}")


def check_spec(spec: str, knobs: dict | None = None) -> tuple[str, float | None]:
    """`split_max_loss(spec)`, after raising ValueError for a spec (with a command's knobs) that cannot run,
    before a model is loaded."""
    from .methods import parse

    rest, bound = split_max_loss(spec)
    if bound is None:
        parse(spec, knobs=knobs)
        return rest, bound
    check_bound(bound)
    if any(v is not None for v in (knobs or {}).values()):
        given = sorted(k for k, v in (knobs or {}).items() if v is not None)
        raise ValueError(f"max_loss picks every fastkv knob from the model's frontier: drop {given}")
    return rest, bound


def from_metrics(
    model: str, metrics: list[dict], suite: str, machine: str, created: str, reference: str = "fullkv"
) -> Frontier:
    """A frontier from evaluation metrics (metrics.json of each suite): the reference (no loss, speed-up 1) and
    the settings that ran in all of them, each with its loss averaged over the suites (the interval: the suites'
    bounds averaged, a stand-in for a joint bootstrap) and its speed-up and cache share averaged likewise."""
    per_suite = []
    for m in metrics:
        runs = {label.split(" | ")[-1]: values for label, values in m.items() if label.split(" | ")[0] == model}
        if not any(spec == reference for spec in runs):
            raise ValueError(f"a suite has no {reference} run of {model}: the loss is measured against it")
        per_suite.append(runs)
    if not per_suite:
        raise ValueError(f"no evaluation of {model} given")
    common = set.intersection(*(set(runs) for runs in per_suite)) - {reference}
    settings = []
    for spec in sorted(common):
        rows = [runs[spec] for runs in per_suite]
        if any("vs_fullkv" not in r or r.get("prefill_speedup") is None for r in rows):
            continue  # a run without its paired difference or its timing cannot be placed

        def mean(values: list[float]) -> float:
            return sum(values) / len(values)

        settings.append(
            Setting(
                spec=spec,
                score=mean([r["average"] for r in rows]),
                loss=-mean([r["vs_fullkv"]["diff"] for r in rows]),
                loss_low=-mean([r["vs_fullkv"]["high"] for r in rows]),
                loss_high=-mean([r["vs_fullkv"]["low"] for r in rows]),
                prefill_speedup=mean([r["prefill_speedup"] for r in rows]),
                kv_share=mean([r.get("kv_ratio", 1.0) for r in rows]),
            )
        )
    if not settings:
        raise ValueError(f"no setting of {model} ran (with its timing) in every suite given")
    full = sum(runs[reference]["average"] for runs in per_suite) / len(per_suite)
    settings.append(Setting(reference, full, 0.0, 0.0, 0.0, 1.0, 1.0))  # what every other setting is against
    return Frontier(model, suite, machine, created, tuple(settings))
