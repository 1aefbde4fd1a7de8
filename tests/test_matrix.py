"""One matrix, every reducer x every cache policy, through the shared invariants of `tests/matrix.py`;
then every preset's exact cache sizes, reference selections and invalid configs, on tiny random Llama,
Qwen2 and Qwen3 models."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from fastkv import (
    H2O,
    AdaKV,
    FastKV,
    GemFilter,
    PrefillOptions,
    PyramidInfer,
    PyramidKV,
    SnapKV,
    StreamingLLM,
    adapter_for,
    decode_step,
    prefill,
)
from fastkv.methods import PRESETS
from fastkv.methods.allocators.pyramid import Pyramid

from .conftest import DENSE, build_tiny, prompt_ids
from .conftest import FAMILIES as ALL_FAMILIES
from .matrix import COMPRESSING, UNCOMPRESSED, check_invariants, check_uncompressed_equals_fullkv, combinations, compose
from .reference import (
    assert_top_entries,
    avg_pool,
    eager_attentions,
    hf_decode_logits,
    last_query_dots,
    run_layers_with_drops,
    snap_scores,
)

L, W, LAYERS = 96, 8, 4
FAMILIES = DENSE  # exact sizes and reference selections: every layer sees every token


@dataclass
class Case:
    compressing: Callable[[], object]
    uncompressed: Callable[[], object]
    lengths: list[int]  # cache entries per layer (per head: the longest head)
    tokens: list[int]  # tokens each layer computes on
    position_base: int = L


CASES = {
    "snapkv": Case(lambda: SnapKV(budget=24), lambda: SnapKV(retain_rate=1.0), [24] * 4, [L] * 4),
    "fastkv": Case(
        lambda: FastKV(tsp_layer=1, tsp_len=48, budget=24),
        lambda: FastKV(tsp_rate=1.0, retain_rate=1.0),
        [24] * 4,
        [L, L, 48, 48],
    ),
    "streamingllm": Case(
        lambda: StreamingLLM(sink=4, budget=24), lambda: StreamingLLM(retain_rate=1.0), [24] * 4, [L] * 4
    ),
    "h2o": Case(lambda: H2O(budget=24), lambda: H2O(retain_rate=1.0), [24] * 4, [L] * 4),
    # prefix budgets 28, 20, 12, 4 (beta 4) + window 8: mean 24
    "pyramidkv": Case(
        lambda: PyramidKV(budget=24, beta=4), lambda: PyramidKV(retain_rate=1.0, beta=1), [36, 28, 20, 12], [L] * 4
    ),
    "adakv": Case(lambda: AdaKV(budget=24, pooling="avg"), lambda: AdaKV(retain_rate=1.0), None, [L] * 4),
    "gemfilter": Case(
        lambda: GemFilter(budget=24, filter_layer=1), lambda: GemFilter(retain_rate=1.0), [24] * 4, [24] * 4, 24
    ),
    # drops after layers 1 and 2: 96 * 0.7 = 67, 96 * 0.49 = 47; none after the last layer
    "pyramidinfer": Case(
        lambda: PyramidInfer(start_layer=1, interval=1, decay=0.7, min_len=16),
        lambda: PyramidInfer(decay=1.0),
        [L, L, 67, 47],
        [L, L, 67, 47],
    ),
}


COMBINATIONS = combinations()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("reducer, policy", [c[1:] for c in COMBINATIONS], ids=[c[0] for c in COMBINATIONS])
def test_every_combination_keeps_the_invariants(reducer, policy, family):
    check_invariants(compose(reducer, policy, COMPRESSING), family)


OTHER_FAMILIES = [f for f in ALL_FAMILIES if f not in FAMILIES]


@pytest.mark.parametrize("family", OTHER_FAMILIES)
@pytest.mark.parametrize("name", list(CASES))
def test_every_preset_keeps_the_invariants_on_every_family(name, family):
    """Every preset through the same invariants on the other blocks (windowed, hybrid, MoE, fused, post-norm,
    scaled): their layers, caches and a decode step against transformers' own (every combination of parts
    runs on the dense families above)."""
    check_invariants(CASES[name].compressing(), family)


@pytest.mark.parametrize("reducer, policy", [c[1:] for c in COMBINATIONS], ids=[c[0] for c in COMBINATIONS])
def test_every_combination_without_compression_is_fullkv(reducer, policy):
    check_uncompressed_equals_fullkv(compose(reducer, policy, UNCOMPRESSED), "qwen2")


def test_the_matrix_covers_every_part_and_preset():
    ids = {c[0] for c in COMBINATIONS}
    assert len(ids) == 4 * (2 + 3 * 3)  # reducers x (all, sinkrecent, topk x scorers x allocators)
    assert "tsp+topk-window-adaptive" in ids and "filter+topk-accumulated-uniform" in ids
    # every preset is one of the combinations
    shapes = {(type(compose(r, p, COMPRESSING).reducer), compose(r, p, COMPRESSING).policy) for _, r, p in COMBINATIONS}
    for cls in PRESETS.values():
        proto = cls.prototype
        assert any(t is type(proto.reducer) and type(p) is type(proto.policy) for t, p in shapes)


def test_every_preset_has_its_exact_sizes_below():
    assert set(CASES) | {"fullkv"} == set(PRESETS)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", list(CASES))
def test_cache_sizes_and_decode_positions(name, family):
    case = CASES[name]
    model = build_tiny(family)
    adapter = adapter_for(model)
    ids = prompt_ids(L, seed=11)
    cache, logits, trace = prefill(adapter, ids, case.compressing(), PrefillOptions(max_tokens=2))
    assert trace.tokens_per_layer == case.tokens
    hkv = model.config.num_key_value_heads
    if name == "adakv":
        for i in range(LAYERS):
            counts = cache.kept_per_head(i)
            assert int(counts.sum()) == hkv * 24  # the layer's total budget, shared by its heads
            assert cache.lengths[i] == int(counts.max())  # padded to the longest head
            assert int(counts.min()) >= int(0.2 * 16) + W  # every head keeps its floor and the window
        # the bytes held are what the padded per-head counts promise
        entry = 2 * adapter.head_dim * 4
        assert cache.nbytes() == sum(hkv * int(cache.kept_per_head(i).max()) * entry for i in range(LAYERS))
    else:
        assert cache.lengths == case.lengths
        assert cache.nbytes() == sum(case.lengths) * 2 * hkv * adapter.head_dim * 4
    assert cache.position_base == case.position_base
    token = int(logits.argmax())
    ref = hf_decode_logits(model, cache, token, position=cache.position_base)
    ours = decode_step(adapter, cache, torch.tensor([token]), cache.position_base)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_window_scored_selections_match_reference(family):
    model = build_tiny(family, attn="eager")
    adapter = adapter_for(model)
    ids = prompt_ids(L, seed=13)
    probs = eager_attentions(model, ids)
    hkv = model.config.num_key_value_heads
    budgets = Pyramid(beta=4).budgets(24, W, LAYERS)
    assert budgets == [36, 28, 20, 12] and sum(budgets) / LAYERS == 24
    pyramid, _, _ = prefill(adapter, ids, PyramidKV(budget=24, beta=4))
    h2o, _, _ = prefill(adapter, ids, H2O(budget=24))
    snap_recent, _, _ = prefill(adapter, ids, SnapKV(budget=24, recent_share=0.75))
    for i, p in enumerate(probs):
        snap = snap_scores(p, W, 7, "max", hkv)
        # H2O: attention received from every query (causal by construction of the eager probs), over all but
        # the most recent half of the budget (12 entries), which is kept whole
        heavy = torch.zeros(hkv, L - 12, dtype=torch.float64)
        for h in range(p.shape[0]):
            heavy[h // (p.shape[0] // hkv)] += p[h, :, : L - 12].double().sum(0)
        for head in range(hkv):
            assert_top_entries(pyramid.positions[i][0, head], snap[head], W, budgets[i])
            assert_top_entries(h2o.positions[i][0, head], heavy[head], 12, 24)
            # a recent share on window scores: the last 18 whole, the best 6 of the rest by the window's scores
            assert_top_entries(snap_recent.positions[i][0, head], snap[head][: L - 18], 18, 24)


@pytest.mark.parametrize("family", FAMILIES)
def test_adakv_allocation_matches_reference(family):
    model = build_tiny(family, attn="eager")
    ids = prompt_ids(L, seed=14)
    probs = eager_attentions(model, ids)
    hkv = model.config.num_key_value_heads
    cache, _, _ = prefill(adapter_for(model), ids, AdaKV(budget=24, pooling="avg", alpha=0.2))
    per_head, floor = 16, 3
    for i, p in enumerate(probs):
        ref = snap_scores(p, W, 7, "avg", hkv)
        # brute force: each head's top `floor`, then the best of what is left over all heads
        chosen = {(h, int(t)) for h in range(hkv) for t in ref[h].argsort(descending=True)[:floor]}
        rest = sorted(
            ((float(ref[h, t]), h, t) for h in range(hkv) for t in range(L - W) if (h, t) not in chosen),
            reverse=True,
        )
        chosen |= {(h, t) for _, h, t in rest[: hkv * per_head - len(chosen)]}
        for head in range(hkv):
            valid = cache.valid[i][0, head, : cache.lengths[i]]
            kept = cache.positions[i][0, head][valid].tolist()
            assert kept[-W:] == list(range(L - W, L))
            assert sorted(kept[:-W]) == sorted(t for h, t in chosen if h == head)


@pytest.mark.parametrize("family", FAMILIES)
def test_streamingllm_keeps_sinks_and_recent(family):
    cache, _, _ = prefill(adapter_for(build_tiny(family)), prompt_ids(L), StreamingLLM(sink=4, budget=24))
    expected = list(range(4)) + list(range(L - 20, L))
    for positions in cache.positions:
        for head in positions[0]:
            assert head.tolist() == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_gemfilter_reruns_on_reference_top_tokens(family):
    model = build_tiny(family)
    adapter = adapter_for(model)
    ids = prompt_ids(L, seed=15)
    cache, logits, trace = prefill(adapter, ids, GemFilter(budget=24, filter_layer=1, kernel_size=5))
    first = trace.filter
    assert first.tokens_per_layer == [L, L]  # layers 0 and 1 ran on the full prompt before the restart
    assert trace.tokens_per_layer == [24] * 4 and not trace.propagated  # the rerun drops nothing
    selected = first.propagated[1][0]
    ref = avg_pool(last_query_dots(model, ids, 1), 5)
    assert_top_entries(selected, ref[: L - 1], 1, 24)
    # The second pass is the plain model on the selected tokens, renumbered 0..23.
    with torch.no_grad():
        expected = model(ids[:, selected]).logits[:, -1]
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    for positions in cache.positions:
        assert positions[0, 0].tolist() == list(range(24))


@pytest.mark.parametrize("family", FAMILIES)
def test_pyramidinfer_drops_reference_tokens_and_keeps_positions(family):
    eager = build_tiny(family, attn="eager")
    ids = prompt_ids(L, seed=16)
    method = PyramidInfer(start_layer=1, interval=1, decay=0.7, min_len=16)
    cache, logits, trace = prefill(adapter_for(eager), ids, method)
    hkv = eager.config.num_key_value_heads
    first = snap_scores(eager_attentions(eager, ids)[1], W, 1, "max", hkv).sum(0)
    assert_top_entries(trace.propagated[1][0], first, W, 67)
    assert set(trace.propagated[2][0].tolist()) <= set(trace.propagated[1][0].tolist())
    # Each layer caches exactly the tokens that reached it.
    assert torch.equal(cache.positions[2][0, 0], trace.propagated[1][0])
    assert torch.equal(cache.positions[3][0, 0], trace.propagated[2][0])
    ref = run_layers_with_drops(build_tiny(family, attn="sdpa"), ids, trace.propagated)
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: StreamingLLM(sink=-1), "SinkRecent.sink"),
        (lambda: StreamingLLM(sink=4, budget=4), "sink=4"),
        (lambda: StreamingLLM(retain_rate=0.0), "retain_rate"),
        (lambda: StreamingLLM(min_budget=0), "min_budget"),
        (lambda: H2O(window_size=0), "window_size"),
        (lambda: H2O(budget=4), "window_size=8"),
        (lambda: H2O(chunk_mib=0), "chunk_mib"),
        (lambda: H2O(budget=64, retain_rate=0.5), "retain_rate or budget"),
        (lambda: PyramidKV(beta=0), "beta"),
        (lambda: PyramidKV(kernel_size=2), "kernel_size"),
        (lambda: AdaKV(alpha=0.0), "alpha"),
        (lambda: AdaKV(alpha=1.5), "alpha"),
        (lambda: GemFilter(filter_layer=-1), "filter_layer"),
        (lambda: GemFilter(kernel_size=4), "kernel_size"),
        (lambda: GemFilter(window_size=0), "window_size"),
        (lambda: GemFilter(budget=0), "budget"),
        (lambda: PyramidInfer(decay=0.0), "decay"),
        (lambda: PyramidInfer(decay=1.2), "decay"),
        (lambda: PyramidInfer(interval=0), "interval"),
        (lambda: PyramidInfer(min_len=4), "window_size"),
        (lambda: FastKV(min_tsp_len=0), "min_tsp_len"),
        (lambda: PyramidInfer(start_layer=-1), "start_layer"),
    ],
)
def test_invalid_configs_raise_naming_the_field(make, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        make()


@pytest.mark.parametrize(
    "method, field",
    [(GemFilter(filter_layer=4), "filter_layer=4"), (PyramidInfer(start_layer=9), "start_layer=9")],
)
def test_layers_outside_the_model_raise(method, field):
    with pytest.raises(ValueError, match=field):
        prefill(adapter_for(build_tiny("llama")), prompt_ids(L), method)
