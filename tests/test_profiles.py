"""A model's calibrated profile applies one way: to every fastkv knob left unset, in a spec string and in a
preset object alike; knobs that are set win; other methods are untouched; evaluations opt out."""

from __future__ import annotations

import pytest

from fastkv import LLM, AdaKV, FastKV, SnapKV, format_spec
from fastkv.profiles import Profile

from .conftest import build_tiny
from .test_generate import CharTokenizer

KNOBS = {"tsp_layer": 2, "kernel_size": 13, "pooling": "avg", "window_size": 16, "tsp_rate": 0.3}


@pytest.fixture
def llm():
    tuned = LLM(build_tiny("llama"), CharTokenizer())
    tuned.profile = Profile("tiny", KNOBS, "tiny.json", {"created": "today"})
    return tuned


def test_a_spec_string_and_a_preset_object_take_the_same_defaults(llm):
    by_spec, source = llm.resolve("fastkv")
    by_object, same_source = llm.resolve(FastKV())
    assert by_spec.same_parts(by_object) and source == same_source and source.startswith("profile tiny")
    r = by_spec.reducer
    assert (r.tsp_layer, r.kernel_size, r.pooling, r.window_size, r.tsp_rate) == (2, 13, "avg", 16, 0.3)
    assert by_spec.policy.scorer.kernel_size == 13  # the preset's shared knobs reach its cache policy too


def test_knobs_that_are_set_win(llm):
    for method in ("fastkv(kernel_size=3, tsp_len=600)", FastKV(kernel_size=3, tsp_len=600)):
        chosen, _ = llm.resolve(method)
        assert chosen.reducer.kernel_size == 3 and chosen.reducer.tsp_layer == 2
        assert chosen.reducer.tsp_len == 600 and chosen.reducer.tsp_rate is None  # tsp_len excludes the rate


def test_a_combination_takes_the_profile_on_its_fastkv_side(llm):
    by_spec, _ = llm.resolve("fastkv+adakv(alpha=0.5)")
    by_object, _ = llm.resolve(FastKV() + AdaKV(alpha=0.5))
    assert by_spec.same_parts(by_object)
    assert by_spec.reducer.kernel_size == 13 and by_spec.policy.scorer.kernel_size == 7  # AdaKV's own


def test_other_methods_and_no_profile_are_untouched(llm):
    snap, source = llm.resolve(SnapKV())
    assert source == "" and format_spec(snap) == format_spec(SnapKV().bind(4))
    llm.profile = None
    plain, source = llm.resolve(FastKV())
    assert source == "paper" and plain.same_parts(FastKV().bind(4))


def test_an_amended_profile_says_when_and_its_record_holds_why():
    """A knob changed after calibration is said in `source` with the latest amendment's date; the shipped
    profiles' amendments name knobs the profile now has, what they were, why, and evidence that exists."""
    import json
    from pathlib import Path

    from fastkv.profiles import shipped_dir

    amended = {"created": "2026-11-30", "amended": [{"date": "2026-12-01"}, {"date": "2026-12-07"}]}
    said = Profile("tiny", KNOBS, "t.json", amended).source
    assert said == "profile tiny (calibrated 2026-11-30, amended 2026-12-07)"
    assert Profile("tiny", KNOBS, "t.json", {"created": "2026-11-30"}).source == "profile tiny (calibrated 2026-11-30)"
    root = Path(__file__).resolve().parents[1]
    for path in shipped_dir().glob("*.json"):
        record = json.loads(path.read_text())
        changes = record.get("amended", [])
        if changes:  # the latest amendment's knobs are the profile's knobs now
            assert all(record["knobs"][k] == v for k, v in changes[-1]["knobs"].items()), path.name
        for change in changes:
            assert set(change) >= {"date", "knobs", "was", "why", "evidence"}, path.name
            assert set(change["was"]) == set(change["knobs"]) and change["why"].strip()
            assert all((root / where).is_dir() for where in change["evidence"]), change["evidence"]
