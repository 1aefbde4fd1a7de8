"""What every method shares: the interface the engine calls, budget arithmetic and field checks.

A method makes two decisions per layer, from the window scores of `fastkv.scoring`:
- `keep`: which KV entries of the tokens present this layer stores for decoding;
- `propagate`: which tokens continue to the next layer (only prefill-reducing methods use it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import ClassVar

import torch

from ..scoring import POOLINGS, top_with_window


def check_positive_int(obj: object, name: str, allow_none: bool = False) -> None:
    value = getattr(obj, name)
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{type(obj).__name__}.{name} must be a positive integer, got {value!r}")


def check_rate(obj: object, name: str) -> None:
    value = getattr(obj, name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{type(obj).__name__}.{name} must be in (0, 1], got {value!r}")


def check_one_of(obj: object, rate: str, size: str, default_rate: float) -> None:
    """A share and an absolute size of the same thing are exclusive; with neither, use the default."""
    if getattr(obj, rate) is not None and getattr(obj, size) is not None:
        raise ValueError(
            f"{type(obj).__name__}: give {rate} or {size}, not both "
            f"(got {rate}={getattr(obj, rate)!r}, {size}={getattr(obj, size)!r})"
        )
    if getattr(obj, rate) is None and getattr(obj, size) is None:
        object.__setattr__(obj, rate, default_rate)
    check_rate(obj, rate)
    check_positive_int(obj, size, allow_none=True)


def share_of(rate: float, length: int) -> int:
    # The epsilon keeps 0.1 * 4000 = 400.00000000000006 and 0.29 * 100 = 28.999999999999996 exact.
    return math.floor(rate * length + 1e-9)


class Method:
    """Base of all methods. Subclasses are dataclasses; `__post_init__` validates their fields."""

    name: ClassVar[str]
    reduces: ClassVar[str]  # "nothing", "KV cache", "prefill compute", or "both"
    window_size: int = 8
    kernel_size: int = 7
    pooling: str = "max"

    def check_model(self, num_layers: int) -> None:
        """Raise ValueError for fields that do not fit a model with `num_layers` layers."""

    def bind(self, num_layers: int) -> Method:
        """This method with its model-dependent defaults resolved; the engine calls it before prefill."""
        self.check_model(num_layers)
        return self

    def wants_scores(self, layer: int, present: int, prompt_len: int) -> bool:
        return False

    def keep(self, layer: int, scores: torch.Tensor | None, present: int, prompt_len: int) -> torch.Tensor | None:
        """Indices [B, Hkv, k] (into the `present` tokens) of the entries to cache, or None for all."""
        return None

    def propagate(self, layer: int, scores: torch.Tensor | None, present: int, prompt_len: int) -> torch.Tensor | None:
        """Sorted token indices [B, T] that continue to the next layer, or None for all."""
        return None

    def describe(self) -> str:
        parts = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)]  # type: ignore[arg-type]
        return f"{self.name}({', '.join(parts)})"


@dataclass(kw_only=True)
class WindowScored(Method):
    """Fields and checks shared by methods that score with the observation window (SnapKV family)."""

    window_size: int = 8
    kernel_size: int = 7
    pooling: str = "max"

    def check_window(self) -> None:
        check_positive_int(self, "window_size")
        check_positive_int(self, "kernel_size")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"{type(self).__name__}.kernel_size must be odd, got {self.kernel_size}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"{type(self).__name__}.pooling must be one of {POOLINGS}, got {self.pooling!r}")


@dataclass(kw_only=True)
class KVBudget(WindowScored):
    """A KV budget per layer: `budget` entries, or `retain_rate` of the prompt (default 0.1).

    The window is always kept, so a budget from a rate never falls below `window_size`.
    """

    budget: int | None = None
    retain_rate: float | None = None

    def check_budget(self) -> None:
        check_one_of(self, "retain_rate", "budget", default_rate=0.1)
        if self.budget is not None and self.window_size > self.budget:
            raise ValueError(
                f"{type(self).__name__}.window_size ({self.window_size}) is larger than budget ({self.budget})"
            )

    def kv_budget(self, prompt_len: int) -> int:
        if self.budget is not None:
            return self.budget
        return max(self.window_size, share_of(self.retain_rate, prompt_len))

    def compresses(self, present: int, prompt_len: int) -> bool:
        return present > self.kv_budget(prompt_len)

    def keep(self, layer: int, scores: torch.Tensor | None, present: int, prompt_len: int) -> torch.Tensor | None:
        if not self.compresses(present, prompt_len):
            return None
        return top_with_window(scores, self.kv_budget(prompt_len), self.window_size)
