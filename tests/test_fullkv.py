"""FullKV must reproduce transformers' own forward and greedy generation."""

from __future__ import annotations

import pytest
import torch

from fastkv import FastKV, FullKV, PrefillOptions, adapter_for, decode_step, prefill

from .conftest import build_tiny, prompt_ids


def greedy(adapter, ids, method, steps):
    cache, logits, _ = prefill(adapter, ids, method, PrefillOptions(max_tokens=steps))
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


@torch.no_grad()
def forward_greedy(model, ids: torch.Tensor, steps: int) -> list[int]:
    """Greedy tokens by the model's own forward over the whole sequence at every step: the definition, with no
    cache of transformers' involved (its generate on tiny Mixtral parts from its own forward after 4 tokens)."""
    out = []
    for _ in range(steps):
        token = model(ids).logits[:, -1].argmax(-1)
        out.append(int(token))
        ids = torch.cat([ids, token.view(1, 1)], dim=1)
    return out


def test_greedy_tokens_match_transformers(family):
    model = build_tiny(family)
    ids = prompt_ids(64, seed=2)
    adapter = adapter_for(model)
    ours, cache = greedy(adapter, ids, FullKV(), 32)
    assert ours == forward_greedy(model, ids, 32)
    if family not in ("mixtral", "qwen3_moe"):  # and transformers' own generate, where it agrees with its forward
        with torch.no_grad():
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                                 min_new_tokens=32, pad_token_id=0)  # fmt: skip
        assert ours == ref[0, 64:].tolist()
    # One entry per decoded token was appended in place to every layer (the last token is not fed back); a layer
    # with a sliding window holds its window, a ring.
    assert cache.lengths == [64 + 31 if w is None else min(64 + 31, w) for w in adapter.windows]


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


def test_fastkv_with_nothing_dropped_gives_transformers_tokens(family):
    """TSP and the cache policy at their whole-prompt sizes change nothing, in every family's block."""
    model = build_tiny(family)
    ids = prompt_ids(64, seed=4)
    nothing_dropped = FastKV(tsp_rate=1.0, retain_rate=1.0, min_budget=1, min_tsp_len=1)
    ours, _ = greedy(adapter_for(model), ids, nothing_dropped, 16)
    assert ours == forward_greedy(model, ids, 16)


def test_a_layer_the_adapter_does_not_know_is_refused():
    """A layer that lacks a module its adapter uses is refused when the adapter is built; one that has them all
    but computes something else is refused by the check against the model's own forward, which names the
    layer where they part."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from fastkv import LLM
    from fastkv.selfcheck import ModelMismatchError

    from .test_generate import CharTokenizer

    model = build_tiny("llama")
    del model.model.layers[2].post_attention_layernorm
    with pytest.raises(ValueError, match=r"layer 2 \(LlamaDecoderLayer\) lacks \['post_attention_layernorm'\]"):
        adapter_for(model)

    class Rescaled(LlamaDecoderLayer):  # a variant of the block: its MLP's output is halved
        def forward(self, hidden_states, *args, **kwargs):
            residual = hidden_states
            attended = super().forward(hidden_states, *args, **kwargs)
            return residual + 0.5 * (attended - residual)

    model = build_tiny("llama")
    for i in (2, 3):
        layer = Rescaled(model.config, i)
        layer.load_state_dict(model.model.layers[i].state_dict())
        model.model.layers[i] = layer
    with pytest.raises(ModelMismatchError, match="part after layer 2"):
        LLM(model, CharTokenizer(), "variant")
    LLM(build_tiny("llama"), CharTokenizer(), "plain")  # the plain block passes


@pytest.mark.parametrize("family", ["mistral-window", "gemma2", "gemma3_text"])
def test_windowed_layers_attend_by_original_position_after_tsp(family):
    """After TSP the tokens present are sparse: a windowed layer's query at position p sees the tokens within
    W positions of p (not the last W tokens present), as transformers' own layers compute under a mask written
    from those positions; the cache of a windowed layer holds what the next token can see."""
    from .reference import run_layers_with_drops_by_position

    model = build_tiny(family)
    adapter = adapter_for(model)
    ids = prompt_ids(96, seed=21)
    cache, logits, trace = prefill(
        adapter, ids, FastKV(tsp_layer=1, tsp_len=40, budget=24), PrefillOptions(max_tokens=4)
    )
    assert trace.tokens_per_layer == [96, 96, 40, 40]
    ref = run_layers_with_drops_by_position(model, ids, trace.propagated)
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
    for i, window in enumerate(adapter.windows):
        if window is None:
            continue
        present = torch.arange(96) if i <= 1 else trace.propagated[1][0]
        kept = cache.positions[i][0, 0].tolist()
        assert kept == [p for p in present.tolist() if p > 96 - window]


@pytest.mark.parametrize("family", ["mistral-window", "gemma3_text"])
def test_windowed_rings_decode_past_their_window_after_tsp(family):
    """Decoding 40 tokens (past the window of 24: every ring wraps) from a cache that TSP left sparse gives the
    greedy tokens of transformers' own layers over the propagated tokens and the new ones."""
    from .reference import run_layers_with_drops_by_position

    model = build_tiny(family)
    adapter = adapter_for(model)
    ids = prompt_ids(96, seed=22)
    method = FastKV(tsp_layer=1, tsp_len=40, retain_rate=1.0, min_budget=1)  # TSP only: every entry cached
    ours, cache = greedy(adapter, ids, method, 40)
    propagated = prefill(adapter, ids, method)[2].propagated[1]
    seq, ref = ids, []
    for _ in range(40):
        new = torch.arange(96, seq.shape[1])[None]
        drops = {1: torch.cat([propagated, new], dim=1)}
        token = int(run_layers_with_drops_by_position(model, seq, drops).argmax())
        ref.append(token)
        seq = torch.cat([seq, torch.tensor([[token]])], dim=1)
    assert ours == ref
    assert all(cache.keys[i].shape[2] == w for i, w in enumerate(adapter.windows) if w is not None)
