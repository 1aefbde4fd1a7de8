"""Per-family glue between the engine and a transformers model.

The engine owns the loop over layers but computes nothing with weights of its own: every projection,
norm and MLP is the model's own module. What differs between families is small (Qwen2 has biases, which
live inside its `nn.Linear`s; Qwen3 normalises q and k per head before RoPE), so an adapter is a few
lines. To support a new family, subclass `Adapter`, override what differs and add it to `ADAPTERS`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


@dataclass
class Adapter:
    """The pieces of a decoder-only model that the engine drives, and the shapes it needs."""

    model: nn.Module
    embed_tokens: nn.Module
    layers: nn.ModuleList
    norm: nn.Module
    lm_head: nn.Module
    rotary_emb: nn.Module
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_positions: int
    sliding_window: int | None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def qkv(self, attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project x [B, n, D] to q [B, Hq, n, d] and k, v [B, Hkv, n, d], before RoPE."""
        b, n, _ = x.shape
        q = attn.q_proj(x).view(b, n, self.num_heads, self.head_dim)
        k = attn.k_proj(x).view(b, n, self.num_kv_heads, self.head_dim)
        v = attn.v_proj(x).view(b, n, self.num_kv_heads, self.head_dim)
        q, k = self.qk_norm(attn, q, k)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def qk_norm(self, attn: nn.Module, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return q, k

    def rope(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, n, d] for positions [B, n]: the model's own rotary embedding (incl. rope scaling)."""
        return self.rotary_emb(x, positions)

    def apply_rope(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q [B, Hq, n, d] and k [B, Hkv, n, d] to their positions (transformers' own function)."""
        return apply_rotary_pos_emb(q, k, cos, sin)


class Qwen3Adapter(Adapter):
    """Qwen3 applies an RMSNorm to each query and key head before RoPE."""

    def qk_norm(self, attn: nn.Module, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return attn.q_norm(q), attn.k_norm(k)


ADAPTERS: dict[str, type[Adapter]] = {
    "llama": Adapter,
    "mistral": Adapter,
    "qwen2": Adapter,
    "qwen3": Qwen3Adapter,
}


def _sliding_window(config) -> int | None:
    """The attention window of a model that limits attention to recent tokens, else None."""
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if "sliding_attention" in layer_types else None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return window


def check_supported(config) -> None:
    """ValueError naming a model's type where fastkv has no adapter for it: read from its config alone, so that
    `fastkv.models.load` refuses such a model before reading its weights."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"unsupported model type {model_type!r}: fastkv supports {sorted(ADAPTERS)} "
            "(add an Adapter in fastkv/adapters.py for another family)"
        )


def adapter_for(model: nn.Module) -> Adapter:
    """Find the adapter of a transformers causal LM from `config.model_type`."""
    config = model.config
    check_supported(config)
    model_type = config.model_type
    base = model.model
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ADAPTERS[model_type](
        model=model,
        embed_tokens=base.embed_tokens,
        layers=base.layers,
        norm=base.norm,
        lm_head=model.lm_head,
        rotary_emb=base.rotary_emb,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        max_positions=config.max_position_embeddings,
        sliding_window=_sliding_window(config),
    )
