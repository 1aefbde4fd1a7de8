"""The nine methods we compare, as named presets of a context reducer and a cache policy.

Each is a frozen, keyword-only dataclass whose fields are its two parts' knobs, e.g. `SnapKV(budget=512)`,
`FastKV(kernel_size=13, tsp_layer=15)`; spec strings name them in lower case. A knob left None takes its
part's default (`Preset.defaults()`, listed by `fastkv methods`), or, for `fastkv`, the model's calibrated
profile where one is in force. The fields mirror the parts' knobs; a test keeps them equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .method import Composed, Preset
from .registry import (
    TSP,
    AccumulatedAttention,
    Adaptive,
    FilterRerun,
    KeepAll,
    LayerSchedule,
    NoReduction,
    Pyramid,
    SinkRecent,
    TopK,
)


@dataclass(frozen=True, kw_only=True)
class Budget:
    """The KV budget of a cache policy that keeps a share (or a count) of the prompt."""

    budget: int | None = None
    retain_rate: float | None = None
    min_budget: int | None = None


@dataclass(frozen=True, kw_only=True)
class Window:
    """The observation window's scores."""

    window_size: int | None = None
    kernel_size: int | None = None
    pooling: str | None = None


@dataclass(frozen=True, kw_only=True)
class FullKV(Preset):
    """No compression: every layer sees every token and caches every entry. The reference."""

    name: ClassVar[str] = "fullkv"
    prototype: ClassVar[Composed] = Composed(reducer=NoReduction(), policy=KeepAll())


@dataclass(frozen=True, kw_only=True)
class SnapKV(Budget, Window, Preset):
    """Full prefill; each layer and KV head caches the entries the observation window attends to most.

    Selects per KV head (GQA-aware). The FastKV paper's SnapKV baseline repeats K/V to every query head
    before selecting, which stores Hq/Hkv times more (7x on a 14:2 model)."""

    name: ClassVar[str] = "snapkv"
    paper: ClassVar[str] = "https://arxiv.org/abs/2404.14469"
    prototype: ClassVar[Composed] = Composed(reducer=NoReduction(), policy=TopK())

    recent_share: float | None = None


@dataclass(frozen=True, kw_only=True)
class FastKV(Budget, Window, Preset):
    """Token-Selective Propagation for prefill, plus SnapKV's cache for decoding, decoupled.

    Layers 0..tsp_layer run on the full prompt and compress their caches as SnapKV does; after tsp_layer
    only the top tsp_rate of the tokens continue (with their original positions); every later layer
    caches its own best entries among them, to the same budget relative to the prompt. The TSP layer uses
    the cache's window, kernel and pooling, as in the paper's code; combine with `+` to change that."""

    name: ClassVar[str] = "fastkv"
    paper: ClassVar[str] = "https://arxiv.org/abs/2502.01068"
    prototype: ClassVar[Composed] = Composed(reducer=TSP(), policy=TopK())

    tsp_layer: int | None = None
    tsp_rate: float | None = None
    tsp_len: int | None = None
    min_tsp_len: int | None = None


@dataclass(frozen=True, kw_only=True)
class StreamingLLM(Budget, Preset):
    """Full prefill; each layer caches the attention sinks and the most recent tokens."""

    name: ClassVar[str] = "streamingllm"
    paper: ClassVar[str] = "https://arxiv.org/abs/2309.17453"
    prototype: ClassVar[Composed] = Composed(reducer=NoReduction(), policy=SinkRecent())

    sink: int | None = None


@dataclass(frozen=True, kw_only=True)
class H2O(Budget, Preset):
    """Full prefill; each layer caches the heavy hitters (most attention received, causally) and the most
    recent tokens, half of the budget each, as in the paper's experiments (`recent_share=0.5`)."""

    name: ClassVar[str] = "h2o"
    paper: ClassVar[str] = "https://arxiv.org/abs/2306.14048"
    prototype: ClassVar[Composed] = Composed(
        reducer=NoReduction(), policy=TopK(scorer=AccumulatedAttention(), recent_share=0.5)
    )

    window_size: int | None = None
    chunk_mib: int | None = None
    recent_share: float | None = None


@dataclass(frozen=True, kw_only=True)
class PyramidKV(Budget, Window, Preset):
    """SnapKV's selection with budgets falling linearly from the bottom layers to the top (mean: the budget)."""

    name: ClassVar[str] = "pyramidkv"
    paper: ClassVar[str] = "https://arxiv.org/abs/2406.02069"
    prototype: ClassVar[Composed] = Composed(reducer=NoReduction(), policy=TopK(allocator=Pyramid()))

    beta: int | None = None


@dataclass(frozen=True, kw_only=True)
class AdaKV(Budget, Window, Preset):
    """SnapKV's scores with each layer's budget shared among its KV heads by one top-k over all of them."""

    name: ClassVar[str] = "adakv"
    paper: ClassVar[str] = "https://arxiv.org/abs/2407.11550"
    prototype: ClassVar[Composed] = Composed(reducer=NoReduction(), policy=TopK(allocator=Adaptive()))

    alpha: float | None = None


@dataclass(frozen=True, kw_only=True)
class GemFilter(Budget, Preset):
    """An early layer picks the top `budget` tokens; the model runs again on them alone, renumbered.

    The KV budget and the prefill reduction are one number here: the coupling FastKV removes."""

    name: ClassVar[str] = "gemfilter"
    paper: ClassVar[str] = "https://arxiv.org/abs/2409.17422"
    prototype: ClassVar[Composed] = Composed(reducer=FilterRerun(), policy=KeepAll())

    filter_layer: int | None = None
    window_size: int | None = None
    kernel_size: int | None = None


@dataclass(frozen=True, kw_only=True)
class PyramidInfer(Window, Preset):
    """Context dropped from the residual stream every few layers; each layer caches the tokens that reached it."""

    name: ClassVar[str] = "pyramidinfer"
    paper: ClassVar[str] = "https://arxiv.org/abs/2405.12532"
    prototype: ClassVar[Composed] = Composed(reducer=LayerSchedule(), policy=KeepAll())

    start_layer: int | None = None
    interval: int | None = None
    decay: float | None = None
    min_len: int | None = None
