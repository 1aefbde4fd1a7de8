"""PyramidInfer (Yang et al., 2024): https://arxiv.org/abs/2405.12532"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..scoring import top_with_window
from .base import WindowScored, check_layer, check_not_larger, check_positive_int, check_rate, share_of


@dataclass(kw_only=True)
class PyramidInfer(WindowScored):
    """Drop context from the residual stream every few layers, keeping a share that decays with depth.

    At layers start_layer, start_layer + interval, ... the tokens are ranked by the attention of the
    last `window_size` tokens (summed over heads) and the top max(min_len, L * decay^(s+1)) continue,
    s being the stage (0, 1, ...), with their hidden states and original positions. Each layer caches
    the tokens that reached it, so prefill compute and KV cache shrink together, as a pyramid.

    Args:
        start_layer: first layer that drops tokens (layers before it see the full prompt). Default 2.
        interval: layers between drops. Default 2.
        decay: share kept at each drop, in (0, 1]. Default 0.8.
        min_len: fewest tokens ever kept (window included). Default 64.
        window_size, kernel_size, pooling: as in SnapKV; kernel_size defaults to 1 (no pooling).
    """

    name = "pyramidinfer"
    reduces = "prefill + KV cache"
    paper = "https://arxiv.org/abs/2405.12532"

    start_layer: int = 2
    interval: int = 2
    decay: float = 0.8
    min_len: int = 64
    kernel_size: int = 1

    def __post_init__(self) -> None:
        self.check_window()
        check_positive_int(self, "start_layer", minimum=0)
        check_positive_int(self, "interval")
        check_rate(self, "decay")
        check_positive_int(self, "min_len")
        check_not_larger(self, "window_size", "min_len")

    def check_model(self, num_layers: int) -> None:
        check_layer(self, "start_layer", num_layers)

    def target(self, layer: int, prompt_len: int) -> int | None:
        """Tokens kept after `layer`, or None where the layer drops nothing."""
        if layer < self.start_layer or (layer - self.start_layer) % self.interval:
            return None
        stage = (layer - self.start_layer) // self.interval
        return max(self.min_len, share_of(self.decay ** (stage + 1), prompt_len))

    def wants_scores(self, layer: int, present: int, prompt_len: int) -> bool:
        target = self.target(layer, prompt_len)
        return target is not None and present > target

    def propagate(self, layer: int, scores: torch.Tensor | None, present: int, prompt_len: int) -> torch.Tensor | None:
        if not self.wants_scores(layer, present, prompt_len):
            return None
        return top_with_window(scores.sum(dim=1), self.target(layer, prompt_len), self.window_size)
