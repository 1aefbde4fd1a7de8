"""Command-line options generated from the method knobs: one per knob of any registered part, none by hand."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import fields

import typer

from ..methods.base import PARTS, is_sub
from ..methods.method import knob_fields

PANEL = "Method knobs (instead of writing them in the --method spec)"


def knob_types() -> dict[str, tuple[type, str]]:
    """Every knob name of every registered part -> (Python type, help)."""
    found: dict[str, tuple[type, str]] = {}
    # Policies first: their help for budget / retain_rate is the one most users mean.
    for kind in ("policy", "scorer", "allocator", "reducer"):
        for cls in PARTS[kind].values():
            for f in fields(cls):
                if is_sub(f) and f.metadata["named"]:  # (a policy's decode budget is not chosen by name)
                    choices = ", ".join(PARTS[f.metadata["kind"]])
                    found.setdefault(f.name, (str, f"{f.metadata['help']} ({choices})"))
            for name, (hint, _, help) in knob_fields(cls).items():
                kinds = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
                found.setdefault(name, (kinds[0], help))
    return dict(sorted(found.items()))


def with_knob_options(command: Callable) -> Callable:
    """Give `command(**knobs)` one `--knob-name` option per method knob, each None unless given."""
    signature = inspect.signature(command)
    params = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    for name, (kind, help) in knob_types().items():
        option = typer.Option(None, f"--{name.replace('_', '-')}", help=help, rich_help_panel=PANEL)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind | None))
    command.__signature__ = signature.replace(parameters=params)
    return command
