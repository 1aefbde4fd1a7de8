"""SnapKV's observation-window attention (Li et al., 2024): https://arxiv.org/abs/2404.14469"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...scoring import POOLINGS, window_scores
from ..base import Scorer, check_choice, check_int, check_odd, knob


@dataclass(frozen=True, kw_only=True)
class ObservationWindow:
    """The knobs of window-attention scores, for every part that ranks tokens with them."""

    window_size: int = knob(8, "last prompt tokens: always kept, and the queries that score the others")
    kernel_size: int = knob(7, "odd width of the pooling of scores along tokens")
    pooling: str = knob("max", "pooling of scores along tokens: max or avg")

    def check(self) -> None:
        check_int(self, "window_size")
        check_odd(self, "kernel_size")
        check_choice(self, "pooling", POOLINGS)

    def window_scorer(self) -> WindowAttention:
        return WindowAttention(window_size=self.window_size, kernel_size=self.kernel_size, pooling=self.pooling)


@dataclass(frozen=True, kw_only=True)
class WindowAttention(ObservationWindow, Scorer):
    """The attention the last `window_size` prompt tokens pay to each earlier token.

    q [B, Hq, n, d], k [B, Hkv, n, d] -> float32 [B, Hkv, n - window_size]: softmax of the window queries
    (causal inside the window), summed over them, pooled along tokens (odd `kernel_size`, stride 1, so
    neighbours of a salient token score too), summed over the query heads of each GQA group.
    """

    name = "window"

    def __call__(self, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
        return window_scores(q[:, :, -self.window_size :], k, scale, self.kernel_size, self.pooling)
