"""The hot path: `prefill` and `decode_step`, plain functions over a model adapter and a KV cache.

Prefill runs the model layer by layer with the model's own modules. After each layer's attention the
method decides which KV entries the layer caches (`Method.keep`) and which tokens continue to the next
layer (`Method.propagate`, FastKV's Token-Selective Propagation). Tokens that continue keep their
original positions, so RoPE stays exact for them. Decoding then continues at position L, L + 1, ...
(the original prompt length, not the compressed cache length).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .adapters import Adapter
from .cache import KVCache
from .methods import Method


@dataclass
class PrefillTrace:
    """What prefill did: tokens each layer computed on, and positions after each propagation."""

    prompt_len: int
    tokens_per_layer: list[int] = field(default_factory=list)
    # layer index -> original positions [B, T] of the tokens that continue past that layer
    propagated: dict[int, torch.Tensor] = field(default_factory=dict)
    # GemFilter: tokens per layer of the filtering pass that preceded the final one
    filter_pass: list[int] = field(default_factory=list)


def check_prompt(parts: Adapter, prompt_len: int, max_new_tokens: int) -> None:
    """Reject what the model cannot attend to, instead of clipping it."""
    if prompt_len < 1:
        raise ValueError("the prompt is empty")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    total = prompt_len + max_new_tokens
    if total > parts.max_positions:
        raise ValueError(
            f"prompt of {prompt_len} tokens + max_new_tokens={max_new_tokens} = {total} exceeds the model's "
            f"context of {parts.max_positions} tokens"
        )
    if parts.sliding_window is not None and total > parts.sliding_window:
        raise ValueError(
            f"prompt of {prompt_len} tokens + max_new_tokens={max_new_tokens} exceeds this model's sliding "
            f"attention window of {parts.sliding_window} tokens, which fastkv does not implement"
        )


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, H, n, d] at token indices idx [B, H, k] -> [B, H, k, d]."""
    return x.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))


@torch.inference_mode()
def prefill(
    parts: Adapter,
    input_ids: torch.Tensor,
    method: Method,
    max_new_tokens: int = 0,
    on_layer=None,
) -> tuple[KVCache, torch.Tensor, PrefillTrace]:
    """Run the prompt input_ids [B, L] through the model under `method`.

    Returns the cache (room for max_new_tokens more entries per layer), the float32 logits of the last
    prompt token [B, V], and a trace. `on_layer(i)` is called after each layer (for progress bars).
    """
    b, prompt_len = input_ids.shape
    check_prompt(parts, prompt_len, max_new_tokens)
    method = method.bind(parts.num_layers)
    positions = torch.arange(prompt_len, device=input_ids.device).expand(b, prompt_len)
    cache, logits, trace, restart = _run_layers(parts, input_ids, positions, method, max_new_tokens, on_layer)
    if restart is not None:
        # GemFilter: the model runs again from scratch on the selected tokens, renumbered 0..T-1.
        ids = input_ids.gather(1, restart)
        renumbered = torch.arange(ids.shape[1], device=ids.device).expand(b, ids.shape[1])
        first_pass = trace
        cache, logits, trace, _ = _run_layers(parts, ids, renumbered, method, max_new_tokens, on_layer, prompt_len)
        cache.prompt_len, cache.position_base = prompt_len, ids.shape[1]
        trace.filter_pass = first_pass.tokens_per_layer
        trace.propagated = first_pass.propagated
    return cache, logits, trace


def _run_layers(
    parts: Adapter,
    input_ids: torch.Tensor,
    pos: torch.Tensor,
    method: Method,
    max_new_tokens: int,
    on_layer,
    prompt_len: int | None = None,
) -> tuple[KVCache, torch.Tensor | None, PrefillTrace, torch.Tensor | None]:
    """One pass over the layers. Returns early with the selected token indices if the method restarts."""
    b, n = input_ids.shape
    prompt_len = prompt_len or n  # budgets stay relative to the original prompt
    cache = KVCache(prompt_len=n, max_new_tokens=max_new_tokens)
    trace = PrefillTrace(prompt_len=prompt_len)
    hq, hkv, d = parts.num_heads, parts.num_kv_heads, parts.head_dim
    last_layer = parts.num_layers - 1

    h = parts.embed(input_ids)
    for i, layer in enumerate(parts.layers):
        attn = layer.self_attn
        n = h.shape[1]
        trace.tokens_per_layer.append(n)
        q, k, v = parts.qkv(attn, layer.input_layernorm(h))
        cos, sin = parts.rope(h, pos)
        q, k = parts.apply_rope(q, k, cos, sin)

        scores = method.score(q, k, attn.scaling) if method.wants_scores(i, n, prompt_len) else None
        selected = None
        if i < last_layer or method.restarts:  # after the last layer, nothing is left to propagate to
            selected = method.propagate(i, scores, n, prompt_len)
        if selected is not None and method.restarts:
            trace.propagated[i] = pos.gather(1, selected)
            return cache, None, trace, selected
        _store(cache, k, v, pos, method.keep(i, scores, n, prompt_len))

        if i == last_layer:
            # Only the last token's output is needed from the last layer: one query that sees every key.
            out = F.scaled_dot_product_attention(q[:, :, -1:], k, v, scale=attn.scaling, enable_gqa=hq != hkv)
            h = h[:, -1:]
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scaling, enable_gqa=hq != hkv)
        h = h + attn.o_proj(out.transpose(1, 2).reshape(b, -1, hq * d))

        if selected is not None:
            # MLPs work per token, so dropping tokens before this layer's MLP changes nothing for the kept.
            h = h.gather(1, selected.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
            pos = pos.gather(1, selected)
            trace.propagated[i] = pos
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        if on_layer is not None:
            on_layer(i)

    logits = parts.lm_head(parts.norm(h[:, -1:]))[:, -1].float()
    return cache, logits, trace, None


def _store(cache: KVCache, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, keep) -> None:
    """Cache a layer's entries: all of them, or those `keep` names (see Method.keep)."""
    b, hkv, n, _ = k.shape
    head_pos = pos.unsqueeze(1).expand(b, hkv, n)
    if keep is None:
        cache.store(k, v, head_pos)
        return
    indices, valid = keep if isinstance(keep, tuple) else (keep, None)
    indices = indices.to(k.device).expand(b, hkv, -1)  # a 1-D selection applies to every head
    cache.store(_take(k, indices), _take(v, indices), head_pos.gather(2, indices), valid)


@torch.inference_mode()
def decode_step(parts: Adapter, cache: KVCache, tokens: torch.Tensor, position: int) -> torch.Tensor:
    """Feed tokens [B] at `position` (cache.position_base + steps so far); return float32 logits [B, V]."""
    b = tokens.shape[0]
    hq, hkv, d = parts.num_heads, parts.num_kv_heads, parts.head_dim
    h = parts.embed(tokens.view(b, 1))
    cos, sin = parts.rope(h, torch.full((b, 1), position, device=h.device))
    for i, layer in enumerate(parts.layers):
        attn = layer.self_attn
        q, k, v = parts.qkv(attn, layer.input_layernorm(h))
        q, k = parts.apply_rope(q, k, cos, sin)
        keys, values, mask = cache.append(i, k, v)
        # The query heads of a GQA group become rows of one query block: no repeat of the cache.
        out = F.scaled_dot_product_attention(
            q.reshape(b, hkv, hq // hkv, d), keys, values, attn_mask=mask, scale=attn.scaling
        )
        h = h + attn.o_proj(out.reshape(b, 1, hq * d))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return parts.lm_head(parts.norm(h))[:, -1].float()
