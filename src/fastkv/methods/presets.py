"""The nine methods we compare, as named presets of a context reducer and a cache policy.

Each is a frozen dataclass whose fields are its parts' knobs (`fastkv methods` lists them), e.g.
`SnapKV(budget=512)`, `FastKV(kernel_size=13, tsp_layer=15)`; spec strings name them in lower case.
"""

from __future__ import annotations

from .method import Composed, Preset, preset
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

FullKV = preset(
    "FullKV",
    "fullkv",
    Composed(reducer=NoReduction(), policy=KeepAll()),
    "No compression: every layer sees every token and caches every entry. The reference.",
)
SnapKV = preset(
    "SnapKV",
    "snapkv",
    Composed(reducer=NoReduction(), policy=TopK()),
    """Full prefill; each layer and KV head caches the entries the observation window attends to most.

    Selects per KV head (GQA-aware). The FastKV paper's SnapKV baseline repeats K/V to every query head
    before selecting, which stores Hq/Hkv times more (7x on a 14:2 model).""",
    "https://arxiv.org/abs/2404.14469",
)
FastKV = preset(
    "FastKV",
    "fastkv",
    Composed(reducer=TSP(), policy=TopK()),
    """Token-Selective Propagation for prefill, plus SnapKV's cache for decoding, decoupled.

    Layers 0..tsp_layer run on the full prompt and compress their caches as SnapKV does; after tsp_layer
    only the top tsp_rate of the tokens continue (with their original positions); every later layer
    caches its own best entries among them, to the same budget relative to the prompt. The TSP layer uses
    the cache's window, kernel and pooling, as in the paper's code; combine with `+` to change that.""",
    "https://arxiv.org/abs/2502.01068",
)
StreamingLLM = preset(
    "StreamingLLM",
    "streamingllm",
    Composed(reducer=NoReduction(), policy=SinkRecent()),
    "Full prefill; each layer caches the attention sinks and the most recent tokens.",
    "https://arxiv.org/abs/2309.17453",
)
H2O = preset(
    "H2O",
    "h2o",
    Composed(reducer=NoReduction(), policy=TopK(scorer=AccumulatedAttention())),
    "Full prefill; each layer caches the heavy hitters (most attention received, causally) and a recent window.",
    "https://arxiv.org/abs/2306.14048",
)
PyramidKV = preset(
    "PyramidKV",
    "pyramidkv",
    Composed(reducer=NoReduction(), policy=TopK(allocator=Pyramid())),
    "SnapKV's selection with budgets falling linearly from the bottom layers to the top (mean: the budget).",
    "https://arxiv.org/abs/2406.02069",
)
AdaKV = preset(
    "AdaKV",
    "adakv",
    Composed(reducer=NoReduction(), policy=TopK(allocator=Adaptive())),
    "SnapKV's scores with each layer's budget shared among its KV heads by one top-k over all of them.",
    "https://arxiv.org/abs/2407.11550",
)
GemFilter = preset(
    "GemFilter",
    "gemfilter",
    Composed(reducer=FilterRerun(), policy=KeepAll()),
    """An early layer picks the top `budget` tokens; the model runs again on them alone, renumbered.

    The KV budget and the prefill reduction are one number here: the coupling FastKV removes.""",
    "https://arxiv.org/abs/2409.17422",
)
PyramidInfer = preset(
    "PyramidInfer",
    "pyramidinfer",
    Composed(reducer=LayerSchedule(), policy=KeepAll()),
    "Context dropped from the residual stream every few layers; each layer caches the tokens that reached it.",
    "https://arxiv.org/abs/2405.12532",
)

PRESETS: dict[str, type[Preset]] = {
    cls.name: cls for cls in (FullKV, SnapKV, FastKV, StreamingLLM, H2O, PyramidKV, AdaKV, GemFilter, PyramidInfer)
}
