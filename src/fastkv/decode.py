"""Decoding: `decode_step` feeds one token per sequence through every layer over the fixed-shape cache.

The shapes are the same at every step, so the step compiles (`--compile`): `decode_layers` is tensors in,
tensors out. On a CPU, int8 weights are frozen into the compiled graph (`FROZEN`).
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch
import torch.nn.functional as F

from .adapters import Adapter
from .cache import KVCache
from .compaction import DecodeState
from .layer import capped_attention
from .quantize import Int8Linear


@torch.inference_mode()
def decode_step(
    adapter: Adapter, cache: KVCache, tokens: torch.Tensor, position: int | torch.Tensor, compiled: bool = False
) -> torch.Tensor:
    """Feed tokens [B] at `position` (an int, or [B]: cache.position_base + steps so far); return float32
    logits [B, V]. The shapes are the same at every step, so `compiled` runs `decode_layers` under
    torch.compile: compiled once per process for any cache capacity, and once per model where int8
    weights on a CPU are frozen into the graph (`FROZEN`)."""
    cache.check_room()
    state = start_decoding(adapter, cache)
    queries, ring_slots = (state.queries, state.ring_slots(tokens.device)) if state is not None else (None, None)
    position = torch.as_tensor(position, device=tokens.device).expand(tokens.shape[0])
    step = compiled_decode_layers() if compiled else decode_layers
    # One sequence only: for a batch (a dynamic batch size) torch 2.13's template fails to compile (an
    # assertion on its epilogue in cpp_gemm_template), so batches take the plain compiled step.
    frozen = compiled and tokens.shape[0] == 1 and frozen_decode(adapter)
    with frozen_compilation() if frozen else contextlib.nullcontext():
        logits = step(adapter, cache.keys, cache.values, cache.attend, cache.slots, tokens, position, cache.entry_pos,
                      queries, ring_slots)  # fmt: skip
    cache.steps += 1
    if state is not None:
        state.after_step(adapter, cache)  # the rows whose interval is up are cut back to their budget
    return logits


def start_decoding(adapter: Adapter, cache: KVCache) -> DecodeState | None:
    """The cache's decode-time state, made on its first step where its policy has a decode budget."""
    if cache.decode_state is None and cache.decoding is not None and cache.decoding.active:
        cache.decode_state = DecodeState.start(cache, adapter, cache.decoding)
    return cache.decode_state


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
                  entry_pos=None, queries=None, ring_slots=None):  # fmt: skip
    """One token per sequence through every layer: write its K/V at each sequence's slot, attend over the
    layer's whole buffer under its mask, advance the slots. Tensors in, tensors out: no Python state.

    A layer with a sliding window W is a ring (`KVCache`): its slot wraps around the buffer, each entry's
    position is kept in entry_pos[i], and the token attends only to entries within W positions of its own.

    Under a decode budget, queries[i] [B, Hq, Q, d] keeps the latest queries of layer i, each row's written at
    ring_slots [B] (`fastkv.compaction` scores generated entries with them)."""
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
        if queries is not None and queries[i] is not None:
            queries[i].scatter_(2, ring_slots.view(b, 1, 1, 1).expand(b, hq, 1, d), q)
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
