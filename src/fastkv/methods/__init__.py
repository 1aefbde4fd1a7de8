"""Methods as FastKV's paper decouples them: a context reducer x a KV-cache policy.

- `base`: the parts' protocol (what the engine asks per layer), `Selection`, knob checks;
- `reducers/`, `policies/`, `scorers/`, `allocators/`: one part per file; `registry`: one line each;
- `method`: `Composed(reducer, policy)` and flat presets; `presets`: the nine methods we compare;
- `spec`: spec strings such as `fastkv(kernel_size=13)` or `fastkv+adakv`, parsed and written.
"""

from __future__ import annotations

from .base import CachePolicy, LayerState, Part, Reducer, Selection
from .method import Composed, Method, Preset
from .presets import H2O, PRESETS, AdaKV, FastKV, FullKV, GemFilter, PyramidInfer, PyramidKV, SnapKV, StreamingLLM
from .registry import ALLOCATORS, POLICIES, REDUCERS, SCORERS, register
from .spec import format_spec, make_method, make_methods, make_with_shared, parse_specs

# The presets by name (kept under this name for older code).
METHODS = PRESETS

__all__ = [
    "ALLOCATORS",
    "H2O",
    "METHODS",
    "POLICIES",
    "PRESETS",
    "REDUCERS",
    "SCORERS",
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
    "make_method",
    "make_methods",
    "make_with_shared",
    "parse_specs",
    "register",
]
