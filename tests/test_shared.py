"""One prefill for many methods gives, bit for bit, what each method's own prefill gives."""

from __future__ import annotations

import pytest
import torch

from fastkv import PrefillOptions, adapter_for, decode_step, prefill
from fastkv.methods import format_spec, parse
from fastkv.shared import prefill_many

from .conftest import build_tiny, prompt_ids
from .fixtures.record_presets import CONFIGS
from .test_presets import equal

SPECS = [
    *(parse(name, knobs=knobs) for name, knobs in CONFIGS.items()),
    parse("fastkv(tsp_layer=1, tsp_len=48, kernel_size=13, budget=24)"),  # same layer, other tokens
    parse("fastkv(tsp_layer=2, tsp_len=48, budget=24)"),  # shares two layers more
    parse("fastkv(tsp_layer=1, tsp_len=48)+adakv(budget=24)"),  # same tokens as the fastkv preset
    parse("pyramidinfer(start_layer=1, interval=1, decay=0.7, min_len=16)+h2o(budget=24)"),
]


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_shared_prefill_equals_separate_runs(family):
    adapter = adapter_for(build_tiny(family))
    ids = prompt_ids(96, seed=21)
    together = prefill_many(adapter, ids, SPECS, PrefillOptions(max_tokens=3))
    for method, (cache, logits, trace) in zip(SPECS, together, strict=True):
        ref_cache, ref_logits, ref_trace = prefill(adapter, ids, method, PrefillOptions(max_tokens=3))
        assert torch.equal(logits, ref_logits), format_spec(method)
        assert trace.tokens_per_layer == ref_trace.tokens_per_layer
        assert equal(trace.propagated, ref_trace.propagated)
        assert equal(cache.positions, ref_cache.positions) and cache.lengths == ref_cache.lengths
        assert cache.position_base == ref_cache.position_base
        for step in range(3):
            token = ref_logits.argmax(-1)
            ref_logits = decode_step(adapter, ref_cache, token, ref_cache.position_base + step)
            logits = decode_step(adapter, cache, token, cache.position_base + step)
            assert torch.equal(logits, ref_logits), (format_spec(method), step)


def test_shared_prefill_computes_each_branch_once(monkeypatch):
    """Counting layer computations: the six single-pass presets that reduce nothing share one branch; FastKV's and
    its combination with AdaKV (same TSP) share another after layer 1."""
    import fastkv.shared as shared

    adapter = adapter_for(build_tiny("qwen2"))
    methods = [parse(s) for s in ("fullkv", "snapkv(budget=24)", "h2o(budget=24)", "adakv(budget=24)")]
    methods += [
        parse("fastkv(tsp_layer=1, tsp_len=48, budget=24)"),
        parse("fastkv(tsp_layer=1, tsp_len=48)+adakv(budget=24)"),
    ]
    calls = []
    real = shared.layer_step

    def counted(adapter, i, h, *args, **kwargs):
        calls.append(h.shape[1])
        return real(adapter, i, h, *args, **kwargs)

    monkeypatch.setattr(shared, "layer_step", counted)
    prefill_many(adapter, prompt_ids(96), methods)
    # layers 0-1: one branch of 96 tokens; layers 2-3: the full branch and the TSP branch of 48
    assert calls == [96, 96, 96, 48, 96, 48]


def test_generate_many_answers_as_separate_generations():
    from fastkv import generate, generate_many

    from .test_generate import PROMPT, CharTokenizer

    model = build_tiny("llama")
    specs = ["fullkv", "snapkv(budget=24)", "fastkv(tsp_layer=1, tsp_len=32, budget=24)", "gemfilter(budget=24)"]
    together = generate_many(model, CharTokenizer(), PROMPT, specs, max_tokens=6, temperature=0.8, seed=3)
    for spec, result in zip(specs, together, strict=True):
        alone = generate(model, CharTokenizer(), PROMPT, spec, max_tokens=6, temperature=0.8, seed=3)
        assert result.token_ids == alone.token_ids and result.text == alone.text
        assert torch.equal(result.first_logits, alone.first_logits) and result.method == alone.method
        assert result.stats.prefill_shared_by == 4 and alone.stats.prefill_shared_by == 1
