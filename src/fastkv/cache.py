"""A preallocated KV cache in which every layer holds its own number of entries.

Layer i owns K and V buffers [B, Hkv, capacity_i, d] with capacity_i = kept_i + max_new_tokens.
Prefill writes the kept entries once; each decode step writes one entry at `lengths[i]` in place, so
decoding never reallocates or concatenates.

When the heads of a layer keep different numbers of entries (an adaptive allocator), the layer is padded to its
longest head and `valid` [B, Hkv, capacity_i] masks the padding; the padding is counted in `nbytes`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class KVCache:
    prompt_len: int
    max_new_tokens: int
    # Position of the first decoded token: after the last position prefill wrote (default prompt_len;
    # a reducer that reruns the model on a renumbered, shorter prompt makes it smaller).
    position_base: int = -1
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    # Original prompt positions of the entries written at prefill, [B, Hkv, kept_i] (for inspection).
    positions: list[torch.Tensor] = field(default_factory=list)
    # Per layer: None when every head holds `lengths[i]` entries, else a mask of the real ones.
    valid: list[torch.Tensor | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.position_base < 0:
            self.position_base = self.prompt_len

    def store(
        self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor | None = None
    ) -> None:
        """Append the next layer's kept entries k, v [B, Hkv, kept, d], their positions [B, Hkv, kept] and,
        for padded layers, which of them are real [B, Hkv, kept]."""
        b, h, kept, d = k.shape
        kbuf = k.new_empty(b, h, kept + self.max_new_tokens, d)
        vbuf = v.new_empty(b, h, kept + self.max_new_tokens, d)
        kbuf[:, :, :kept] = k
        vbuf[:, :, :kept] = v
        self.keys.append(kbuf)
        self.values.append(vbuf)
        self.lengths.append(kept)
        self.positions.append(positions)
        if valid is not None:
            mask = torch.ones(b, h, kept + self.max_new_tokens, dtype=torch.bool, device=k.device)
            mask[:, :, :kept] = valid
            valid = mask
        self.valid.append(valid)

    def append(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Write one decoded token's k, v [B, Hkv, 1, d]; return views of the layer's entries so far and,
        for a padded layer, the attention mask [B, Hkv, 1, n] of the real ones."""
        n = self.lengths[layer]
        kbuf, vbuf = self.keys[layer], self.values[layer]
        if n >= kbuf.shape[2]:
            raise RuntimeError(
                f"KV cache of layer {layer} is full: it was sized for max_new_tokens={self.max_new_tokens}"
            )
        kbuf[:, :, n : n + 1] = k
        vbuf[:, :, n : n + 1] = v
        self.lengths[layer] = n + 1
        mask = self.valid[layer]
        if mask is not None:
            mask = mask[:, :, None, : n + 1]
        return kbuf[:, :, : n + 1], vbuf[:, :, : n + 1], mask

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
        decoded = self.lengths[0] - self.kept_per_layer[0]
        return self.entry_bytes() * len(self.keys) * (self.prompt_len + decoded)
