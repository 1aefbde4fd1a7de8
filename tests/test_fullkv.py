"""FullKV must reproduce transformers' own forward and greedy generation."""

from __future__ import annotations

import torch

from fastkv import FullKV, adapter_for, decode_step, prefill

from .conftest import build_tiny, prompt_ids


def greedy(adapter, ids, method, steps):
    cache, logits, _ = prefill(adapter, ids, method, max_new_tokens=steps)
    out = []
    for t in range(steps):
        token = logits.argmax(-1)
        out.append(int(token))
        if t < steps - 1:
            logits = decode_step(adapter, cache, token, ids.shape[1] + t)
    return out, cache


def test_last_logits_match_transformers(family):
    model = build_tiny(family)
    ids = prompt_ids(96)
    with torch.no_grad():
        ref = model(ids).logits[:, -1]
    _, logits, trace = prefill(adapter_for(model), ids, FullKV())
    assert trace.tokens_per_layer == [96] * 4
    rel = (logits - ref).abs().max() / ref.abs().max()
    assert rel < 1e-4, rel


def test_greedy_tokens_match_generate(family):
    model = build_tiny(family)
    ids = prompt_ids(64, seed=2)
    with torch.no_grad():
        ref = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=32,
            do_sample=False,
            min_new_tokens=32,
            pad_token_id=0,
        )
    ours, cache = greedy(adapter_for(model), ids, FullKV(), 32)
    assert ours == ref[0, 64:].tolist()
    # One entry per decoded token was appended in place to every layer (the last token is not fed back).
    assert cache.lengths == [64 + 31] * 4


def test_half_precision_follows_transformers(family):
    # bfloat16 and float16 take the same path; the engine must stay as close to transformers as
    # transformers' own float32 result is to it.
    for dtype in (torch.bfloat16, torch.float16):
        model = build_tiny(family).to(dtype)
        ids = prompt_ids(64, seed=9)
        with torch.no_grad():
            ref = model(ids).logits[:, -1].float()
            exact = build_tiny(family)(ids).logits[:, -1]
        _, logits, _ = prefill(adapter_for(model), ids, FullKV())
        assert logits.dtype == torch.float32
        assert (logits - ref).abs().max() <= 2 * (ref - exact).abs().max() + 1e-2
