"""`fastkv calibrate` on a tiny model: its prompts, the recall it measures against FastKV's real selections,
resume, and profiles applied as a model's FastKV defaults."""

from __future__ import annotations

import json
import os

import pytest
import torch

from fastkv import LLM, adapter_for, prefill
from fastkv.calibrate import search
from fastkv.calibrate.prompts import NEEDLES, prompt_set
from fastkv.chat import render_chat
from fastkv.eval.ruler import NIAH
from fastkv.models import MODELS, load_tokenizer, part_paths
from fastkv.profiles import find, user_path

from .conftest import build_tiny

if part_paths(MODELS["qwen2.5-0.5b"]) is None:
    if os.environ.get("FASTKV_REQUIRE_MODELS") == "1":
        raise RuntimeError("qwen2.5-0.5b is not installed")
    pytest.skip("qwen2.5-0.5b's tokenizer is not installed", allow_module_level=True)

LENGTHS = (512, 1024)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("qwen2.5-0.5b", progress=False)


@pytest.fixture(scope="module")
def llm(tokenizer):
    model = build_tiny("qwen2", vocab_size=len(tokenizer), max_position_embeddings=16384)
    return LLM(model, tokenizer, name="tiny-calibration")


def test_prompts_are_deterministic_fit_and_hold_their_answer(tokenizer):
    prompts = prompt_set(tokenizer, (2048, 4096), per_kind=2)
    again = prompt_set(tokenizer, (2048, 4096), per_kind=2)
    assert [p.text for p in prompts] == [p.text for p in again]
    assert [p.kind for p in prompts] == list(NEEDLES) * 2 and {p.haystack for p in prompts} == {"prose", "code", "logs"}
    for p in prompts:
        rendered = render_chat(tokenizer, p.text)
        n = len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
        target = 2048 if n < 3000 else 4096
        assert 0.85 * target <= n <= target, (p.kind, p.haystack, n)
        assert rendered.count(p.answer) == 1 and search.answer_positions(tokenizer, rendered, p.answer)
    # independent of RULER: none of its NIAH templates or haystack names appear
    texts = " ".join(p.text for p in prompts)
    assert "special magic" not in texts and all(str(kind) not in texts for kind, *_ in NIAH.values() if kind != "noise")


def test_recall_matches_what_fastkv_propagates(llm, tokenizer):
    """Observe's recall of a setting = the share of answer tokens in FastKV's own propagated tokens."""
    p = prompt_set(tokenizer, (1024,), per_kind=1)[0]
    text = render_chat(tokenizer, p.text)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    answer = search.answer_positions(tokenizer, text, p.answer)
    settings = [search.Setting(1, k, pool, w, 0.3) for k in (7, 13) for pool in ("max", "avg") for w in (8, 16)]
    observe = search.Observe(settings=tuple(settings), answer=answer, retain_rate=0.1)
    adapter = adapter_for(llm.model)
    from fastkv.methods import Composed
    from fastkv.methods.registry import KeepAll

    prefill(adapter, ids, Composed(reducer=observe, policy=KeepAll()))
    for s in settings:
        method = s.method(0.1).bind(adapter.num_layers)
        _, _, trace = prefill(adapter, ids, method)
        kept = set(trace.propagated[1][0].tolist())
        assert observe.found[search.key(s)] == pytest.approx(sum(a in kept for a in answer) / len(answer))


def test_calibration_picks_a_finalist_resumes_and_its_profile_applies(llm, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTKV_CACHE", str(tmp_path))
    kwargs = dict(retain_rate=0.1, min_speedup=1.0, candidates=2, per_kind=1, lengths=LENGTHS)
    record = search.calibrate(llm, llm.name, tmp_path, **kwargs)
    assert record["chosen"] in record["finalists"] and len(record["finalists"]) <= 3
    assert set(record["knobs"]) == {"tsp_layer", "kernel_size", "pooling", "window_size", "tsp_rate"}
    chosen = record["chosen"]
    assert chosen["predicted_speedup_8k"] >= 1.0 and 0 <= chosen["agreement"] <= 1 and chosen["first_token_kl"] >= 0
    best = max((e["agreement"], e["correct"], -e["first_token_kl"]) for e in record["finalists"])
    assert (chosen["agreement"], chosen["correct"], -chosen["first_token_kl"]) == best

    # A rerun finds every prompt done: no prefill, no generation.
    monkeypatch.setattr(search, "prefill", lambda *a, **k: pytest.fail("recomputed stage 1"))
    monkeypatch.setattr(llm, "generate_many", lambda *a, **k: pytest.fail("recomputed stage 2"))
    again = search.calibrate(llm, llm.name, tmp_path, **kwargs)
    assert again["knobs"] == record["knobs"]
    assert [e["spec"] for e in again["finalists"]] == [e["spec"] for e in record["finalists"]]
    assert [e["agreement"] for e in again["finalists"]] == [e["agreement"] for e in record["finalists"]]

    # Saved as the user's profile, it becomes the model's FastKV defaults for spec strings.
    path = user_path(llm.name)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(record))
    tuned = LLM(llm.model, llm.tokenizer, name=llm.name)
    assert find(llm.name).knobs == record["knobs"]
    method, source = tuned.resolve("fastkv")
    assert method.reducer.tsp_layer == record["knobs"]["tsp_layer"] and source.startswith("profile tiny-calibration")
    method, _ = tuned.resolve("fastkv(kernel_size=3)")
    assert method.reducer.kernel_size == 3  # the spec wins
    result = tuned.generate(list(range(40)), "snapkv", max_tokens=2)
    assert result.stats.defaults == ""
    assert llm.resolve("fastkv")[1] == "paper"  # the first LLM was made before the profile existed


def test_one_of_five_hides_five_facts_alike_and_asks_one(tokenizer):
    """The kind that shows a window holding the template: five facts of one form, told apart only by the
    question's key, and the answer is the asked key's value (not the first or last fact's by position)."""
    import re

    prompts = [p for p in prompt_set(tokenizer, (2048,), per_kind=3) if p.kind == "one_of_five"]
    assert len(prompts) == 3
    for p in prompts:
        facts = dict(re.findall(r"The access code of the (\w+(?: \w+)*?) depot is (\d{6})\.", p.text))
        assert len(facts) == 5 and len(set(facts.values())) == 5
        asked = re.search(r"What is the access code of the (.+?) depot\?", p.text).group(1)
        assert facts[asked] == p.answer and p.text.count(p.answer) == 1
