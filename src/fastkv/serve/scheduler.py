"""The server's engine loop: admission by KV memory, one prefill at a time, continuous batched decoding.

One thread owns the model. Each turn of its loop it
1. drops cancelled requests (a client that went away) from the queue or the batch, freeing their cache;
2. admits the request at the head of the queue if the batch has a free row and its cache fits in the
   memory left (`fastkv.cache.merged_bytes`: the batch's caches after the join, from the policy's bound on
   entries per layer, known before prefill), then prefills it alone (from the longest stored prefix of its
   prompt, with a prefix store) and lets it join the running batch;
3. runs one decode step for every running request.
So a long prefill pauses the running streams for that one prefill, never longer: between two prefills
there is always a decode step. Requests wait in a bounded queue, first come first served (a large request
at the head is not overtaken, so it cannot starve); a full queue refuses new ones (`QueueFull`).

The prefix store (`llm.prefix_cache`, bounded by itself) shares the KV memory with the batch: a request
that fits only without some stored prefixes evicts them, least recently used first, so requests always
outrank cached prefixes; the store never holds more than the memory the batch leaves.

Results travel to the asyncio side through each job's queue of events: ("text", piece), then
("done", GenerationResult) or ("error", message).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from ..batch import DecodeBatch, prefill_prompt
from ..cache import entry_bytes, merged_bytes
from ..engine import check_prompt
from ..methods import Method
from ..results import GenerationResult
from ..sampling import SamplingParams


class QueueFull(Exception):
    """The wait queue is full: come back later."""


class KVMemoryError(ValueError):
    """A request whose KV cache could never fit the server's KV memory."""


@dataclass(eq=False)
class Job:
    ids: list[int]
    method: Method  # bound
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    need: list[int] = field(default_factory=list)  # entries per layer it may hold: the bound, then the room
    cancelled: bool = False
    id: int = field(default_factory=itertools.count().__next__)
    queued_at: float = field(default_factory=time.perf_counter)

    def send(self, kind: str, value) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class Scheduler:
    def __init__(self, llm, kv_bytes: int, max_batch: int, max_queue: int, metrics=None, compile: bool = False):
        self.llm, self.adapter = llm, llm.adapter
        self.kv_limit, self.max_batch, self.max_queue = kv_bytes, max_batch, max_queue
        self.metrics = metrics
        self.queue: deque[Job] = deque()
        self.jobs: dict[int, Job] = {}  # running, by id
        self.cond = threading.Condition()
        self.stopping = False
        self.batch = DecodeBatch(llm.model, llm.tokenizer, compile=compile, on_text=self._on_text)
        a = self.adapter
        self.entry_bytes = entry_bytes(a.num_kv_heads, a.head_dim, a.dtype.itemsize)  # one row's K and V
        self.thread = threading.Thread(target=self._run, name="fastkv-engine", daemon=True)

    # -- the asyncio side ------------------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def make_job(self, ids: list[int], method: Method, params: SamplingParams, loop: asyncio.AbstractEventLoop) -> Job:
        """A job for a prompt, checked: `ContextLengthError` or `KVMemoryError` (ValueErrors) name what the
        model or the memory cannot take."""
        check_prompt(self.adapter, len(ids), params.max_tokens)
        n, layers, heads = len(ids), self.adapter.num_layers, self.adapter.num_kv_heads
        need = [method.policy.max_entries(n, i, layers, heads) + params.max_tokens for i in range(layers)]
        job = Job(ids, method, params, loop, need=need)
        alone = merged_bytes(None, need, self.entry_bytes)
        if alone > self.kv_limit:
            raise KVMemoryError(
                f"this request's KV cache may need {alone / 2**20:.1f} MiB, more than the server's "
                f"{self.kv_limit / 2**20:.1f} MiB (--kv-mib): shorten the prompt or use a smaller KV budget"
            )
        return job

    def submit(self, job: Job) -> None:
        with self.cond:
            if self.stopping:
                raise QueueFull("the server is shutting down")
            if len(self.queue) >= self.max_queue:
                raise QueueFull(f"{len(self.queue)} requests are waiting already (--max-queue)")
            self.queue.append(job)
            self._gauges()
            self.cond.notify()

    def cancel(self, job: Job) -> None:
        with self.cond:
            job.cancelled = True
            self.cond.notify()

    def stop(self, timeout: float = 30.0) -> None:
        """Admit nothing more, cancel what waits, let running requests finish (up to timeout), then stop."""
        with self.cond:
            self.stopping = True
            for job in self.queue:
                job.send("error", "the server is shutting down")
            self.queue.clear()
            self.cond.notify()
        self.thread.join(timeout)
        with self.cond:
            for job in self.jobs.values():
                job.cancelled = True

    # -- the engine thread -----------------------------------------------------------------------------
    def kv_bytes_now(self) -> int:
        cache = self.batch.cache
        return 0 if cache is None else sum(k.numel() * k.element_size() * 2 for k in cache.keys)

    def _admissible(self) -> Job | None:
        if not self.queue or len(self.batch.rows) >= self.max_batch:
            return None
        head = self.queue[0]
        need = merged_bytes(self.batch.cache, head.need, self.entry_bytes)
        if need > self.kv_limit:
            return None
        self._fit_store(need)
        return head

    def _fit_store(self, batch_bytes: int) -> None:
        """Evict stored prefixes until they fit in the memory that `batch_bytes` of caches leave."""
        store = self.llm.prefix_cache
        if store is not None and batch_bytes + store.bytes > self.kv_limit:
            store.evict(batch_bytes + store.bytes - self.kv_limit)

    def _run(self) -> None:
        while True:
            with self.cond:
                self._drop_cancelled()
                while not self.stopping and not self.batch.rows and self._admissible() is None:
                    self.cond.wait()
                    self._drop_cancelled()
                if self.stopping and not self.batch.rows:
                    return
                job = None if self.stopping else self._admissible()
                if job is not None:
                    self.queue.popleft()
                    self.jobs[job.id] = job
            if job is not None:
                try:
                    self._prefill(job)
                except Exception as e:  # this request's fault (or the engine's): it alone fails
                    self.jobs.pop(job.id, None)
                    job.send("error", f"prefill failed: {type(e).__name__}: {e}")
            try:
                if self.batch.rows:
                    for key, result in self.batch.step():
                        self._finish(self.jobs[key], result)
            except Exception as e:  # a fault in a decode step must not take the server down
                self._fail_all(f"decoding failed: {type(e).__name__}: {e}")
            with self.cond:
                self._gauges()

    def _prefill(self, job: Job) -> None:
        if self.metrics:
            self.metrics.queue_seconds.observe(time.perf_counter() - job.queued_at)
        done = prefill_prompt(self.adapter, job.ids, job.method, job.params.max_tokens,
                              prefix_cache=self.llm.prefix_cache)  # fmt: skip
        result = self.batch.join(job.id, done, job.params)
        self._fit_store(self.kv_bytes_now())  # what this prefill stored, within what the batch leaves
        if result is not None:
            self._finish(job, result)

    def _on_text(self, key, piece: str) -> None:
        self.jobs[key].send("text", piece)

    def _finish(self, job: Job, result: GenerationResult) -> None:
        self.jobs.pop(job.id, None)
        job.send("done", result)
        if self.metrics:
            self.metrics.finished(result)

    def _drop_cancelled(self) -> None:
        for job in [j for j in self.queue if j.cancelled]:
            self.queue.remove(job)
        dropped = [j for j in self.jobs.values() if j.cancelled]
        for job in dropped:
            self.batch.cancel(job.id)
            self.jobs.pop(job.id)
        if dropped:
            self._gauges()  # before the count, so that a watcher of the count sees the memory freed
            if self.metrics:
                self.metrics.cancelled.inc(len(dropped))

    def _fail_all(self, message: str) -> None:
        for job in list(self.jobs.values()):
            self.batch.cancel(job.id)
            job.send("error", message)
        self.jobs.clear()

    def _gauges(self) -> None:
        if self.metrics:
            self.metrics.running.set(len(self.batch.rows))
            self.metrics.queued.set(len(self.queue))
            self.metrics.kv_bytes.set(self.kv_bytes_now())
            store = self.llm.prefix_cache
            self.metrics.prefix_bytes.set(store.bytes if store is not None else 0)
