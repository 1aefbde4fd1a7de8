"""Tiny random models of every supported family, built from configs (no downloads)."""

from __future__ import annotations

import os

# Check the values of every selection the parts return, on any device (`fastkv.engine.DEBUG`).
os.environ.setdefault("FASTKV_DEBUG", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    # A wide init separates logits, so greedy choices are not decided by rounding.
    initializer_range=0.2,
    tie_word_embeddings=False,
)

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"use_sliding_window": False}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),
}


def build_tiny(family: str, attn: str = "sdpa", **overrides) -> torch.nn.Module:
    config_cls, model_cls, extra = FAMILIES[family]
    config = config_cls(**{**COMMON, **extra, **overrides})
    config._attn_implementation = attn
    torch.manual_seed(0)
    return model_cls(config).eval()


@pytest.fixture(params=list(FAMILIES))
def family(request) -> str:
    return request.param


def prompt_ids(length: int, seed: int = 1, vocab: int = 128) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, length), generator=g)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Qwen2 model with qwen2.5-0.5b's tokenizer, saved like any local model."""
    from fastkv.models import MODELS, load_tokenizer, part_paths

    if not part_paths(MODELS["qwen2.5-0.5b"]):
        if os.environ.get("FASTKV_REQUIRE_MODELS") == "1":
            raise RuntimeError("qwen2.5-0.5b is not installed (its tokenizer is needed)")
        pytest.skip("qwen2.5-0.5b is not installed (its tokenizer is needed)")
    tokenizer = load_tokenizer("qwen2.5-0.5b", progress=False)
    model = build_tiny("qwen2", vocab_size=len(tokenizer), max_position_embeddings=4096)
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
