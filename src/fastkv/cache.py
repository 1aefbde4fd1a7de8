"""A preallocated, fixed-shape KV cache in which every layer holds its own number of entries.

Layer i owns K and V buffers [B, Hkv, capacity_i, d] with capacity_i = kept_i + max_tokens.
Prefill writes the kept entries once. Each decode step writes one entry per sequence at its slot
(`slots[i]`, a tensor [B]) in place and attends over the whole buffer under `attend[i]` [B, Hkv,
capacity_i], the mask of entries that are real and written. So decoding never reallocates or
concatenates, and a decode step sees the same shapes at every step (it can be compiled or captured).

When the heads of a layer keep different numbers of entries (an adaptive allocator), the layer is padded
to its longest head and `valid[i]` says which prefill entries are real; the padding is counted in `nbytes`.

A layer with a sliding window W (Mistral, Gemma 3's local layers) is a ring: at most W entries, the slot
wrapping around (`windows[i]`), so its memory stays bounded however long the generation. It also keeps each
entry's position (`entry_pos[i]`): a decode step attends to the entries within W positions of its own,
which after TSP (sparse positions) are not simply the last W written.

Ragged batches: `merge` makes one cache of several sequences' caches (each row keeps its own mask, write
slot and next position; a layer is as long as its longest row needs, `KVCache.capacity`), and `keep_rows`
keeps some of its rows. A batch cache's `position_base` is a tensor [B].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from .compaction import DecodeBudget, DecodeState, merge_states

NO_POSITION = -(2**62)  # the position of a ring slot not written yet: out of every window


def entry_bytes(kv_heads: int, head_dim: int, element_size: int, rows: int = 1) -> int:
    """Bytes of one entry (K and V) of one layer, over `rows` sequences and every KV head."""
    return 2 * rows * kv_heads * head_dim * element_size


@dataclass
class KVCache:
    prompt_len: int
    max_tokens: int
    # Position of the first decoded token: after the last position prefill wrote (default prompt_len;
    # a reducer that reruns the model on a renumbered, shorter prompt makes it smaller). A ragged batch's
    # cache (`fastkv.batch.merge`) holds one per row, [B].
    position_base: int | torch.Tensor = -1
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    # Original prompt positions of the entries written at prefill, [B, Hkv, kept_i] (for inspection).
    positions: list[torch.Tensor] = field(default_factory=list)
    # Per layer: None when every head holds all of its prefill entries, else [B, Hkv, kept_i], the real ones.
    valid: list[torch.Tensor | None] = field(default_factory=list)
    # Per layer: [B, Hkv, capacity_i], the entries a decode step attends to (real and written so far).
    attend: list[torch.Tensor] = field(default_factory=list)
    # Per layer: [B], the slot the next decoded token's entry goes to.
    slots: list[torch.Tensor] = field(default_factory=list)
    steps: int = 0  # tokens decoded into the cache so far
    # Per layer: its sliding window W (a ring of at most W entries), or None.
    windows: list[int | None] = field(default_factory=list)
    # Per layer with a window: [B, Hkv, capacity_i], each entry's position (NO_POSITION where none); else None.
    entry_pos: list[torch.Tensor | None] = field(default_factory=list)
    # The policy's decode-time budget (`DecodeBudget`), where it has one: then a non-sliding layer holds at
    # most decode_budget + decode_interval generated entries, and `decode_state` tracks them (`fastkv.compaction`).
    decoding: DecodeBudget | None = None
    decode_state: DecodeState | None = None

    def __post_init__(self) -> None:
        if isinstance(self.position_base, int) and self.position_base < 0:
            self.position_base = self.prompt_len

    def store(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        valid: torch.Tensor | None = None,
        window: int | None = None,
    ) -> None:
        """Append the next layer's kept entries k, v [B, Hkv, kept, d], their positions [B, Hkv, kept] and,
        for padded layers, which of them are real [B, Hkv, kept]. window: the layer's sliding window, whose
        ring holds at most `window` entries (kept must be fewer)."""
        b, h, kept, d = k.shape
        generated = self.max_tokens if self.decoding is None else min(self.max_tokens, self.decoding.held)
        capacity = kept + generated if window is None else min(kept + self.max_tokens, window)
        if capacity < kept:
            raise ValueError(f"a layer with a window of {window} cannot keep {kept} entries")
        # Zeros, not garbage, in the slots not written yet: a masked score is -inf, but 0 * NaN is NaN.
        kbuf = k.new_zeros(b, h, capacity, d)
        vbuf = v.new_zeros(b, h, capacity, d)
        kbuf[:, :, :kept] = k
        vbuf[:, :, :kept] = v
        attend = torch.zeros(b, h, capacity, dtype=torch.bool, device=k.device)
        attend[:, :, :kept] = True if valid is None else valid
        self.keys.append(kbuf)
        self.values.append(vbuf)
        self.positions.append(positions)
        self.valid.append(valid)
        self.attend.append(attend)
        self.slots.append(torch.full((b,), kept, dtype=torch.long, device=k.device))
        self.windows.append(window)
        if window is None:
            self.entry_pos.append(None)
        else:
            where = torch.full((b, h, capacity), NO_POSITION, dtype=torch.long, device=k.device)
            where[:, :, :kept] = positions if valid is None else positions.masked_fill(~valid, NO_POSITION)
            self.entry_pos.append(where)

    def check_room(self) -> None:
        if self.steps >= self.max_tokens:
            raise RuntimeError(f"the KV cache is full: it was sized for max_tokens={self.max_tokens}")

    @property
    def room(self) -> int:
        """Decode steps it still has room for."""
        return self.max_tokens - self.steps

    def capacity(self, layer: int) -> int:
        """Entries `layer` must be able to hold for its furthest row: the next slot plus the steps left; for a
        ring, at most its window, and all of it once a row has wrapped around."""
        window = self.windows[layer] if self.windows else None
        if window is None and self.decode_state is not None:
            return self.decode_state.capacity(layer, self.slots[layer], self.room)
        need = int(self.slots[layer].max()) + self.room
        if window is None:
            return need
        return min(window, max(need, int(self.attend[layer].sum(dim=-1).max())))

    @property
    def lengths(self) -> list[int]:
        """Entries each layer holds per KV head: its prefill entries (padding included) and decoded ones (a ring
        no more than its size)."""
        windows = self.windows or [None] * len(self.keys)
        held = self.steps if self.decode_state is None else self.decode_state.held()
        return [min(kept + (held if w is None else self.steps), k.shape[2])
                for kept, k, w in zip(self.kept_per_layer, self.keys, windows, strict=True)]  # fmt: skip

    @property
    def kept_per_layer(self) -> list[int]:
        """Entries each layer stores from prefill per KV head (for a padded layer, its longest head)."""
        return [p.shape[-1] for p in self.positions]

    def kept_per_head(self, layer: int) -> torch.Tensor:
        """Real entries from prefill of each head of `layer`, [B, Hkv]."""
        kept = self.kept_per_layer[layer]
        if self.valid[layer] is None:
            return torch.full(self.positions[layer].shape[:2], kept, device=self.positions[layer].device)
        return self.valid[layer][:, :, :kept].sum(dim=-1)

    def entry_bytes(self) -> int:
        """Bytes of one entry (K and V) of one layer over batch and heads."""
        b, h, _, d = self.keys[0].shape
        return entry_bytes(h, d, self.keys[0].element_size(), rows=b)

    def nbytes(self) -> int:
        """Bytes of the K and V entries now held over all layers, padding included."""
        return self.entry_bytes() * sum(self.lengths)

    def full_nbytes(self) -> int:
        """Bytes that an uncompressed cache would hold for the same tokens (a windowed layer: its window)."""
        tokens = self.prompt_len + self.steps
        windows = self.windows or [None] * len(self.keys)
        return self.entry_bytes() * sum(tokens if w is None else min(tokens, w) for w in windows)


def _pad(t: torch.Tensor, length: int, value) -> torch.Tensor:
    """t [B, H, n, ...] cut or padded with `value` to `length` along dim 2."""
    if t.shape[2] >= length:
        return t[:, :, :length]
    pad = t.new_full((*t.shape[:2], length - t.shape[2], *t.shape[3:]), value)
    return torch.cat([t, pad], dim=2)


def merge(caches: Sequence[KVCache]) -> KVCache:
    """One cache with the rows of all `caches`, each layer as long as its rows need (`KVCache.capacity`);
    rows keep their masks, slots and next positions."""
    if not caches:
        raise ValueError("nothing to merge")
    out = KVCache(
        prompt_len=max(c.prompt_len for c in caches),
        max_tokens=max(c.room for c in caches),
        position_base=torch.cat([_next_positions(c) for c in caches]),
    )
    for i in range(len(caches[0].keys)):
        capacity = max(c.capacity(i) for c in caches)
        kept = max(c.positions[i].shape[-1] for c in caches)
        out.keys.append(torch.cat([_pad(c.keys[i], capacity, 0) for c in caches]))
        out.values.append(torch.cat([_pad(c.values[i], capacity, 0) for c in caches]))
        out.attend.append(torch.cat([_pad(c.attend[i], capacity, False) for c in caches]))
        out.slots.append(torch.cat([c.slots[i] for c in caches]))
        out.positions.append(torch.cat([_pad(c.positions[i], kept, -1) for c in caches]))
        valid = [
            c.valid[i] if c.valid[i] is not None else torch.ones_like(c.positions[i], dtype=torch.bool) for c in caches
        ]
        valid = torch.cat([_pad(v, kept, False) for v in valid])
        out.valid.append(None if bool(valid.all()) else valid)
        window = caches[0].windows[i] if caches[0].windows else None
        out.windows.append(window)
        out.entry_pos.append(
            None if window is None else torch.cat([_pad(c.entry_pos[i], capacity, NO_POSITION) for c in caches])
        )
    out.decode_state = merge_states(caches)
    return out


def merged_bytes(batch: KVCache | None, need: Sequence[int], per_row_entry: int) -> int:
    """K/V bytes of `batch` once one more sequence joins it (`merge`) that needs need[i] entries in layer i:
    every layer then holds all rows at the longest capacity. per_row_entry: `entry_bytes` of one row."""
    if batch is None:
        return per_row_entry * sum(need)
    rows = batch.keys[0].shape[0] + 1
    return per_row_entry * rows * sum(max(batch.capacity(i), n) for i, n in enumerate(need))


def _next_positions(c: KVCache) -> torch.Tensor:
    base = torch.as_tensor(c.position_base, device=c.slots[0].device)
    return (base + c.steps).expand(c.keys[0].shape[0]).clone()


def keep_rows(cache: KVCache, rows: Sequence[int]) -> KVCache:
    """The cache of the given rows only, in that order (the others' memory is released)."""
    idx = torch.tensor(list(rows), dtype=torch.long, device=cache.slots[0].device)

    def take(ts: list) -> list:
        return [t.index_select(0, idx) if t is not None else None for t in ts]

    return replace(
        cache,
        position_base=_next_positions(cache).index_select(0, idx),
        steps=0,
        max_tokens=cache.room,
        keys=take(cache.keys),
        values=take(cache.values),
        attend=take(cache.attend),
        slots=take(cache.slots),
        positions=take(cache.positions),
        valid=take(cache.valid),
        entry_pos=take(cache.entry_pos),
        decode_state=None if cache.decode_state is None else cache.decode_state.rows(list(rows)),
    )
