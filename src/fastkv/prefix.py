"""A prefix store: follow-up questions on a long document reuse its full-context work exactly.

Causal attention makes every layer's K/V of a prompt's first tokens, and their residual stream, the same
whatever follows them. So the part of a prefill that comes before the first question-dependent decision
depends only on the prefix, and can be stored once:

- FullKV and the decode-only methods (SnapKV, AdaKV, PyramidKV, StreamingLLM): the K/V of every layer;
- FastKV: the K/V of layers 0..tsp_layer and, at the TSP layer, every token's residual after attention
  (before the MLP, which then runs on the propagated tokens only);
- GemFilter: the K/V of layers 0..filter_layer, the filter's whole pass (its rerun on the selected tokens
  is fresh: they are renumbered).

A follow-up then runs only its new tokens through those layers, attending to the stored K/V, makes every
selection (each layer's cache, TSP's tokens) with its own observation window over all tokens, and runs the
later layers on what continues: what a fresh prefill of the whole prompt computes, up to float rounding.
So what a follow-up reuses depends on the entry as much as on its own method: after a FastKV entry (layers
0..tsp_layer), a method that needs every token in every layer (SnapKV, FullKV, ...) reuses those layers,
rejoins the stored tokens from their residuals at the TSP layer, and runs the later layers on all tokens.
Where a method needs more than an entry holds (H2O scores with every query; PyramidInfer drops tokens at
layer 2, where entries hold no residuals), it runs "fresh", a whole prefill, and says why
(`Reuse.fresh_because`; `StoreStats.fresh` counts them); its own entry then serves the next follow-up.

Entries are found by the longest common prefix of token ids, through a chain of hashes of fixed blocks
of tokens (as vLLM's prefix caching) seeded with the entry's scope (model, dtype, weights, adapter): an
entry of another model or precision never matches. The store is bounded in bytes and evicts the least
recently used entry; an entry whose prompt another entry extends is dropped for it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from .adapters import Adapter
from .cache import KVCache
from .engine import Prefix, Recording, prefill
from .layer import WHOLE, PrefillOptions
from .methods import Method
from .methods.base import NotReusable, PrefillTrace

BLOCK = 64  # tokens per hashed block: the shortest prefix an entry can be found by
TRIES = 3  # entries a prefill tries, longest match first, before it runs fresh


def block_hashes(scope: str, ids: tuple[int, ...]) -> list[int]:
    """The chain of hashes of each full block of `ids` (block j's hash covers blocks 0..j), seeded by scope."""
    out, h = [], hash(scope)
    for start in range(0, len(ids) - BLOCK + 1, BLOCK):
        h = hash((h, ids[start : start + BLOCK]))
        out.append(h)
    return out


@dataclass(eq=False)
class Entry:
    """What the store keeps of one prompt: its token ids, the K/V of its first `depth` layers for every token,
    and residuals after attention at some layers."""

    scope: str
    ids: tuple[int, ...]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mids: dict[int, torch.Tensor]
    hashes: list[int] = field(default_factory=list)

    @property
    def depth(self) -> int:
        return len(self.keys)

    @property
    def nbytes(self) -> int:
        tensors = [*self.keys, *self.values, *self.mids.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def covers(self, other: Entry) -> bool:
        """Whether this entry holds all that `other` holds (its tokens as a prefix, as deep, the same mids)."""
        return (
            self.scope == other.scope
            and len(self.ids) >= len(other.ids)
            and self.ids[: len(other.ids)] == other.ids
            and self.depth >= other.depth
            and set(self.mids) >= set(other.mids)
        )

    def prefix(self, length: int) -> Prefix:
        return Prefix(length, self.keys, self.values, self.mids)


@dataclass
class StoreStats:
    hits: int = 0  # prompts that started from a stored prefix
    misses: int = 0  # prompts that found none (or too short a one)
    fresh: int = 0  # prompts whose method could not use what was found, and ran fresh
    tokens_reused: int = 0
    evictions: int = 0
    entries: int = 0
    bytes: int = 0


@dataclass
class Reuse:
    """What one prefill took from the store: how many prompt tokens, or why it ran fresh."""

    tokens: int = 0
    fresh_because: str = ""


class PrefixStore:
    """Entries of stored prefix state, bounded by `max_bytes`, least recently used evicted first."""

    def __init__(self, max_bytes: int, mid_layers: frozenset[int] = frozenset()) -> None:
        """mid_layers: layers where every prompt's residuals are kept (where the model's default FastKV
        propagates), so that a FastKV follow-up can continue from any method's entry."""
        if max_bytes < 0:
            raise ValueError(f"the prefix store's size must be >= 0 bytes, got {max_bytes}")
        self.max_bytes, self.mid_layers = max_bytes, frozenset(mid_layers)
        self.entries: OrderedDict[int, Entry] = OrderedDict()
        self.index: dict[int, set[int]] = {}  # block hash -> ids of the entries holding that block
        self.stats = StoreStats()
        self.lock = threading.Lock()
        self._next = 0

    @property
    def bytes(self) -> int:
        return self.stats.bytes

    def recording(self) -> Recording:
        return Recording(self.mid_layers)

    def matches(self, scope: str, ids: list[int] | tuple[int, ...]) -> list[tuple[Entry, int]]:
        """The entries sharing at least one block with `ids`, each with the length of that shared prefix: the
        most stored work (shared tokens x layers) first. Each is marked as recently used."""
        ids = tuple(ids)
        with self.lock:
            candidates: set[int] = set()
            for h in block_hashes(scope, ids):
                found = self.index.get(h)
                if not found:
                    break
                candidates = found
            shared = {k: common_prefix(self.entries[k].ids, ids) for k in candidates}
            # Most stored work first (tokens x layers): a follow-up rejoins every token after an entry's last
            # layer, so a deeper entry of a shorter prefix can save more than a shallow one of a longer prefix.
            ranked = sorted(candidates, key=lambda k: (-shared[k] * self.entries[k].depth, -shared[k]))
            for key in reversed(ranked):
                self.entries.move_to_end(key)
            return [(self.entries[k], shared[k]) for k in ranked]

    def put(self, scope: str, ids: list[int] | tuple[int, ...], record: Recording) -> Entry | None:
        """Keep what a prefill recorded of its prompt (nothing if it recorded no layer or does not fit)."""
        entry = Entry(scope, tuple(ids), record.keys, record.values, record.mids)
        entry.hashes = block_hashes(scope, entry.ids)
        if entry.depth == 0 or not entry.hashes or entry.nbytes > self.max_bytes:
            return None
        with self.lock:
            if any(old.covers(entry) for old in self.entries.values()):
                return None
            for key in [k for k, old in self.entries.items() if entry.covers(old)]:
                self._drop(key)
            key, self._next = self._next, self._next + 1
            self.entries[key] = entry
            for h in entry.hashes:
                self.index.setdefault(h, set()).add(key)
            self.stats.entries += 1
            self.stats.bytes += entry.nbytes
            while self.stats.bytes > self.max_bytes:
                self._drop(next(iter(self.entries)))
                self.stats.evictions += 1
            return entry

    def prefill(
        self,
        adapter: Adapter,
        input_ids: torch.Tensor,
        method: Method,
        options: PrefillOptions = WHOLE,
    ) -> tuple[KVCache, torch.Tensor, PrefillTrace, Reuse]:
        """`engine.prefill` of one prompt [1, n], starting from the longest stored prefix when there is one
        (short of the method's observation window, whose queries the follow-up computes), and keeping what it
        computed for later prompts. A method that cannot use what is stored runs fresh (`Reuse` says why)."""
        ids, scope = tuple(input_ids[0].tolist()), scope_of(adapter)
        window = max(method.reducer.tail() or 0, method.policy.observed_window(), 1)
        reuse, started = Reuse(), False
        for entry, shared in self.matches(scope, ids)[:TRIES]:  # a shorter match may hold more layers
            length = min(shared, len(ids) - window)  # the window's queries are computed, not stored
            if length < BLOCK:
                continue
            started, record = True, self.recording()
            try:
                cache, logits, trace = prefill(adapter, input_ids, method, options, prefix=entry.prefix(length),
                                               record=record)  # fmt: skip
                reuse = Reuse(length)
                break
            except NotReusable as why:
                reuse.fresh_because = str(why)
        if not reuse.tokens:
            record = self.recording()
            cache, logits, trace = prefill(adapter, input_ids, method, options, record=record)
        with self.lock:
            self.stats.hits += reuse.tokens > 0
            self.stats.misses += not started
            self.stats.fresh += started and not reuse.tokens
            self.stats.tokens_reused += reuse.tokens
        self.put(scope, ids, record)
        return cache, logits, trace, reuse

    def evict(self, need_bytes: int) -> int:
        """Drop least recently used entries until `need_bytes` are freed (or none is left); bytes freed."""
        freed = 0
        with self.lock:
            while self.entries and freed < need_bytes:
                freed += self._drop(next(iter(self.entries)))
                self.stats.evictions += 1
        return freed

    def clear(self) -> None:
        self.evict(self.stats.bytes + 1)

    def _drop(self, key: int) -> int:
        entry = self.entries.pop(key)
        for h in entry.hashes:
            holders = self.index.get(h)
            if holders is not None:
                holders.discard(key)
                if not holders:
                    del self.index[h]
        self.stats.entries -= 1
        self.stats.bytes -= entry.nbytes
        return entry.nbytes


def scope_of(adapter: Adapter) -> str:
    """What an entry is valid for: the model (its name and shape), the dtype, the weights' format, the adapter."""
    config = adapter.model.config
    name = getattr(config, "_name_or_path", "") or config.model_type
    weights = type(adapter.lm_head).__name__
    return f"{name}|{adapter.num_layers}x{config.hidden_size}|{adapter.dtype}|{weights}|{type(adapter).__name__}"


def common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    low, high = 0, n  # the first position where they differ, by bisection on equal prefixes
    while high - low > 1:
        mid = (low + high) // 2
        if a[:mid] == b[:mid]:
            low = mid
        else:
            high = mid
    return low
