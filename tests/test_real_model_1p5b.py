"""qwen2.5-1.5b (Qwen2.5-Coder-1.5B-Instruct) from its 22 PyPI packages: the offline path and checksum,
exactness against transformers, a passkey through FullKV, SnapKV and FastKV, and the precision `auto` picks.

Marked slow: a one-time assembly and conversion (1.1 GB GGUF, to 3.4 GB in bfloat16 or 6.7 GB in float32,
whichever this CPU's default is), then about a minute on 2 CPU cores. Skipped when the packages are missing,
unless FASTKV_REQUIRE_MODELS=1 (set by CI).
"""

from __future__ import annotations

import os

import pytest
import torch

from fastkv import LLM, FastKV, FullKV, SnapKV, passkey_prompt, prefill
from fastkv.models import MODELS, part_paths

pytestmark = pytest.mark.slow
NAME = "qwen2.5-1.5b"

if part_paths(MODELS[NAME]) is None:
    if os.environ.get("FASTKV_REQUIRE_MODELS") == "1":
        raise RuntimeError(f"{NAME} is not installed: {MODELS[NAME].pip_command}")
    pytest.skip(f"{NAME} is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM.load(NAME, progress=False)  # what users get: the precision measured fastest here


def test_it_is_the_coder_1p5b_and_the_engine_matches_transformers(llm):
    config = llm.model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (28, 12, 2)
    assert config.hidden_size == 1536
    ids = llm.tokenizer("def quicksort(xs):\n    " * 30, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        ref = llm.model(ids, logits_to_keep=1).logits[:, -1].float()
        _, logits, _ = prefill(llm.adapter, ids, FullKV())
    # The same modules in the same precision: rounding of another summation order only.
    tolerance = 1e-4 if llm.adapter.dtype == torch.float32 and "int8" not in llm.precision else 3e-2
    assert ((logits.float() - ref).abs().max() / ref.abs().max()) < tolerance
    assert int(logits.argmax()) == int(ref.argmax())


def test_passkey_at_1k_tokens(llm):
    """FullKV, SnapKV and FastKV from one shared prefill (`generate_many`: each as it would run alone). At 1K
    tokens both floors bind (TSP passes min_tsp_len 512, the cache keeps min_budget 256): still compressed."""
    needle = passkey_prompt(llm.tokenizer, 1024, depth=0.4, seed=3)
    methods = [FullKV(), SnapKV(retain_rate=0.1), FastKV(tsp_rate=0.2, retain_rate=0.1)]
    for method, result in zip(methods, llm.generate_many(needle.text, methods, max_tokens=10, chat=True), strict=True):
        assert needle.is_correct(result.text), (method, result.text)
        if method.name == "fastkv":
            s = result.stats
            # The shipped profile sets the knobs left unset (tsp_layer 15 of 28); tsp_rate is set here.
            assert llm.profile is not None and llm.profile.model == NAME
            layer = llm.profile.knobs["tsp_layer"]
            assert layer == 15 and s.defaults.startswith("profile qwen2.5-1.5b")
            assert s.tokens_per_layer[: layer + 1] == [s.prompt_tokens] * (layer + 1)
            assert s.tokens_per_layer[layer + 1 :] == [max(512, s.prompt_tokens // 5)] * (27 - layer)
