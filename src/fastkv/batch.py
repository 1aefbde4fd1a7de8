"""The decode loop: sequences of any prompt length decoded together, one token each per step.

Each prompt is prefilled alone (`prefill_prompt`), so it keeps its own positions, TSP and cache selections
(prefill is compute-bound: on a CPU, batching it would save little). Its cache then joins the running
batch (`fastkv.cache.merge`), and one decode step feeds every row's token at once, so the weights are read
once per step for the whole batch. A row that ends (EOS, a stop string, its token limit) leaves at once,
and a new one may join between steps: the server feeds requests this way, and a single generation is a
batch of one row.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, replace

import torch

from .adapters import Adapter, adapter_for
from .cache import KVCache, keep_rows, merge
from .decode import decode_step, frozen_decode, start_decoding
from .engine import prefill
from .layer import PrefillOptions
from .methods import Method, format_spec
from .methods.base import PrefillTrace
from .prefix import PrefixStore
from .results import GenerationResult, GenerationStats
from .sampling import SamplingParams, Transcript, eos_ids, sample, token_logprob


def clock(device: torch.device) -> float:
    """Seconds, after the device's queued work is done (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass
class Prefilled:
    """What decoding starts from."""

    method: Method  # bound
    prompt_tokens: int
    cache: KVCache | None  # None once it has joined a batch (the batch's cache holds it)
    logits: torch.Tensor
    trace: PrefillTrace
    seconds: float
    shared_by: int = 1
    reused: int = 0  # prompt tokens taken from the prefix store


def prefill_prompt(
    adapter: Adapter,
    ids: list[int],
    method: Method,
    options: PrefillOptions,
    *,
    prefix_cache: PrefixStore | None = None,
) -> Prefilled:
    """Prefill one prompt's token ids under a bound method, timed: what decoding starts from. With a prefix
    store, from the longest stored prefix of the prompt, and what it computes is kept for later prompts.
    options: `engine.prefill`'s (with on_chunk, the server decodes its running batch between chunks)."""
    start = clock(adapter.device)
    input_ids = torch.tensor([list(ids)], device=adapter.device)
    reused = 0
    if prefix_cache is not None:
        cache, logits, trace, reuse = prefix_cache.prefill(adapter, input_ids, method, options)
        reused = reuse.tokens
    else:
        cache, logits, trace = prefill(adapter, input_ids, method, options)
    return Prefilled(method, len(ids), cache, logits, trace, clock(adapter.device) - start, reused=reused)


@dataclass
class Row:
    """One sequence in a decode batch."""

    key: object  # the caller's name for it
    prefilled: Prefilled  # without its cache, which lives in the batch's
    params: SamplingParams
    transcript: Transcript
    generator: torch.Generator | None
    # bytes after prefill, a full cache's bytes, entries per layer, bytes of one generated entry in every layer
    kv: tuple[int, int, list[int], int]
    started: float | None = None  # when its first decode step began
    steps: int = 0  # decode steps it took part in
    sent: int = 0  # tokens whose logprobs went out with on_text (when logprobs are asked for)
    evicted: int = 0  # generated entries its decode budget evicted, over layers and KV heads
    held: int = 0  # generated entries a layer held at its last step, per KV head

    def add(self, logits: torch.Tensor) -> bool:
        """Sample its next token from logits [V] and take it; False once it has ended."""
        token = sample(logits, self.params, self.generator)
        logprobs = self.params.logprobs
        return self.transcript.add(token, token_logprob(logits, token, logprobs) if logprobs is not None else None)

    def result(self, decode_seconds: float) -> GenerationResult:
        p, t = self.prefilled, self.transcript
        spec = format_spec(p.method)
        return GenerationResult(
            text=t.text,
            token_ids=t.out,
            finish_reason=t.finish,
            method=spec,
            first_logits=p.logits[0],
            logprobs=t.logprobs if self.params.logprobs is not None else None,
            stats=GenerationStats(
                method=spec,
                prompt_tokens=p.prompt_tokens,
                new_tokens=len(t.out),
                prefill_seconds=p.seconds,
                decode_seconds=decode_seconds,
                decode_steps=self.steps,
                kv_entries_per_layer=self.kv[2],
                tokens_per_layer=p.trace.tokens_per_layer,
                kv_bytes=self.kv[0],
                kv_bytes_full=self.kv[1],
                prefill_shared_by=p.shared_by,
                prefix_tokens_reused=p.reused,
                kv_evicted=self.evicted,
                kv_bytes_end=self.kv[0] + self.held * self.kv[3],
            ),
        )


class DecodeBatch:
    """Sequences decoding together, one token each per `step`; sequences join and leave between steps."""

    def __init__(self, model, tokenizer, compile: bool = False, on_text: Callable[[object, str], None] | None = None):
        """on_text(key, piece, logprobs) receives each row's text as it becomes final (for streaming); where
        the row asks for logprobs, also the TokenLogprobs of its tokens since the last call, so that every
        token is reported in the step that made it even when its text is not final yet (else None)."""
        self.model, self.tokenizer, self.compile, self.on_text = model, tokenizer, compile, on_text
        self.adapter = adapter_for(model)
        self.eos = eos_ids(model, tokenizer)
        self.rows: list[Row] = []
        self.cache: KVCache | None = None

    def join(self, key, prefilled: Prefilled, params: SamplingParams) -> GenerationResult | Exception | None:
        """Add a prefilled sequence; its result at once if its first token already ends it (or the error that
        ended it: a row's failure, in sampling or its stop strings, ends that row alone)."""
        cache = prefilled.cache
        if cache.keys[0].shape[0] != 1:
            raise ValueError(f"a sequence joins alone: its cache holds {cache.keys[0].shape[0]} rows")
        if cache.room < params.max_tokens - 1:
            raise ValueError(f"the cache has room for {cache.max_tokens} new tokens, not {params.max_tokens}")
        row = Row(
            key,
            replace(prefilled, cache=None),
            params,
            Transcript(self.tokenizer, set() if params.ignore_eos else self.eos, params.stop),
            params.generator(self.adapter.device),
            (cache.nbytes(), cache.full_nbytes(), cache.kept_per_layer, cache.entry_bytes() * len(cache.keys)),
        )
        try:
            going = row.add(prefilled.logits[0])
            if not going or params.max_tokens == 1:
                return self._finish(row)
            self._emit(row)
        except Exception as e:  # this row's failure, reported to its caller
            return e
        start_decoding(self.adapter, cache)  # before the merge: the batch's state is its rows'
        self.cache = cache if self.cache is None else merge([self.cache, cache])
        self.rows.append(row)
        return None

    def step(self) -> list[tuple[object, GenerationResult | Exception]]:
        """One decode step for every row; returns (key, result) of the rows that ended, which leave. A row
        whose sampling or stop strings fail ends with the exception as its result; the others go on. (A
        failure of the step itself, which every row shares, raises.)"""
        if not self.rows:
            return []
        now = clock(self.adapter.device)
        for row in self.rows:
            row.started = now if row.started is None else row.started
        tokens = torch.tensor([r.transcript.out[-1] for r in self.rows], device=self.adapter.device)
        position = self.cache.position_base + self.cache.steps
        with compiling(self.adapter, len(self.rows)) if self.compile else contextlib.nullcontext():
            logits = decode_step(self.adapter, self.cache, tokens, position, self.compile)
        done, keep = [], []
        state = self.cache.decode_state
        for b, row in enumerate(self.rows):
            row.steps += 1
            row.evicted = state.evicted[b] if state is not None else 0
            row.held = state.generated[b] if state is not None else row.steps
            try:
                going = row.add(logits[b])
                if going and len(row.transcript.out) < row.params.max_tokens:
                    self._emit(row)
                    keep.append(b)
                else:
                    done.append((row.key, self._finish(row)))
            except Exception as e:  # this row's failure, reported to its caller
                done.append((row.key, e))
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
        if self.on_text is None:
            return
        piece, fresh = row.transcript.ready(final), None
        if row.params.logprobs is not None:
            fresh, row.sent = row.transcript.logprobs[row.sent :], len(row.transcript.logprobs)
        if piece or fresh:
            self.on_text(row.key, piece, fresh)

    def _finish(self, row: Row) -> GenerationResult:
        self._emit(row, final=True)
        seconds = clock(self.adapter.device) - row.started if row.started is not None else 0.0
        return row.result(seconds)


# The kinds of compiled decode step each model has run (one row: frozen where int8 weights are on a CPU; rows
# > 1: the plain graph). The first step of a kind compiles, for minutes: `compiling` says so on stderr.
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def compiling(adapter: Adapter, rows: int) -> Iterator[None]:
    """Around a compiled decode step: on the first of its kind for this model, a line on stderr saying that
    it compiles and how long that takes, with a live timer where stderr is a terminal."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    kinds = _COMPILED.setdefault(adapter.model, set())
    single = rows == 1
    if single in kinds:
        yield
        return
    kinds.add(single)
    frozen = single and frozen_decode(adapter)
    what = "int8 weights frozen into the graph: minutes" if frozen else "tens of seconds"
    text = f"compiling the decode step for {'one sequence' if single else 'batches'} ({what}, once per process)"
    console = Console(stderr=True)
    start = time.perf_counter()
    if not console.is_terminal:
        console.print(text, highlight=False)
    columns = SpinnerColumn(), TextColumn(text), TimeElapsedColumn()
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        bar.add_task("compile", total=None)
        yield
    console.print(f"decode step compiled in {time.perf_counter() - start:.0f} s", highlight=False)


def decode_alone(
    model, tokenizer, prefilled: Prefilled, params: SamplingParams, compile: bool = False
) -> Generator[str, None, GenerationResult]:
    """Decode one prefilled sequence as a batch of one row, yielding its text as it becomes final; the
    generator's return value is its result."""
    pieces: list[str] = []
    batch = DecodeBatch(model, tokenizer, compile, on_text=lambda _key, piece, _lp: piece and pieces.append(piece))
    result = batch.join(0, prefilled, params)
    while result is None:
        yield from pieces
        pieces.clear()
        ended = batch.step()  # [] until the one row ends
        result = ended[0][1] if ended else None
    yield from pieces
    return raised(result)


def raised(result: GenerationResult | Exception) -> GenerationResult:
    """A row's result, or the error that ended it, raised."""
    if isinstance(result, Exception):
        raise result
    return result
