"""One layer of prefill, as the engine runs it: the model's own modules through its adapter.

`open_layer` projects a layer's q, k, v (the state the method's parts see), `attend` adds its attention,
`feed_forward` its MLP block, and `layer_step` runs the three with a decision in between: which tokens
continue (`chosen_tokens`) and which entries the layer caches (`store`). How the work is split (chunks, and
callbacks between them) comes whole in one `PrefillOptions`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .adapters import Adapter
from .cache import KVCache
from .methods import CachePolicy, LayerState, Reducer, Selection

# Check the values of every selection a part returns (range, order, repeats), not only its shape. On a CPU
# this costs nothing; on a GPU it reads back to the host twice per layer, so it is off there unless asked
# for (FASTKV_DEBUG=1, which the tests set).
DEBUG = os.environ.get("FASTKV_DEBUG") == "1"


def check_chunk(prefill_chunk: int | None) -> None:
    if prefill_chunk is not None and (
        isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < 1
    ):
        raise ValueError(f"prefill_chunk must be a positive number of tokens or None, got {prefill_chunk!r}")


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


@dataclass(frozen=True)
class PrefillOptions:
    """How a prefill runs, apart from what it computes: built once per request and passed whole.

    max_tokens: room in the cache for this many new tokens per layer (decoding's steps).
    prefill_chunk: attend and run the MLP over at most this many queries at a time (`attend`,
        `feed_forward`), so that activations beyond q, k, v grow with the prompt, not with chunk x prompt;
        None: all at once.
    on_layer(i): called after each layer (progress bars).
    on_chunk(tokens): with prefill_chunk, called after each chunk of work (`OnChunk`): projections, attention
        and MLP alike then go prefill_chunk tokens at a time, and the caller may do other work in between.
    """

    max_tokens: int = 0
    prefill_chunk: int | None = None
    on_layer: Callable[[int], None] | None = None
    on_chunk: OnChunk | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise ValueError(f"max_tokens must be a number of tokens >= 0, got {self.max_tokens!r}")
        check_chunk(self.prefill_chunk)
        for name in ("on_layer", "on_chunk"):
            if getattr(self, name) is not None and not callable(getattr(self, name)):
                raise TypeError(f"{name} must be callable or None, got {getattr(self, name)!r}")

    def chunks(self, n: int) -> bool:
        """Whether n tokens' work goes in chunks."""
        return self.prefill_chunk is not None and self.prefill_chunk < n


WHOLE = PrefillOptions()  # no room for new tokens, no chunks, no callbacks


def open_layer(adapter: Adapter, i: int, h: torch.Tensor, pos: torch.Tensor, prompt_len: int,
               past: Past | None = None, *, options: PrefillOptions = WHOLE) -> LayerState:  # fmt: skip
    """Layer i's projections of hidden states h [B, n, D] at positions pos [B, n], as the parts see them. With
    `past`, the earlier tokens' K/V come first in k and v (they attend and are attended to as if present).
    With options.on_chunk, the projections too go prefill_chunk tokens at a time (they work per token)."""
    layer = adapter.layers[i]

    def project(hs: torch.Tensor, ps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = adapter.qkv(layer, adapter.attn_input(layer, hs))
        cos, sin = adapter.rope(hs, ps, i)
        return (*adapter.apply_rope(q, k, cos, sin), v)

    n, size = h.shape[1], options.prefill_chunk
    if options.on_chunk is None or not options.chunks(n):
        q, k, v = project(h, pos)
    else:
        parts = []
        for s in range(0, n, size):
            parts.append(project(h[:, s : s + size], pos[:, s : s + size]))
            options.on_chunk(parts[-1][0].shape[2])
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
    *,
    options: PrefillOptions = WHOLE,
    past: Past | None = None,
    last: bool = False,
    past_mid: torch.Tensor | None = None,
    keep_mid: Callable[[torch.Tensor], None] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run layer i over the tokens present: h [B, n, D] at positions pos [B, n] (after `past`, see open_layer).

    `decide` sees the layer's state (and caches what it wants); for each selection it returns, one
    (h, pos) comes back: the hidden states after this layer of the tokens that continue, and their positions.
    The attention runs once for all of them, over chunks of options.prefill_chunk queries (queries [s, e)
    attend to keys [0, e)); the MLP runs per token, so only on the tokens that continue. last: only the last
    token's output is needed (the model's last layer).

    With `past`, a selection indexes every token present, earlier ones included, so it needs their residuals
    after this layer's attention (`past_mid` [B, p, D], as stored); None (every token continues) continues
    h's own tokens, the earlier ones staying past. keep_mid(mid) receives the residual after attention, before
    the MLP, of every token present (earlier ones first, where given): what a prefix store keeps.
    options: how the work is split (`PrefillOptions`); max_tokens and on_layer are the caller's.
    """
    state = open_layer(adapter, i, h, pos, prompt_len, past, options=options)
    selections = decide(state) if decide is not None else [None]
    if not selections:
        return []
    layer = adapter.layers[i]
    out = attend(adapter, i, h, state, last, options=options)
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
        steps.append((feed_forward(adapter, layer, hs, options=options), ps))
    return steps


# A layer that needs a mask (a sliding window, a soft-cap) attends this many queries at a time at most: its
# masks are then [chunk, keys in reach], never [n, n].
MASKED_CHUNK = 1024


def attend(adapter: Adapter, i: int, h: torch.Tensor, state: LayerState, last: bool, *,
           options: PrefillOptions = WHOLE) -> torch.Tensor:  # fmt: skip
    """h plus layer i's causal attention output; for the last layer only the last token's.

    The state's q [B, Hq, n, d] are the queries of the last n of the m tokens in k, v [B, Hkv, m, d] (m > n
    when earlier tokens' K/V come first). With options.prefill_chunk, queries [s, e) attend to keys
    [0, m - n + e) a chunk at a time, written into a new h. A layer with a sliding window W attends by original position
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
    if plain and offset == 0 and not options.chunks(n):
        return h + output(attention(q, k, v, scale, causal=True))
    size = options.prefill_chunk or n
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
        if options.on_chunk is not None:
            options.on_chunk(e - s)
    return new


def feed_forward(adapter: Adapter, layer, h: torch.Tensor, *, options: PrefillOptions = WHOLE) -> torch.Tensor:
    """h plus the layer's MLP block, over at most options.prefill_chunk tokens at a time (it works per token)."""
    if not options.chunks(h.shape[1]):
        return h + adapter.mlp_residual(layer, h)
    new, size = torch.empty_like(h), options.prefill_chunk
    for s in range(0, h.shape[1], size):
        part = h[:, s : s + size]
        new[:, s : s + size] = part + adapter.mlp_residual(layer, part)
        if options.on_chunk is not None:
            options.on_chunk(part.shape[1])
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
