"""A preallocated KV cache in which every layer holds its own number of entries.

Layer i owns K and V buffers [B, Hkv, capacity_i, d] with capacity_i = kept_i + max_new_tokens.
Prefill writes the kept entries once; each decode step writes one entry at `lengths[i]` in place, so
decoding never reallocates or concatenates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class KVCache:
    prompt_len: int
    max_new_tokens: int
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    # Original prompt positions of the entries written at prefill, [B, Hkv, kept_i] (for inspection).
    positions: list[torch.Tensor] = field(default_factory=list)

    def store(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """Append the next layer's kept entries k, v [B, Hkv, kept, d] with their positions [B, Hkv, kept]."""
        b, h, kept, d = k.shape
        kbuf = k.new_empty(b, h, kept + self.max_new_tokens, d)
        vbuf = v.new_empty(b, h, kept + self.max_new_tokens, d)
        kbuf[:, :, :kept] = k
        vbuf[:, :, :kept] = v
        self.keys.append(kbuf)
        self.values.append(vbuf)
        self.lengths.append(kept)
        self.positions.append(positions)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one decoded token's k, v [B, Hkv, 1, d]; return views of the layer's valid entries."""
        n = self.lengths[layer]
        kbuf, vbuf = self.keys[layer], self.values[layer]
        if n >= kbuf.shape[2]:
            raise RuntimeError(
                f"KV cache of layer {layer} is full: it was sized for max_new_tokens={self.max_new_tokens}"
            )
        kbuf[:, :, n : n + 1] = k
        vbuf[:, :, n : n + 1] = v
        self.lengths[layer] = n + 1
        return kbuf[:, :, : n + 1], vbuf[:, :, : n + 1]

    @property
    def kept_per_layer(self) -> list[int]:
        """Entries each layer kept at prefill (per KV head)."""
        return [p.shape[-1] for p in self.positions]

    def entry_bytes(self) -> int:
        """Bytes of one entry (K and V) of one layer over batch and heads."""
        k = self.keys[0]
        return 2 * k.shape[0] * k.shape[1] * k.shape[3] * k.element_size()

    def nbytes(self) -> int:
        """Bytes of the valid K and V entries now held, over all layers."""
        return self.entry_bytes() * sum(self.lengths)

    def full_nbytes(self) -> int:
        """Bytes that an uncompressed cache would hold for the same tokens."""
        decoded = self.lengths[0] - self.kept_per_layer[0]
        return self.entry_bytes() * len(self.keys) * (self.prompt_len + decoded)
