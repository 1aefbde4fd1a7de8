"""StreamingLLM (Xiao et al., 2023): https://arxiv.org/abs/2309.17453"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Budgeted, Keep, check_one_of, check_positive_int


@dataclass(kw_only=True)
class StreamingLLM(Budgeted):
    """Keep the first `sink` tokens (attention sinks) and the most recent ones, up to the budget.

    No scores: the cache of every layer holds positions [0, sink) and [L - (budget - sink), L).
    Cheap and position-blind, so it loses whatever lies in the middle of a long prompt.

    Args:
        sink: attention-sink tokens kept from the start. Default 4.
        budget / retain_rate: entries kept per layer (sinks included). Default retain_rate 0.1.
    """

    name = "streamingllm"
    reduces = "KV cache"
    paper = "https://arxiv.org/abs/2309.17453"

    sink: int = 4

    def __post_init__(self) -> None:
        check_positive_int(self, "sink", minimum=0)
        check_one_of(self, "retain_rate", "budget", default_rate=0.1)
        if self.budget is not None and self.sink >= self.budget:
            raise ValueError(f"StreamingLLM.sink ({self.sink}) must be smaller than budget ({self.budget})")

    def floor(self) -> int:
        return self.sink + 1  # at least the last token besides the sinks

    def keep(self, layer: int, scores: torch.Tensor | None, present: int, prompt_len: int) -> Keep:
        budget = self.layer_budget(layer, prompt_len)
        if present <= budget:
            return None
        recent = torch.arange(present - (budget - self.sink), present)
        return torch.cat([torch.arange(self.sink), recent])
