"""One prefill for many methods: every layer computation the methods have in common is done once.

Decode-only methods (SnapKV, PyramidKV, AdaKV, H2O, ...) compute exactly FullKV's prefill and differ only
in what each layer caches; methods with the same reducer run the same layers until their token
selections differ. `prefill_many` keeps one *branch* per distinct set of tokens present: each layer is
projected, scored and attended once per branch, every member method's policy caches its own entries from
it, and a branch splits where the members' reducers let different tokens through. Equal scorers are
computed once per branch and layer (`LayerState.scores`). Every result is bit for bit what `prefill`
gives for that method alone: the same operations on the same tensors.

Multi-pass reducers (a filter-and-rerun) run on their own through `prefill`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .adapters import Adapter
from .cache import KVCache
from .engine import check_options, check_prompt, decide_layer, decoding_of, prefill
from .layer import WHOLE, PrefillOptions, layer_step, logits_of
from .methods import LayerState, Method, Reducer
from .methods.base import PrefillTrace


@dataclass
class Branch:
    h: torch.Tensor  # hidden states [B, n, D] of the tokens present
    pos: torch.Tensor  # their original positions [B, n]
    members: list[int]  # indices of the methods that computed exactly this


def single_pass(reducer: Reducer) -> bool:
    return type(reducer).prefill is Reducer.prefill


@torch.inference_mode()
def prefill_many(
    adapter: Adapter,
    input_ids: torch.Tensor,
    methods: list[Method],
    options: PrefillOptions = WHOLE,
) -> list[tuple[KVCache, torch.Tensor, PrefillTrace]]:
    """Exactly `[prefill(adapter, input_ids, m, options) for m in methods]`, computed once where shared
    (options.on_layer is called once per layer of the shared work, not by multi-pass methods' own)."""
    b, n = input_ids.shape
    check_options(options)
    check_prompt(adapter, n, options.max_tokens)
    bound = [adapter.bind(m) for m in methods]
    results: list = [None] * len(bound)
    shared = [i for i, m in enumerate(bound) if single_pass(m.reducer)]
    for i in set(range(len(bound))) - set(shared):
        results[i] = prefill(adapter, input_ids, bound[i], replace(options, on_layer=None))
    caches = {
        i: KVCache(prompt_len=n, max_tokens=options.max_tokens, position_base=n, decoding=decoding_of(bound[i].policy))
        for i in shared
    }
    traces = {i: PrefillTrace(prompt_len=n) for i in shared}
    last = adapter.num_layers - 1

    branches = [Branch(adapter.embed(input_ids), torch.arange(n, device=input_ids.device).expand(b, n), shared)]
    for li in range(adapter.num_layers if shared else 0):
        split: list[Branch] = []
        for br in branches:
            groups: list[tuple[torch.Tensor | None, list[int]]] = []

            def decide(state: LayerState, br=br, groups=groups, li=li) -> list[torch.Tensor | None]:
                """Every member caches its own entries; members whose reducers agree continue as one branch."""
                for i in br.members:
                    selected = decide_layer(adapter, state, bound[i].reducer, bound[i].policy, caches[i], traces[i])
                    same = [g for g in groups if _equal(g[0], selected)]
                    if same:
                        same[0][1].append(i)
                    else:
                        groups.append((selected, [i]))
                return [selected for selected, _ in groups]

            steps = layer_step(adapter, li, br.h, br.pos, n, decide, options=options, last=li == last)
            split += [Branch(h, pos, members) for (h, pos), (_, members) in zip(steps, groups, strict=True)]
        branches = split
        if options.on_layer is not None:
            options.on_layer(li)
    for br in branches:
        logits = logits_of(adapter, br.h)
        for i in br.members:
            results[i] = (caches[i], logits, traces[i])
    return results


def _equal(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and bool(torch.equal(a, b))
