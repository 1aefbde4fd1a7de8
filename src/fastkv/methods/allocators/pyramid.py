"""PyramidKV's layer budgets (Cai et al., 2024): https://arxiv.org/abs/2406.02069"""

from __future__ import annotations

from dataclasses import dataclass

from ..base import Allocator, check_int, knob


@dataclass(frozen=True, kw_only=True)
class Pyramid(Allocator):
    """Budgets that fall linearly from the bottom layers to the top.

    Lower layers spread their attention widely and keep more; upper layers concentrate it and keep less.
    With B the budget and w the window, the prefix budgets run linearly from 2(B - w) - (B - w)/beta at
    layer 0 to (B - w)/beta at the last layer; their mean is B - w, so the mean budget over layers is
    exactly B (rounding remainders go to the lowest layers).
    """

    name = "pyramid"

    beta: int = knob(20, "steepness of the layer budgets; 1 is uniform")

    def check(self) -> None:
        check_int(self, "beta")

    def budgets(self, budget: int, window: int, num_layers: int) -> list[int]:
        """Budget of every layer (window included); their sum is num_layers * budget."""
        prefix = budget - window
        if num_layers == 1:
            return [budget]
        low = prefix / self.beta
        high = 2 * prefix - low
        floors = [int(high - (high - low) * i / (num_layers - 1)) for i in range(num_layers)]
        for i in range(prefix * num_layers - sum(floors)):
            floors[i] += 1
        return [f + window for f in floors]

    def layer_budget(self, budget: int, window: int, layer: int, num_layers: int) -> int:
        return self.budgets(budget, window, num_layers)[layer]
