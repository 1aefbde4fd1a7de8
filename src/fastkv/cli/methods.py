"""`fastkv methods`: the presets, the parts they are made of, and every knob with the default it will use.

Plain text, one knob per line, wrapped at the terminal's width (80 columns when piped), so that names and
values never break in the middle.
"""

from __future__ import annotations

import shutil
import textwrap
from dataclasses import fields

import typer

from ..methods import PARTS, PRESETS
from ..methods.base import is_sub
from ..methods.method import in_force
from ..profiles import PRESET, find


def width() -> int:
    return max(60, min(120, shutil.get_terminal_size((80, 24)).columns))


def wrapped(text: str, indent: int, hanging: int) -> list[str]:
    return textwrap.wrap(
        text, width(), initial_indent=" " * indent, subsequent_indent=" " * hanging, break_long_words=False
    ) or [" " * indent]


def knob_lines(knobs: dict[str, tuple[object, str]], indent: int = 4) -> list[str]:
    """One line (or more, wrapped) per knob: name = value, then what it means."""
    name_w = max((len(k) for k in knobs), default=0)
    value_w = min(14, max((len(str(v)) for v, _ in knobs.values()), default=0))
    lines = []
    for name, (value, help) in knobs.items():
        head = f"{name:<{name_w}} = {value!s:<{value_w}}  "
        lines += wrapped(head + help, indent, indent + len(head))
    return lines


def summary(cls: type) -> str:
    """The first paragraph of a class's docstring, as one line: its first line alone can stop mid-sentence."""
    doc = (cls.__doc__ or "").strip()
    return " ".join(doc.split("\n\n", 1)[0].split())


# Every cache policy's decode-time budget: listed once, not under each preset and policy.
DECODE_KNOBS = ("decode_budget", "decode_interval", "decode_window", "decode_scorer")


def without_decode(knobs: dict) -> dict:
    return {k: v for k, v in knobs.items() if k not in DECODE_KNOBS}


def part_label(part) -> str:
    subs = [getattr(part, f.name).name for f in fields(part) if is_sub(f) and f.metadata["named"]]
    return part.name + (f" ({', '.join(subs)})" if subs else "")


def methods(
    model: str | None = typer.Option(None, "--model", "-m", help="also show the FastKV defaults this model gets"),
) -> None:
    """List the presets, the parts they are made of, and every knob with the default it will use."""
    profile = find(model) if model else None
    lines = ["PRESETS  (--method NAME, NAME(knob=value, ...) or REDUCER+POLICY)", ""]
    for name, cls in PRESETS.items():
        proto = cls.prototype
        parts = f"reducer {part_label(proto.reducer)}, cache policy {part_label(proto.policy)}"
        lines += wrapped(f"{name}: reduces {proto.reduces}; {parts}", 0, 2)
        lines += wrapped(summary(cls), 2, 2)
        if cls.paper:
            lines.append(f"  {cls.paper}")
        knobs = without_decode(cls.knobs_in_force())
        if profile is not None and name == PRESET:
            knobs.update({k: (f"{v} (profile)", knobs[k][1]) for k, v in profile.knobs.items() if k in knobs})
        lines += knob_lines(knobs) if knobs else ["    (no knobs)"]
        lines.append("")
    lines += [*wrapped("DECODE-TIME BUDGET  (every method has it: fastkv(decode_budget=1024), ...)", 0, 2), ""]
    lines += wrapped(summary(PARTS["decoding"]["budget"]), 2, 2)
    lines += knob_lines(in_force(PARTS["decoding"]["budget"]()))
    lines.append("")
    lines += ["PARTS  (any reducer combines with any cache policy: REDUCER+POLICY)", ""]
    for kind, registered in PARTS.items():
        for name, part_cls in registered.items():
            lines += wrapped(f"{kind} {name}: {summary(part_cls)}", 0, 2)
            subs = {f.name: ("|".join(PARTS[f.metadata["kind"]]), f.metadata["help"]) for f in fields(part_cls)
                    if is_sub(f) and f.metadata["named"]}  # fmt: skip
            knobs = {**subs, **(in_force(part_cls()) if kind == "decoding" else without_decode(in_force(part_cls())))}
            lines += knob_lines(knobs) if knobs else ["    (no knobs)"]
    lines.append("")
    if model is not None:
        if profile is None:
            lines += wrapped(f"{model}: no calibrated profile; fastkv uses the paper's defaults "
                             f"(`fastkv calibrate -m {model}` makes one)", 0, 2)  # fmt: skip
        else:
            lines += wrapped(f"{model}: fastkv's defaults come from its {profile.source}: {profile.path}", 0, 2)
    lines += wrapped(
        "A knob written in NAME(...) on the left of + configures the reducer; on the right, the cache policy. "
        "Every knob is also a --knob-name option of `fastkv generate`. On a model with a calibrated profile, "
        "the fastkv knobs you leave unset take the profile's values (fastkv methods --model NAME shows them).",
        0,
        0,
    )
    typer.echo("\n".join(line.rstrip() for line in lines))
