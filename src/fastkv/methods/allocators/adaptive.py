"""AdaKV's adaptive budgets across heads (Feng et al., 2024): https://arxiv.org/abs/2407.11550"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base import Allocator, check_rate, knob


@dataclass(frozen=True, kw_only=True)
class Adaptive(Allocator):
    """A layer's budget is shared among its KV heads by one top-k over all of them.

    With b prefix entries per head on average, a layer keeps Hkv * b: every head first takes its own top
    floor(alpha * b), then the rest go to the best remaining scores of any head. Heads that attend widely
    keep more, focused heads less. The cache pads each layer to its longest head and masks the padding,
    and the reported KV bytes count it. Nothing dropped is stored (kvpress's AdaKV keeps every key and
    hides the dropped ones, which saves no memory).
    """

    name = "adaptive"

    alpha: float = knob(0.2, "share of the uniform per-head budget every head is guaranteed, in (0, 1]")

    def check(self) -> None:
        check_rate(self, "alpha")

    def longest_head(self, per_head: int, kv_heads: int) -> int:
        return kv_heads * per_head  # one head may take the whole layer's share

    def select(self, scores: torch.Tensor, per_head: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, hkv, prefix = scores.shape
        guaranteed = int(self.alpha * per_head)
        # Rank of every entry inside its head; the guaranteed ones win any global comparison.
        rank = scores.argsort(dim=-1, descending=True).argsort(dim=-1)
        boosted = scores.masked_fill(rank < guaranteed, float("inf"))
        chosen = boosted.view(b, hkv * prefix).topk(hkv * per_head, dim=-1).indices
        mask = torch.zeros(b, hkv * prefix, dtype=torch.bool, device=scores.device)
        mask = mask.scatter_(1, chosen, True).view(b, hkv, prefix)
        counts = mask.sum(dim=-1)  # [B, Hkv]
        longest = int(counts.max())
        # Chosen positions first, in order; unchosen ones sort after them and become masked padding.
        positions = torch.arange(prefix, device=scores.device)
        order = torch.where(mask, positions, positions + prefix).sort(dim=-1).values[..., :longest] % prefix
        return order, torch.arange(longest, device=scores.device) < counts.unsqueeze(-1)
