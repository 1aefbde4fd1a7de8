"""fastkv: prefill and decoding acceleration for long prompts (FastKV, arXiv 2502.01068)."""

from .adapters import Adapter, adapter_for
from .cache import KVCache
from .decode import decode_step
from .engine import ContextLengthError, prefill
from .generate import generate, generate_batch, generate_many, stream
from .layer import PrefillOptions
from .llm import LLM
from .methods import (
    H2O,
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
    format_spec,
    parse,
)
from .methods.base import PrefillTrace
from .models import MODELS, DiskSpaceError, ModelNotInstalledError, load
from .needle import passkey_prompt
from .results import GenerationResult, GenerationStats
from .sampling import SamplingParams

__version__ = "0.1.0"

__all__ = [
    "H2O",
    "MODELS",
    "PRESETS",
    "AdaKV",
    "Adapter",
    "Composed",
    "ContextLengthError",
    "DiskSpaceError",
    "FastKV",
    "FullKV",
    "GemFilter",
    "GenerationResult",
    "GenerationStats",
    "KVCache",
    "LLM",
    "Method",
    "ModelNotInstalledError",
    "PrefillOptions",
    "PrefillTrace",
    "PyramidInfer",
    "PyramidKV",
    "SamplingParams",
    "SnapKV",
    "StreamingLLM",
    "adapter_for",
    "decode_step",
    "format_spec",
    "generate",
    "generate_batch",
    "generate_many",
    "load",
    "parse",
    "passkey_prompt",
    "prefill",
    "stream",
]
