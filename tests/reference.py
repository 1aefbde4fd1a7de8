"""Brute-force references computed from transformers' own modules, independent of fastkv's engine."""

from __future__ import annotations

import torch
from transformers import DynamicCache


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
def run_layers_on_subset(model, ids: torch.Tensor, split: int, keep: torch.Tensor) -> torch.Tensor:
    """Last-token logits when layers 0..split see the whole prompt and later layers see only the
    tokens at positions `keep` (sorted), at those positions. Uses transformers' decoder layers."""
    assert model.config._attn_implementation == "sdpa"  # causal when no mask is given
    base = model.model
    h = base.embed_tokens(ids)
    pos = torch.arange(ids.shape[1])[None]
    for i, layer in enumerate(base.layers):
        if i == split + 1:
            h, pos = h[:, keep], pos[:, keep]
        h = layer(h, attention_mask=None, position_ids=pos, position_embeddings=base.rotary_emb(h, pos))
    return model.lm_head(base.norm(h))[:, -1]


@torch.no_grad()
def hf_decode_logits(model, keys, values, token: int, position: int) -> torch.Tensor:
    """transformers' own decode step over a given cache (lists of [B, Hkv, n, d]) at `position`."""
    cache = DynamicCache(config=model.config)
    for i, (k, v) in enumerate(zip(keys, values, strict=True)):
        cache.update(k.clone(), v.clone(), i)
    out = model(torch.tensor([[token]]), position_ids=torch.tensor([[position]]), cache=cache)
    return out.logits[:, -1]
