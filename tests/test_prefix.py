"""The prefix store (`fastkv.prefix`): a prompt D + N after D + Q was stored gives what a fresh prefill of
D + N gives (the same greedy tokens, logits within float rounding) for every reducer x cache policy, or says
why it ran fresh; matching is by token ids within a scope, bounded in bytes, least recently used first."""

from __future__ import annotations

import pytest
import torch

from fastkv import FastKV, FullKV, PrefillOptions, SnapKV, adapter_for, decode_step, prefill
from fastkv.prefix import BLOCK, PrefixStore

from .conftest import build_tiny, prompt_ids
from .matrix import COMPRESSING, combinations, compose

STEPS, TOLERANCE = 3, 1e-4  # logits within 1e-4 of the largest: attention sums in another order
D = prompt_ids(160, seed=31)[0].tolist()
Q, N = prompt_ids(24, seed=32)[0].tolist(), prompt_ids(30, seed=33)[0].tolist()


def greedy(adapter, ids: list[int], method, store: PrefixStore | None = None):
    """(prefill logits, greedy tokens, reuse) of a prompt, from the store or fresh."""
    input_ids = torch.tensor([ids])
    if store is None:
        cache, logits, _ = prefill(adapter, input_ids, method, PrefillOptions(STEPS))
        reuse = None
    else:
        cache, logits, _, reuse = store.prefill(adapter, input_ids, method, PrefillOptions(STEPS))
    first, tokens = logits, []
    for step in range(STEPS):
        tokens.append(int(logits.argmax()))
        if step < STEPS - 1:
            logits = decode_step(adapter, cache, torch.tensor(tokens[-1:]), len(ids) + step)
    return first, tokens, reuse


def assert_same(got, fresh) -> None:
    assert got[1] == fresh[1]
    worst = float((got[0] - fresh[0]).abs().max() / fresh[0].abs().max())
    assert worst <= TOLERANCE, worst


def runs_fresh(label: str) -> bool:
    """What the store cannot serve exactly: H2O's scores need every query (unless the policy only runs in
    GemFilter's rerun, which is fresh anyway)."""
    return "accumulated" in label and not label.startswith("filter")


@pytest.mark.parametrize("label, reducer, policy", combinations(), ids=[c[0] for c in combinations()])
def test_every_combination_continues_from_the_store_as_a_fresh_prefill(label, reducer, policy):
    adapter = adapter_for(build_tiny("qwen2"))
    method = compose(reducer, policy, COMPRESSING).bind(adapter.num_layers)
    store = PrefixStore(64 * 2**20)
    greedy(adapter, D + Q, method, store)  # stores D + Q
    got, fresh = greedy(adapter, D + N, method, store), greedy(adapter, D + N, method)
    assert_same(got, fresh)
    reuse = got[2]
    if runs_fresh(label):
        assert reuse.tokens == 0 and reuse.fresh_because, reuse
    else:
        assert reuse.tokens == len(D) and not reuse.fresh_because, reuse


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_a_new_part_shorter_than_the_window_recomputes_the_window(family):
    adapter = adapter_for(build_tiny(family))
    method = FastKV(tsp_layer=1, tsp_len=48, budget=24, window_size=16).bind(adapter.num_layers)
    store = PrefixStore(64 * 2**20)
    greedy(adapter, D + Q, method, store)
    short = D + N[:3]  # 3 new tokens: the window of 16 reaches 13 tokens into D
    got = greedy(adapter, short, method, store)
    assert_same(got, greedy(adapter, short, method))
    assert got[2].tokens == len(short) - 16


def test_any_method_continues_from_another_methods_entry():
    adapter = adapter_for(build_tiny("llama"))
    fastkv = FastKV(tsp_layer=1, tsp_len=48, budget=24).bind(adapter.num_layers)
    store = PrefixStore(64 * 2**20, mid_layers=frozenset({1}))  # residuals where this FastKV propagates
    greedy(adapter, D + Q, FullKV(), store)
    for method in (fastkv, SnapKV(budget=24)):
        got = greedy(adapter, D + N, method, store)
        assert_same(got, greedy(adapter, D + N, method))
        assert got[2].tokens == len(D)


@pytest.mark.parametrize("label, reducer, policy", combinations(), ids=[c[0] for c in combinations()])
def test_every_combination_continues_from_a_fastkv_entry(label, reducer, policy):
    """A FastKV entry holds layers 0..tsp_layer and the residuals at its TSP layer: a method that needs every
    token in later layers rejoins the stored tokens there, and runs those layers on all of them; its answer
    is a fresh prefill's. One that needs more (H2O's every query, a selection at a layer without stored
    residuals) runs fresh and says why."""
    adapter = adapter_for(build_tiny("qwen2"))
    fastkv = FastKV(tsp_layer=1, tsp_len=48, budget=24).bind(adapter.num_layers)
    store = PrefixStore(64 * 2**20)
    greedy(adapter, D + Q, fastkv, store)
    (entry,) = store.entries.values()
    assert entry.depth == 2 and set(entry.mids) == {1}
    method = compose(reducer, policy, COMPRESSING).bind(adapter.num_layers)
    got = greedy(adapter, D + N, method, store)
    assert_same(got, greedy(adapter, D + N, method))
    reuse = got[2]
    assert reuse.tokens == len(D) or (reuse.tokens == 0 and reuse.fresh_because), reuse
    if label.startswith("none+") and not runs_fresh(label):  # every layer on every token: rejoins at layer 1
        assert reuse.tokens == len(D), reuse


def test_a_prefix_that_ends_inside_a_block_is_matched_to_the_token():
    adapter = adapter_for(build_tiny("llama"))
    store = PrefixStore(64 * 2**20)
    greedy(adapter, D + Q, FullKV(), store)
    cut = D[: BLOCK + 13] + N  # shares 77 tokens: one whole block and 13 of the next
    got = greedy(adapter, cut, FullKV(), store)
    assert got[2].tokens == BLOCK + 13
    assert_same(got, greedy(adapter, cut, FullKV()))
    other = [(t + 1) % 128 for t in D[:BLOCK]] + D[BLOCK:] + N  # the first block differs: nothing to start from
    assert greedy(adapter, other, FullKV(), store)[2].tokens == 0


def test_the_store_is_bounded_and_evicts_the_least_recently_used():
    adapter = adapter_for(build_tiny("llama"))
    documents = [prompt_ids(130, seed=s)[0].tolist() for s in (41, 42, 43)]
    probe = PrefixStore(2**30)
    greedy(adapter, documents[0], FullKV(), probe)
    one = probe.bytes
    store = PrefixStore(int(2.5 * one))  # room for two entries
    for doc in documents:
        greedy(adapter, doc, FullKV(), store)
    assert store.stats.entries == 2 and store.stats.evictions == 1 and store.bytes <= store.max_bytes
    assert store.bytes == 2 * one
    assert greedy(adapter, documents[0] + N, FullKV(), store)[2].tokens == 0  # evicted: runs fresh
    got = greedy(adapter, documents[2] + N, FullKV(), store)
    assert got[2].tokens == 130 and got[1] == greedy(adapter, documents[2] + N, FullKV())[1]


def test_an_entry_that_a_longer_prompt_extends_is_replaced_by_it():
    adapter = adapter_for(build_tiny("llama"))
    store = PrefixStore(64 * 2**20)
    greedy(adapter, D, FullKV(), store)
    greedy(adapter, D + Q, FullKV(), store)  # turn 2 repeats turn 1: one entry holds both
    assert store.stats.entries == 1 and store.stats.hits == 1 and store.stats.tokens_reused == len(D)


@pytest.mark.parametrize("other", ["another model", "another dtype"])
def test_another_model_or_dtype_never_matches(other):
    store = PrefixStore(64 * 2**20)
    first = adapter_for(build_tiny("llama"))
    greedy(first, D + Q, FullKV(), store)
    model = build_tiny("llama", num_hidden_layers=3) if other == "another model" else build_tiny("llama").double()
    second = adapter_for(model)
    got = greedy(second, D + N, FullKV(), store)
    assert got[2].tokens == 0 and store.stats.misses == 2
    assert_same(got, greedy(second, D + N, FullKV()))


def test_stored_state_is_never_written_by_its_readers():
    adapter = adapter_for(build_tiny("qwen2"))
    store = PrefixStore(64 * 2**20)
    greedy(adapter, D + Q, FullKV(), store)
    (entry,) = store.entries.values()
    before = [k.clone() for k in entry.keys]
    for tail in (N, Q[::-1]):
        greedy(adapter, D + tail, SnapKV(budget=24), store)
    assert all(torch.equal(a, b) for a, b in zip(before, entry.keys, strict=True))
