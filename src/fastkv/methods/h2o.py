"""H2O, Heavy-Hitter Oracle (Zhang et al., 2023): https://arxiv.org/abs/2306.14048"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..scoring import accumulated_scores
from .base import TopKWindow, check_positive_int


@dataclass(kw_only=True)
class H2O(TopKWindow):
    """Keep the "heavy hitters" (keys with the most accumulated attention) plus a recent window.

    Score per layer: for queries Q [B, Hq, L, d] and keys K [B, Hkv, L, d], the causal attention
    softmax(QK^T) summed over all queries and over the query heads of each GQA group: [B, Hkv, L].
    Each KV head keeps its top `budget - window_size` prefix entries plus the last `window_size`.
    The scores are computed over chunks of queries (about `chunk_mib` MiB at a time), so no L x L
    matrix is held. Unlike KVCache-Factory's H2O, a query never scores keys after it.

    Args:
        budget / retain_rate: entries kept per layer and head. Default retain_rate 0.1.
        window_size: recent tokens always kept. Default 8.
        chunk_mib: memory for one chunk of scores. Default 64.
    """

    name = "h2o"
    reduces = "KV cache"
    paper = "https://arxiv.org/abs/2306.14048"

    window_size: int = 8
    chunk_mib: int = 64

    def __post_init__(self) -> None:
        check_positive_int(self, "window_size")
        check_positive_int(self, "chunk_mib")
        self.check_budget()

    def score(self, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
        return accumulated_scores(q, k, scale, self.chunk_mib)[..., : -self.window_size]
