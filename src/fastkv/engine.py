"""Prefill: run a prompt through the model under a method, layer by layer (`fastkv.layer`).

After each layer's attention projections, the engine asks the method's two parts two questions
(`decide_layer`): which tokens continue to the next layer (`reducer.tokens`) and which KV entries this
layer caches (`policy.entries`). Tokens that continue keep their original positions, so RoPE stays exact
for them. Decoding (`fastkv.decode`) then continues at the position after the last prompt token
(L, L + 1, ...), not at the compressed cache's length.

A reducer that needs more than one pass (a filter-and-rerun) drives them itself through `Passes` (whole
passes, and a look at one layer); the engine holds nothing that only one method uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .adapters import Adapter
from .cache import KVCache
from .layer import WHOLE, Past, PrefillOptions, chosen_tokens, layer_step, logits_of, open_layer, store
from .methods import CachePolicy, LayerState, Method, Reducer
from .methods.base import NotReusable, Pass, PrefillTrace


class ContextLengthError(ValueError):
    """A prompt (with its new tokens) that the model cannot attend to."""


def check_prompt(adapter: Adapter, prompt_len: int, max_tokens: int) -> None:
    """Reject what the model cannot attend to, instead of clipping it."""
    if prompt_len < 1:
        raise ValueError("the prompt is empty")
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    total = prompt_len + max_tokens
    if total > adapter.max_positions:
        raise ContextLengthError(
            f"prompt of {prompt_len} tokens + max_tokens={max_tokens} = {total} exceeds the model's "
            f"context of {adapter.max_positions} tokens"
        )


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
    options: PrefillOptions = WHOLE
    prompt: torch.Tensor | None = None
    prefix: Prefix | None = None
    record: Recording | None = None

    def _own(self, input_ids: torch.Tensor) -> tuple[Prefix | None, Recording | None]:
        return (self.prefix, self.record) if input_ids is self.prompt else (None, None)

    def run(self, input_ids: torch.Tensor, reducer: Reducer, policy: CachePolicy) -> Pass:
        prefix, record = self._own(input_ids)
        return run_pass(self.adapter, input_ids, reducer, policy, self.options, prefix=prefix, record=record)

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

        options = self.options
        for i in range(layer):
            past = prefix.past(i) if p else None
            ((h, pos),) = layer_step(adapter, i, h, pos, n, keep, options=options, past=past)
            if options.on_layer is not None:
                options.on_layer(i)
        state = open_layer(adapter, layer, h, pos, n, prefix.past(layer) if p else None, options=options)
        keep(state)
        return state


@torch.inference_mode()
def prefill(
    adapter: Adapter,
    input_ids: torch.Tensor,
    method: Method,
    options: PrefillOptions = WHOLE,
    *,
    prefix: Prefix | None = None,
    record: Recording | None = None,
) -> tuple[KVCache, torch.Tensor, PrefillTrace]:
    """Run the prompt input_ids [B, L] through the model under `method`.

    Returns the cache (room for options.max_tokens more entries per layer), the float32 logits of the last
    prompt token [B, V], and a trace. options: room for new tokens, chunks and callbacks (`PrefillOptions`).
    prefix: start from the stored state of the prompt's first tokens (`Prefix`): only the later tokens run
    through the layers that see every token, attending to the stored K/V; every selection is made over all
    tokens, as a fresh prefill makes it. `NotReusable` when the method needs what the prefix lacks.
    record: fill it with what the prefix store keeps of this prompt (`Recording`).
    """
    check_options(options)
    check_prompt(adapter, input_ids.shape[1], options.max_tokens)
    if prefix is not None and not 0 < prefix.length < input_ids.shape[1]:
        raise ValueError(f"a stored prefix of {prefix.length} tokens cannot start a prompt of {input_ids.shape[1]}")
    method = adapter.bind(method)
    runner = Runner(adapter, options, input_ids, prefix, record)
    done = method.reducer.prefill(runner, input_ids, method.policy)
    return done.cache, done.logits, done.trace


def decoding_of(policy: CachePolicy):
    """The policy's decode-time budget, where it sets one (else None: every generated entry is kept)."""
    return policy.decoding if policy.decoding.active else None


def check_options(options: PrefillOptions) -> None:
    if not isinstance(options, PrefillOptions):
        raise TypeError(f"options must be a PrefillOptions (max_tokens, prefill_chunk, ...), got {options!r}")


def decide_layer(adapter: Adapter, state: LayerState, reducer: Reducer, policy: CachePolicy, cache: KVCache,
                 trace: PrefillTrace) -> torch.Tensor | None:  # fmt: skip
    """The engine's one decision at a layer, for one method: which tokens continue past it (their indices
    [B, T] among the tokens present, or None: all of them; after the last layer nothing is left to
    propagate to), recorded in the trace; and which of its entries the layer caches, stored in `cache`."""
    i = state.index
    trace.tokens_per_layer.append(state.present)
    selected = chosen_tokens(reducer, state) if i < adapter.num_layers - 1 else None
    if selected is not None:
        trace.propagated[i] = state.positions.gather(1, selected)
    store(cache, state, policy, adapter.windows[i])
    return selected


def run_pass(
    adapter: Adapter,
    input_ids: torch.Tensor,
    reducer: Reducer,
    policy: CachePolicy,
    options: PrefillOptions = WHOLE,
    *,
    prefix: Prefix | None = None,
    record: Recording | None = None,
) -> Pass:
    """One pass over the layers on input_ids [B, n] at positions 0..n-1 (after `prefix`, see `prefill`)."""
    b, n = input_ids.shape
    p = prefix.length if prefix is not None else 0
    pos = torch.arange(p, n, device=input_ids.device).expand(b, n - p)
    cache = KVCache(prompt_len=n, max_tokens=options.max_tokens, position_base=n, decoding=decoding_of(policy))
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
            selected = decide_layer(adapter, state, reducer, policy, cache, trace)
            if selected is not None:
                if reusing and past_mid is None:
                    raise NotReusable(f"{reducer.name} selects at layer {i}, where the prefix holds no residuals")
            elif reusing and i == stored - 1 and i < last:
                # The stored layers end here (an entry of a method that reduced after this layer) and the later
                # ones need every token: the stored tokens rejoin from their residuals after this attention.
                if past_mid is None:
                    raise NotReusable(f"the stored prefix holds layers 0..{i}, and no residuals at layer {i} to "
                                      f"continue every token from")  # fmt: skip
                selected = torch.arange(state.present, device=state.positions.device).expand(b, -1)
            if record is not None and whole:
                record.keys.append(state.k)
                record.values.append(state.v)
            chosen.append(selected)
            return [selected]

        def keep_mid(mid: torch.Tensor, i=i, chosen=chosen) -> None:
            if i < last and (chosen[0] is not None or i in record.mid_layers):
                record.mids[i] = mid

        keep = keep_mid if record is not None and whole and (not reusing or past_mid is not None) else None
        ((h, pos),) = layer_step(adapter, i, h, pos, n, decide, options=options, past=past, last=i == last,
                                 past_mid=past_mid, keep_mid=keep)  # fmt: skip
        whole = whole and (chosen[0] is None or i not in trace.propagated)  # a rejoin keeps every token
        if options.on_layer is not None:
            options.on_layer(i)
    return Pass(cache, logits_of(adapter, h), trace)
