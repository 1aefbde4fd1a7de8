"""How a decode-time budget ranks generated entries (`DecodeBudget.decode_scorer`), one class each.

Every scorer gets, per KV head of one row and layer, `attention` [Hkv, n]: the softmax attention that the
latest generated queries paid to each of the n generated entries (over the whole cache they saw, prompt
entries included, causal), summed over those queries and the query heads of each GQA group; `keys`
[Hkv, n, d]; and, for a scorer that `carries`, its running score [Hkv, n]. It returns scores [Hkv, n]:
higher is kept. The latest `decode_window` entries are kept whatever they score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..base import Part


@dataclass(frozen=True, kw_only=True)
class DecodeScorer(Part):
    kind: ClassVar[str] = "decode_scorer"
    carries: ClassVar[bool] = False  # keeps a running score per entry from cut to cut

    def queries(self, window: int, interval: int) -> int:
        """How many of the latest steps' queries it scores with (at most `interval`: all after the last cut)."""
        return window

    def __call__(self, attention: torch.Tensor, keys: torch.Tensor, carried: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class RecentAttention(DecodeScorer):
    """SnapKV's rule during decoding: the attention of the last `decode_window` queries."""

    name: ClassVar[str] = "window"

    def __call__(self, attention, keys, carried):
        return attention


@dataclass(frozen=True, kw_only=True)
class AccumulatedDecodeAttention(DecodeScorer):
    """H2O's rule during decoding (https://arxiv.org/abs/2306.14048): all the attention an entry has received
    from every query since it was written. The queries of one interval are folded in at each cut, so this is
    exact, not sampled."""

    name: ClassVar[str] = "accumulated"
    carries: ClassVar[bool] = True

    def queries(self, window: int, interval: int) -> int:
        return interval

    def __call__(self, attention, keys, carried):
        return carried + attention


@dataclass(frozen=True, kw_only=True)
class Redundancy(DecodeScorer):
    """R-KV's rule (https://arxiv.org/abs/2505.24133), from its description: importance (the latest queries'
    attention, as a share) traded against redundancy (how alike an entry's key is to the others': the mean
    cosine similarity to them, as a softmax share), score = lam * importance - (1 - lam) * redundancy.
    Long reasoning repeats itself; keeping one of many nearly identical keys frees room for the rest. lam is
    R-KV's default, 0.1."""

    name: ClassVar[str] = "redundancy"
    lam: ClassVar[float] = 0.1

    def __call__(self, attention, keys, carried):
        n = keys.shape[1]
        importance = attention / attention.sum(dim=-1, keepdim=True).clamp_min(1e-30)
        unit = F.normalize(keys.float(), dim=-1)
        similar = unit @ unit.transpose(1, 2)  # [Hkv, n, n]
        mean_other = (similar.sum(dim=-1) - similar.diagonal(dim1=1, dim2=2)) / max(1, n - 1)
        redundancy = mean_other.softmax(dim=-1)
        return self.lam * importance - (1 - self.lam) * redundancy
