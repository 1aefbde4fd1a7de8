"""StreamingLLM's sinks + recent window (Xiao et al., 2023): https://arxiv.org/abs/2309.17453"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base import Budgeted, LayerState, Selection, check_int, knob


@dataclass(frozen=True, kw_only=True)
class SinkRecent(Budgeted):
    """Keep the first `sink` tokens present (attention sinks) and the most recent ones, up to the budget.

    No scores: every layer and head caches positions [0, sink) and the last budget - sink tokens
    present. Cheap and blind to content, so it loses whatever lies in the middle of a long prompt.
    Unlike the paper, entries keep their original positions (no re-numbering inside the cache), and
    eviction happens once, at prefill; decoding appends without evicting.
    """

    name = "sinkrecent"

    sink: int = knob(4, "attention-sink tokens kept from the start")

    def check(self) -> None:
        check_int(self, "sink", minimum=0)
        super().check()

    def always_kept(self) -> int:
        return self.sink + 1  # the sinks and at least the last token

    def kept_why(self) -> str:
        return f"sink={self.sink} sinks and the last token"

    def entries(self, layer: LayerState) -> Selection | None:
        budget, n = self.kv_budget(layer.prompt_len), layer.present
        if n <= budget:
            return None
        keep = torch.cat([torch.arange(self.sink), torch.arange(n - (budget - self.sink), n)]).to(layer.k.device)
        return Selection(keep.expand(layer.k.shape[0], 1, -1))
