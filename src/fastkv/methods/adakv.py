"""AdaKV, adaptive budget allocation across heads (Feng et al., 2024): https://arxiv.org/abs/2407.11550"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Keep, check_rate
from .snapkv import SnapKV


@dataclass(kw_only=True)
class AdaKV(SnapKV):
    """SnapKV scores, but a layer's budget is shared among its KV heads by one top-k over all of them.

    With b = budget - window_size prefix entries per head on average, a layer keeps Hkv * b prefix
    entries: every head first takes its own top floor(alpha * b), then the rest go to the best
    remaining scores of any head. Heads that attend widely keep more, focused heads less. Every head
    also keeps the window.

    The cache pads each layer to its longest head and masks the padding at decode time; the reported
    KV bytes count that padding. Nothing dropped is stored, unlike kvpress's AdaKV, which keeps all
    keys and hides the dropped ones.

    Args:
        alpha: share of the uniform per-head budget that every head is guaranteed, in (0, 1]. Default 0.2.
        budget / retain_rate, window_size, kernel_size, pooling: as in SnapKV.
    """

    name = "adakv"
    reduces = "KV cache"
    paper = "https://arxiv.org/abs/2407.11550"

    alpha: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        check_rate(self, "alpha")

    def keep(self, layer: int, scores: torch.Tensor | None, present: int, prompt_len: int) -> Keep:
        if not self.compresses(layer, present, prompt_len):
            return None
        b, hkv, prefix = scores.shape
        per_head = self.layer_budget(layer, prompt_len) - self.window_size
        guaranteed = int(self.alpha * per_head)
        # Rank of every entry inside its head; the guaranteed ones win any global comparison.
        rank = scores.argsort(dim=-1, descending=True).argsort(dim=-1)
        boosted = scores.masked_fill(rank < guaranteed, float("inf"))
        chosen = boosted.view(b, hkv * prefix).topk(hkv * per_head, dim=-1).indices
        mask = torch.zeros(b, hkv * prefix, dtype=torch.bool, device=scores.device)
        mask.scatter_(1, chosen, True)
        mask = mask.view(b, hkv, prefix)
        counts = mask.sum(dim=-1)  # [B, Hkv]
        longest = int(counts.max())
        # Chosen positions first, in order; unchosen ones sort after them and become masked padding.
        positions = torch.arange(prefix, device=scores.device)
        order = torch.where(mask, positions, positions + prefix).sort(dim=-1).values[..., :longest] % prefix
        valid = torch.arange(longest, device=scores.device) < counts.unsqueeze(-1)
        window = torch.arange(prefix, prefix + self.window_size, device=scores.device)
        indices = torch.cat([order, window.expand(b, hkv, -1)], dim=-1)
        valid = torch.cat([valid, torch.ones(b, hkv, self.window_size, dtype=torch.bool, device=valid.device)], -1)
        return indices, valid
