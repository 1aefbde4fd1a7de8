"""Spec strings and method configs: parsing, canonical round trips, combinations, frozen dataclasses, and the
engine's checks of what parts return."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch

from fastkv import adapter_for, prefill
from fastkv.methods import (
    PRESETS,
    AdaKV,
    Composed,
    FastKV,
    Reducer,
    Selection,
    SnapKV,
    format_spec,
    parse,
    spec_name,
    split_specs,
)
from fastkv.methods.base import CachePolicy

from .conftest import build_tiny, prompt_ids

COMBOS = [
    "fastkv+adakv",
    "fastkv(tsp_rate=0.3)+pyramidkv(beta=10)",
    "gemfilter(window_size=8)+h2o",
    "gemfilter+streamingllm(sink=2)",
    "pyramidinfer+snapkv(budget=64)",
    "tsp(tsp_layer=2, kernel_size=13)+snapkv",
    "topk(scorer=accumulated, allocator=pyramid, beta=4)",
    "tsp+topk(scorer=last_query, allocator=adaptive)",
    "filter",
    "sinkrecent(sink=8)",
]


@pytest.mark.parametrize("spec", [*PRESETS, *COMBOS])
def test_canonical_spec_round_trips(spec):
    method = parse(spec).bind(24)
    again = parse(format_spec(method))
    assert again.same_parts(method) and format_spec(again) == format_spec(method)
    assert "None" not in format_spec(method)  # unset knobs are left out; after bind none is unset


def test_presets_print_flat_and_combinations_print_their_sides():
    assert (
        format_spec(parse("snapkv(budget=512)"))
        == "snapkv(budget=512, min_budget=256, window_size=8, kernel_size=7, pooling='max')"
    )
    combo = format_spec(parse("fastkv(kernel_size=13)+adakv(alpha=0.5)").bind(24))
    assert combo.startswith("fastkv(window_size=8, kernel_size=13, pooling='max', tsp_layer=11, tsp_rate=0.2")
    assert combo.split("+")[1].startswith("adakv(retain_rate=0.1, min_budget=256, window_size=8, kernel_size=7")
    assert "alpha=0.5" in combo
    # a FastKV whose TSP and cache windows agree is the preset again
    assert format_spec(parse("fastkv+snapkv")) == format_spec(FastKV())
    # TSP and the cache with different kernels cannot be one preset: written as two sides
    assert "+snapkv(" in format_spec(parse("tsp(kernel_size=13)+snapkv"))


def test_combination_takes_the_reducer_from_the_left_and_the_policy_from_the_right():
    method = parse("fastkv(tsp_len=300)+adakv(budget=100, alpha=0.5)")
    assert method.reducer == FastKV(tsp_len=300).reducer
    assert method.policy == AdaKV(budget=100, alpha=0.5).policy
    assert (FastKV(tsp_len=300) + AdaKV(budget=100, alpha=0.5)).same_parts(method)
    assert spec_name(method) == "fastkv+adakv" and method.reduces == "prefill + KV cache"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nosuch", "unknown method 'nosuch'"),
        ("fastkv(", "bad method spec"),
        ("fastkv(13)", "give knobs by name"),
        ("fastkv(kernel_size=[1])", "knob values are numbers, strings or None"),
        ("a+b+c", "two parts at most"),
        ("fastkv-adakv", "expected NAME"),
        ("snapkv(tsp_rate=0.2)", "method 'snapkv' has no knob(s) ['tsp_rate']"),
        ("fastkv(budget=10)+adakv", "has no knob(s) ['budget']; the right side's part takes them"),
        ("snapkv+fastkv(tsp_rate=0.2)", "has no knob(s) ['tsp_rate']; the left side's part takes them"),
        ("fastkv+adakv(tsp_rate=0.2)", "method 'adakv' has no knob(s) ['tsp_rate']"),
        ("gemfilter+snapkv", "give the reducer window_size=8 or more"),
        ("gemfilter+adakv(window_size=4)", "give the reducer window_size=4 or more"),
        ("topk+snapkv", "'topk' is a policy; the left side of + is a reducer"),
        ("snapkv+tsp", "'tsp' is a reducer; the right side of + is a policy"),
        ("topk(allocator=nosuch)", "unknown allocator 'nosuch'"),
        ("topk(beta=4)", "policy 'topk' has no knob(s) ['beta']"),
        ("snapkv(budget=64, retain_rate=0.2)", "give retain_rate or budget, not both"),
        ("fastkv(kernel_size=4)", "kernel_size must be odd"),
        ("snapkv, fastkv", "names 2 methods"),
    ],
)
def test_bad_specs_name_the_problem(spec, message):
    with pytest.raises(ValueError, match=None) as e:
        parse(spec)
    assert message in str(e.value)


def test_lists_and_shared_settings():
    methods = [
        parse(s, defaults={"retain_rate": 0.2, "tsp_rate": 0.25})
        for s in split_specs("fullkv, fastkv(kernel_size=13, tsp_rate=0.3), snapkv(budget=64), h2o")
    ]
    assert [m.name for m in methods] == ["fullkv", "fastkv", "snapkv", "h2o"]
    assert methods[1].reducer.tsp_rate == 0.3 and methods[1].policy.retain_rate == 0.2  # the spec wins
    assert methods[2].policy.budget == 64 and methods[2].policy.retain_rate is None  # a count excludes a rate
    assert methods[3].policy.retain_rate == 0.2
    assert [m.name for m in [parse(s) for s in split_specs("all")]] == list(PRESETS)
    # a shared setting goes to the side that has it
    combo = parse("fastkv+adakv", defaults={"retain_rate": 0.3, "tsp_rate": 0.4})
    assert combo.reducer.tsp_rate == 0.4 and combo.policy.retain_rate == 0.3
    # options of a command: to the side(s) that have them, and never twice
    combo = parse("fastkv+adakv", knobs={"tsp_len": 300, "alpha": 0.5, "window_size": 16})
    assert combo.reducer.tsp_len == 300 and combo.policy.allocator.alpha == 0.5
    assert combo.reducer.window_size == combo.policy.scorer.window_size == 16
    with pytest.raises(ValueError, match="has no knob 'sink'"):
        parse("fastkv+adakv", knobs={"sink": 3})


def test_configs_are_frozen_and_validation_writes_nothing():
    assert dataclasses.replace(SnapKV(), budget=512).policy.budget == 512
    method = FastKV()
    assert method.tsp_layer is None and method.retain_rate is None and method.tsp_rate is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        method.budget = 3
    bound = method.bind(24)  # defaults resolve into a new object
    assert bound.reducer.tsp_layer == 11 and bound.policy.retain_rate == 0.1 and method.tsp_layer is None
    assert FastKV(kernel_size=13) == FastKV(kernel_size=13) and hash(FastKV()) == hash(FastKV())


def test_a_method_is_bound_once_per_model(monkeypatch):
    """LLM.resolve, generate and prefill each bind the method they get: binding a bound one is free."""
    calls = []
    original = type(FastKV().reducer).bind
    monkeypatch.setattr(type(FastKV().reducer), "bind", lambda self, *a: calls.append(a) or original(self, *a))
    bound = FastKV().bind(24)
    assert len(calls) == 1 and bound.bind(24) is bound and bound.bind(24, None) is bound
    other = bound.bind(32)  # another model: bound again
    assert len(calls) == 2 and other is not bound and other.bound_for == (32, None)
    assert bound.bind(24, [5, 11, 17, 23]) is not bound  # a hybrid model of the same depth is another model
    assert bound == FastKV().bind(24)  # bound_for takes no part in equality


@dataclass(frozen=True, kw_only=True)
class Returns(Reducer):
    """A reducer that returns a fixed (bad) selection at layer 1, for the engine's checks."""

    name = "returns"
    make: object = None

    def tokens(self, layer):
        return self.make(layer.present) if layer.index == 1 else None


@dataclass(frozen=True, kw_only=True)
class Keeps(CachePolicy):
    name = "keeps"
    make: object = None

    def entries(self, layer):
        return self.make(layer.present)


@pytest.mark.parametrize(
    "reducer, message",
    [
        (lambda n: Selection(torch.arange(10)[None]), "indices of shape [1, 10], expected [1, 1, k]"),
        (lambda n: Selection(torch.arange(10).expand(1, 2, 10)), "expected [1, 1, k]"),
        (lambda n: Selection.same_for_all_heads(torch.tensor([[0, 5, n]])), "must lie in 0..47"),
        (lambda n: Selection.same_for_all_heads(torch.tensor([[3, 1, 7]])), "strictly increasing"),
        (lambda n: Selection.same_for_all_heads(torch.tensor([[1, 1, 7]])), "strictly increasing"),
        (lambda n: Selection.same_for_all_heads(torch.tensor([[1.0, 2.0]])), "integer tensor"),
    ],
)
def test_the_engine_refuses_bad_token_selections(reducer, message):
    adapter = adapter_for(build_tiny("llama"))
    method = Composed(reducer=Returns(make=reducer), policy=Keeps(make=lambda n: None))
    with pytest.raises(ValueError, match=None) as e:
        prefill(adapter, prompt_ids(48), method)
    assert message in str(e.value) and "returns at layer 1" in str(e.value)


@pytest.mark.parametrize(
    "entries, message",
    [
        (lambda n: Selection(torch.tensor([[[0, 2, 2]]])), "repeat an entry"),
        (lambda n: Selection(torch.tensor([[[0, 2, 3]]]).expand(1, 3, 3)), "expected [1, 1, k] or [1, 2, k]"),
        (lambda n: Selection(torch.tensor([[[-1, 2]]])), "must lie in 0..47"),
        (lambda n: Selection(torch.tensor([[[0, 2]]]), torch.ones(1, 1, 3, dtype=torch.bool)), "valid must be"),
    ],
)
def test_the_engine_refuses_bad_cache_selections(entries, message):
    adapter = adapter_for(build_tiny("llama"))
    method = Composed(reducer=Returns(make=lambda n: None), policy=Keeps(make=entries))
    with pytest.raises(ValueError, match=None) as e:
        prefill(adapter, prompt_ids(48), method)
    assert message in str(e.value) and "keeps at layer 0" in str(e.value)


def test_cache_entries_need_not_be_sorted_and_a_head_order_is_kept():
    adapter = adapter_for(build_tiny("llama"))
    order = torch.tensor([[[5, 1, 47], [47, 0, 9]]])
    method = Composed(reducer=Returns(make=lambda n: None), policy=Keeps(make=lambda n: Selection(order)))
    cache, _, _ = prefill(adapter, prompt_ids(48), method)
    assert all(torch.equal(p, order) for p in cache.positions)
