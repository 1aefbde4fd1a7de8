"""Brute-force references computed from transformers' own modules, independent of fastkv's engine."""

from __future__ import annotations

import torch
from transformers import AttentionInterface, DynamicCache


def eager_attentions(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Softmax attention probabilities [Hq, L, L] of every layer, from transformers' eager attention."""
    assert model.config._attn_implementation == "eager"
    with torch.no_grad():
        out = model(ids, output_attentions=True)
    return [a[0].float() for a in out.attentions]


def snap_scores(probs: torch.Tensor, window: int, kernel: int, pooling: str, kv_heads: int) -> torch.Tensor:
    """SnapKV scores [Hkv, L - window] by explicit loops over a layer's probabilities [Hq, L, L]."""
    hq, length, _ = probs.shape
    prefix = length - window
    summed = torch.zeros(hq, prefix, dtype=torch.float64)
    for h in range(hq):
        for j in range(length - window, length):
            for t in range(prefix):
                summed[h, t] += float(probs[h, j, t])
    pooled = torch.zeros_like(summed)
    half = kernel // 2
    for h in range(hq):
        for t in range(prefix):
            span = [summed[h, s] for s in range(t - half, t + half + 1) if 0 <= s < prefix]
            # max pooling ignores the padding; average pooling counts it as zeros (count_include_pad)
            pooled[h, t] = max(span) if pooling == "max" else sum(span) / kernel
    group = hq // kv_heads
    scores = torch.zeros(kv_heads, prefix, dtype=torch.float64)
    for h in range(hq):
        scores[h // group] += pooled[h]
    return scores


def assert_top_entries(kept: torch.Tensor, scores: torch.Tensor, window: int, expected: int) -> None:
    """kept: sorted positions of one head; scores: reference over the prefix. Tie-aware top-k check."""
    prefix = scores.shape[-1]
    kept = kept.tolist()
    assert kept == sorted(kept), "kept entries are not in position order"
    assert len(kept) == expected
    assert kept[-window:] == list(range(prefix, prefix + window)), "the window is not kept whole"
    chosen = set(kept[:-window])
    assert len(chosen) == expected - window
    dropped = [t for t in range(prefix) if t not in chosen]
    if dropped:
        worst_kept = min(float(scores[t]) for t in chosen)
        best_dropped = max(float(scores[t]) for t in dropped)
        assert worst_kept >= best_dropped - 1e-6 * abs(best_dropped), (worst_kept, best_dropped)


@torch.no_grad()
def run_layers_with_drops(model, ids: torch.Tensor, drops: dict[int, torch.Tensor]) -> torch.Tensor:
    """Last-token logits when, after each layer i in `drops`, only the tokens at original positions
    drops[i] (sorted) continue, at those positions. Uses transformers' own decoder layers."""
    assert model.config._attn_implementation == "sdpa"  # causal when no mask is given
    base = model.model
    h = base.embed_tokens(ids)
    pos = torch.arange(ids.shape[1])[None]
    for i, layer in enumerate(base.layers):
        h = layer(h, attention_mask=None, position_ids=pos, position_embeddings=base.rotary_emb(h, pos))
        if i in drops:
            keep = torch.isin(pos[0], drops[i].flatten())
            h, pos = h[:, keep], pos[:, keep]
    return model.lm_head(base.norm(h))[:, -1]


@torch.no_grad()
def run_layers_with_drops_by_position(model, ids: torch.Tensor, drops: dict[int, torch.Tensor]) -> torch.Tensor:
    """`run_layers_with_drops` for models with sliding windows: each layer gets a mask written from the tokens'
    original positions (query p sees keys at positions in (p - W, p] in a windowed layer, [0, p] in another),
    its own rotary embedding (per layer type), and the model's final norm, output layer and soft-cap."""
    from fastkv import adapter_for

    adapter = adapter_for(model)  # its windows and logits only: the layers are transformers' own
    base = model.model
    h = base.embed_tokens(ids)
    pos = torch.arange(ids.shape[1])[None]
    for i, layer in enumerate(base.layers):
        q, k = pos[0][:, None], pos[0][None, :]
        seen = k <= q
        if adapter.windows[i] is not None:
            seen &= k > q - adapter.windows[i]
        mask = torch.zeros(seen.shape, dtype=h.dtype).masked_fill(~seen, float("-inf"))[None, None]
        kind = getattr(model.config, "layer_types", [None] * len(base.layers))[i]
        rope = base.rotary_emb(h, pos, kind) if model.config.model_type == "gemma3_text" else base.rotary_emb(h, pos)
        h = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=rope)
        if i in drops:
            keep = torch.isin(pos[0], drops[i].flatten())
            h, pos = h[:, keep], pos[:, keep]
    return adapter.logits(h)


def run_layers_on_subset(model, ids: torch.Tensor, split: int, keep: torch.Tensor) -> torch.Tensor:
    """Layers 0..split see the whole prompt, later layers only the tokens at positions `keep`."""
    return run_layers_with_drops(model, ids, {split: keep})


@torch.no_grad()
def last_query_dots(model, ids: torch.Tensor, layer_index: int) -> torch.Tensor:
    """Sum over query heads of q_last . k_t at a layer, by loops over transformers' modules: [L]."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    base = model.model
    h = base.embed_tokens(ids)
    pos = torch.arange(ids.shape[1])[None]
    cos_sin = base.rotary_emb(h, pos)
    for layer in base.layers[:layer_index]:
        h = layer(h, attention_mask=None, position_ids=pos, position_embeddings=cos_sin)
    attn = base.layers[layer_index].self_attn
    x = base.layers[layer_index].input_layernorm(h)
    d = attn.head_dim
    q = attn.q_proj(x).view(1, ids.shape[1], -1, d)
    k = attn.k_proj(x).view(1, ids.shape[1], -1, d)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), *cos_sin)
    hq, hkv = q.shape[1], k.shape[1]
    dots = torch.zeros(ids.shape[1], dtype=torch.float64)
    for h_ in range(hq):
        for t in range(ids.shape[1]):
            dots[t] += float(q[0, h_, -1] @ k[0, h_ // (hq // hkv), t])
    return dots


def avg_pool(values: torch.Tensor, kernel: int) -> torch.Tensor:
    half = kernel // 2
    n = values.shape[0]
    return torch.tensor(
        [sum(float(values[s]) for s in range(t - half, t + half + 1) if 0 <= s < n) / kernel for t in range(n)],
        dtype=torch.float64,
    )


def _per_layer_masked_attention(masks):
    """An attention function for transformers that applies masks[layer] [B, Hkv, n] (True = attend)."""

    def attend(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        group = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
        logits = torch.matmul(query, key.transpose(2, 3)) * scaling
        cap = getattr(module, "attn_logit_softcapping", None)  # Gemma 2
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        mask = masks[module.layer_idx]
        if mask is not None:
            logits = logits.masked_fill(~mask.repeat_interleave(group, dim=1)[:, :, None, :], float("-inf"))
        probs = logits.softmax(dim=-1)
        return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs

    return attend


def adapter_windows(model) -> list[int | None]:
    from fastkv import adapter_for

    return adapter_for(model).windows


@torch.no_grad()
def hf_decode_logits(model, cache, token: int, position: int) -> torch.Tensor:
    """transformers' own decode step over the entries of a fastkv cache, at `position`.

    For a padded cache (AdaKV) the model runs with a test-only attention function that masks each
    layer's padding; otherwise with its own attention.
    """
    # A model with sliding windows gets a cache of full layers (transformers' sliding ones would assume the
    # last W - 1 positions, contiguous) and each windowed layer a mask by the entries' positions.
    windows = adapter_windows(model)
    hf_cache = DynamicCache() if any(w is not None for w in windows) else DynamicCache(config=model.config)
    masks = []
    for i, (k, v, n) in enumerate(zip(cache.keys, cache.values, cache.lengths, strict=True)):
        hf_cache.update(k[:, :, :n].clone(), v[:, :, :n].clone(), i)
        real = cache.valid[i] if cache.valid[i] is not None else None
        if windows[i] is not None:
            seen = cache.positions[i] > position - windows[i]
            real = seen if real is None else real & seen
        if real is None:
            masks.append(None)
        else:  # the prefill entries that are real (and in reach); decoded ones and the new token are too
            b, h, kept = real.shape
            masks.append(torch.cat([real, torch.ones(b, h, n - kept + 1, dtype=torch.bool, device=real.device)], -1))
    inputs = dict(input_ids=torch.tensor([[token]]), position_ids=torch.tensor([[position]]), cache=hf_cache)
    if all(m is None for m in masks):
        return model(**inputs).logits[:, -1]
    AttentionInterface.register("fastkv_test_masked", _per_layer_masked_attention(masks))
    previous = model.config._attn_implementation
    model.set_attn_implementation("fastkv_test_masked")
    try:
        return model(**inputs).logits[:, -1]
    finally:
        model.set_attn_implementation(previous)


def assert_same_as_fullkv(adapter, ids: torch.Tensor, method, steps: int) -> None:
    """`method` computes exactly what FullKV does: every token in every layer and cache, and bit-identical
    logits at prefill and over `steps` greedy decode steps."""
    from fastkv import FullKV, PrefillOptions, decode_step, prefill

    n = ids.shape[1]
    ref_cache, ref, _ = prefill(adapter, ids, FullKV(), PrefillOptions(max_tokens=steps))
    cache, logits, trace = prefill(adapter, ids, method, PrefillOptions(max_tokens=steps))
    assert trace.tokens_per_layer == [n] * adapter.num_layers and not trace.propagated
    assert getattr(trace, "filter", None) is None  # no filter ran
    assert cache.lengths == ref_cache.lengths  # every token (a layer with a sliding window: its window)
    for step in range(steps):
        assert torch.equal(logits, ref)
        token = ref.argmax(-1)
        ref = decode_step(adapter, ref_cache, token, n + step)
        logits = decode_step(adapter, cache, token, n + step)
    assert torch.equal(logits, ref)
