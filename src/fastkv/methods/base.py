"""What every method shares: the interface the engine calls, budget arithmetic and field checks.

Per layer, after attention, the engine asks the method:
- `wants_scores` / `score(q, k, scale)`: token importance, [B, Hkv or 1, prefix] (float32);
- `keep`: which KV entries of the tokens present this layer caches for decoding: None (all), indices
  [B, Hkv, k], or (indices, valid) for per-head counts padded to the longest head (AdaKV);
- `propagate`: which tokens continue to the next layer (prefill-reducing methods only). When
  `restarts` is set (GemFilter), the model instead runs again from layer 0 on those tokens alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import ClassVar

import torch

from ..scoring import POOLINGS, top_with_window, window_scores

Keep = torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None


def check_positive_int(obj: object, name: str, allow_none: bool = False, minimum: int = 1) -> None:
    value = getattr(obj, name)
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{type(obj).__name__}.{name} must be {kind}, got {value!r}")


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


def check_odd_kernel(obj: object) -> None:
    """window_size and kernel_size are positive, and the pooling kernel is odd (same-length pooling)."""
    check_positive_int(obj, "window_size")
    check_positive_int(obj, "kernel_size")
    if obj.kernel_size % 2 == 0:
        raise ValueError(f"{type(obj).__name__}.kernel_size must be odd, got {obj.kernel_size}")


def check_not_larger(obj: object, small: str, large: str) -> None:
    a, b = getattr(obj, small), getattr(obj, large)
    if a is not None and b is not None and a > b:
        raise ValueError(f"{type(obj).__name__}.{small} ({a}) is larger than {large} ({b})")


def check_layer(obj: object, name: str, num_layers: int) -> None:
    value = getattr(obj, name)
    if value is not None and value >= num_layers:
        raise ValueError(
            f"{type(obj).__name__}.{name}={value} is outside the model: "
            f"it has {num_layers} layers (0..{num_layers - 1})"
        )


def share_of(rate: float, length: int) -> int:
    # The epsilon keeps 0.1 * 4000 = 400.00000000000006 and 0.29 * 100 = 28.999999999999996 exact.
    return math.floor(rate * length + 1e-9)


class Method:
    """Base of all methods. Subclasses are kw-only dataclasses; `__post_init__` validates their fields."""

    name: ClassVar[str]
    reduces: ClassVar[str]  # "nothing", "KV cache", or "prefill + KV cache"
    paper: ClassVar[str] = ""
    restarts: ClassVar[bool] = False
    # Defaults that depend on the model, for listings: field -> rule
    auto: ClassVar[dict[str, str]] = {}

    def check_model(self, num_layers: int) -> None:
        """Raise ValueError for fields that do not fit a model with `num_layers` layers."""

    def bind(self, num_layers: int) -> Method:
        """This method with its model-dependent defaults resolved; the engine calls it before prefill."""
        self.check_model(num_layers)
        return self

    def wants_scores(self, layer: int, present: int, prompt_len: int) -> bool:
        return False

    def score(self, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
        raise NotImplementedError(f"{self.name} does not score tokens")

    def keep(self, layer: int, scores: torch.Tensor | None, present: int, prompt_len: int) -> Keep:
        return None

    def propagate(self, layer: int, scores: torch.Tensor | None, present: int, prompt_len: int) -> torch.Tensor | None:
        """Sorted token indices [B, T] that continue to the next layer, or None for all."""
        return None

    def describe(self) -> str:
        parts = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)]  # type: ignore[arg-type]
        return f"{self.name}({', '.join(parts)})"


@dataclass(kw_only=True)
class WindowScored(Method):
    """Scores from the attention of the last `window_size` prompt tokens (SnapKV's observation window)."""

    window_size: int = 8
    kernel_size: int = 7
    pooling: str = "max"

    def check_window(self) -> None:
        check_odd_kernel(self)
        if self.pooling not in POOLINGS:
            raise ValueError(f"{type(self).__name__}.pooling must be one of {POOLINGS}, got {self.pooling!r}")

    def score(self, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
        return window_scores(q[:, :, -self.window_size :], k, scale, self.kernel_size, self.pooling)


@dataclass(kw_only=True)
class Budgeted(Method):
    """A KV budget per layer: `budget` entries, or `retain_rate` of the prompt (default 0.1).

    `floor()` entries (the window, or the sinks) are always kept, so a budget from a rate never falls
    below it. A budget is relative to the original prompt length, whatever the layer sees.
    """

    budget: int | None = None
    retain_rate: float | None = None

    def floor(self) -> int:
        return getattr(self, "window_size", 1)

    def check_budget(self, floor_field: str = "window_size") -> None:
        check_one_of(self, "retain_rate", "budget", default_rate=0.1)
        check_not_larger(self, floor_field, "budget")

    def kv_budget(self, prompt_len: int) -> int:
        if self.budget is not None:
            return self.budget
        return max(self.floor(), share_of(self.retain_rate, prompt_len))

    def layer_budget(self, layer: int, prompt_len: int) -> int:
        return self.kv_budget(prompt_len)

    def compresses(self, layer: int, present: int, prompt_len: int) -> bool:
        return present > self.layer_budget(layer, prompt_len)


@dataclass(kw_only=True)
class TopKWindow(Budgeted):
    """Each KV head keeps its top `budget - window_size` prefix entries plus the last `window_size`."""

    def wants_scores(self, layer: int, present: int, prompt_len: int) -> bool:
        return self.compresses(layer, present, prompt_len)

    def keep(self, layer: int, scores: torch.Tensor | None, present: int, prompt_len: int) -> Keep:
        if not self.compresses(layer, present, prompt_len):
            return None
        return top_with_window(scores, self.layer_budget(layer, prompt_len), self.window_size)
