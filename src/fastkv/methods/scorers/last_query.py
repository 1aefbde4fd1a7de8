"""GemFilter's last-query score (Shi et al., 2024): https://arxiv.org/abs/2409.17422"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...scoring import last_query_scores
from ..base import Scorer, check_int, check_odd, knob


@dataclass(frozen=True, kw_only=True)
class LastQuery(Scorer):
    """The last query's q.k with every key, summed over all heads, average-pooled along tokens.

    q [B, Hq, n, d], k [B, Hkv, n, d] -> float32 [B, 1, n - window_size]: one ranking for all heads.
    """

    name = "last_query"

    window_size: int = knob(1, "last prompt tokens always kept")
    kernel_size: int = knob(5, "odd width of the average pooling along tokens")

    def check(self) -> None:
        check_int(self, "window_size")
        check_odd(self, "kernel_size")

    def __call__(self, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
        return last_query_scores(q, k, self.kernel_size)[..., : -self.window_size]

    def queries_needed(self, present: int) -> int:
        return 1
