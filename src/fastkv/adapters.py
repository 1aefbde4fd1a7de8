"""Per-family glue between the engine and a transformers model: the whole decoder block, as the model defines it.

The engine owns the loop over layers but computes nothing with weights of its own: every projection, norm and
MLP is the model's own module. What differs between families is where those modules sit and a few scalars, so
everything the engine does to a layer goes through the adapter:

- `embed`: token embeddings (Granite multiplies them; Gemma's embedding module scales them itself);
- `attn_input`: the norm before attention (none in OLMo 2);
- `qkv`: q, k, v per head before RoPE: separate or fused projections (Phi-3), q/k norms per head (Qwen3,
  Gemma 3) or over the whole projection (OLMo 2);
- `rope`, `apply_rope`: each layer's rotary embedding (Gemma 3: its own base for local layers), applied with
  the family's own function (Phi-3's partial rotary);
- `scale`, `softcap`, `window`: each layer's softmax scale, attention-logit soft-cap (Gemma 2) and sliding
  window (Mistral, Qwen2 with `use_sliding_window`, Gemma 2/3's local layers, Phi-3);
- `attn_residual`: what attention adds to the residual stream: the output projection, a norm after it
  (Gemma 2/3, OLMo 2), a residual multiplier (Granite);
- `mlp_residual`: what the MLP adds, with its norms, the model's own MLP module (dense or mixture of experts);
- `logits`: the final norm, the output layer, and logit scaling (Granite) or soft-capping (Gemma 2/3).

Adding a family is one subclass that overrides what differs, plus one line in `ADAPTERS`. `adapter_for`
refuses a model whose type is not registered, or whose layers lack a module its adapter uses; loading a model
(`fastkv.models.load`) also checks the engine's logits against the model's own forward (`check_against_model`).
"""

from __future__ import annotations

import importlib
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn


@dataclass
class Adapter:
    """The pieces of a decoder-only model that the engine drives, its shapes, and how its decoder block computes.
    The base class is the Llama block: pre-norm attention and MLP, each added to the residual stream."""

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
    windows: list[int | None] = field(default_factory=list)  # per layer: keys in (p - W, p] are seen, or all
    scales: list[float] = field(default_factory=list)  # per layer: the attention's softmax scale
    softcaps: list[float | None] = field(default_factory=list)  # per layer: attention-logit soft-cap
    rope_apply: Callable | None = None  # the family's own apply_rotary_pos_emb

    # Modules every layer must have for this adapter (dotted paths): a layer of another shape is refused.
    needs: ClassVar[tuple[str, ...]] = (
        "input_layernorm", "post_attention_layernorm", "mlp",
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    )  # fmt: skip

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def config(self):
        return self.model.config

    @property
    def hybrid(self) -> bool:
        """Whether some layers see a sliding window and others everything (Gemma 2/3)."""
        return any(w is not None for w in self.windows) and any(w is None for w in self.windows)

    @property
    def global_layers(self) -> list[int]:
        return [i for i, w in enumerate(self.windows) if w is None]

    # -- the block ---------------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def attn_input(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """What the attention projections read: the residual stream, normalised."""
        return layer.input_layernorm(h)

    def qkv(self, layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project x [B, n, D] to q [B, Hq, n, d] and k, v [B, Hkv, n, d], before RoPE."""
        attn = layer.self_attn
        b, n, _ = x.shape
        q = attn.q_proj(x).view(b, n, self.num_heads, self.head_dim)
        k = attn.k_proj(x).view(b, n, self.num_kv_heads, self.head_dim)
        v = attn.v_proj(x).view(b, n, self.num_kv_heads, self.head_dim)
        q, k = self.qk_norm(attn, q, k)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def qk_norm(self, attn: nn.Module, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Norms of q and k per head, [B, n, H, d] (none in Llama)."""
        return q, k

    def rope_key(self, i: int) -> object:
        """Layers with the same key share their rotary embedding (one per step in decoding)."""
        return None

    def rope(self, x: torch.Tensor, positions: torch.Tensor, i: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, n, d] of layer i for positions [B, n]: the model's own rotary embedding (incl. scaling)."""
        return self.rotary_emb(x, positions)

    def apply_rope(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q [B, Hq, n, d] and k [B, Hkv, n, d] to their positions (the family's own function)."""
        return self.rope_apply(q, k, cos, sin)

    def attn_residual(self, layer: nn.Module, out: torch.Tensor) -> torch.Tensor:
        """What attention adds to the residual stream, from its heads' output out [B, n, Hq * d]."""
        return layer.self_attn.o_proj(out)

    def mlp_residual(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """What the MLP block adds to the residual stream h [B, n, D] (the model's own MLP, dense or MoE)."""
        return layer.mlp(layer.post_attention_layernorm(h))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """float32 logits [B, V] of the last token of h [B, n, D] after the last layer."""
        return self.lm_head(self.norm(h[:, -1:]))[:, -1].float()

    @property
    def ranking_layers(self) -> list[int] | None:
        """Where a method may rank the whole prompt at one layer (TSP, GemFilter's filter): the global layers of
        a hybrid model (`methods.base.ranking_layer`); None: any layer."""
        return self.global_layers if self.hybrid else None

    def bind(self, method):
        """`method` with every default resolved for this model (`Method.bind`)."""
        return method.bind(self.num_layers, self.ranking_layers)

    def need(self, i: int, entries: int) -> int:
        """Entries layer i's cache holds at most when `entries` would be cached without a window."""
        window = self.windows[i]
        return entries if window is None else min(entries, window)


class Qwen3Adapter(Adapter):
    """Qwen3 (and Qwen3-MoE) apply an RMSNorm to each query and key head before RoPE."""

    def qk_norm(self, attn, q, k):
        return attn.q_norm(q), attn.k_norm(k)


class Phi3Adapter(Adapter):
    """Phi-3 fuses q, k and v into one projection (and gate and up in its MLP, which is its own module)."""

    needs = ("input_layernorm", "post_attention_layernorm", "mlp", "self_attn.qkv_proj", "self_attn.o_proj")

    def qkv(self, layer, x):
        b, n, _ = x.shape
        qkv = layer.self_attn.qkv_proj(x)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q = qkv[..., :q_size].view(b, n, self.num_heads, self.head_dim)
        k = qkv[..., q_size : q_size + kv_size].view(b, n, self.num_kv_heads, self.head_dim)
        v = qkv[..., q_size + kv_size :].view(b, n, self.num_kv_heads, self.head_dim)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


class Olmo2Adapter(Adapter):
    """OLMo 2 normalises after each block, not before: the attention reads the raw residual stream; q and k
    are normalised over the whole projection (all heads at once)."""

    needs = (
        "post_attention_layernorm", "post_feedforward_layernorm", "mlp", "self_attn.q_norm", "self_attn.k_norm",
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    )  # fmt: skip

    def attn_input(self, layer, h):
        return h

    def qkv(self, layer, x):
        attn = layer.self_attn
        b, n, _ = x.shape
        q = attn.q_norm(attn.q_proj(x)).view(b, n, self.num_heads, self.head_dim)
        k = attn.k_norm(attn.k_proj(x)).view(b, n, self.num_kv_heads, self.head_dim)
        v = attn.v_proj(x).view(b, n, self.num_kv_heads, self.head_dim)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def attn_residual(self, layer, out):
        return layer.post_attention_layernorm(layer.self_attn.o_proj(out))

    def mlp_residual(self, layer, h):
        return layer.post_feedforward_layernorm(layer.mlp(h))


class GraniteAdapter(Adapter):
    """Granite scales the embeddings, each block's output before it joins the residual stream, and the logits
    (its attention module's `scaling` is already the attention multiplier)."""

    def embed(self, input_ids):
        return self.embed_tokens(input_ids) * self.config.embedding_multiplier

    def attn_residual(self, layer, out):
        return layer.self_attn.o_proj(out) * self.config.residual_multiplier

    def mlp_residual(self, layer, h):
        return layer.mlp(layer.post_attention_layernorm(h)) * self.config.residual_multiplier

    def logits(self, h):
        return super().logits(h) / self.config.logits_scaling


class Gemma2Adapter(Adapter):
    """Gemma 2 normalises before and after both attention and MLP, soft-caps attention logits and the final
    logits, and alternates local (sliding-window) and global layers. Its embedding module scales by
    sqrt(hidden) itself."""

    needs = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
             "post_feedforward_layernorm", "mlp", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
             "self_attn.o_proj")  # fmt: skip

    def attn_residual(self, layer, out):
        return layer.post_attention_layernorm(layer.self_attn.o_proj(out))

    def mlp_residual(self, layer, h):
        return layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)))

    def logits(self, h):
        logits = super().logits(h)
        cap = getattr(self.config, "final_logit_softcapping", None)
        return logits if cap is None else torch.tanh(logits / cap) * cap


class Gemma3Adapter(Gemma2Adapter):
    """Gemma 3's block is Gemma 2's with q/k norms per head, no attention soft-cap, and a rotary embedding per
    layer type (local layers have their own base)."""

    needs = (*Gemma2Adapter.needs, "self_attn.q_norm", "self_attn.k_norm")

    def qk_norm(self, attn, q, k):
        return attn.q_norm(q), attn.k_norm(k)

    def rope_key(self, i):
        return self.config.layer_types[i]

    def rope(self, x, positions, i=0):
        return self.rotary_emb(x, positions, self.config.layer_types[i])


ADAPTERS: dict[str, type[Adapter]] = {
    "llama": Adapter,
    "mistral": Adapter,
    "mixtral": Adapter,  # its MLP is the model's sparse MoE block
    "qwen2": Adapter,
    "qwen3": Qwen3Adapter,
    "qwen3_moe": Qwen3Adapter,
    "phi3": Phi3Adapter,
    "olmo2": Olmo2Adapter,
    "granite": GraniteAdapter,
    "gemma2": Gemma2Adapter,
    "gemma3_text": Gemma3Adapter,
}


def check_supported(config) -> None:
    """ValueError naming a model's type where fastkv has no adapter for it (or a setting it does not run):
    read from its config alone, so that `fastkv.models.load` refuses such a model before reading its weights."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"unsupported model type {model_type!r}: fastkv supports {sorted(ADAPTERS)} "
            "(add an Adapter in fastkv/adapters.py for another family)"
        )
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError(f"{model_type!r} with use_bidirectional_attention (an embedding model) is not a causal LM")


def windows_of(config, num_layers: int) -> list[int | None]:
    """Each layer's sliding window (its keys are those within W positions, itself included), or None."""
    window = getattr(config, "sliding_window", None)
    if window is None or getattr(config, "use_sliding_window", True) is False:
        return [None] * num_layers
    types = getattr(config, "layer_types", None)
    if types is None:
        return [int(window)] * num_layers
    return [int(window) if t == "sliding_attention" else None for t in types]


def _module(root: nn.Module, path: str) -> nn.Module | None:
    for name in path.split("."):
        root = getattr(root, name, None)
        if root is None:
            return None
    return root


_ADAPTERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its adapter, built once


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of a transformers causal LM, by `config.model_type`; a model whose layers lack a module the
    adapter uses is refused, not run wrong. Built once per model (and again if its output layer or embedding
    was replaced since, as int8 quantization does)."""
    found = _ADAPTERS.get(model)
    if found is not None and found.lm_head is model.lm_head and found.embed_tokens is model.model.embed_tokens:
        return found
    _ADAPTERS[model] = found = _build(model)
    return found


def _build(model: nn.Module) -> Adapter:
    config = model.config
    check_supported(config)
    cls = ADAPTERS[config.model_type]
    base = model.model
    for i, layer in enumerate(base.layers):
        missing = [p for p in cls.needs if _module(layer, p) is None]
        if missing:
            raise ValueError(
                f"{config.model_type!r} layer {i} ({type(layer).__name__}) lacks {missing}, which fastkv's "
                f"{cls.__name__} uses: this model's decoder block is not the one its adapter describes"
            )
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    attention = base.layers[0].self_attn
    rope_apply = getattr(importlib.import_module(type(attention).__module__), "apply_rotary_pos_emb", None)
    if rope_apply is None:
        raise ValueError(f"{type(attention).__module__} has no apply_rotary_pos_emb: fastkv cannot rotate q and k")
    return cls(
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
        windows=windows_of(config, len(base.layers)),
        scales=[float(layer.self_attn.scaling) for layer in base.layers],
        softcaps=[getattr(layer.self_attn, "attn_logit_softcapping", None) for layer in base.layers],
        rope_apply=rope_apply,
    )
