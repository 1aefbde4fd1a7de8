"""Decode-time budgets (issue 30): generated entries cut back in place, checked against brute force."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from fastkv import PrefillOptions, adapter_for, decode_step, generate, prefill
from fastkv.cache import merge
from fastkv.compaction import generated_attention
from fastkv.methods import FullKV, parse
from fastkv.methods.decoding.scorers import Redundancy

from .conftest import build_tiny, prompt_ids
from .test_generate import CharTokenizer
from .test_matrix import CASES


def brute_attention(q, pk, pvalid, k, scale, softcap=None):
    """generated_attention by loops: every query head and query alone."""
    hq, c, _ = q.shape
    hkv, n, _ = k.shape
    out = torch.zeros(hkv, n, dtype=torch.float64)
    for h in range(hq):
        kv = h // (hq // hkv)
        for j in range(c):
            seen_prompt = pk[kv][pvalid[kv]].double()
            seen_gen = k[kv, : n - c + j + 1].double()
            logits = torch.cat([seen_prompt, seen_gen]) @ q[h, j].double() * scale
            if softcap is not None:
                logits = softcap * torch.tanh(logits / softcap)
            p = logits.softmax(0)
            out[kv, : n - c + j + 1] += p[len(seen_prompt) :]
    return out


@pytest.mark.parametrize("softcap", [None, 20.0])
def test_generated_attention_matches_brute_force(softcap):
    g = torch.Generator().manual_seed(0)
    q, pk, k = torch.randn(6, 3, 8, generator=g), torch.randn(2, 10, 8, generator=g), torch.randn(2, 7, 8, generator=g)
    pvalid = torch.rand(2, 10, generator=g) > 0.3
    got = generated_attention(q, pk, pvalid, k, 0.4, softcap)
    assert torch.allclose(got.double(), brute_attention(q, pk, pvalid, k, 0.4, softcap), atol=1e-5)


def test_redundancy_score_matches_its_formula():
    g = torch.Generator().manual_seed(1)
    attention, keys = torch.rand(2, 6, generator=g), torch.randn(2, 6, 4, generator=g)
    keys[0, 3] = keys[0, 1] * 2  # a repeated key: more redundant
    got = Redundancy()(attention, keys, None)
    for h in range(2):
        mean_other = torch.tensor([
            sum(torch.cosine_similarity(keys[h, i], keys[h, j], dim=0) for j in range(6) if j != i) / 5
            for i in range(6)
        ])  # fmt: skip
        want = 0.1 * attention[h] / attention[h].sum() - 0.9 * mean_other.softmax(0)
        assert torch.allclose(got[h], want, atol=1e-6)


def run(adapter, method: str, steps: int, tokens=None, max_tokens=64):
    """Prefill a 100-token prompt and decode `steps` tokens (greedy, or `tokens` forced); the cache, the logits."""
    cache, logits, _ = prefill(adapter, prompt_ids(100), parse(method), PrefillOptions(max_tokens=max_tokens))
    token, out = logits.argmax(-1), []
    for s in range(steps):
        step = decode_step(adapter, cache, token if tokens is None else tokens[s : s + 1], cache.position_base + s)
        out.append(step)
        token = step.argmax(-1)
    return cache, torch.cat(out)


PROMPT_POLICY = "snapkv(budget=32, window_size=8, kernel_size=5)"


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text"])
def test_a_budget_above_the_generation_changes_nothing(family):
    adapter = adapter_for(build_tiny(family))
    _, plain = run(adapter, PROMPT_POLICY, 40)
    for scorer in ("window", "accumulated", "redundancy"):
        spec = PROMPT_POLICY[:-1] + f", decode_budget=48, decode_interval=8, decode_scorer={scorer})"
        cache, budgeted = run(adapter, spec, 40)
        assert torch.equal(plain.argmax(-1), budgeted.argmax(-1))
        assert torch.allclose(plain, budgeted, atol=1e-5)
        assert cache.decode_state.evicted == [0]


def test_accumulated_scores_are_all_attention_received():
    """Folded in every interval, the running score equals the sum of every step's attention (brute force)."""
    adapter = adapter_for(build_tiny("llama"))
    spec = PROMPT_POLICY[:-1] + ", decode_budget=60, decode_interval=4, decode_window=2, decode_scorer=accumulated)"
    cache, logits = run(adapter, spec, 1)
    state, g0 = cache.decode_state, cache.decode_state.gen_start
    queries = {i: [state.queries[i][0, :, 0].clone()] for i in range(4)}
    token = logits.argmax(-1)
    for s in range(1, 12):
        token = decode_step(adapter, cache, token, cache.position_base + s).argmax(-1)
        for i in range(4):
            queries[i].append(state.queries[i][0, :, s % 4].clone())
    for i in range(4):
        keys, start = cache.keys[i][0], g0[i][0]
        want = torch.zeros(2, 12, dtype=torch.float64)
        for s, q in enumerate(queries[i]):  # step s saw the prompt's entries and generated ones 0..s
            want[:, : s + 1] += brute_attention(q[:, None], keys[:, :start], cache.attend[i][0, :, :start],
                                                keys[:, start : start + s + 1], adapter.scales[i])  # fmt: skip
        assert torch.allclose(state.carried[i][0, :, :12].double(), want, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_cut_keeps_the_brute_force_top_entries_and_attends_as_a_mask_would(family):
    """Budget 8, interval 6, window 2: at step 12 each layer and KV head keeps its 6 best older entries by the last
    2 queries' attention (brute force), and the 2 latest. Decoding on from there gives the logits of an uncut cache
    whose evicted entries are masked."""
    adapter = adapter_for(build_tiny(family))
    spec = PROMPT_POLICY[:-1] + ", decode_budget=8, decode_interval=6, decode_window=2)"
    _, free = run(adapter, PROMPT_POLICY, 20)
    tokens = free.argmax(-1)
    cut, _ = run(adapter, spec, 11, tokens)
    full, _ = run(adapter, PROMPT_POLICY, 11, tokens)
    shapes = [k.shape for k in cut.keys]
    state = cut.decode_state
    # step 12 (index 11): the cut follows it
    decode_step(adapter, cut, tokens[11:12], cut.position_base + 11)
    decode_step(adapter, full, tokens[11:12], full.position_base + 11)
    last_two = [state.queries[i][0][:, [0, 1]] for i in range(4)]  # steps 10 and 11 sit at 10 % 2, 11 % 2
    assert state.generated == [8] and state.evicted == [4 * 2 * 4]
    for i in range(4):
        g0 = state.gen_start[i][0]
        gen = full.keys[i][0, :, g0 : g0 + 12]
        scores = brute_attention(last_two[i], full.keys[i][0, :, :g0], full.attend[i][0, :, :g0], gen,
                                 adapter.scales[i])  # fmt: skip
        for h in range(2):
            keep = sorted(scores[h, :10].topk(6).indices.tolist()) + [10, 11]
            # (the two caches differ in length, so layers past the first differ by rounding)
            assert torch.allclose(cut.keys[i][0, h, g0 : g0 + 8], gen[h, keep], atol=1e-5)
            assert torch.allclose(cut.values[i][0, h, g0 : g0 + 8], full.values[i][0, h, g0 : g0 + 12][keep], atol=1e-5)
            dropped = [t for t in range(12) if t not in keep]
            with torch.inference_mode():
                full.attend[i][0, h, g0 + torch.tensor(dropped)] = False
        assert not cut.attend[i][0, :, g0 + 8 :].any() and int(cut.slots[i][0]) == g0 + 8
    for s in range(12, 18):  # up to the next cut (step 18)
        a = decode_step(adapter, cut, tokens[s : s + 1], cut.position_base + s)
        b = decode_step(adapter, full, tokens[s : s + 1], full.position_base + s)
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    assert [k.shape for k in cut.keys] == shapes  # in place: no buffer grew


@pytest.mark.parametrize("scorer", ["window", "accumulated", "redundancy"])
def test_memory_stays_flat_over_a_long_generation(scorer):
    adapter = adapter_for(build_tiny("llama"))
    spec = PROMPT_POLICY[:-1] + f", decode_budget=16, decode_interval=8, decode_window=4, decode_scorer={scorer})"
    cache, logits = run(adapter, spec, 200, max_tokens=300)
    assert all(k.shape[2] == kept + 24 for k, kept in zip(cache.keys, cache.kept_per_layer, strict=True))
    assert torch.isfinite(logits).all()
    # cuts at steps 24, 32, ..., 200, each back to 16: 184 entries evicted per layer and KV head
    assert cache.decode_state.generated == [16] and cache.decode_state.evicted[0] == (200 - 16) * 2 * 4


def test_ragged_batch_with_budgets_follows_solo_runs():
    """Rows with different budgets, intervals and scorers, and one without, decode together as they do alone."""
    adapter = adapter_for(build_tiny("qwen2"))
    specs = [
        PROMPT_POLICY[:-1] + ", decode_budget=8, decode_interval=4, decode_window=2)",
        "fastkv(tsp_layer=1, tsp_len=48, budget=24, decode_budget=12, decode_interval=8, decode_scorer=accumulated)",
        "fullkv",
    ]
    lengths = (70, 130, 96)
    solo = [prefill(adapter, prompt_ids(n, seed=n), parse(s), PrefillOptions(max_tokens=40))
            for n, s in zip(lengths, specs, strict=True)]  # fmt: skip
    tokens = torch.stack([logits[0].argmax() for _, logits, _ in solo])
    from fastkv.decode import start_decoding

    for cache, _, _ in solo:
        start_decoding(adapter, cache)
    batch = merge([cache for cache, _, _ in solo])
    for step in range(30):
        logits = decode_step(adapter, batch, tokens, batch.position_base + step)
        alone = torch.cat(
            [decode_step(adapter, c, tokens[b : b + 1], c.position_base + step) for b, (c, _, _) in enumerate(solo)]
        )
        assert torch.allclose(logits, alone, rtol=1e-4, atol=1e-5), (step, (logits - alone).abs().max())
        tokens = alone.argmax(-1)
    assert batch.decode_state.evicted == [*(c.decode_state.evicted[0] for c, _, _ in solo[:2]), 0]
    assert batch.decode_state.evicted[0] > 0 and batch.decode_state.evicted[1] > 0


def test_generation_reports_evictions_and_final_bytes():
    model = build_tiny("llama")
    ids = prompt_ids(100)[0].tolist()
    plain = generate(model, CharTokenizer(), ids, PROMPT_POLICY, max_tokens=60, ignore_eos=True)
    cut = generate(model, CharTokenizer(), ids, PROMPT_POLICY[:-1] + ", decode_budget=16, decode_interval=8)",
                   max_tokens=60, ignore_eos=True)  # fmt: skip
    assert plain.stats.kv_evicted == 0 and cut.stats.kv_evicted > 0
    assert cut.stats.kv_bytes == plain.stats.kv_bytes and cut.stats.kv_bytes_end < plain.stats.kv_bytes_end
    assert "decode_budget=16" in cut.stats.method


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ("snapkv(decode_interval=8)", "decode_interval"),
        ("fastkv(decode_budget=4, decode_window=8)", "decode_window"),
        ("h2o(decode_budget=64, decode_window=32, decode_interval=16)", "decode_window"),
        ("snapkv(decode_budget=64, decode_scorer=nope)", "decode_scorer"),
        ("snapkv(decode_budget=0)", "decode_budget"),
    ],
)
def test_bad_decode_knobs_raise_naming_the_field(spec, field):
    with pytest.raises(ValueError, match=field):
        parse(spec)


PRESETS = {"fullkv": FullKV, **{name: case.compressing for name, case in CASES.items()}}
SCORERS = ("window", "accumulated", "redundancy")


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_under_a_decode_budget(name, family):
    """The shared invariants of decode budgets, for every preset: a budget above the generation is no budget
    (same logits, nothing evicted); a binding one holds every buffer's shape and its generated entries to
    budget + interval while evicting, and its logits stay finite. (Sliding layers of gemma3 keep their ring.)"""
    adapter = adapter_for(build_tiny(family))
    base = PRESETS[name]()
    scorer = SCORERS[list(PRESETS).index(name) % 3]
    ids = prompt_ids(96, seed=11)

    def decode(method, tokens=None, steps=30):
        cache, logits, _ = prefill(adapter, ids, method, PrefillOptions(max_tokens=steps))
        shapes, token, out, fed = [k.shape for k in cache.keys], logits.argmax(-1), [], []
        for s in range(steps):
            token = token if tokens is None else tokens[s : s + 1]
            fed.append(token)
            step = decode_step(adapter, cache, token, cache.position_base + s)
            out.append(step)
            token = step.argmax(-1)
            assert [k.shape for k in cache.keys] == shapes
        return cache, torch.cat(out), torch.cat(fed)

    _, plain, tokens = decode(base)
    cache, same, _ = decode(replace(base, decode_budget=64, decode_interval=8, decode_scorer=scorer), tokens)
    torch.testing.assert_close(same, plain, rtol=1e-4, atol=1e-5)
    assert cache.decode_state.evicted == [0]
    small = replace(base, decode_budget=8, decode_interval=4, decode_window=2, decode_scorer=scorer)
    cache, cut, _ = decode(small, tokens)
    dense = [i for i, w in enumerate(adapter.windows) if w is None]
    assert cache.decode_state.generated == [8 + 2]  # cut back to 8 at steps 12, 16, ..., 28, then two more
    assert cache.decode_state.evicted == [(28 - 8) * adapter.num_kv_heads * len(dense)]
    for i in dense:
        assert int(cache.slots[i][0]) == cache.decode_state.gen_start[i][0] + 8 + 2  # two steps since the cut
    assert torch.isfinite(cut).all()
