"""Every part by name: one line per part. A new reducer, cache policy, scorer or allocator is a file of its
own plus a line here; the spec strings, the CLI, `fastkv methods` and the test matrix pick it up."""

from __future__ import annotations

from .allocators.adaptive import Adaptive
from .allocators.pyramid import Pyramid
from .allocators.uniform import Uniform
from .base import PARTS, Part
from .decoding.budget import DecodeBudget
from .decoding.scorers import AccumulatedDecodeAttention, RecentAttention, Redundancy
from .policies.keep_all import KeepAll
from .policies.sink_recent import SinkRecent
from .policies.topk import TopK
from .reducers.filter_rerun import FilterRerun
from .reducers.layer_schedule import LayerSchedule
from .reducers.none import NoReduction
from .reducers.tsp import TSP
from .scorers.accumulated import AccumulatedAttention
from .scorers.last_query import LastQuery
from .scorers.window import WindowAttention


def register(part: type[Part]) -> type[Part]:
    """Add a part class under its `kind` and `name` (usable as a decorator)."""
    PARTS[part.kind][part.name] = part
    return part


register(NoReduction)
register(TSP)
register(FilterRerun)
register(LayerSchedule)
register(KeepAll)
register(SinkRecent)
register(TopK)
register(WindowAttention)
register(AccumulatedAttention)
register(LastQuery)
register(Uniform)
register(Pyramid)
register(Adaptive)
register(DecodeBudget)
register(RecentAttention)
register(AccumulatedDecodeAttention)
register(Redundancy)
