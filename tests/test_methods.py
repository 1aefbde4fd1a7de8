"""SnapKV and FastKV against brute-force references built from transformers' own attention."""

from __future__ import annotations

import warnings

import pytest
import torch

from fastkv import FastKV, FullKV, PrefillOptions, SnapKV, adapter_for, decode_step, prefill
from fastkv.methods import format_spec
from fastkv.methods import method as method_module

from .conftest import build_tiny, prompt_ids
from .reference import (
    assert_same_as_fullkv,
    assert_top_entries,
    eager_attentions,
    hf_decode_logits,
    run_layers_on_subset,
    snap_scores,
)

L = 80
W = 8


@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_snapkv_keeps_reference_top_entries(dense_family, pooling):
    model = build_tiny(dense_family, attn="eager")
    ids = prompt_ids(L)
    probs = eager_attentions(model, ids)
    method = SnapKV(budget=24, window_size=W, kernel_size=5, pooling=pooling)
    cache, _, trace = prefill(adapter_for(model), ids, method)
    assert trace.tokens_per_layer == [L] * 4  # SnapKV does not cut prefill
    hkv = model.config.num_key_value_heads
    for i, p in enumerate(probs):
        ref = snap_scores(p, W, 5, pooling, hkv)
        assert cache.lengths[i] == 24
        for head in range(hkv):
            assert_top_entries(cache.positions[i][0, head], ref[head], W, 24)


def test_snapkv_cache_holds_the_selected_keys(dense_family):
    model = build_tiny(dense_family)
    adapter = adapter_for(model)
    ids = prompt_ids(L)
    full, _, _ = prefill(adapter, ids, FullKV())
    snap, _, _ = prefill(adapter, ids, SnapKV(retain_rate=0.3, min_budget=1))
    for i in range(adapter.num_layers):
        idx = snap.positions[i][..., None].expand(-1, -1, -1, adapter.head_dim)
        n = snap.lengths[i]
        assert n == 24
        torch.testing.assert_close(snap.keys[i][:, :, :n], full.keys[i][:, :, :L].gather(2, idx))
        torch.testing.assert_close(snap.values[i][:, :, :n], full.values[i][:, :, :L].gather(2, idx))


def test_fastkv_propagates_reference_top_tokens(dense_family):
    eager = build_tiny(dense_family, attn="eager")
    ids = prompt_ids(L, seed=3)
    probs = eager_attentions(eager, ids)
    method = FastKV(tsp_layer=1, tsp_rate=0.5, min_tsp_len=1, budget=24, window_size=W, kernel_size=7)
    adapter = adapter_for(eager)
    cache, logits, trace = prefill(adapter, ids, method)

    hkv = eager.config.num_key_value_heads
    tsp_ref = snap_scores(probs[1], W, 7, "max", hkv).sum(0)
    selected = trace.propagated[1][0]
    assert_top_entries(selected, tsp_ref, W, 40)
    assert list(trace.propagated) == [1]
    # Layers after the TSP layer compute on the 40 propagated tokens only.
    assert trace.tokens_per_layer == [L, L, 40, 40]
    # Every layer keeps the budget: the full-context layers among L tokens, the later ones among 40.
    assert cache.lengths == [24] * 4
    for i in range(2):
        for head in range(hkv):
            assert_top_entries(cache.positions[i][0, head], snap_scores(probs[i], W, 7, "max", hkv)[head], W, 24)
    for i in range(2, 4):
        assert set(cache.positions[i].flatten().tolist()) <= set(selected.tolist())

    # The propagated tokens carry their original positions: transformers' own layers, run on exactly
    # those tokens at those positions, give the same logits.
    ref = run_layers_on_subset(build_tiny(dense_family, attn="sdpa"), ids, split=1, keep=selected)
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", [SnapKV(budget=24), FastKV(tsp_layer=1, tsp_len=40, budget=24)])
def test_decode_continues_from_original_length(dense_family, method):
    model = build_tiny(dense_family)
    adapter = adapter_for(model)
    ids = prompt_ids(L, seed=4)
    cache, logits, _ = prefill(adapter, ids, method, PrefillOptions(max_tokens=3))
    token = int(logits.argmax())
    ref = hf_decode_logits(model, cache, token, position=L)
    # A position taken from the compressed cache length would give other logits.
    wrong = hf_decode_logits(model, cache, token, position=24)
    ours = decode_step(adapter, cache, torch.tensor([token]), L)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ours, wrong, rtol=1e-4, atol=1e-4)
    assert cache.lengths == [25] * 4


def test_fastkv_without_compression_equals_fullkv(family):
    adapter = adapter_for(build_tiny(family))
    assert_same_as_fullkv(adapter, prompt_ids(L, seed=5), FastKV(tsp_rate=1.0, retain_rate=1.0), steps=8)


def test_short_prompt_is_not_compressed():
    adapter = adapter_for(build_tiny("llama"))
    ids = prompt_ids(40)
    cache, _, trace = prefill(adapter, ids, SnapKV(budget=40))
    assert cache.lengths == [40] * 4
    cache, _, trace = prefill(adapter, ids, FastKV(tsp_len=64, budget=64))
    assert cache.lengths == [40] * 4 and trace.tokens_per_layer == [40] * 4


def test_tsp_length_at_least_prompt_drops_nothing():
    adapter = adapter_for(build_tiny("qwen2"))
    ids = prompt_ids(L)
    _, _, trace = prefill(adapter, ids, FastKV(tsp_len=L, budget=16))
    assert trace.tokens_per_layer == [L] * 4 and not trace.propagated


def test_fastkv_defaults_are_the_papers_on_long_prompts():
    adapter = adapter_for(build_tiny("llama", num_hidden_layers=8, max_position_embeddings=4096))
    ids = prompt_ids(3000)
    cache, _, trace = prefill(adapter, ids, FastKV())
    # tsp_layer = 8 // 2 - 1 = 3, tsp_rate 0.2 -> 600 tokens, retain_rate 0.1 -> 300 entries
    assert trace.tokens_per_layer == [3000] * 4 + [600] * 4
    assert cache.lengths == [300] * 8
    assert format_spec(FastKV().bind(8)) == (
        "fastkv(window_size=8, kernel_size=7, pooling='max', tsp_layer=3, tsp_rate=0.2, min_tsp_len=512, "
        "retain_rate=0.1, min_budget=256)"
    )


def test_a_budget_above_what_tsp_passes_on_warns_and_is_capped_as_it_says(monkeypatch):
    monkeypatch.setattr(method_module, "_UNREACHABLE_WARNED", set())  # each message warns once per process
    adapter = adapter_for(build_tiny("llama"))  # 4 layers: tsp_layer 1 cuts after the second
    ids = prompt_ids(L)
    with pytest.warns(UserWarning, match=r"cache budget \(60 tokens\) is above what the 'tsp' reducer passes on \(40"):
        cache, _, trace = prefill(adapter, ids, FastKV(tsp_layer=1, tsp_len=40, budget=60))
    # what the warning says: the layers after the cut cache all 40 tokens they see, not the 60 asked
    assert trace.tokens_per_layer == [L, L, 40, 40] and cache.lengths == [60, 60, 40, 40]
    with pytest.warns(UserWarning, match=r"cache budget \(25% of the prompt\) is above .* \(10% of the prompt\)"):
        FastKV(tsp_rate=0.1, retain_rate=0.25).bind(4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # within what TSP passes on, or equal to it: silent
        FastKV(tsp_layer=1, tsp_len=40, budget=40).bind(4)
        FastKV(tsp_rate=0.1, retain_rate=0.1).bind(4)
        FastKV().bind(4)
        FastKV(tsp_rate=0.1, retain_rate=0.25).bind(4)  # warned above: not again
    # bounded: past MAX_UNREACHABLE_WARNINGS distinct messages, no more (a server binds every request)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for budget in range(41, 41 + 2 * method_module.MAX_UNREACHABLE_WARNINGS):
            FastKV(tsp_layer=1, tsp_len=40, budget=budget).bind(4)
    assert len(caught) == method_module.MAX_UNREACHABLE_WARNINGS - 2


@pytest.mark.parametrize("length", [40, 150, 256])
def test_default_fastkv_leaves_short_prompts_whole(family, length):
    """At most min_budget (256) tokens: bit for bit FullKV, prefill and decoding."""
    assert_same_as_fullkv(adapter_for(build_tiny(family)), prompt_ids(length, seed=6), FastKV(), steps=4)


def test_floors_of_rate_derived_sizes():
    adapter = adapter_for(build_tiny("qwen2"))
    ids = prompt_ids(400)
    # 10% of 400 is 40, raised to min_budget; 20% is 80, raised to min_tsp_len (400: no TSP)
    cache, _, trace = prefill(adapter, ids, FastKV(tsp_layer=1))
    assert cache.lengths == [256] * 4 and trace.tokens_per_layer == [400] * 4
    cache, _, trace = prefill(adapter, ids, FastKV(tsp_layer=1, min_budget=100, min_tsp_len=300))
    assert cache.lengths == [100] * 4 and trace.tokens_per_layer == [400, 400, 300, 300]
    # explicit counts are taken as given
    cache, _, trace = prefill(adapter, ids, FastKV(tsp_layer=1, budget=40, tsp_len=80))
    assert cache.lengths == [40] * 4 and trace.tokens_per_layer == [400, 400, 80, 80]


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: FastKV(tsp_rate=0.0), "tsp_rate"),
        (lambda: FastKV(tsp_rate=1.5), "tsp_rate"),
        (lambda: FastKV(retain_rate=-0.1), "retain_rate"),
        (lambda: SnapKV(retain_rate=2), "retain_rate"),
        (lambda: SnapKV(budget=4, window_size=8), "window_size=8"),
        (lambda: FastKV(tsp_len=4, window_size=8), "tsp_len"),
        (lambda: SnapKV(budget=-3), "budget"),
        (lambda: SnapKV(window_size=-1), "window_size"),
        (lambda: SnapKV(kernel_size=0), "kernel_size"),
        (lambda: SnapKV(kernel_size=4), "kernel_size"),
        (lambda: SnapKV(pooling="median"), "pooling"),
        (lambda: SnapKV(budget=64, retain_rate=0.1), "retain_rate or budget"),
        (lambda: FastKV(tsp_len=64, tsp_rate=0.2), "tsp_rate or tsp_len"),
        (lambda: FastKV(tsp_layer=-1), "tsp_layer"),
        (lambda: FastKV(tsp_len=1.5), "tsp_len"),
    ],
)
def test_invalid_config_raises_naming_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_tsp_layer_outside_the_model_raises():
    adapter = adapter_for(build_tiny("llama"))
    with pytest.raises(ValueError, match="tsp_layer=4 is outside the model"):
        prefill(adapter, prompt_ids(L), FastKV(tsp_layer=4))


def test_prompt_longer_than_context_raises():
    adapter = adapter_for(build_tiny("llama", max_position_embeddings=64))
    with pytest.raises(ValueError, match="exceeds the model's context of 64"):
        prefill(adapter, prompt_ids(60), FullKV(), PrefillOptions(max_tokens=8))
