"""What several commands share: the prefill progress bar, the method option's help, rates for display."""

from __future__ import annotations

import math
from collections.abc import Callable

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..console import err
from ..methods import PRESETS

METHOD_HELP = (
    "method spec: a preset (" + ", ".join(PRESETS) + "), with knobs as in 'fastkv(kernel_size=13)', or "
    "REDUCER+POLICY as in 'fastkv+adakv', or 'fastkv(max_loss=0.02)': the fastest setting of the model's "
    "measured frontier that loses at most 2 points; see `fastkv methods`"
)
MODEL_HELP = "registered name, local dir, .gguf or HF id"
COMPILE_HELP = (
    "decode under torch.compile: compiling takes tens of seconds, minutes for int8 weights on a CPU, which "
    "then decode 1.5-2x faster from a second, repacked copy of the weights"
)


def prefill_progress(num_layers: int, label: str) -> tuple[Progress, Callable[[int], None]]:
    """A transient progress bar over the layers of a prefill, on stderr, and its on_layer callback."""
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("layers"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    )
    task = progress.add_task(label, total=num_layers)
    return progress, lambda _layer: progress.advance(task)


def rate(value: float, digits: int = 2) -> str:
    """A rate or ratio for display; '-' where it is undefined (no decode step ran)."""
    return f"{value:.{digits}f}" if math.isfinite(value) else "-"
