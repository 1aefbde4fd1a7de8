"""Where fastkv keeps what it makes once: converted models, profiles, precision measurements."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """`$FASTKV_CACHE`, else `$XDG_CACHE_HOME/fastkv`, else `~/.cache/fastkv`."""
    if os.environ.get("FASTKV_CACHE"):
        return Path(os.environ["FASTKV_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fastkv"
