"""fastkv: prefill and decoding acceleration for long prompts (FastKV, arXiv 2502.01068)."""

from .adapters import Adapter, adapter_for
from .cache import KVCache
from .engine import PrefillTrace, decode_step, prefill
from .generate import LLM, GenerationResult, GenerationStats, generate, generate_many, stream
from .methods import (
    H2O,
    METHODS,
    PRESETS,
    AdaKV,
    Composed,
    FastKV,
    FullKV,
    GemFilter,
    Method,
    PyramidInfer,
    PyramidKV,
    SnapKV,
    StreamingLLM,
    make_method,
    make_methods,
)
from .models import REGISTRY, ModelNotInstalledError, load
from .needle import passkey_prompt

__version__ = "0.1.0"

__all__ = [
    "H2O",
    "AdaKV",
    "GemFilter",
    "PyramidInfer",
    "PyramidKV",
    "StreamingLLM",
    "METHODS",
    "PRESETS",
    "Adapter",
    "Composed",
    "FastKV",
    "FullKV",
    "GenerationResult",
    "GenerationStats",
    "LLM",
    "KVCache",
    "Method",
    "ModelNotInstalledError",
    "PrefillTrace",
    "REGISTRY",
    "SnapKV",
    "adapter_for",
    "decode_step",
    "generate",
    "generate_many",
    "load",
    "make_method",
    "make_methods",
    "passkey_prompt",
    "prefill",
    "stream",
]
