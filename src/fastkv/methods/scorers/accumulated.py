"""H2O's accumulated attention, Heavy-Hitter Oracle (Zhang et al., 2023): https://arxiv.org/abs/2306.14048"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...scoring import accumulated_scores
from ..base import Scorer, check_int, knob


@dataclass(frozen=True, kw_only=True)
class AccumulatedAttention(Scorer):
    """The attention each token receives from every prompt query after it (causal).

    q [B, Hq, n, d], k [B, Hkv, n, d] -> float32 [B, Hkv, n - window_size], summed over queries and over
    the query heads of each GQA group. Computed over chunks of queries of about `chunk_mib` MiB, never as
    an n x n matrix. Unlike KVCache-Factory's H2O, a query never scores keys after it. The last
    `window_size` tokens are the recent window, always kept; they are not an observation window.
    """

    name = "accumulated"
    observes = False

    chunk_mib: int = knob(64, "MiB of scores computed at a time")

    def check(self) -> None:
        check_int(self, "window_size")
        check_int(self, "chunk_mib")

    def __call__(self, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
        return accumulated_scores(q, k, scale, self.chunk_mib)[..., : -self.window_size]

    def queries_needed(self, present: int) -> int:
        return present  # every query scores: a prefix's stored K/V cannot stand in for its queries
