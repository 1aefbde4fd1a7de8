"""Top-k by a scorer, with a budget allocator: SnapKV, H2O, PyramidKV and AdaKV are instances."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..allocators.uniform import Uniform
from ..base import Allocator, Budgeted, LayerState, Scorer, Selection, check_rate, knob, share_of, sub_part
from ..scorers.window import WindowAttention


@dataclass(frozen=True, kw_only=True)
class TopK(Budgeted):
    """Each layer keeps, per KV head, its best-scored prefix entries plus the most recent tokens.

    `scorer` gives scores [B, Hkv or 1, n - w] of the n tokens present; `allocator` turns the budget
    (relative to the original prompt) into a count per layer and head and picks the entries. The recent
    tokens kept are the scorer's window (w), or `recent_share` of the layer's budget where that is more:
    H2O gives half its budget to recent tokens and half to heavy hitters. A layer with no more tokens
    present than its budget caches them all.
    """

    name = "topk"

    scorer: Scorer = sub_part("scorer", WindowAttention, "what ranks the entries")
    allocator: Allocator = sub_part("allocator", Uniform, "how the budget is spread over layers and heads")
    recent_share: float | None = knob(None, "share of the budget kept for the most recent tokens (None: the window)")

    def check(self) -> None:
        super().check()
        check_rate(self, "recent_share")

    def recent(self, budget: int) -> int:
        """The most recent tokens a layer of `budget` entries per head keeps whole (the window at least)."""
        w = self.scorer.window_size
        return w if self.recent_share is None else min(budget, max(w, share_of(self.recent_share, budget)))

    def always_kept(self) -> int:
        return self.scorer.window_size

    def kept_why(self) -> str:
        return f"the window, window_size={self.scorer.window_size}"

    def observed_window(self) -> int:
        return self.scorer.window_size if self.scorer.observes else 0

    def max_entries(self, prompt_len: int, layer: int, num_layers: int, kv_heads: int) -> int:
        w = self.scorer.window_size
        budget = self.allocator.layer_budget(self.kv_budget(prompt_len), w, layer, num_layers)
        recent = self.recent(budget)
        return min(prompt_len, self.allocator.longest_head(budget - recent, kv_heads) + recent)

    def entries(self, layer: LayerState) -> Selection | None:
        w = self.scorer.window_size
        budget = self.allocator.layer_budget(self.kv_budget(layer.prompt_len), w, layer.index, layer.num_layers)
        if layer.present <= budget:
            return None
        recent = self.recent(budget)
        scores = layer.scores(self.scorer)[..., : layer.present - recent]  # the recent tokens are kept anyway
        chosen, valid = self.allocator.select(scores, budget - recent)
        b, h, prefix = scores.shape
        window = torch.arange(prefix, prefix + recent, device=chosen.device).expand(b, h, recent)
        if valid is not None:
            valid = torch.cat([valid, torch.ones(b, h, recent, dtype=torch.bool, device=valid.device)], dim=-1)
        return Selection(torch.cat([chosen, window], dim=-1), valid)
