"""Ragged batches: prompts of different lengths, decoded together.

Each prompt is prefilled alone, so it keeps its own positions, TSP and cache selections (prefill is
compute-bound: on a CPU, batching it would save little). Its cache then joins the running batch:
`merge` pads every layer to what its rows need, and each row keeps its own mask of real entries, its own
write slot and its own position. One decode step feeds every row's token at once, so the weights are
read once per step for the whole batch. A row that ends (EOS, a stop string, its token limit) leaves at
once (`keep_rows`), and a new one may join between steps: the server feeds requests this way.

Shapes: a batch cache's layer i holds keys, values [B, Hkv, capacity_i, d], attend [B, Hkv, capacity_i],
slots [B]; `position_base` is then a tensor [B] of each row's next position.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from .adapters import adapter_for
from .cache import KVCache
from .engine import decode_step
from .generate import (
    GenerationResult,
    Prefilled,
    Transcript,
    _now,
    _result,
    check_sampling,
    encode_prompt,
    eos_ids,
    prefill_prompt,
    sample,
)
from .methods import FastKV, Method, make_method


def _pad(t: torch.Tensor, length: int, value) -> torch.Tensor:
    """t [B, H, n, ...] cut or padded with `value` to `length` along dim 2."""
    if t.shape[2] >= length:
        return t[:, :, :length]
    pad = t.new_full((*t.shape[:2], length - t.shape[2], *t.shape[3:]), value)
    return torch.cat([t, pad], dim=2)


def merge(caches: Sequence[KVCache]) -> KVCache:
    """One cache with the rows of all `caches`, each layer as long as its rows need (entries written so far
    plus the room each has left); rows keep their masks, slots and next positions."""
    if not caches:
        raise ValueError("nothing to merge")
    room = max(c.max_new_tokens - c.steps for c in caches)
    out = KVCache(
        prompt_len=max(c.prompt_len for c in caches),
        max_new_tokens=room,
        position_base=torch.cat([_next_positions(c) for c in caches]),
    )
    for i in range(len(caches[0].keys)):
        # the furthest slot any row writes to: its next one plus the steps it may still take
        capacity = max(int(c.slots[i].max()) + c.max_new_tokens - c.steps for c in caches)
        kept = max(c.positions[i].shape[-1] for c in caches)
        out.keys.append(torch.cat([_pad(c.keys[i], capacity, 0) for c in caches]))
        out.values.append(torch.cat([_pad(c.values[i], capacity, 0) for c in caches]))
        out.attend.append(torch.cat([_pad(c.attend[i], capacity, False) for c in caches]))
        out.slots.append(torch.cat([c.slots[i] for c in caches]))
        out.positions.append(torch.cat([_pad(c.positions[i], kept, -1) for c in caches]))
        valid = [
            c.valid[i] if c.valid[i] is not None else torch.ones_like(c.positions[i], dtype=torch.bool) for c in caches
        ]
        valid = torch.cat([_pad(v, kept, False) for v in valid])
        out.valid.append(None if bool(valid.all()) else valid)
    return out


def _next_positions(c: KVCache) -> torch.Tensor:
    base = torch.as_tensor(c.position_base, device=c.slots[0].device)
    return (base + c.steps).expand(c.keys[0].shape[0]).clone()


def keep_rows(cache: KVCache, rows: Sequence[int]) -> KVCache:
    """The cache of the given rows only, in that order (the others' memory is released)."""
    idx = torch.tensor(list(rows), dtype=torch.long, device=cache.slots[0].device)

    def take(ts: list) -> list:
        return [t.index_select(0, idx) if t is not None else None for t in ts]

    return replace(
        cache,
        position_base=_next_positions(cache).index_select(0, idx),
        steps=0,
        max_new_tokens=cache.max_new_tokens - cache.steps,
        keys=take(cache.keys),
        values=take(cache.values),
        attend=take(cache.attend),
        slots=take(cache.slots),
        positions=take(cache.positions),
        valid=take(cache.valid),
    )


@dataclass
class Row:
    """One sequence in a decode batch."""

    key: object  # the caller's name for it
    prefilled: Prefilled  # without its cache, which lives in the batch's
    transcript: Transcript
    limit: int  # max_new_tokens
    temperature: float
    top_p: float
    generator: torch.Generator | None
    kv: tuple[int, int, list[int]]  # bytes after prefill, a full cache's bytes, entries per layer
    started: float | None = None  # when its first decode step began
    steps: int = 0  # decode steps it took part in


class DecodeBatch:
    """Sequences decoding together, one token each per `step`; sequences join and leave between steps."""

    def __init__(self, model, tokenizer, compile: bool = False, on_text: Callable[[object, str], None] | None = None):
        """on_text(key, piece) receives each row's text as it becomes final (for streaming)."""
        self.model, self.tokenizer, self.compile, self.on_text = model, tokenizer, compile, on_text
        self.parts = adapter_for(model)
        self.eos = eos_ids(model, tokenizer)
        self.rows: list[Row] = []
        self.cache: KVCache | None = None

    def join(
        self,
        key,
        prefilled: Prefilled,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        ignore_eos: bool = False,
    ) -> GenerationResult | None:
        """Add a prefilled sequence; its result at once if its first token already ends it.
        ignore_eos: go on past EOS to max_new_tokens (load tests want fixed lengths)."""
        check_sampling(max_new_tokens, temperature, top_p)
        cache = prefilled.cache
        if cache.keys[0].shape[0] != 1:
            raise ValueError(f"a sequence joins alone: its cache holds {cache.keys[0].shape[0]} rows")
        if cache.max_new_tokens - cache.steps < max_new_tokens - 1:
            raise ValueError(f"the cache has room for {cache.max_new_tokens} new tokens, not {max_new_tokens}")
        generator = torch.Generator(device=self.parts.device).manual_seed(seed) if seed is not None else None
        row = Row(
            key,
            replace(prefilled, cache=None),
            Transcript(self.tokenizer, set() if ignore_eos else self.eos, stop),
            max_new_tokens,
            temperature,
            top_p,
            generator,
            (cache.nbytes(), cache.full_nbytes(), cache.kept_per_layer),
        )
        if not row.transcript.add(sample(prefilled.logits[0], temperature, top_p, generator)) or max_new_tokens == 1:
            return self._finish(row)
        self._emit(row)
        self.cache = cache if self.cache is None else merge([self.cache, cache])
        self.rows.append(row)
        return None

    def step(self) -> list[tuple[object, GenerationResult]]:
        """One decode step for every row; returns (key, result) of the rows that ended, which leave."""
        if not self.rows:
            return []
        now = _now(self.parts.device)
        for row in self.rows:
            row.started = now if row.started is None else row.started
        tokens = torch.tensor([r.transcript.out[-1] for r in self.rows], device=self.parts.device)
        logits = decode_step(self.parts, self.cache, tokens, self.cache.position_base + self.cache.steps, self.compile)
        done, keep = [], []
        for b, row in enumerate(self.rows):
            row.steps += 1
            going = row.transcript.add(sample(logits[b], row.temperature, row.top_p, row.generator))
            if going and len(row.transcript.out) < row.limit:
                keep.append(b)
                self._emit(row)
            else:
                done.append((row.key, self._finish(row)))
        self._keep(keep)
        return done

    def cancel(self, key) -> bool:
        """Drop a row now (a client that went away); False if no row has that key."""
        keep = [b for b, row in enumerate(self.rows) if row.key != key]
        found = len(keep) < len(self.rows)
        self._keep(keep)
        return found

    def _keep(self, keep: list[int]) -> None:
        if len(keep) < len(self.rows):
            self.rows = [self.rows[b] for b in keep]
            self.cache = keep_rows(self.cache, keep) if keep else None

    def _emit(self, row: Row, final: bool = False) -> None:
        if self.on_text is not None and (piece := row.transcript.ready(final)):
            self.on_text(row.key, piece)

    def _finish(self, row: Row) -> GenerationResult:
        self._emit(row, final=True)
        seconds = _now(self.parts.device) - row.started if row.started is not None else 0.0
        return _result(row.prefilled, row.transcript, row.kv, seconds, row.steps)


def generate_batch(
    model,
    tokenizer,
    prompts: Sequence[str | Sequence[int]],
    method: Method | str | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    chat: bool = False,
    prefill_chunk: int | None = None,
    compile: bool = False,
    on_result: Callable[[int, GenerationResult], None] | None = None,
    ignore_eos: bool = False,
) -> list[GenerationResult]:
    """One result per prompt, in order: each prompt prefilled alone, then all decoded as one ragged batch.

    Each sequence's tokens are those `generate` gives it alone (greedy: the same; sampled with a seed: the
    same draws, each row with its own generator). Its decode_seconds is the time it spent decoding in the
    batch, which it shared with the other rows.
    on_result(index, result) is called as each sequence ends.
    """
    check_sampling(max_new_tokens, temperature, top_p)
    parts = adapter_for(model)
    method = make_method(method if method is not None else FastKV()).bind(parts.num_layers)
    encoded = [encode_prompt(tokenizer, p, chat) for p in prompts]
    batch = DecodeBatch(model, tokenizer, compile)
    results: list[GenerationResult | None] = [None] * len(prompts)

    def finished(index: int, result: GenerationResult) -> None:
        results[index] = result
        if on_result is not None:
            on_result(index, result)

    for index, ids in enumerate(encoded):
        prefilled = prefill_prompt(parts, ids, method, max_new_tokens, prefill_chunk)
        done = batch.join(index, prefilled, max_new_tokens, temperature, top_p, seed, stop, ignore_eos)
        if done is not None:
            finished(index, done)
    while batch.rows:
        for index, result in batch.step():
            finished(index, result)
    return results  # type: ignore[return-value]
