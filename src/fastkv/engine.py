"""The hot path: `prefill` and `decode_step`, plain functions over a model adapter and a KV cache.

Prefill runs the model layer by layer with the model's own modules (`layer_step`). After each layer's
attention projections, the engine asks the method's two parts two questions: which tokens continue to the
next layer (`reducer.tokens`) and which KV entries this layer caches (`policy.entries`). Tokens that
continue keep their original positions, so RoPE stays exact for them. Decoding then continues at the
position after the last prompt token (L, L + 1, ...), not at the compressed cache's length.

A reducer that needs more than one pass (a filter-and-rerun) drives them itself through `Passes` (whole
passes, and a look at one layer); the engine holds nothing that only one method uses.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .adapters import Adapter
from .cache import KVCache
from .methods import CachePolicy, LayerState, Method, Reducer, Selection
from .methods.base import NotReusable, Pass, PrefillTrace
from .quantize import Int8Linear

# Check the values of every selection a part returns (range, order, repeats), not only its shape. On a CPU
# this costs nothing; on a GPU it reads back to the host twice per layer, so it is off there unless asked
# for (FASTKV_DEBUG=1, which the tests set).
DEBUG = os.environ.get("FASTKV_DEBUG") == "1"


class ContextLengthError(ValueError):
    """A prompt (with its new tokens) that the model cannot attend to."""


def check_prompt(adapter: Adapter, prompt_len: int, max_new_tokens: int) -> None:
    """Reject what the model cannot attend to, instead of clipping it."""
    if prompt_len < 1:
        raise ValueError("the prompt is empty")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    total = prompt_len + max_new_tokens
    if total > adapter.max_positions:
        raise ContextLengthError(
            f"prompt of {prompt_len} tokens + max_new_tokens={max_new_tokens} = {total} exceeds the model's "
            f"context of {adapter.max_positions} tokens"
        )


def check_chunk(chunk_size: int | None) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive number of tokens or None, got {chunk_size!r}")


def checked(sel: Selection, what: str, present: int, batch: int, heads: int, ordered: bool) -> Selection:
    """`sel` if it indexes the `present` tokens properly, else a ValueError that says how it does not.
    Shapes and dtypes are always checked; values (which read the indices back) on a CPU or in DEBUG."""
    idx, valid = sel.indices, sel.valid
    if idx.dim() != 3 or idx.shape[0] != batch or idx.shape[1] not in ((1,) if ordered else (1, heads)):
        expected = f"[{batch}, 1, k]" + ("" if ordered else f" or [{batch}, {heads}, k]")
        raise ValueError(f"{what}: indices of shape {list(idx.shape)}, expected {expected}")
    if idx.dtype not in (torch.int64, torch.int32) or idx.shape[-1] == 0:
        raise ValueError(f"{what}: indices must be a non-empty integer tensor, got {idx.dtype} {list(idx.shape)}")
    if valid is not None and (valid.dtype != torch.bool or valid.shape != (batch, idx.shape[1], idx.shape[2])):
        raise ValueError(f"{what}: valid must be a bool mask of shape {list(idx.shape)}")
    if idx.device.type != "cpu" and not DEBUG:
        return sel
    if int(idx.min()) < 0 or int(idx.max()) >= present:
        raise ValueError(f"{what}: indices must lie in 0..{present - 1}, got {int(idx.min())}..{int(idx.max())}")
    steps = (idx if ordered else idx.sort(dim=-1).values).diff(dim=-1)
    if bool((steps <= 0).any()):
        raise ValueError(f"{what}: indices " + ("must be strictly increasing" if ordered else "repeat an entry"))
    return sel


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    causal: bool = False,
    mask: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """SDPA over GQA keys without ever taking a path that builds the n x n matrix.

    On CUDA, float32 has no fused kernel that takes GQA (flash needs half precision, the memory-efficient
    kernel does not take enable_gqa), so SDPA would silently run the math path: about 56 GiB at 32K.
    There K/V are repeated per query head instead, which the memory-efficient kernel takes.
    softcap (Gemma 2): logits become cap * tanh(logits / cap) before the softmax, which SDPA cannot do: the
    scores are computed here, for the queries given (callers pass query chunks).
    """
    group = q.shape[1] // k.shape[1]
    if softcap is not None:
        return capped_attention(q, k, v, scale, softcap, causal, mask)
    if group > 1 and repeat_kv(q.device, q.dtype):
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    gqa = k.shape[1] != q.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa)


def capped_attention(q, k, v, scale: float, cap: float, causal: bool, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention with soft-capped logits, q [B, Hq, n, d] over k, v [B, Hkv, m, d]; mask [n, m], [B, 1, n, m] or
    [B, Hkv, 1, n, m] (True: attend), or causal from the top left."""
    b, hq, n, d = q.shape
    hkv, m = k.shape[1], k.shape[2]
    logits = torch.matmul(q.reshape(b, hkv, -1, d).float(), k.float().transpose(-1, -2)) * scale
    logits = (torch.tanh(logits / cap) * cap).view(b, hkv, hq // hkv, n, m)
    if causal:
        mask = torch.ones(n, m, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        mask = mask.unsqueeze(2) if mask.dim() == 4 else mask  # [B, 1, n, m]: the same for every head
        logits = logits.masked_fill(~mask, float("-inf"))
    probs = logits.softmax(dim=-1).to(v.dtype).view(b, hkv, -1, m)
    return torch.matmul(probs, v).view(b, hq, n, d)


def repeat_kv(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether GQA attention repeats K/V: only where no fused kernel takes enable_gqa (CUDA float32)."""
    return device.type == "cuda" and dtype == torch.float32


# -- one layer -------------------------------------------------------------------------------------------
Past = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # K, V [B, Hkv, p, d] and positions [B, p] of earlier tokens
# decide(state) -> for each way the layer's output continues, the indices [B, T] of the tokens that do (None:
# all of them); the attention is computed once for all of them. Its side effects (caching) are its own.
Decide = Callable[[LayerState], Sequence[torch.Tensor | None]]
# on_chunk(tokens): called after each chunk of a chunked layer's work (projections, attention, MLP) of that
# many tokens, so that a caller can interleave other work (the server: a decode step of its running batch).
OnChunk = Callable[[int], None]


def open_layer(adapter: Adapter, i: int, h: torch.Tensor, pos: torch.Tensor, prompt_len: int,
               past: Past | None = None, chunk_size: int | None = None,
               on_chunk: OnChunk | None = None) -> LayerState:  # fmt: skip
    """Layer i's projections of hidden states h [B, n, D] at positions pos [B, n], as the parts see them. With
    `past`, the earlier tokens' K/V come first in k and v (they attend and are attended to as if present).
    With on_chunk, the projections too go chunk_size tokens at a time (they work per token)."""
    layer = adapter.layers[i]

    def project(hs: torch.Tensor, ps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = adapter.qkv(layer, adapter.attn_input(layer, hs))
        cos, sin = adapter.rope(hs, ps, i)
        return (*adapter.apply_rope(q, k, cos, sin), v)

    n = h.shape[1]
    if on_chunk is None or chunk_size is None or chunk_size >= n:
        q, k, v = project(h, pos)
    else:
        parts = []
        for s in range(0, n, chunk_size):
            parts.append(project(h[:, s : s + chunk_size], pos[:, s : s + chunk_size]))
            on_chunk(parts[-1][0].shape[2])
        q, k, v = (torch.cat(t, dim=2) for t in zip(*parts, strict=True))
    if past is not None:
        k, v, pos = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2), torch.cat([past[2], pos], dim=1)
    return LayerState(i, adapter.num_layers, prompt_len, q, k, v, pos, adapter.scales[i])


def layer_step(
    adapter: Adapter,
    i: int,
    h: torch.Tensor,
    pos: torch.Tensor,
    prompt_len: int,
    decide: Decide | None = None,
    chunk_size: int | None = None,
    past: Past | None = None,
    last: bool = False,
    past_mid: torch.Tensor | None = None,
    keep_mid: Callable[[torch.Tensor], None] | None = None,
    on_chunk: OnChunk | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run layer i over the tokens present: h [B, n, D] at positions pos [B, n] (after `past`, see open_layer).

    `decide` sees the layer's state (and caches what it wants); for each selection it returns, one
    (h, pos) comes back: the hidden states after this layer of the tokens that continue, and their positions.
    The attention runs once for all of them, over chunks of chunk_size queries (queries [s, e) attend to keys
    [0, e)); the MLP runs per token, so only on the tokens that continue. last: only the last token's output
    is needed (the model's last layer).

    With `past`, a selection indexes every token present, earlier ones included, so it needs their residuals
    after this layer's attention (`past_mid` [B, p, D], as stored); None (every token continues) continues
    h's own tokens, the earlier ones staying past. keep_mid(mid) receives the residual after attention, before
    the MLP, of every token present (earlier ones first, where given): what a prefix store keeps.
    on_chunk: see `OnChunk` (with chunk_size).
    """
    state = open_layer(adapter, i, h, pos, prompt_len, past, chunk_size, on_chunk)
    selections = decide(state) if decide is not None else [None]
    if not selections:
        return []
    layer = adapter.layers[i]
    out = attend(adapter, i, h, state, last, chunk_size, on_chunk)
    every, every_pos = out, pos  # the residual of every token present, and their positions
    if past_mid is not None:
        every, every_pos = torch.cat([past_mid, out], dim=1), state.positions
    if keep_mid is not None:
        keep_mid(every)
    steps = []
    for selected in selections:
        if selected is None:
            hs, ps = out, pos
        elif every.shape[1] != state.present:
            raise ValueError(f"layer {i}: a selection among earlier tokens needs their residuals (past_mid)")
        else:
            index = selected.unsqueeze(-1).expand(-1, -1, out.shape[-1])
            hs, ps = every.gather(1, index), every_pos.gather(1, selected)
        steps.append((feed_forward(adapter, layer, hs, chunk_size, on_chunk), ps))
    return steps


# A layer that needs a mask (a sliding window, a soft-cap) attends this many queries at a time at most: its
# masks are then [chunk, keys in reach], never [n, n].
MASKED_CHUNK = 1024


def attend(adapter: Adapter, i: int, h: torch.Tensor, state: LayerState, last: bool, chunk_size: int | None = None,
           on_chunk: OnChunk | None = None):  # fmt: skip
    """h plus layer i's causal attention output; for the last layer only the last token's.

    The state's q [B, Hq, n, d] are the queries of the last n of the m tokens in k, v [B, Hkv, m, d] (m > n
    when earlier tokens' K/V come first). With chunk_size, queries [s, e) attend to keys [0, m - n + e) a
    chunk at a time, written into a new h. A layer with a sliding window W attends by original position
    (`state.positions`): the query at position p sees the keys at positions in (p - W, p], so tokens that TSP
    propagated keep the neighbours they have; it goes MASKED_CHUNK queries at a time over the keys in reach.
    """
    layer, q, k, v = adapter.layers[i], state.q, state.k, state.v
    b, n, hq, d = h.shape[0], h.shape[1], adapter.num_heads, adapter.head_dim
    offset = k.shape[2] - n
    scale, cap, window = adapter.scales[i], adapter.softcaps[i], adapter.windows[i]
    pos = state.positions

    def output(out: torch.Tensor) -> torch.Tensor:
        return adapter.attn_residual(layer, out.transpose(1, 2).reshape(b, -1, hq * d))

    if last:
        # Only the last token's output is needed from the last layer: one query that sees every key in reach.
        lo = 0 if window is None else int(torch.searchsorted(pos.contiguous(), pos[:, -1:] - window + 1).min())
        mask = None if window is None else (pos[:, lo:] > pos[:, -1:] - window).view(b, 1, 1, -1)
        return h[:, -1:] + output(attention(q[:, :, -1:], k[:, :, lo:], v[:, :, lo:], scale, mask=mask, softcap=cap))
    plain = window is None and cap is None
    if plain and offset == 0 and (chunk_size is None or chunk_size >= n):
        return h + output(attention(q, k, v, scale, causal=True))
    size = n if chunk_size is None else chunk_size
    if not plain:
        size = min(size, MASKED_CHUNK)
    new = torch.empty_like(h)
    for s in range(0, n, size):
        e = min(n, s + size)
        lo = 0
        if window is not None:  # the keys in reach of the chunk's first query, and the window's mask by position
            lo = int(torch.searchsorted(pos[:, : offset + e].contiguous(), pos[:, offset + s : offset + s + 1]
                                        - window + 1).min())  # fmt: skip
            qp, kp = pos[:, offset + s : offset + e, None], pos[:, None, lo : offset + e]
            mask = ((kp <= qp) & (kp > qp - window)).unsqueeze(1)
        else:  # causal from the bottom right: query s + i sees keys 0..offset + s + i
            rows = torch.arange(offset + s, offset + e, device=h.device)
            mask = torch.arange(offset + e, device=h.device) <= rows[:, None]
        keys, values = k[:, :, lo : offset + e], v[:, :, lo : offset + e]
        new[:, s:e] = h[:, s:e] + output(attention(q[:, :, s:e], keys, values, scale, mask=mask, softcap=cap))
        if on_chunk is not None:
            on_chunk(e - s)
    return new


def feed_forward(adapter: Adapter, layer, h: torch.Tensor, chunk_size: int | None = None,
                 on_chunk: OnChunk | None = None):  # fmt: skip
    """h plus the layer's MLP block, over at most chunk_size tokens at a time (it works per token)."""
    if chunk_size is None or chunk_size >= h.shape[1]:
        return h + adapter.mlp_residual(layer, h)
    new = torch.empty_like(h)
    for s in range(0, h.shape[1], chunk_size):
        part = h[:, s : s + chunk_size]
        new[:, s : s + chunk_size] = part + adapter.mlp_residual(layer, part)
        if on_chunk is not None:
            on_chunk(part.shape[1])
    return new


def chosen_tokens(reducer: Reducer, state: LayerState) -> torch.Tensor | None:
    """The indices [B, T] of the tokens the reducer lets continue past this layer (checked), or None."""
    tokens = reducer.tokens(state)
    if tokens is None:
        return None
    b, hkv = state.k.shape[:2]
    return checked(tokens, f"{reducer.name} at layer {state.index}", state.present, b, hkv, ordered=True).indices[:, 0]


def store(cache: KVCache, state: LayerState, policy: CachePolicy, window: int | None = None) -> None:
    """Ask the policy which of this layer's entries to cache, check its answer, and cache them. A layer with a
    sliding window keeps what the next tokens can see, the tokens within `window` positions of the end, in a
    ring of at most `window` entries (`KVCache.store`): no policy is asked, its cache is bounded already."""
    k, v = state.k, state.v
    b, hkv, n, _ = k.shape
    head_pos = state.positions.unsqueeze(1).expand(b, hkv, n)
    if window is not None:
        # Tokens are in position order: those in reach of the next position are a tail, of its own length per row.
        counts = (state.positions > state.prompt_len - window).sum(dim=1)
        most = int(counts.max())
        idx = torch.arange(n - most, n, device=k.device).expand(b, most)
        valid = idx >= (n - counts)[:, None]
        idx = idx.unsqueeze(1).expand(b, hkv, most)
        valid = None if bool(valid.all()) else valid.unsqueeze(1).expand(b, hkv, most)
        cache.store(_take(k, idx), _take(v, idx), head_pos.gather(2, idx), valid, window=window)
        return
    entries = policy.entries(state)
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


def logits_of(adapter: Adapter, h: torch.Tensor) -> torch.Tensor:
    """float32 logits [B, V] of the last token of hidden states h [B, n, D] after the last layer."""
    return adapter.logits(h)


# -- prefill ---------------------------------------------------------------------------------------------
@dataclass
class Prefix:
    """What a prefix store (`fastkv.prefix`) holds of a prompt's first `length` tokens: their K/V in layers
    0..len(keys)-1 ([B, Hkv, >= length, d], after RoPE) and, at some layers, their residuals after that
    layer's attention, before its MLP ([B, >= length, D]). Causal attention makes all of it the same whatever
    follows those tokens, so a pass over a longer prompt may start from it."""

    length: int
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mids: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def depth(self) -> int:
        """The layers whose K/V it holds: 0..depth-1."""
        return len(self.keys)

    def past(self, i: int) -> Past:
        if i >= len(self.keys):
            raise NotReusable(f"the stored prefix holds layers 0..{len(self.keys) - 1}; layer {i} needs every token")
        p, k = self.length, self.keys[i]
        return k[:, :, :p], self.values[i][:, :, :p], torch.arange(p, device=k.device).expand(k.shape[0], p)

    def mid(self, i: int) -> torch.Tensor | None:
        return self.mids[i][:, : self.length] if i in self.mids else None


@dataclass
class Recording:
    """What a pass computes over the whole prompt, for a prefix store: the K/V of every layer that still sees
    every token, and the residuals after attention (before the MLP) at the layer whose reducer selects and at
    `mid_layers` (where another method would select)."""

    mid_layers: frozenset[int] = frozenset()
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    mids: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class Runner:
    """`Passes` over one model: what `prefill` gives the method's reducer. Passes over `prompt` itself (not
    a rerun on other tokens) start from `prefix` and fill `record`, where given."""

    adapter: Adapter
    max_new_tokens: int = 0
    chunk_size: int | None = None
    on_layer: Callable[[int], None] | None = None
    prompt: torch.Tensor | None = None
    prefix: Prefix | None = None
    record: Recording | None = None
    on_chunk: OnChunk | None = None

    def _own(self, input_ids: torch.Tensor) -> tuple[Prefix | None, Recording | None]:
        return (self.prefix, self.record) if input_ids is self.prompt else (None, None)

    def run(self, input_ids: torch.Tensor, reducer: Reducer, policy: CachePolicy) -> Pass:
        prefix, record = self._own(input_ids)
        return run_pass(self.adapter, input_ids, reducer, policy, self.max_new_tokens, self.on_layer,
                        self.chunk_size, prefix, record, self.on_chunk)  # fmt: skip

    def look(self, input_ids: torch.Tensor, layer: int) -> LayerState:
        prefix, record = self._own(input_ids)
        adapter, (b, n) = self.adapter, input_ids.shape
        p = prefix.length if prefix is not None else 0
        h, pos = adapter.embed(input_ids[:, p:]), torch.arange(p, n, device=input_ids.device).expand(b, n - p)

        def keep(state: LayerState) -> list[None]:
            if record is not None:
                record.keys.append(state.k)
                record.values.append(state.v)
            return [None]

        for i in range(layer):
            past = prefix.past(i) if p else None
            ((h, pos),) = layer_step(adapter, i, h, pos, n, keep, self.chunk_size, past, on_chunk=self.on_chunk)
            if self.on_layer is not None:
                self.on_layer(i)
        state = open_layer(adapter, layer, h, pos, n, prefix.past(layer) if p else None, self.chunk_size, self.on_chunk)
        keep(state)
        return state


@torch.inference_mode()
def prefill(
    adapter: Adapter,
    input_ids: torch.Tensor,
    method: Method,
    max_new_tokens: int = 0,
    on_layer: Callable[[int], None] | None = None,
    chunk_size: int | None = None,
    prefix: Prefix | None = None,
    record: Recording | None = None,
    on_chunk: OnChunk | None = None,
) -> tuple[KVCache, torch.Tensor, PrefillTrace]:
    """Run the prompt input_ids [B, L] through the model under `method`.

    Returns the cache (room for max_new_tokens more entries per layer), the float32 logits of the last
    prompt token [B, V], and a trace. `on_layer(i)` is called after each layer (for progress bars).
    chunk_size: attend and run the MLP over at most this many queries at a time (`attend`, `feed_forward`),
    so that activations beyond q, k, v grow with the prompt, not with chunk x prompt; None: all at once.
    prefix: start from the stored state of the prompt's first tokens (`Prefix`): only the later tokens run
    through the layers that see every token, attending to the stored K/V; every selection is made over all
    tokens, as a fresh prefill makes it. `NotReusable` when the method needs what the prefix lacks.
    record: fill it with what the prefix store keeps of this prompt (`Recording`).
    on_chunk(tokens): with chunk_size, called after each chunk of work (`OnChunk`): projections, attention
    and MLP alike go chunk_size tokens at a time, and the caller may do other work in between.
    """
    check_prompt(adapter, input_ids.shape[1], max_new_tokens)
    check_chunk(chunk_size)
    if prefix is not None and not 0 < prefix.length < input_ids.shape[1]:
        raise ValueError(f"a stored prefix of {prefix.length} tokens cannot start a prompt of {input_ids.shape[1]}")
    method = adapter.bind(method)
    runner = Runner(adapter, max_new_tokens, chunk_size, on_layer, input_ids, prefix, record, on_chunk)
    done = method.reducer.prefill(runner, input_ids, method.policy)
    return done.cache, done.logits, done.trace


def run_pass(
    adapter: Adapter,
    input_ids: torch.Tensor,
    reducer: Reducer,
    policy: CachePolicy,
    max_new_tokens: int = 0,
    on_layer: Callable[[int], None] | None = None,
    chunk_size: int | None = None,
    prefix: Prefix | None = None,
    record: Recording | None = None,
    on_chunk: OnChunk | None = None,
) -> Pass:
    """One pass over the layers on input_ids [B, n] at positions 0..n-1 (after `prefix`, see `prefill`)."""
    b, n = input_ids.shape
    p = prefix.length if prefix is not None else 0
    pos = torch.arange(p, n, device=input_ids.device).expand(b, n - p)
    cache = KVCache(prompt_len=n, max_new_tokens=max_new_tokens, position_base=n)
    trace = PrefillTrace(prompt_len=n)
    last = adapter.num_layers - 1

    h = adapter.embed(input_ids[:, p:])
    whole = True  # every prompt token is still present (the first p of them as stored state)
    stored = prefix.depth if prefix is not None else 0
    for i in range(adapter.num_layers):
        reusing = p > 0 and whole and i < stored
        past, past_mid = (prefix.past(i), prefix.mid(i)) if reusing else (None, None)
        chosen: list[torch.Tensor | None] = []

        def decide(state: LayerState, i=i, reusing=reusing, past_mid=past_mid, chosen=chosen, whole=whole):
            trace.tokens_per_layer.append(state.present)
            # After the last layer nothing is left to propagate to.
            selected = chosen_tokens(reducer, state) if i < last else None
            if selected is not None:
                if reusing and past_mid is None:
                    raise NotReusable(f"{reducer.name} selects at layer {i}, where the prefix holds no residuals")
                trace.propagated[i] = state.positions.gather(1, selected)
            elif reusing and i == stored - 1 and i < last:
                # The stored layers end here (an entry of a method that reduced after this layer) and the later
                # ones need every token: the stored tokens rejoin from their residuals after this attention.
                if past_mid is None:
                    raise NotReusable(f"the stored prefix holds layers 0..{i}, and no residuals at layer {i} to "
                                      f"continue every token from")  # fmt: skip
                selected = torch.arange(state.present, device=state.positions.device).expand(b, -1)
            store(cache, state, policy, adapter.windows[i])
            if record is not None and whole:
                record.keys.append(state.k)
                record.values.append(state.v)
            chosen.append(selected)
            return [selected]

        def keep_mid(mid: torch.Tensor, i=i, chosen=chosen) -> None:
            if i < last and (chosen[0] is not None or i in record.mid_layers):
                record.mids[i] = mid

        keep = keep_mid if record is not None and whole and (not reusing or past_mid is not None) else None
        ((h, pos),) = layer_step(adapter, i, h, pos, n, decide, chunk_size, past, i == last, past_mid, keep, on_chunk)
        whole = whole and (chosen[0] is None or i not in trace.propagated)  # a rejoin keeps every token
        if on_layer is not None:
            on_layer(i)
    return Pass(cache, logits_of(adapter, h), trace)


# -- decode ----------------------------------------------------------------------------------------------
@torch.inference_mode()
def decode_step(
    adapter: Adapter, cache: KVCache, tokens: torch.Tensor, position: int | torch.Tensor, compiled: bool = False
) -> torch.Tensor:
    """Feed tokens [B] at `position` (an int, or [B]: cache.position_base + steps so far); return float32
    logits [B, V]. The shapes are the same at every step, so `compiled` runs `decode_layers` under
    torch.compile: compiled once per process for any cache capacity, and once per model where int8
    weights on a CPU are frozen into the graph (`FROZEN`)."""
    cache.check_room()
    position = torch.as_tensor(position, device=tokens.device).expand(tokens.shape[0])
    step = compiled_decode_layers() if compiled else decode_layers
    # One sequence only: for a batch (a dynamic batch size) torch 2.13's template fails to compile (an
    # assertion on its epilogue in cpp_gemm_template), so batches take the plain compiled step.
    frozen = compiled and tokens.shape[0] == 1 and frozen_decode(adapter)
    with frozen_compilation() if frozen else contextlib.nullcontext():
        logits = step(adapter, cache.keys, cache.values, cache.attend, cache.slots, tokens, position, cache.entry_pos)
    cache.steps += 1
    return logits


# Compiled decoding of int8 weights on a CPU. `freezing` makes the weights constants of the graph, which
# lets max-autotune pick inductor's C++ GEMM template for them: for one row it reads the output layer about
# 2x faster than torch's `_weight_int8pack_mm`, and a whole decode step gets 1.5-2x faster. The template
# reads the weights repacked in blocks, a second int8 copy held by the graph (442 MiB more resident memory
# for qwen2.5-0.5b, whose int8 weights are 494 MB; the model's own copy stays for prefill). Dynamo guards
# the parameters' identity under freezing, so each model gets its own graph (at most
# torch._dynamo.config.recompile_limit per process). The FX graph cache is off for these graphs: with
# freezing it can hand one model the graph, and so the weights, compiled for another of the same shapes
# (torch 2.13: it keys frozen parameters by shape, but stores the template's repacked weights, made while
# lowering, by value; pytorch/pytorch#143563, #145868). tests/test_decode.py checks it.
FROZEN = {
    "freezing": True,
    "max_autotune": True,
    "max_autotune_gemm_backends": "CPP,ATEN",
    "fx_graph_cache": False,
    # Autotuning prints a table per shape to stderr; a user's console is not the place for it.
    "autotune_num_choices_displayed": 0,
    "max_autotune_report_choices_stats": False,
}


@contextlib.contextmanager
def frozen_compilation():
    """`FROZEN` around a compiled call. Dynamo reads `freezing` from the global config while it traces
    (torch.compile's options do not reach it), so the settings hold around each call; outside a
    (re)compile they cost nothing."""
    import torch._inductor.config as inductor_config  # loaded by torch.compile anyway; not at import

    with inductor_config.patch(FROZEN), warnings.catch_warnings():
        # torch's autotuner calls a deprecated storage API of its own while it compiles.
        warnings.filterwarnings("ignore", "TypedStorage is deprecated", UserWarning)
        yield


def frozen_decode(adapter: Adapter) -> bool:
    """Whether compiled decoding freezes this model's weights: int8 weights on a CPU."""
    return adapter.device.type == "cpu" and isinstance(adapter.lm_head, Int8Linear)


@functools.cache
def compiled_decode_layers():
    # dynamic: capacities differ per prompt and method; one graph serves them all.
    return torch.compile(decode_layers, dynamic=True)


def decode_layers(adapter: Adapter, keys, values, attend, slots, tokens: torch.Tensor, position: torch.Tensor,
                  entry_pos=None):  # fmt: skip
    """One token per sequence through every layer: write its K/V at each sequence's slot, attend over the
    layer's whole buffer under its mask, advance the slots. Tensors in, tensors out: no Python state.

    A layer with a sliding window W is a ring (`KVCache`): its slot wraps around the buffer, each entry's
    position is kept in entry_pos[i], and the token attends only to entries within W positions of its own."""
    b = tokens.shape[0]
    hq, hkv, d = adapter.num_heads, adapter.num_kv_heads, adapter.head_dim
    h = adapter.embed(tokens.view(b, 1))
    ropes: dict = {}  # one rotary embedding per kind of layer (Gemma 3: local and global)
    for i, layer in enumerate(adapter.layers):
        key = adapter.rope_key(i)
        if key not in ropes:
            ropes[key] = adapter.rope(h, position.view(b, 1), i)
        q, k, v = adapter.qkv(layer, adapter.attn_input(layer, h))
        q, k = adapter.apply_rope(q, k, *ropes[key])
        at = slots[i].view(b, 1, 1).expand(b, hkv, 1)
        keys[i].scatter_(2, at.unsqueeze(-1).expand(b, hkv, 1, d), k)
        values[i].scatter_(2, at.unsqueeze(-1).expand(b, hkv, 1, d), v)
        attend[i].scatter_(2, at, True)
        mask, window = attend[i], adapter.windows[i]
        if window is not None:  # (before the slot moves: `at` is a view of it)
            entry_pos[i].scatter_(2, at, position.view(b, 1, 1).expand(b, hkv, 1))
            mask = mask & (entry_pos[i] > (position - window).view(b, 1, 1))
        slots[i].add_(1)
        if window is not None:
            slots[i].remainder_(keys[i].shape[2])  # the ring: the oldest entry is overwritten next
        # The query heads of a GQA group become rows of one query block: no repeat of the cache.
        group = q.reshape(b, hkv, hq // hkv, d)
        if adapter.softcaps[i] is None:
            out = F.scaled_dot_product_attention(group, keys[i], values[i], attn_mask=mask[:, :, None],
                                                 scale=adapter.scales[i])  # fmt: skip
        else:
            out = capped_attention(group, keys[i], values[i], adapter.scales[i], adapter.softcaps[i], False,
                                   mask[:, :, None, None])  # fmt: skip
        h = h + adapter.attn_residual(layer, out.reshape(b, 1, hq * d))
        h = h + adapter.mlp_residual(layer, h)
    return adapter.logits(h)
