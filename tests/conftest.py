"""Tiny random models of every supported family, built from configs (no downloads)."""

from __future__ import annotations

import os

# Check the values of every selection the parts return, on any device (`fastkv.layer.DEBUG`).
os.environ.setdefault("FASTKV_DEBUG", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

# pytest-xdist's workers (pyproject: `-n 2`) share the cores: each one's torch gets its part of them (two
# workers of two threads on two cores slow each other down: OpenMP's threads spin while they wait). The
# CLIs and servers a test starts keep the default, as a user's do.
if workers := os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, torch.get_num_threads() // int(workers)))


# The longest files, longest first (the durations every run prints): each xdist worker takes the next file
# when it finishes one, so a long file left for last would keep one worker busy alone at the end.
LONGEST = ("test_readme.py", "test_real_model.py", "test_real_model_1p5b.py", "test_real_model_gemma3.py")


def pytest_collection_modifyitems(config, items) -> None:
    """The longest files first, then the other real-model files (marked slow), then the rest; a file's
    tests keep their order."""
    slow = {item.path.name for item in items if item.get_closest_marker("slow") is not None}

    def rank(item) -> int:
        name = item.path.name
        return LONGEST.index(name) if name in LONGEST else len(LONGEST) + (name not in slow)

    items.sort(key=rank)


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
WINDOW = 24  # tiny sliding windows: the tests' prompts (64-160 tokens) run far past them
HYBRID = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
GEMMA = dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW, layer_types=HYBRID, pad_token_id=0)

# name -> (config class, model class, overrides): every family fastkv supports, as a tiny random model.
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "mistral-window": (MistralConfig, MistralForCausalLM, {"sliding_window": WINDOW}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"use_sliding_window": False}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),
    "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM,
                  {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}),
    "mixtral": (MixtralConfig, MixtralForCausalLM, {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "gemma2": (Gemma2Config, Gemma2ForCausalLM,
               {**GEMMA, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}),
    "gemma3_text": (Gemma3TextConfig, Gemma3ForCausalLM, {**GEMMA, "final_logit_softcapping": 30.0}),
    "phi3": (Phi3Config, Phi3ForCausalLM, {"partial_rotary_factor": 0.5, "pad_token_id": 0}),
    "olmo2": (Olmo2Config, Olmo2ForCausalLM, {"pad_token_id": 0}),
    "granite": (GraniteConfig, GraniteForCausalLM, {"embedding_multiplier": 6.0, "residual_multiplier": 0.3,
                                                    "attention_multiplier": 0.2, "logits_scaling": 4.0}),
}  # fmt: skip
# The families whose layers all see every token: what tests of a method's selections at every layer use.
DENSE = ["llama", "qwen2", "qwen3"]


EAGER_ONLY = {"gemma2"}  # transformers runs its soft-capped attention only eagerly


def build_tiny(family: str, attn: str = "sdpa", **overrides) -> torch.nn.Module:
    config_cls, model_cls, extra = FAMILIES[family]
    config = config_cls(**{**COMMON, **extra, **overrides})
    config._attn_implementation = "eager" if family in EAGER_ONLY else attn
    torch.manual_seed(0)
    return model_cls(config).eval()


@pytest.fixture(params=list(FAMILIES))
def family(request) -> str:
    return request.param


@pytest.fixture(params=DENSE)
def dense_family(request) -> str:
    """A family whose every layer sees every token: for tests of a method's selections at every layer."""
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
