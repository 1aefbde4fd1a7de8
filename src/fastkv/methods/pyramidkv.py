"""PyramidKV (Cai et al., 2024): https://arxiv.org/abs/2406.02069"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .base import check_positive_int
from .snapkv import SnapKV


@dataclass(kw_only=True)
class PyramidKV(SnapKV):
    """SnapKV selection with budgets that fall linearly from the bottom layers to the top.

    Lower layers spread their attention widely and keep more; upper layers concentrate it and keep
    less. With B the configured budget and w the window, the prefix budgets run linearly from
    2(B - w) - (B - w)/beta at layer 0 to (B - w)/beta at the last layer; their mean is B - w, so the
    mean budget over layers is exactly B (rounding remainders go to the lowest layers).

    Args:
        beta: steepness; 1 gives SnapKV's uniform budgets. Default 20 (the paper's).
        budget / retain_rate, window_size, kernel_size, pooling: as in SnapKV.
    """

    name = "pyramidkv"
    reduces = "KV cache"
    paper = "https://arxiv.org/abs/2406.02069"

    beta: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self, "beta")

    def bind(self, num_layers: int) -> PyramidKV:
        bound = replace(self)
        bound._num_layers = num_layers  # the budgets depend on the depth
        return bound

    def budgets(self, prompt_len: int, num_layers: int) -> list[int]:
        """Budget of every layer (window included); their sum is num_layers * kv_budget."""
        prefix = self.kv_budget(prompt_len) - self.window_size
        if num_layers == 1:
            return [prefix + self.window_size]
        low = prefix / self.beta
        high = 2 * prefix - low
        exact = [high - (high - low) * i / (num_layers - 1) for i in range(num_layers)]
        floors = [int(x) for x in exact]
        short = prefix * num_layers - sum(floors)
        for i in range(short):
            floors[i] += 1
        return [f + self.window_size for f in floors]

    def layer_budget(self, layer: int, prompt_len: int) -> int:
        return self.budgets(prompt_len, self._num_layers)[layer]
