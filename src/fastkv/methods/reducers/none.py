"""No context reduction: every layer computes on the whole prompt (FullKV and the decode-only methods)."""

from __future__ import annotations

from dataclasses import dataclass

from ..base import Reducer


@dataclass(frozen=True, kw_only=True)
class NoReduction(Reducer):
    """Every token continues to every layer."""

    name = "none"
