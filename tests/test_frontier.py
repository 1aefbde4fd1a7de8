"""The speed/fidelity frontier and `max_loss` (`fastkv.frontier`), against brute force on made-up settings."""

from __future__ import annotations

import json
import random
import warnings

import pytest
from typer.testing import CliRunner

from fastkv import LLM
from fastkv.cli import app
from fastkv.frontier import Frontier, Setting, from_metrics, split_max_loss
from fastkv.methods import format_spec

# Specs the tiny models (4 layers) can run, each a complete fastkv setting.
SPECS = [f"fastkv(tsp_layer={layer}, tsp_rate={rate}, retain_rate=0.5)" for layer in (1, 2) for rate in (0.3, 0.6)]


def made_up(seed: int, n: int = 30) -> Frontier:
    rng = random.Random(seed)
    settings = []
    for k in range(n):
        preset = rng.choice(("fastkv", "fastkv", "snapkv"))
        loss = rng.uniform(0, 30)
        settings.append(Setting(f"{preset}(retain_rate=0.{k + 10})", 70 - loss, loss, loss - 3, loss + 3,
                                rng.uniform(0.9, 2.5), rng.uniform(0.05, 0.6)))  # fmt: skip
    return Frontier("m", "a made-up suite", "no machine", "2026-12-07", tuple(settings))


@pytest.mark.parametrize("seed", range(20))
def test_pick_is_the_fastest_fastkv_setting_within_the_bound(seed):
    frontier = made_up(seed)
    for bound in (0.0, 0.05, 0.1, 0.2, 0.3):
        within = [s for s in frontier.settings if s.preset == "fastkv" and s.loss <= 100 * bound]
        if within:
            top = max(s.prefill_speedup for s in within)
            fast = [s for s in within if s.prefill_speedup >= 0.95 * top]  # one timing each: 5% is a tie
            best = min(fast, key=lambda s: s.loss)
            assert frontier.pick(bound) == best
        else:
            closest = min((s for s in frontier.settings if s.preset == "fastkv"), key=lambda s: s.loss)
            with pytest.raises(ValueError, match="the closest is") as refused:
                frontier.pick(bound)
            enough = float(str(refused.value).split("max_loss >= ")[1].split(",")[0])
            assert closest.spec in str(refused.value) and frontier.pick(enough).loss <= 100 * enough  # it suffices


@pytest.mark.parametrize("seed", range(20))
def test_pareto_holds_exactly_the_settings_nothing_beats(seed):
    frontier = made_up(seed)

    def beaten(s: Setting) -> bool:
        return any(
            o.prefill_speedup >= s.prefill_speedup and o.loss <= s.loss
            and (o.prefill_speedup > s.prefill_speedup or o.loss < s.loss)
            for o in frontier.settings
        )  # fmt: skip

    assert set(frontier.pareto()) == {s for s in frontier.settings if not beaten(s)}


def test_a_bound_outside_0_1_is_refused():
    with pytest.raises(ValueError, match="max_loss must be a share of the score in \\[0, 1\\]"):
        made_up(0).pick(2)


def test_the_spec_holds_max_loss_alone():
    assert split_max_loss("fastkv(max_loss=0.02)") == ("fastkv", 0.02)
    assert split_max_loss("fastkv(max_loss = 0.1)") == ("fastkv", 0.1)
    assert split_max_loss("fastkv(tsp_rate=0.2)") == ("fastkv(tsp_rate=0.2)", None)
    for bad, message in [
        ("fastkv(tsp_rate=0.2, max_loss=0.02)", "give it alone"),
        ("fastkv(max_loss=0.02, retain_rate=0.1)", "give it alone"),
        ("snapkv(max_loss=0.02)", "give it alone"),
        ("fastkv(max_loss=0.02)+adakv", "does not combine"),
        ("fastkv(max_loss=lots)", "must be a number"),
    ]:
        with pytest.raises(ValueError, match=message):
            split_max_loss(bad)


def metrics_of(scores: dict[str, tuple[float, float, float]]) -> dict:
    """metrics.json as an evaluation writes it: {label: {average, vs_fullkv, prefill_speedup, kv_ratio}}."""
    out = {"m | 4096 float32 | fullkv": {"average": 70.0, "samples": 10}}
    for spec, (average, speedup, kv) in scores.items():
        diff = average - 70.0
        out[f"m | 4096 float32 | {spec}"] = {"average": average, "samples": 10, "prefill_speedup": speedup,
                                             "kv_ratio": kv, "vs_fullkv": {"diff": diff, "low": diff - 2,
                                                                           "high": diff + 2}}  # fmt: skip
    return out


def test_a_frontier_from_two_suites_averages_them_over_the_settings_both_ran():
    one = metrics_of({SPECS[0]: (60.0, 1.8, 0.2), SPECS[1]: (66.0, 1.5, 0.3), SPECS[2]: (50.0, 2.0, 0.1)})
    two = metrics_of({SPECS[0]: (64.0, 1.6, 0.2), SPECS[1]: (70.0, 1.5, 0.3)})
    built = from_metrics("m", [one, two], "two suites", "here", "today")
    by_spec = {s.spec: s for s in built.settings}
    assert set(by_spec) == {SPECS[0], SPECS[1], "fullkv"}  # SPECS[2] ran in one suite only
    assert (by_spec["fullkv"].loss, by_spec["fullkv"].prefill_speedup, by_spec["fullkv"].score) == (0, 1, 70)
    assert by_spec[SPECS[0]].loss == pytest.approx(8.0) and by_spec[SPECS[0]].prefill_speedup == pytest.approx(1.7)
    assert by_spec[SPECS[1]].loss == pytest.approx(2.0)
    assert (by_spec[SPECS[1]].loss_low, by_spec[SPECS[1]].loss_high) == (pytest.approx(0.0), pytest.approx(4.0))
    with pytest.raises(ValueError, match="has no fullkv run of m"):
        from_metrics("m", [{k: v for k, v in one.items() if not k.endswith("fullkv")}], "s", "here", "today")


@pytest.fixture(scope="module")
def llm(tiny_dir):
    return LLM.load(str(tiny_dir), dtype="float32", progress=False)


def test_max_loss_runs_the_picked_setting_and_says_so(llm):
    settings = (Setting(SPECS[0], 60, 10.0, 8, 12, 2.0, 0.2), Setting(SPECS[1], 68, 2.0, 0, 4, 1.6, 0.3),
                Setting(SPECS[3], 69, 1.0, -1, 3, 1.2, 0.5))  # fmt: skip
    llm.frontier = Frontier("tiny", "a made-up suite", "here", "today", settings)
    try:
        chosen, source = llm.resolve("fastkv(max_loss=0.02)")
        assert format_spec(chosen) == format_spec(llm.resolve(SPECS[1])[0])  # the fastest within 2 points
        assert "max_loss=0.02" in source and "loss 2.0 points" in source and "a made-up suite" in source
        result = llm.generate(list(range(10, 90)), "fastkv(max_loss=0.02)", max_tokens=3)
        assert result.stats.defaults == source and result.method == format_spec(chosen)
        with pytest.raises(ValueError, match=r"loses at most 0\.5 points .* the closest is fastkv\(tsp_layer=2"):
            llm.resolve("fastkv(max_loss=0.005)")
        with pytest.raises(ValueError, match="drop \\['tsp_rate'\\]"):
            llm.resolve("fastkv(max_loss=0.02)", tsp_rate=0.3)
    finally:
        llm.frontier = None


def test_a_model_without_a_frontier_says_so_and_runs_the_papers_fastkv(llm):
    assert llm.frontier is None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chosen, source = llm.resolve("fastkv(max_loss=0.02)")
    assert any("has no measured frontier" in str(w.message) for w in caught)
    assert source.startswith("paper (") and "max_loss=0.02 not applied" in source
    llm_profile, llm.profile = llm.profile, None
    try:
        assert format_spec(chosen) == format_spec(llm.resolve("fastkv")[0])
    finally:
        llm.profile = llm_profile


def test_the_command_builds_table_plot_and_installs(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTKV_CACHE", str(tmp_path / "cache"))
    one, two = tmp_path / "ruler", tmp_path / "multiq"
    for folder, scores in ((one, {SPECS[0]: (60.0, 1.8, 0.2), SPECS[1]: (66.0, 1.5, 0.3)}),
                           (two, {SPECS[0]: (62.0, 1.7, 0.2), SPECS[1]: (69.0, 1.5, 0.3)})):  # fmt: skip
        folder.mkdir()
        (folder / "metrics.json").write_text(json.dumps(metrics_of(scores)))
    args = ["eval", "frontier", str(one), str(two), "--model", "m", "--out", str(tmp_path / "f"),
            "--suite", "two made-up suites", "--machine", "nowhere", "--install"]  # fmt: skip
    made = CliRunner().invoke(app, args)
    assert made.exit_code == 0, made.output
    assert (tmp_path / "f" / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    table = (tmp_path / "f" / "frontier.md").read_text()
    assert "| yes |" in table and "two made-up suites" in table
    from fastkv.frontier import find

    installed = find("m")
    assert installed is not None and installed == Frontier.load(tmp_path / "f" / "frontier.json")
    assert installed.pick(0.05).spec == SPECS[1]  # loses 2.5 points, the faster one 9
    missing = CliRunner().invoke(app, [*args[:2], str(tmp_path / "nothing"), *args[4:]])
    assert missing.exit_code == 2 and f"{tmp_path / 'nothing' / 'metrics.json'} not found" in missing.stderr


def test_generate_refuses_a_bad_bound_before_loading(tiny_dir):
    bad = CliRunner().invoke(app, ["generate", "--model", str(tiny_dir), "-q", "hi", "--method", "fastkv(max_loss=3)"])
    assert bad.exit_code == 2 and "max_loss must be a share of the score in [0, 1]" in bad.stderr


def test_every_shipped_frontier_is_a_registered_models_and_can_be_picked_from():
    """What ships: a frontier per model we measured, each with FullKV as its reference (loss 0) and FastKV
    settings whose specs parse, and `max_loss` picks a FastKV setting from it at a loose bound."""
    from fastkv.methods import parse
    from fastkv.models import MODELS
    from fastkv.profiles import shipped_dir

    shipped = sorted(shipped_dir().glob("*.frontier.json"))
    assert {p.name.removesuffix(".frontier.json") for p in shipped} >= {"qwen2.5-0.5b", "qwen2.5-1.5b"}
    for path in shipped:
        frontier = Frontier.load(path)
        assert frontier.model in MODELS and frontier.model == path.name.removesuffix(".frontier.json")
        full = [s for s in frontier.settings if s.spec == "fullkv"]
        assert len(full) == 1 and full[0].loss == 0 and full[0].prefill_speedup == 1
        for s in frontier.settings:
            parse(s.spec)  # every spec still parses (a renamed knob would break max_loss)
        picked = frontier.pick(1.0)
        assert picked.spec.startswith("fastkv(") and picked in frontier.settings
