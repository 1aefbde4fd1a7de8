"""FastKV (Jo et al., 2025): https://arxiv.org/abs/2502.01068"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..scoring import top_with_window
from .base import check_layer, check_not_larger, check_one_of, check_positive_int, share_of
from .snapkv import SnapKV


@dataclass(kw_only=True)
class FastKV(SnapKV):
    """Token-Selective Propagation (TSP) for prefill, plus a SnapKV-style cache for decoding.

    - Layers 0..tsp_layer run on the full prompt of L tokens and compress their caches as SnapKV does.
    - At tsp_layer the window scores [B, Hkv, L - w], summed over KV heads, rank the prompt; the top
      T - w tokens plus the window, in position order, are propagated (hidden states and original
      positions) to the later layers, which therefore compute on T tokens only.
    - Each later layer compresses its own cache among the propagated tokens to the same budget, which is
      relative to L, so every layer keeps about the same count (all T entries if T < budget).

    The two knobs are independent: prefill compute follows tsp_layer and tsp_rate, decode cost the budget.

    Args:
        tsp_layer: last layer on the full prompt. Default (None) is the paper's num_layers // 2 - 1.
        tsp_rate: share of the prompt propagated past tsp_layer, in (0, 1]. Default 0.2.
        tsp_len: absolute number of tokens propagated (window included). Exclusive with tsp_rate.
        budget / retain_rate: the KV budget per layer, as in SnapKV. Default retain_rate 0.1.
        window_size, kernel_size, pooling: the observation window and its pooling, as in SnapKV.
    """

    name = "fastkv"
    reduces = "prefill + KV cache"
    paper = "https://arxiv.org/abs/2502.01068"
    auto = {"tsp_layer": "layers//2-1"}

    tsp_layer: int | None = None
    tsp_rate: float | None = None
    tsp_len: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_one_of(self, "tsp_rate", "tsp_len", default_rate=0.2)
        check_positive_int(self, "tsp_layer", allow_none=True, minimum=0)
        check_not_larger(self, "window_size", "tsp_len")

    def check_model(self, num_layers: int) -> None:
        check_layer(self, "tsp_layer", num_layers)

    def resolved_tsp_layer(self, num_layers: int) -> int:
        return self.tsp_layer if self.tsp_layer is not None else max(0, num_layers // 2 - 1)

    def tsp_tokens(self, prompt_len: int) -> int:
        if self.tsp_len is not None:
            return self.tsp_len
        return max(self.window_size, share_of(self.tsp_rate, prompt_len))

    def wants_scores(self, layer: int, present: int, prompt_len: int) -> bool:
        return self.compresses(layer, present, prompt_len) or self._tsp_here(layer, present, prompt_len)

    def _tsp_here(self, layer: int, present: int, prompt_len: int) -> bool:
        if self.tsp_layer is None:
            raise RuntimeError("FastKV.tsp_layer is unresolved: call bind(num_layers) first")
        return layer == self.tsp_layer and present > self.tsp_tokens(prompt_len)

    def bind(self, num_layers: int) -> FastKV:
        self.check_model(num_layers)
        return replace(self, tsp_layer=self.resolved_tsp_layer(num_layers))

    def propagate(self, layer: int, scores: torch.Tensor | None, present: int, prompt_len: int) -> torch.Tensor | None:
        if not self._tsp_here(layer, present, prompt_len):
            return None
        # One ranking for all heads: tokens move as a whole through the residual stream.
        return top_with_window(scores.sum(dim=1), self.tsp_tokens(prompt_len), self.window_size)
