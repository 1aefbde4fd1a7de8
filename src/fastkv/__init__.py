"""fastkv: prefill and decoding acceleration for long prompts (FastKV, arXiv 2502.01068)."""

from .adapters import Adapter, adapter_for
from .cache import KVCache
from .engine import PrefillTrace, decode_step, prefill
from .methods import METHODS, FastKV, FullKV, Method, SnapKV, make_method

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "Adapter",
    "FastKV",
    "FullKV",
    "KVCache",
    "Method",
    "PrefillTrace",
    "SnapKV",
    "adapter_for",
    "decode_step",
    "make_method",
    "prefill",
]
