"""The server's engine loop: admission by KV memory, one prefill at a time, continuous batched decoding.

One thread owns the model. Each turn of its loop it
1. drops cancelled requests (a client that went away) from the queue or the batch, freeing their cache;
2. admits the request at the head of the queue if the batch has a free row and its cache fits in the
   memory left (`fastkv.cache.merged_bytes`: the batch's caches after the join, from the policy's bound on
   entries per layer, known before prefill), then prefills it alone (from the longest stored prefix of its
   prompt, with a prefix store) and lets it join the running batch;
3. runs one decode step for every running request.
A prefill runs `prefill_chunk` tokens at a time through each layer's projections, attention and MLP, and
the running batch takes a decode step between chunks once `prefill_budget` tokens of such work have run, or
sooner, before the next chunk would take the prefill's time since the last step beyond `prefill_share`
decode steps' time: so a long prompt arriving does not freeze the streams (None: a prefill runs whole,
pausing them for its duration). Both bounds are needed because chunks differ in cost by about 5x (an
attention chunk late in an 8K prompt against a projection chunk): a token budget alone that keeps every
gap within 3x a decode step on a small CPU makes the prefill several times slower
(benchmarks/results/serve-interleave-8k-cpu.txt).
Requests wait in a bounded queue, first come first served (a large request at the head is not overtaken,
so it cannot starve); a full queue refuses new ones (`QueueFull`).

The prefix store (`llm.prefix_cache`, bounded by itself) shares the KV memory with the batch: a request
that fits only without some stored prefixes evicts them, least recently used first, so requests always
outrank cached prefixes; the store never holds more than the memory the batch leaves.

Results travel to the asyncio side through each job's queue of events: ("text", (piece, logprobs of the
tokens since the last one, or None)), then
("done", GenerationResult) or ("error", message). A request's own failure (its prefill, its sampling or
stop strings in the decode step) ends that request alone; a failure of a decode step itself ends the
requests in it; if the engine thread itself dies, every waiting request fails at once and `dead` says why.
Errors are logged with the request's id; clients get a message without the exception's text.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from ..batch import DecodeBatch, prefill_prompt
from ..cache import entry_bytes, merged_bytes
from ..engine import check_prompt
from ..layer import PrefillOptions
from ..methods import Method
from ..results import GenerationResult
from ..sampling import SamplingParams

log = logging.getLogger("fastkv.serve")


class QueueFull(Exception):
    """The wait queue is full: come back later."""


class EngineDown(Exception):
    """The engine thread has stopped (it died, or the server is shutting down)."""


class Cancelled(Exception):
    """The request being prefilled was cancelled (its client went away): stop its prefill."""


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
    rid: str = ""  # the HTTP request's id, which its client was given

    @property
    def request_id(self) -> str:
        return self.rid or f"job-{self.id}"

    def send(self, kind: str, value) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    def fail(self, what: str, error: BaseException | None = None) -> None:
        """End this job with an error: its details go to the log under its request id, not to the client."""
        if error is not None:
            log.error("%s %s: %s: %s", self.request_id, what, type(error).__name__, error, exc_info=error)
        self.send("error", f"{what} (request {self.request_id}; the server's log has the details)")


class Scheduler:
    def __init__(self, llm, kv_bytes: int, max_batch: int, max_queue: int, metrics=None, compile: bool = False,
                 prefill_chunk: int | None = 256, prefill_budget: int = 8192, prefill_share: float = 1.0):  # fmt: skip
        self.llm, self.adapter = llm, llm.adapter
        self.prefill_chunk, self.prefill_budget, self.prefill_share = prefill_chunk, prefill_budget, prefill_share
        self._since_step, self._spent, self._mark = 0, 0.0, 0.0  # prefill work since the last decode step
        self._chunks: deque[float] = deque(maxlen=3)  # the last chunks' seconds: what the next may take
        self._step_seconds: float | None = None  # a decode step's time (moving average)
        self._prefilling: Job | None = None
        self.kv_limit, self.max_batch, self.max_queue = kv_bytes, max_batch, max_queue
        self.metrics = metrics
        self.queue: deque[Job] = deque()
        self.jobs: dict[int, Job] = {}  # running, by id
        self.cond = threading.Condition()
        self.stopping = False
        self.dead: str | None = None  # why the engine thread stopped, when it died
        self.batch = DecodeBatch(llm.model, llm.tokenizer, compile=compile, on_text=self._on_text)
        a = self.adapter
        self.entry_bytes = entry_bytes(a.num_kv_heads, a.head_dim, a.dtype.itemsize)  # one row's K and V
        self.thread = threading.Thread(target=self._serve, name="fastkv-engine", daemon=True)

    # -- the asyncio side ------------------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def make_job(self, ids: list[int], method: Method, params: SamplingParams, loop: asyncio.AbstractEventLoop) -> Job:
        """A job for a prompt, checked: `ContextLengthError` or `KVMemoryError` (ValueErrors) name what the
        model or the memory cannot take."""
        check_prompt(self.adapter, len(ids), params.max_tokens)
        n, layers, heads = len(ids), self.adapter.num_layers, self.adapter.num_kv_heads
        # A layer with a sliding window holds at most its window, however long the prompt and the answer; under a
        # decode budget, a layer holds at most the budget plus one interval of generated entries.
        policy, generated = method.policy, method.policy.generated_entries(params.max_tokens)
        grows = [generated if w is None else params.max_tokens for w in self.adapter.windows]
        need = [self.adapter.need(i, policy.max_entries(n, i, layers, heads) + grows[i]) for i in range(layers)]
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
            if self.dead is not None:
                raise EngineDown(f"the engine has stopped: {self.dead}")
            if self.stopping:
                raise EngineDown("the server is shutting down")
            if len(self.queue) >= self.max_queue:
                raise QueueFull(f"{len(self.queue)} requests are waiting already (--max-queue)")
            self.queue.append(job)
            self._gauges()
            self.cond.notify()

    def cancel(self, job: Job) -> None:
        with self.cond:
            job.cancelled = True
            self.cond.notify()

    def close_admission(self) -> None:
        """Admit nothing more and fail what waits; running requests go on."""
        with self.cond:
            self.stopping = True
            for job in self.queue:
                job.fail("the server is shutting down")
            self.queue.clear()
            self._gauges()
            self.cond.notify()

    def stop(self, timeout: float = 30.0) -> None:
        """Admit nothing more, fail what waits, let running requests finish (up to timeout), then end the
        rest with an error and stop."""
        self.close_admission()
        self.thread.join(timeout)
        with self.cond:
            for job in list(self.jobs.values()):
                job.cancelled = True
                job.fail("the server is shutting down")
            self.cond.notify()
        self.thread.join(5)

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

    def _serve(self) -> None:
        """The engine thread: `_run`, and if it dies, every request fails at once instead of waiting."""
        try:
            self._run()
        except BaseException as e:  # the thread is gone: nothing else would ever answer
            log.critical("the engine thread died: %s: %s", type(e).__name__, e, exc_info=e)
            with self.cond:
                self.dead = f"{type(e).__name__}"
                for job in [*self.queue, *self.jobs.values()]:
                    job.fail("the engine stopped")
                self.queue.clear()
                self.jobs.clear()
                self._gauges()

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
                except Cancelled:
                    pass
                except Exception as e:  # this request's fault (or the engine's): it alone fails
                    self.jobs.pop(job.id, None)
                    job.fail("its prefill failed", e)
                finally:
                    self._prefilling = None
            self._decode_once()

    def _decode_once(self) -> None:
        """One decode step for the running batch; the requests that end leave it."""
        try:
            if self.batch.rows:
                start = time.perf_counter()
                for key, result in self.batch.step():
                    self._finish(self.jobs[key], result)
                took = time.perf_counter() - start
                self._step_seconds = took if self._step_seconds is None else 0.8 * self._step_seconds + 0.2 * took
        except Exception as e:  # a fault of the decode step itself: the requests in it end
            self._fail_all("a decode step failed", e)
        with self.cond:
            self._gauges()

    def _between_chunks(self, tokens: int) -> None:
        """Called inside a chunked prefill after each chunk: a decode step for the running batch once
        `prefill_budget` tokens of prefill work have run since the last one, or once the next chunk (taken to
        cost as much as the dearest of the last three) would bring the prefill's time since then beyond
        `prefill_share` decode steps; the prefill stops if its own request was cancelled."""
        now = time.perf_counter()
        self._chunks.append(now - self._mark)
        self._spent += now - self._mark
        self._since_step += tokens
        self._mark = now
        late = (self.prefill_share > 0 and self._step_seconds is not None
                and self._spent + max(self._chunks) > self.prefill_share * self._step_seconds)  # fmt: skip
        if self._since_step < self.prefill_budget and not late:
            return
        self._since_step, self._spent = 0, 0.0
        with self.cond:
            self._drop_cancelled()
        if self._prefilling is not None and self._prefilling.cancelled:
            raise Cancelled
        self._decode_once()
        self._mark = time.perf_counter()

    def _prefill(self, job: Job) -> None:
        if self.metrics:
            self.metrics.queue_seconds.observe(time.perf_counter() - job.queued_at)
        self._prefilling, self._since_step, self._spent, self._mark = job, 0, 0.0, time.perf_counter()
        self._chunks.clear()
        chunked = self.prefill_chunk is not None
        options = PrefillOptions(job.params.max_tokens, self.prefill_chunk,
                                 on_chunk=self._between_chunks if chunked else None)  # fmt: skip
        done = prefill_prompt(self.adapter, job.ids, job.method, options, prefix_cache=self.llm.prefix_cache)
        if job.cancelled or job.id not in self.jobs:  # its client went away during the prefill
            return
        result = self.batch.join(job.id, done, job.params)
        self._fit_store(self.kv_bytes_now())  # what this prefill stored, within what the batch leaves
        if result is not None:
            self._finish(job, result)

    def _on_text(self, key, piece: str, logprobs) -> None:
        self.jobs[key].send("text", (piece, logprobs))

    def _finish(self, job: Job, result: GenerationResult | Exception) -> None:
        self.jobs.pop(job.id, None)
        if isinstance(result, Exception):  # its sampling or stop strings failed: this request alone ends
            job.fail("generation failed", result)
            return
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

    def _fail_all(self, what: str, error: Exception) -> None:
        for job in list(self.jobs.values()):
            self.batch.cancel(job.id)
            job.fail(what, error)
        self.jobs.clear()

    def _gauges(self) -> None:
        if self.metrics:
            self.metrics.running.set(len(self.batch.rows))
            self.metrics.queued.set(len(self.queue))
            self.metrics.kv_bytes.set(self.kv_bytes_now())
            store = self.llm.prefix_cache
            self.metrics.prefix_bytes.set(store.bytes if store is not None else 0)
