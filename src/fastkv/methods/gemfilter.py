"""GemFilter (Shi et al., 2024): https://arxiv.org/abs/2409.17422"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..scoring import last_query_scores, top_with_window
from .base import Budgeted, check_layer, check_odd_kernel, check_positive_int


@dataclass(kw_only=True)
class GemFilter(Budgeted):
    """Use an early layer as a filter, then run the whole model again on the selected tokens only.

    Layers 0..filter_layer run on the full prompt. At filter_layer each token is scored by the last
    query's q.k summed over all heads and average-pooled ([B, L]); the top `budget` tokens (the last
    `window_size` always among them), in order, form a new, shorter prompt with positions renumbered
    0..budget-1, which the model runs from scratch. Decoding continues from that cache at position
    `budget`. The KV budget and the prefill reduction are one number here: the coupling FastKV removes.

    Args:
        filter_layer: the filter layer. Default: the paper's 13 of 32 layers, scaled by depth.
        budget / retain_rate: tokens kept (and so KV entries per layer). Default retain_rate 0.1.
        window_size: last prompt tokens always kept (the generation continues from them). Default 1.
        kernel_size: odd width of the average pooling. Default 5.
    """

    name = "gemfilter"
    reduces = "prefill + KV cache"
    paper = "https://arxiv.org/abs/2409.17422"
    restarts = True
    auto = {"filter_layer": "round(13/32*layers)"}

    filter_layer: int | None = None
    window_size: int = 1
    kernel_size: int = 5

    def __post_init__(self) -> None:
        check_positive_int(self, "filter_layer", allow_none=True, minimum=0)
        check_odd_kernel(self)
        self.check_budget()

    def check_model(self, num_layers: int) -> None:
        check_layer(self, "filter_layer", num_layers)

    def bind(self, num_layers: int) -> GemFilter:
        self.check_model(num_layers)
        if self.filter_layer is not None:
            return self
        return replace(self, filter_layer=min(num_layers - 1, round(13 * num_layers / 32)))

    def wants_scores(self, layer: int, present: int, prompt_len: int) -> bool:
        return layer == self.filter_layer and present > self.kv_budget(prompt_len)

    def score(self, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
        return last_query_scores(q, k, self.kernel_size)[..., : -self.window_size]

    def propagate(self, layer: int, scores: torch.Tensor | None, present: int, prompt_len: int) -> torch.Tensor | None:
        if not self.wants_scores(layer, present, prompt_len):
            return None
        return top_with_window(scores.sum(dim=1), self.kv_budget(prompt_len), self.window_size)
