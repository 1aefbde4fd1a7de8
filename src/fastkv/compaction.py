"""Decode-time compaction: the generated tokens' entries of each layer cut back to their budget, in place.

A cache whose policy has a decode budget (`fastkv.methods.decoding.budget.DecodeBudget`) holds, per row, a
`DecodeState`: where each layer's generated entries begin, how many it holds, and a small ring of the latest
queries of every layer (written by the decode step). Every `decode_interval` steps of a row, each of its
non-sliding layers scores its generated entries with the attention those queries paid them and keeps the
latest `decode_window` plus the best of the rest, `decode_budget` in all, per KV head, moved to the front of
the region. Nothing is reallocated: the region is `decode_budget + decode_interval` entries from the start.

The queries in the ring were all made after the last cut (decode_window <= decode_interval), so each saw exactly
the entries present now that are not newer than itself: the attention recomputed here is the attention
those steps computed (`generated_attention`, which a test checks against a brute-force loop).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

# A row's rule is a `fastkv.methods.decoding.budget.DecodeBudget` (not imported: the methods import the cache).
DecodeBudget = Any


def generated_attention(q: torch.Tensor, prompt_keys: torch.Tensor, prompt_valid: torch.Tensor, keys: torch.Tensor,
                        scale: float, softcap: float | None = None) -> torch.Tensor:  # fmt: skip
    """The attention that the last c generated queries q [Hq, c, d] paid to the n generated entries keys
    [Hkv, n, d], query j having seen the prompt's entries prompt_keys [Hkv, P, d] where prompt_valid [Hkv, P],
    and the generated ones up to its own (entry n - c + j). Softmax over all of that; summed over the c
    queries and the query heads of each GQA group (query head h reads KV head h // (Hq / Hkv)): float32 [Hkv, n]."""
    hkv, n, d = keys.shape
    hq, c, _ = q.shape
    group = q.float().reshape(hkv, hq // hkv * c, d)
    every = torch.cat([prompt_keys, keys], dim=1).float()
    logits = group @ every.transpose(1, 2) * scale  # [Hkv, G*c, P+n]
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    j = torch.arange(hq // hkv * c, device=q.device) % c
    seen = torch.arange(n, device=q.device) <= (n - c + j)[:, None]  # [G*c, n]
    mask = torch.cat([prompt_valid[:, None, :].expand(-1, len(j), -1), seen.expand(hkv, -1, -1)], dim=2)
    probs = logits.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return probs[..., prompt_keys.shape[1] :].sum(dim=1)


@dataclass
class DecodeState:
    """What decode-time compaction needs of a cache's rows (B) and layers."""

    rules: list[DecodeBudget | None]  # per row: its decode budget (None: keeps every generated entry)
    decoded: list[int]  # per row: decode steps it took
    generated: list[int]  # per row: generated entries each non-sliding layer holds per KV head
    evicted: list[int]  # per row: generated entries evicted, summed over layers and KV heads
    gen_start: list[list[int]]  # per layer, per row: the slot its generated entries begin at
    queries: list[torch.Tensor | None]  # per layer: [B, Hq, Q, d], the latest queries (None: a sliding layer)
    carried: list[torch.Tensor | None]  # per layer: [B, Hkv, held], running scores (None: no row carries one)

    @classmethod
    def start(cls, cache, adapter, rule: DecodeBudget | None) -> DecodeState:
        """The state of a one-row cache just prefilled (slots at the end of its prompt entries)."""
        rule = rule if rule is not None and rule.active else None
        window, interval = (rule.decode_window, rule.decode_interval) if rule else (1, 1)
        count = rule.scorer().queries(window, interval) if rule else 1
        carries = rule is not None and rule.scorer().carries
        queries, carried = [], []
        for i, k in enumerate(cache.keys):
            sliding = cache.windows[i] is not None
            queries.append(None if sliding else k.new_zeros(1, adapter.num_heads, count, adapter.head_dim))
            carries_here = carries and not sliding
            carried.append(k.new_zeros(1, k.shape[1], rule.held, dtype=torch.float32) if carries_here else None)
        starts = [[int(s[0])] for s in cache.slots]
        return cls([rule], [0], [0], [0], starts, queries, carried)

    def ring_slots(self, device: torch.device) -> torch.Tensor:
        """[B]: where each row's next query goes in its ring."""
        sizes = [self._ring(b) for b in range(len(self.rules))]
        return torch.tensor([d % s for d, s in zip(self.decoded, sizes, strict=True)], device=device)

    def _ring(self, b: int) -> int:
        rule = self.rules[b]
        return rule.scorer().queries(rule.decode_window, rule.decode_interval) if rule else 1

    def capacity(self, layer: int, slots: torch.Tensor, room: int) -> int:
        """Entries `layer` needs for its furthest row (`KVCache.capacity`, non-sliding layers)."""
        need = 0
        for b, rule in enumerate(self.rules):
            if rule is None:
                need = max(need, int(slots[b]) + room)
            else:
                need = max(need, self.gen_start[layer][b] + min(rule.held, self.generated[b] + room))
        return need

    def held(self) -> int:
        """Generated entries a non-sliding layer holds for its fullest row."""
        return max(self.generated)

    def after_step(self, adapter, cache) -> None:
        """Count the step for every row, and compact the rows whose interval is up."""
        for b, rule in enumerate(self.rules):
            self.decoded[b] += 1
            self.generated[b] += 1
            if rule is None or self.decoded[b] % rule.decode_interval:
                continue
            scorer = rule.scorer()
            cut = self.generated[b] > rule.decode_budget
            if not (cut or scorer.carries):
                continue
            layers = [i for i, w in enumerate(cache.windows) if w is None]
            for i in layers:
                self._compact(adapter, cache, i, b, rule, scorer, cut)
            if cut:
                self.evicted[b] += (self.generated[b] - rule.decode_budget) * cache.keys[0].shape[1] * len(layers)
                self.generated[b] = rule.decode_budget

    def _compact(self, adapter, cache, i: int, b: int, rule: DecodeBudget, scorer, cut: bool) -> None:
        g0, n, budget, window = self.gen_start[i][b], self.generated[b], rule.decode_budget, rule.decode_window
        size = self._ring(b)
        order = [(self.decoded[b] - size + j) % size for j in range(size)]
        keys, values = cache.keys[i][b], cache.values[i][b]  # [Hkv, capacity, d]
        attention = generated_attention(self.queries[i][b][:, order], keys[:, :g0], cache.attend[i][b, :, :g0],
                                        keys[:, g0 : g0 + n], adapter.scales[i], adapter.softcaps[i])  # fmt: skip
        carried = self.carried[i][b, :, :n] if scorer.carries else None
        scores = scorer(attention, keys[:, g0 : g0 + n], carried)
        if not cut:
            carried.copy_(scores)
            return
        older = scores[:, : n - window].topk(budget - window, dim=-1).indices.sort(dim=-1).values
        latest = torch.arange(n - window, n, device=keys.device).expand(keys.shape[0], -1)
        keep = torch.cat([older, latest], dim=1)  # [Hkv, budget]
        at = keep[..., None].expand(-1, -1, keys.shape[-1])
        keys[:, g0 : g0 + budget] = keys[:, g0 : g0 + n].gather(1, at)
        values[:, g0 : g0 + budget] = values[:, g0 : g0 + n].gather(1, at)
        cache.attend[i][b, :, g0 + budget : g0 + n] = False
        if scorer.carries:
            self.carried[i][b, :, :budget] = scores.gather(1, keep)
            self.carried[i][b, :, budget:] = 0
        cache.slots[i][b] = g0 + budget

    def rows(self, idx: Sequence[int]) -> DecodeState:
        """The state of some rows, in that order (`fastkv.cache.keep_rows`)."""
        index = None

        def take(ts):
            nonlocal index
            out = []
            for t in ts:
                if t is not None and index is None:
                    index = torch.tensor(list(idx), dtype=torch.long, device=t.device)
                out.append(None if t is None else t.index_select(0, index))
            return out

        pick = lambda xs: [xs[b] for b in idx]  # noqa: E731
        return DecodeState(pick(self.rules), pick(self.decoded), pick(self.generated), pick(self.evicted),
                           [pick(s) for s in self.gen_start], take(self.queries), take(self.carried))  # fmt: skip


def merge_states(caches: Sequence) -> DecodeState | None:
    """The state of `fastkv.cache.merge`d caches (None when no row has a decode budget); a cache without a state
    contributes rows that keep every generated entry."""
    states = [c.decode_state for c in caches]
    if all(s is None for s in states):
        return None
    like = next(s for s in states if s is not None)
    layers = len(like.gen_start)
    filled = [s if s is not None else _keeping_all(c, like) for s, c in zip(states, caches, strict=True)]

    def cat(per: list[list[torch.Tensor | None]], i: int) -> torch.Tensor | None:
        """Layer i's tensors of every cache, rows stacked, padded with zeros to the longest along dim 2."""
        ts = [p[i] for p in per]
        if all(t is None for t in ts):
            return None
        shaped = next(t for t in ts if t is not None)
        length = max(t.shape[2] for t in ts if t is not None)
        out = []
        for t, c in zip(ts, caches, strict=True):
            rows = c.keys[0].shape[0]
            t = t if t is not None else shaped.new_zeros(rows, *shaped.shape[1:])
            pad = length - t.shape[2]
            if pad > 0:
                t = torch.cat([t, t.new_zeros(*t.shape[:2], pad, *t.shape[3:])], dim=2)
            out.append(t)
        return torch.cat(out)

    return DecodeState(
        rules=[r for s in filled for r in s.rules],
        decoded=[d for s in filled for d in s.decoded],
        generated=[g for s in filled for g in s.generated],
        evicted=[e for s in filled for e in s.evicted],
        gen_start=[[g for s in filled for g in s.gen_start[i]] for i in range(layers)],
        queries=[cat([s.queries for s in filled], i) for i in range(layers)],
        carried=[cat([s.carried for s in filled], i) for i in range(layers)],
    )


def _keeping_all(cache, like: DecodeState) -> DecodeState:
    """The state of a cache whose rows keep every generated entry, shaped like `like`."""
    rows = cache.keys[0].shape[0]
    queries = [None if q is None else q.new_zeros(rows, q.shape[1], 1, q.shape[3]) for q in like.queries]
    starts = [[int(s) for s in slots] for slots in cache.slots]
    zeros = [0] * rows
    return DecodeState([None] * rows, [cache.steps] * rows, [cache.steps] * rows, list(zeros), starts, queries,
                       [None] * len(queries))  # fmt: skip
