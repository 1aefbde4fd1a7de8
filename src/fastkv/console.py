"""Console helpers shared by the `fastkv` commands: output streams, errors, model loading."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

out = Console()
err = Console(stderr=True)


def fail(message: str) -> None:
    """Print an error that names the problem and exit with status 2. The line is not wrapped at the
    console's width, so that a path in it stays whole for copying (the terminal wraps it for the eye)."""
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def load_llm(model: str, dtype: str, device: str, quantize: str = "none"):
    """Load a model for a command, turning a bad name or a missing package into a clear error."""
    from .llm import LLM
    from .models import DiskSpaceError, ModelNotInstalledError

    try:
        return LLM.load(model, dtype=dtype, device=device, quantize=quantize)
    except (ValueError, ModelNotInstalledError, DiskSpaceError) as e:
        fail(str(e))
