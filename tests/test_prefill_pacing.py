"""The server's pacing of a chunked prefill (`Scheduler._between_chunks`): a decode step of the running
batch comes before the next chunk would take the prefill past `prefill_share` decode steps' time, or after
`prefill_budget` tokens, whichever is first. A fake clock drives it."""

from __future__ import annotations

import threading
from collections import deque

import pytest

from fastkv.serve import scheduler as S


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def paced(monkeypatch, share: float, budget: int, step_s: float | None, rows: int = 1):
    clock = Clock()
    monkeypatch.setattr(S.time, "perf_counter", clock)
    s = S.Scheduler.__new__(S.Scheduler)  # the pacing state alone, no model
    s.prefill_share, s.prefill_budget, s._step_seconds = share, budget, step_s
    s._since_step, s._spent, s._mark, s._chunks = 0, 0.0, 0.0, deque(maxlen=3)
    s._prefilling, s.cond, s.jobs, s.queue = None, threading.Condition(), {}, deque()
    steps = []
    s._decode_once = lambda: steps.append(clock.now)
    s._drop_cancelled = lambda: None
    return s, clock, steps


def run_chunks(s, clock, costs: list[float], tokens: int = 256) -> None:
    for cost in costs:
        clock.now += cost
        s._between_chunks(tokens)


@pytest.mark.parametrize("share", [1.0, 2.0])
def test_a_decode_step_comes_before_the_prefill_would_pass_its_share(monkeypatch, share):
    s, clock, steps = paced(monkeypatch, share, budget=10**9, step_s=0.1)
    costs = [0.02, 0.02, 0.08, 0.03, 0.05, 0.02, 0.09, 0.01] * 4  # chunks differ in cost, as in a real prefill
    run_chunks(s, clock, costs)
    assert steps, "no decode step at all"
    # Between two decode steps the prefill ran at most share x 0.1 s, give or take one chunk dearer than the
    # three before it (the pacing predicts the next chunk from those); steps themselves take no fake time.
    marks = [0.0, *steps]
    gaps = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    assert max(gaps) <= share * 0.1 + max(costs) - min(costs) + 1e-9
    assert sum(g <= share * 0.1 + 1e-9 for g in gaps) >= 0.75 * len(gaps)
    assert len(steps) >= int(sum(costs) / (share * 0.1)) - 1  # and not many more than needed


def test_the_token_budget_bounds_work_when_no_time_is_known(monkeypatch):
    s, clock, steps = paced(monkeypatch, share=1.0, budget=1024, step_s=None)  # no decode step timed yet
    run_chunks(s, clock, [0.01] * 12)
    assert len(steps) == 3  # after 4, 8 and 12 chunks of 256 tokens


def test_share_zero_leaves_the_token_budget_alone(monkeypatch):
    s, clock, steps = paced(monkeypatch, share=0.0, budget=512, step_s=0.01)
    run_chunks(s, clock, [1.0] * 6)  # slow chunks, yet only the budget decides
    assert len(steps) == 3
