"""The hot path: `prefill` and `decode_step`, plain functions over a model adapter and a KV cache.

Prefill runs the model layer by layer with the model's own modules. After each layer's attention
projections, the engine asks the method's two parts two questions: which tokens continue to the next
layer (`reducer.tokens`) and which KV entries this layer caches (`policy.entries`). Tokens that
continue keep their original positions, so RoPE stays exact for them. Decoding then continues at the
position after the last prompt token (L, L + 1, ...), not at the compressed cache's length.

A reducer that needs more than one pass (a filter-and-rerun) drives them itself through `run_pass`,
the single pass below; the engine holds nothing that only one method uses.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F

from .adapters import Adapter
from .cache import KVCache
from .methods import CachePolicy, LayerState, Method, Reducer, Selection


@dataclass
class PrefillTrace:
    """What a prefill pass did: tokens each layer computed on, and positions after each reduction."""

    prompt_len: int
    tokens_per_layer: list[int] = field(default_factory=list)
    # layer index -> original positions [B, T] of the tokens that continue past that layer
    propagated: dict[int, torch.Tensor] = field(default_factory=dict)
    # traces of earlier passes over the same prompt (a multi-pass reducer's), in order
    earlier: list[PrefillTrace] = field(default_factory=list)


@dataclass
class Pass:
    cache: KVCache
    logits: torch.Tensor | None  # None when the pass stopped at `stop_at`
    trace: PrefillTrace


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


def checked(sel: Selection, what: str, present: int, batch: int, heads: int, ordered: bool) -> Selection:
    """`sel` if it indexes the `present` tokens properly, else a ValueError that says how it does not."""
    idx, valid = sel.indices, sel.valid
    if idx.dim() != 3 or idx.shape[0] != batch or idx.shape[1] not in ((1,) if ordered else (1, heads)):
        expected = f"[{batch}, 1, k]" + ("" if ordered else f" or [{batch}, {heads}, k]")
        raise ValueError(f"{what}: indices of shape {list(idx.shape)}, expected {expected}")
    if idx.dtype not in (torch.int64, torch.int32) or idx.shape[-1] == 0:
        raise ValueError(f"{what}: indices must be a non-empty integer tensor, got {idx.dtype} {list(idx.shape)}")
    if int(idx.min()) < 0 or int(idx.max()) >= present:
        raise ValueError(f"{what}: indices must lie in 0..{present - 1}, got {int(idx.min())}..{int(idx.max())}")
    steps = (idx if ordered else idx.sort(dim=-1).values).diff(dim=-1)
    if bool((steps <= 0).any()):
        raise ValueError(f"{what}: indices " + ("must be strictly increasing" if ordered else "repeat an entry"))
    if valid is not None and (valid.dtype != torch.bool or valid.shape != (batch, idx.shape[1], idx.shape[2])):
        raise ValueError(f"{what}: valid must be a bool mask of shape {list(idx.shape)}")
    return sel


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    causal: bool = False,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """SDPA over GQA keys without ever taking a path that builds the n x n matrix.

    On CUDA, float32 has no fused kernel that takes GQA (flash needs half precision, the memory-efficient
    kernel does not take enable_gqa), so SDPA would silently run the math path: about 56 GiB at 32K.
    There K/V are repeated per query head instead, which the memory-efficient kernel takes.
    """
    group = q.shape[1] // k.shape[1]
    if group > 1 and repeat_kv(q.device, q.dtype):
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    gqa = k.shape[1] != q.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa)


def repeat_kv(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether GQA attention repeats K/V: only where no fused kernel takes enable_gqa (CUDA float32)."""
    return device.type == "cuda" and dtype == torch.float32


@torch.inference_mode()
def prefill(
    parts: Adapter,
    input_ids: torch.Tensor,
    method: Method,
    max_new_tokens: int = 0,
    on_layer=None,
    chunk_size: int | None = None,
) -> tuple[KVCache, torch.Tensor, PrefillTrace]:
    """Run the prompt input_ids [B, L] through the model under `method`.

    Returns the cache (room for max_new_tokens more entries per layer), the float32 logits of the last
    prompt token [B, V], and a trace. `on_layer(i)` is called after each layer (for progress bars).
    chunk_size: attend and run the MLP over at most this many queries at a time (`attend`, `feed_forward`),
    so that activations beyond q, k, v grow with the prompt, not with chunk x prompt; None: all at once.
    """
    check_prompt(parts, input_ids.shape[1], max_new_tokens)
    check_chunk(chunk_size)
    method = method.bind(parts.num_layers)
    run = partial(run_pass, parts, max_new_tokens=max_new_tokens, on_layer=on_layer, chunk_size=chunk_size)
    result = method.reducer.prefill(run, input_ids, method.policy)
    return result.cache, result.logits, result.trace


def run_pass(
    parts: Adapter,
    input_ids: torch.Tensor,
    reducer: Reducer,
    policy: CachePolicy,
    prompt_len: int | None = None,
    stop_at: int | None = None,
    max_new_tokens: int = 0,
    on_layer=None,
    chunk_size: int | None = None,
) -> Pass:
    """One pass over the layers on input_ids [B, n] at positions 0..n-1.

    prompt_len: the original prompt's length, to which budgets are relative (default n).
    stop_at: end the pass at this layer if the reducer picks tokens there, before its attention; the
    trace then holds them and `logits` is None.
    """
    b, n = input_ids.shape
    prompt_len = prompt_len or n
    pos = torch.arange(n, device=input_ids.device).expand(b, n)
    cache = KVCache(prompt_len=prompt_len, max_new_tokens=max_new_tokens, position_base=n)
    trace = PrefillTrace(prompt_len=prompt_len)
    last_layer = parts.num_layers - 1

    h = parts.embed(input_ids)
    for i, layer in enumerate(parts.layers):
        trace.tokens_per_layer.append(h.shape[1])
        q, k, v = project(parts, layer, h, pos)
        state = LayerState(i, parts.num_layers, prompt_len, q, k, layer.self_attn.scaling)

        # After the last layer nothing is left to propagate to (unless the pass ends there).
        selected = chosen_tokens(reducer, state) if i < last_layer or i == stop_at else None
        if selected is not None:
            trace.propagated[i] = pos.gather(1, selected)
            if i == stop_at:
                return Pass(cache, None, trace)
        store(cache, state, policy, v, pos)

        h = attend(parts, layer, h, q, k, v, last=i == last_layer, chunk_size=chunk_size)
        if selected is not None:
            # MLPs work per token, so dropping tokens before this layer's MLP changes nothing for the kept.
            h, pos = h.gather(1, selected.unsqueeze(-1).expand(-1, -1, h.shape[-1])), trace.propagated[i]
        h = feed_forward(layer, h, chunk_size)
        if on_layer is not None:
            on_layer(i)

    logits = parts.lm_head(parts.norm(h[:, -1:]))[:, -1].float()
    return Pass(cache, logits, trace)


def chosen_tokens(reducer: Reducer, state: LayerState) -> torch.Tensor | None:
    """The indices [B, T] of the tokens the reducer lets continue past this layer (checked), or None."""
    tokens = reducer.tokens(state)
    if tokens is None:
        return None
    b, hkv = state.k.shape[:2]
    return checked(tokens, f"{reducer.name} at layer {state.index}", state.present, b, hkv, ordered=True).indices[:, 0]


def project(parts: Adapter, layer, h: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q [B, Hq, n, d], k, v [B, Hkv, n, d] of hidden states h [B, n, D], rotated to positions pos [B, n]."""
    q, k, v = parts.qkv(layer.self_attn, layer.input_layernorm(h))
    cos, sin = parts.rope(h, pos)
    q, k = parts.apply_rope(q, k, cos, sin)
    return q, k, v


def attend(parts: Adapter, layer, h: torch.Tensor, q, k, v, last: bool, chunk_size: int | None = None) -> torch.Tensor:
    """h plus the layer's causal attention output; for the last layer only the last token's.

    With chunk_size, queries [s, e) attend to keys [0, e) one chunk at a time, written into a new h.
    """
    b, n, hq, d = h.shape[0], h.shape[1], parts.num_heads, parts.head_dim
    scale = layer.self_attn.scaling

    def output(out: torch.Tensor) -> torch.Tensor:
        return layer.self_attn.o_proj(out.transpose(1, 2).reshape(b, -1, hq * d))

    if last:
        # Only the last token's output is needed from the last layer: one query that sees every key.
        return h[:, -1:] + output(attention(q[:, :, -1:], k, v, scale, causal=False))
    if chunk_size is None or chunk_size >= n:
        return h + output(attention(q, k, v, scale, causal=True))
    new = torch.empty_like(h)
    for s in range(0, n, chunk_size):
        e = min(n, s + chunk_size)
        # causal from the bottom right: query s + i sees keys 0..s + i
        mask = torch.arange(e, device=h.device) <= torch.arange(s, e, device=h.device)[:, None]
        new[:, s:e] = h[:, s:e] + output(attention(q[:, :, s:e], k[:, :, :e], v[:, :, :e], scale, mask=mask))
    return new


def feed_forward(layer, h: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """h plus the layer's MLP, over at most chunk_size tokens at a time (it works per token)."""
    if chunk_size is None or chunk_size >= h.shape[1]:
        return h + layer.mlp(layer.post_attention_layernorm(h))
    new = torch.empty_like(h)
    for s in range(0, h.shape[1], chunk_size):
        part = h[:, s : s + chunk_size]
        new[:, s : s + chunk_size] = part + layer.mlp(layer.post_attention_layernorm(part))
    return new


def check_chunk(chunk_size: int | None) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive number of tokens or None, got {chunk_size!r}")


def store(cache: KVCache, state: LayerState, policy: CachePolicy, v: torch.Tensor, pos: torch.Tensor) -> None:
    """Ask the policy which of this layer's entries to cache, check its answer, and cache them."""
    k = state.k
    entries = policy.entries(state)
    b, hkv, n, _ = k.shape
    head_pos = pos.unsqueeze(1).expand(b, hkv, n)
    if entries is None:
        cache.store(k, v, head_pos)
        return
    checked(entries, f"{policy.name} at layer {state.index}", n, b, hkv, ordered=False)
    idx = entries.indices.expand(b, hkv, -1)  # a selection for all heads applies to each
    valid = entries.valid.expand(b, hkv, -1) if entries.valid is not None else None
    cache.store(_take(k, idx), _take(v, idx), head_pos.gather(2, idx), valid)


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, H, n, d] at token indices idx [B, H, k] -> [B, H, k, d]."""
    return x.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))


@torch.inference_mode()
def decode_step(
    parts: Adapter, cache: KVCache, tokens: torch.Tensor, position: int | torch.Tensor, compiled: bool = False
) -> torch.Tensor:
    """Feed tokens [B] at `position` (an int, or [B]: cache.position_base + steps so far); return float32
    logits [B, V]. The shapes are the same at every step, so `compiled` runs `decode_layers` under
    torch.compile (compiled once per process, for any cache capacity)."""
    cache.check_room()
    position = torch.as_tensor(position, device=tokens.device).expand(tokens.shape[0])
    step = compiled_decode_layers() if compiled else decode_layers
    logits = step(parts, cache.keys, cache.values, cache.attend, cache.slots, tokens, position)
    cache.steps += 1
    return logits


@functools.cache
def compiled_decode_layers():
    # dynamic: capacities differ per prompt and method; one graph serves them all.
    return torch.compile(decode_layers, dynamic=True)


def decode_layers(parts: Adapter, keys, values, attend, slots, tokens: torch.Tensor, position: torch.Tensor):
    """One token per sequence through every layer: write its K/V at each sequence's slot, attend over the
    layer's whole buffer under its mask, advance the slots. Tensors in, tensors out: no Python state."""
    b = tokens.shape[0]
    hq, hkv, d = parts.num_heads, parts.num_kv_heads, parts.head_dim
    h = parts.embed(tokens.view(b, 1))
    cos, sin = parts.rope(h, position.view(b, 1))
    for i, layer in enumerate(parts.layers):
        attn = layer.self_attn
        q, k, v = parts.qkv(attn, layer.input_layernorm(h))
        q, k = parts.apply_rope(q, k, cos, sin)
        at = slots[i].view(b, 1, 1).expand(b, hkv, 1)
        keys[i].scatter_(2, at.unsqueeze(-1).expand(b, hkv, 1, d), k)
        values[i].scatter_(2, at.unsqueeze(-1).expand(b, hkv, 1, d), v)
        attend[i].scatter_(2, at, True)
        slots[i].add_(1)
        # The query heads of a GQA group become rows of one query block: no repeat of the cache.
        out = F.scaled_dot_product_attention(
            q.reshape(b, hkv, hq // hkv, d), keys[i], values[i], attn_mask=attend[i][:, :, None], scale=attn.scaling
        )
        h = h + attn.o_proj(out.reshape(b, 1, hq * d))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return parts.lm_head(parts.norm(h))[:, -1].float()
