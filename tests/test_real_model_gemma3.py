"""gemma3-270m from its PyPI packages: a hybrid model (local layers with a 512-token window, every sixth layer
global) against transformers, far past its window, and its passkey under FullKV and FastKV.

Marked slow (about a minute on 2 CPU cores, plus a one-time conversion). Skipped without the model's packages,
unless FASTKV_REQUIRE_MODELS=1 (set by CI).
"""

from __future__ import annotations

import os

import pytest
import torch

from fastkv import LLM, FastKV, FullKV, passkey_prompt
from fastkv.models import MODELS, part_paths

pytestmark = pytest.mark.slow

if part_paths(MODELS["gemma3-270m"]) is None:
    if os.environ.get("FASTKV_REQUIRE_MODELS") == "1":
        raise RuntimeError(f"gemma3-270m is not installed: {MODELS['gemma3-270m'].pip_command}")
    pytest.skip("gemma3-270m is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM.load("gemma3-270m", dtype="float32", progress=False)  # the reference precision


def test_the_adapter_reads_its_hybrid_layout(llm):
    a = llm.adapter
    assert a.num_layers == 18 and a.global_layers == [5, 11, 17] and a.hybrid
    assert all(w == 512 for i, w in enumerate(a.windows) if i not in (5, 11, 17))
    assert not llm.tokenizer.chat_template  # a base model: prompts go in as they are


def test_greedy_fullkv_equals_transformers_generate_far_past_the_window(llm):
    needle = passkey_prompt(llm.tokenizer, 2100, depth=0.3, seed=5)
    ids = llm.tokenizer(needle.text, return_tensors="pt")["input_ids"]
    assert ids.shape[1] > 2000  # four windows long
    with torch.no_grad():
        ref = llm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                                 min_new_tokens=24, pad_token_id=0)[0, ids.shape[1]:].tolist()  # fmt: skip
    ours = llm.generate(ids[0].tolist(), FullKV(), max_tokens=24, ignore_eos=True)
    assert ours.token_ids == ref
    # every local layer holds its window, every global one the whole prompt and the answer
    kept = ours.stats.kv_entries_per_layer
    assert [kept[i] for i in (5, 11, 17)] == [ids.shape[1]] * 3
    assert all(k == 511 for i, k in enumerate(kept) if i not in (5, 11, 17))


def test_the_passkey_at_2k_under_fullkv_and_fastkv(llm):
    needle = passkey_prompt(llm.tokenizer, 2048, depth=0.5, seed=1)  # four of its local layers' windows
    for method in (FullKV(), FastKV()):
        result = llm.generate(needle.text, method, max_tokens=12)
        assert needle.is_correct(result.text), (method, result.text)


def test_the_server_answers_the_openai_client(llm):
    """`fastkv serve --model gemma3-270m`: a base model, so the openai client's completions (a chat is refused
    with the endpoint to use), streamed and whole, with its calibrated FastKV; the 2K passkey comes back."""
    openai = pytest.importorskip("openai")
    from .test_serve import Live

    needle = passkey_prompt(llm.tokenizer, 2048, depth=0.5, seed=3)  # four windows long
    server = Live(llm, name="gemma3-270m", method="fastkv", kv_mib=256)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        whole = client.completions.create(model="gemma3-270m", prompt=needle.text, max_tokens=12, temperature=0)
        assert needle.is_correct(whole.choices[0].text), whole.choices[0].text
        stats = whole.model_extra["fastkv"]
        assert stats["defaults"].startswith("profile gemma3-270m") and stats["method"].startswith("fastkv(")
        pieces = [
            c.choices[0].text
            for c in client.completions.create(
                model="gemma3-270m", prompt=needle.text, max_tokens=12, temperature=0, stream=True
            )
        ]
        assert "".join(pieces) == whole.choices[0].text
        with pytest.raises(openai.BadRequestError, match="no chat template: use /v1/completions"):
            client.chat.completions.create(model="gemma3-270m", messages=[{"role": "user", "content": "hi"}])
    finally:
        server.close()
