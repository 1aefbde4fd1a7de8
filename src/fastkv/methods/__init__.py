"""Methods by name. Each lives in its own module; `METHODS` maps the CLI/API name to its class."""

from __future__ import annotations

from .adakv import AdaKV
from .base import Method
from .fastkv import FastKV
from .fullkv import FullKV
from .gemfilter import GemFilter
from .h2o import H2O
from .pyramidinfer import PyramidInfer
from .pyramidkv import PyramidKV
from .snapkv import SnapKV
from .streamingllm import StreamingLLM

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (FullKV, SnapKV, FastKV, StreamingLLM, H2O, PyramidKV, AdaKV, GemFilter, PyramidInfer)
}


def make_method(name: str, **knobs) -> Method:
    """Build a method from its registered name and knobs (None values mean 'use the default')."""
    key = name.lower()
    if key not in METHODS:
        raise ValueError(f"unknown method {name!r}: choose one of {sorted(METHODS)}")
    cls = METHODS[key]
    accepted = {f for f in cls.__dataclass_fields__}
    given = {k: v for k, v in knobs.items() if v is not None}
    unknown = sorted(set(given) - accepted)
    if unknown:
        raise ValueError(f"method {key!r} has no knob(s) {unknown}; it takes {sorted(accepted)}")
    return cls(**given)


def make_with_shared(name: str, **shared) -> Method:
    """A method by name, given the shared knobs (None: the method's default) that it has; the others are
    left out. For comparisons that set one KV budget or TSP rate across methods."""
    key = name.lower()
    fields = METHODS[key].__dataclass_fields__ if key in METHODS else {}
    return make_method(key, **{k: v for k, v in shared.items() if k in fields})


__all__ = [
    "METHODS",
    "H2O",
    "AdaKV",
    "FastKV",
    "FullKV",
    "GemFilter",
    "Method",
    "PyramidInfer",
    "PyramidKV",
    "SnapKV",
    "StreamingLLM",
    "make_method",
    "make_with_shared",
]
