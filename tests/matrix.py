"""The shared invariants that every context reducer x cache policy combination must keep.

`combinations()` enumerates the registries, so a part added to them (in `fastkv.methods.registry`, or in
a test) is in the matrix with no code of its own. Every part is built from one dictionary of knobs
(`COMPRESSING` or `UNCOMPRESSED`); a part takes the knobs it has.
"""

from __future__ import annotations

import itertools
from dataclasses import fields

import torch

from fastkv import PrefillOptions, adapter_for, decode_step, prefill
from fastkv.methods import Composed
from fastkv.methods.base import PARTS, build, is_sub

from .conftest import build_tiny, prompt_ids
from .reference import assert_same_as_fullkv, hf_decode_logits

L, LAYERS, BUDGET = 96, 4, 24
COMPRESSING = {
    "budget": BUDGET,
    "window_size": 8,
    "kernel_size": 5,
    "sink": 4,
    "beta": 4,
    "alpha": 0.2,
    "tsp_layer": 1,
    "tsp_len": 48,
    "filter_layer": 1,
    "start_layer": 1,
    "interval": 1,
    "decay": 0.7,
    "min_len": 16,
}
# Every size at the whole prompt, every floor at its least: nothing may be dropped.
UNCOMPRESSED = {
    "retain_rate": 1.0,
    "tsp_rate": 1.0,
    "decay": 1.0,
    "min_budget": 1,
    "min_tsp_len": 1,
    "min_len": 8,
    "beta": 1,  # pyramid budgets all equal
    "window_size": 8,
    "tsp_layer": 1,
    "filter_layer": 1,
    "start_layer": 1,
    "interval": 1,
}


def variants(kind: str) -> list[tuple[str, dict]]:
    """(label, choices) for every part of `kind` and every choice of its sub-parts (a TopK's scorer and
    allocator)."""
    out = []
    for name, cls in PARTS[kind].items():
        subs = [f for f in fields(cls) if is_sub(f) and f.metadata["named"]]  # (not a policy's decode budget)
        for picked in itertools.product(*(PARTS[f.metadata["kind"]] for f in subs)):
            choices = {f.name: p for f, p in zip(subs, picked, strict=True)}
            out.append(("-".join([name, *picked]), {"cls": cls, **choices}))
    return out


def combinations() -> list[tuple[str, dict, dict]]:
    """(id, reducer variant, policy variant) for every reducer x every cache policy."""
    return [(f"{r}+{p}", rv, pv) for (r, rv), (p, pv) in itertools.product(variants("reducer"), variants("policy"))]


def compose(reducer: dict, policy: dict, knobs: dict) -> Composed:
    def make(variant: dict):
        choices = {k: v for k, v in variant.items() if k != "cls"}
        return build(variant["cls"], {**knobs, **choices})

    return Composed(reducer=make(reducer), policy=make(policy))


def check_invariants(method: Composed, family: str) -> None:
    """Selections stay among the tokens present, the last token is always cached, the budget holds, the
    cache's bytes are what it holds, and decoding from it matches transformers' own decode step."""
    model = build_tiny(family)
    adapter = adapter_for(model)
    cache, logits, trace = prefill(adapter, prompt_ids(L, seed=11), method, PrefillOptions(max_tokens=2))
    hkv = adapter.num_kv_heads
    present = list(range(trace.tokens_per_layer[0]))  # the final pass's prompt (GemFilter's: renumbered)
    assert trace.tokens_per_layer == sorted(trace.tokens_per_layer, reverse=True)
    total = 0
    for i in range(LAYERS):
        assert trace.tokens_per_layer[i] == len(present)
        kept = cache.positions[i][0]
        n = kept.shape[-1]
        valid = cache.valid[i][0, :, :n] if cache.valid[i] is not None else torch.ones_like(kept, dtype=torch.bool)
        for head in range(hkv):
            real = kept[head][valid[head]].tolist()
            assert len(set(real)) == len(real), f"layer {i} head {head} caches an entry twice"
            assert set(real) <= set(present), f"layer {i} caches a token that is not present there"
            assert present[-1] in real, f"layer {i} head {head} dropped the last prompt token"
            total += len(real)
        if i in trace.propagated:
            after = trace.propagated[i][0].tolist()
            assert after == sorted(after) and set(after) <= set(present) and after[-1] == present[-1]
            present = after
    budget = method.bind(LAYERS).policy.kv_budget(L)
    if budget is not None:
        assert total <= LAYERS * hkv * budget
    assert cache.nbytes() == cache.entry_bytes() * sum(cache.lengths)
    assert cache.position_base == trace.tokens_per_layer[0]
    token = int(logits.argmax())
    ref = hf_decode_logits(model, cache, token, position=cache.position_base)
    ours = decode_step(adapter, cache, torch.tensor([token]), cache.position_base)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def check_uncompressed_equals_fullkv(method: Composed, family: str) -> None:
    """With every size at the whole prompt, the combination is FullKV, bit for bit, through decoding."""
    assert_same_as_fullkv(adapter_for(build_tiny(family)), prompt_ids(L, seed=12), method, steps=3)
