"""The same budget for every layer and KV head (SnapKV, H2O)."""

from __future__ import annotations

from dataclasses import dataclass

from ..base import Allocator


@dataclass(frozen=True, kw_only=True)
class Uniform(Allocator):
    """Every layer and every KV head keeps its own top `budget - window` prefix entries (the base rule)."""

    name = "uniform"
