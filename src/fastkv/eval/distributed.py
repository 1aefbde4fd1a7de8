"""Evaluation jobs spread over a Ray cluster (`fastkv eval ... --ray [ADDRESS]`; the `ray` extra).

One actor per worker loads the model once and answers whole jobs: an item under all its pending
methods, from one shared prefill (`LLM.generate_many`), exactly as the local runner does. The driver
keeps everything else: it builds the items, scores the answers and appends the rows to
`predictions.jsonl` as each job comes back (in any order). So resuming works as without Ray, and a
worker that dies loses only the job it was running: that job goes back to the queue and a new worker
takes the dead one's place.

Each worker uses `threads` threads (default: the cores Ray gives it). Answers are those of a local run
with the same dtype and threads; with another thread count, float rounding can differ in the last bits
(and, rarely, a greedy token).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator

from .runner import Job

RETRIES = 3  # times one job may lose its worker before the run gives up


class EvalWorker:
    """A Ray actor's state: the model, loaded once."""

    def __init__(self, model: str, dtype: str, device: str, threads: int, quantize: str = "none") -> None:
        import torch

        from ..llm import LLM

        torch.set_num_threads(threads)
        self.llm = LLM.load(model, dtype=dtype, device=device, progress=False, quantize=quantize)
        self.llm.profile = None  # evaluations run methods as their specs are written (`runner`)

    def answer(self, ids: list[int], methods: list, options: dict, shared: bool) -> list:
        if shared:
            results = self.llm.generate_many(ids, methods, **options)
        else:
            results = [self.llm.generate(ids, m, **options) for m in methods]
        for r in results:
            r.first_logits = r.first_logits.cpu()
        return results

    def pid(self) -> int:
        return os.getpid()


class RayAnswer:
    """Answer jobs on `workers` Ray actors, each holding the model; yields (job, results) as they finish.

    address: a Ray cluster to join ("auto": the one this machine belongs to); None starts a local one
    (or uses the one this process already started). cpus: cores Ray reserves per worker; threads: its
    torch threads (default: its cores; more oversubscribes them, to match another run's float rounding).
    """

    def __init__(
        self,
        model: str,
        dtype: str,
        device: str,
        workers: int = 2,
        address: str | None = None,
        cpus: float = 1,
        gpus: float = 0,
        shared: bool = True,
        threads: int | None = None,
        quantize: str = "none",
    ) -> None:
        import ray

        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, logging_level="ERROR")
        self.ray, self.shared = ray, shared
        threads = threads or max(1, int(cpus))
        self.actor = ray.remote(num_cpus=cpus, num_gpus=gpus, max_restarts=0)(EvalWorker)
        self.args = (model, dtype, device, threads, quantize)
        self.workers = [self._spawn() for _ in range(workers)]
        self.lost = 0  # jobs whose worker died (requeued)
        self.computed = 0  # jobs answered

    def _spawn(self):
        return self.actor.remote(*self.args)

    def pids(self) -> list[int]:
        """The worker processes (tests kill one)."""
        return self.ray.get([w.pid.remote() for w in self.workers])

    def __call__(self, jobs: list[Job], on_start: Callable[[Job], None]) -> Iterator[tuple[Job, list]]:
        from ray.exceptions import RayActorError

        queue, idle, running = deque(jobs), list(self.workers), {}
        lost: dict[int, int] = {}  # id(job) -> times it lost its worker
        while queue or running:
            while queue and idle:
                job, worker = queue.popleft(), idle.pop()
                on_start(job)
                ref = worker.answer.remote(job.ids, job.methods, job.options, self.shared)
                running[ref] = (worker, job)
            ready, _ = self.ray.wait(list(running), num_returns=1)
            worker, job = running.pop(ready[0])
            try:
                results = self.ray.get(ready[0])
            except RayActorError:
                lost[id(job)] = lost.get(id(job), 0) + 1
                self.lost += 1
                if lost[id(job)] > RETRIES:
                    raise RuntimeError(f"job {job} lost its worker {lost[id(job)]} times: giving up") from None
                queue.appendleft(job)  # back to the front: it was next anyway
                self.workers[self.workers.index(worker)] = replacement = self._spawn()
                idle.append(replacement)
                continue
            idle.append(worker)
            self.computed += 1
            yield job, results

    def close(self) -> None:
        for worker in self.workers:
            self.ray.kill(worker)
        self.workers = []
