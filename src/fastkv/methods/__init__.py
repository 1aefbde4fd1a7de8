"""Methods as FastKV's paper decouples them: a context reducer x a KV-cache policy.

- `base`: the parts' protocol (what the engine asks per layer), `Selection`, knob checks, `PARTS`;
- `reducers/`, `policies/`, `scorers/`, `allocators/`: one part per file; `registry`: one line each;
- `method`: `Composed(reducer, policy)` and the `Preset` base; `presets`: the nine methods we compare;
- `spec`: spec strings such as `fastkv(kernel_size=13)` or `fastkv+adakv`: `parse` and `format_spec`.
"""

from __future__ import annotations

from .base import PARTS, CachePolicy, LayerState, Part, Reducer, Selection
from .method import PRESETS, Composed, Method, Preset
from .presets import H2O, AdaKV, FastKV, FullKV, GemFilter, PyramidInfer, PyramidKV, SnapKV, StreamingLLM
from .registry import register
from .spec import format_spec, parse, short_spec, spec_name, split_specs

__all__ = [
    "H2O",
    "PARTS",
    "PRESETS",
    "AdaKV",
    "CachePolicy",
    "Composed",
    "FastKV",
    "FullKV",
    "GemFilter",
    "LayerState",
    "Method",
    "Part",
    "Preset",
    "PyramidInfer",
    "PyramidKV",
    "Reducer",
    "Selection",
    "SnapKV",
    "StreamingLLM",
    "format_spec",
    "parse",
    "register",
    "short_spec",
    "spec_name",
    "split_specs",
]
