"""A preallocated, fixed-shape KV cache in which every layer holds its own number of entries.

Layer i owns K and V buffers [B, Hkv, capacity_i, d] with capacity_i = kept_i + max_new_tokens.
Prefill writes the kept entries once. Each decode step writes one entry per sequence at its slot
(`slots[i]`, a tensor [B]) in place and attends over the whole buffer under `attend[i]` [B, Hkv,
capacity_i], the mask of entries that are real and written. So decoding never reallocates or
concatenates, and a decode step sees the same shapes at every step (it can be compiled or captured).

When the heads of a layer keep different numbers of entries (an adaptive allocator), the layer is padded
to its longest head and `valid[i]` says which prefill entries are real; the padding is counted in `nbytes`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class KVCache:
    prompt_len: int
    max_new_tokens: int
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

    def __post_init__(self) -> None:
        if isinstance(self.position_base, int) and self.position_base < 0:
            self.position_base = self.prompt_len

    def store(
        self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor | None = None
    ) -> None:
        """Append the next layer's kept entries k, v [B, Hkv, kept, d], their positions [B, Hkv, kept] and,
        for padded layers, which of them are real [B, Hkv, kept]."""
        b, h, kept, d = k.shape
        # Zeros, not garbage, in the slots not written yet: a masked score is -inf, but 0 * NaN is NaN.
        kbuf = k.new_zeros(b, h, kept + self.max_new_tokens, d)
        vbuf = v.new_zeros(b, h, kept + self.max_new_tokens, d)
        kbuf[:, :, :kept] = k
        vbuf[:, :, :kept] = v
        attend = torch.zeros(b, h, kept + self.max_new_tokens, dtype=torch.bool, device=k.device)
        attend[:, :, :kept] = True if valid is None else valid
        self.keys.append(kbuf)
        self.values.append(vbuf)
        self.positions.append(positions)
        self.valid.append(valid)
        self.attend.append(attend)
        self.slots.append(torch.full((b,), kept, dtype=torch.long, device=k.device))

    def check_room(self) -> None:
        if self.steps >= self.max_new_tokens:
            raise RuntimeError(f"the KV cache is full: it was sized for max_new_tokens={self.max_new_tokens}")

    @property
    def lengths(self) -> list[int]:
        """Entries each layer holds per KV head: its prefill entries (padding included) and decoded ones."""
        return [kept + self.steps for kept in self.kept_per_layer]

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
        k = self.keys[0]
        return 2 * k.shape[0] * k.shape[1] * k.shape[3] * k.element_size()

    def nbytes(self) -> int:
        """Bytes of the K and V entries now held over all layers, padding included."""
        return self.entry_bytes() * sum(self.lengths)

    def full_nbytes(self) -> int:
        """Bytes that an uncompressed cache would hold for the same tokens."""
        return self.entry_bytes() * len(self.keys) * (self.prompt_len + self.steps)
