"""The Pareto figure: method families across KV budgets, read from metrics.json."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fastkv.eval.pareto import pareto, points
from fastkv.methods import format_spec, parse
from fastkv.methods.spec import short_spec


def spec(text: str, rate: float) -> str:
    return format_spec(parse(text, defaults={"retain_rate": rate}).bind(24))


def entry(score: float, prefill_s: float | None, kv_bytes: float | None) -> dict:
    return {"average": score, "prefill_s": prefill_s, "kv_bytes": kv_bytes, "samples": 13}


@pytest.fixture
def metrics() -> dict:
    ctx = "qwen | 4096 float32"
    return {
        f"{ctx} | fullkv": entry(70.0, 20.0, 48 * 2**20),
        f"{ctx} | {spec('snapkv', 0.05)}": entry(30.0, 20.5, 2.4 * 2**20),
        f"{ctx} | {spec('snapkv', 0.5)}": entry(60.0, 20.4, 24 * 2**20),
        f"{ctx} | {spec('fastkv(kernel_size=17, pooling=avg)', 0.1)}": entry(50.0, 11.0, 4.8 * 2**20),
        f"{ctx} | {spec('fastkv(kernel_size=17, pooling=avg, tsp_layer=15)', 0.1)}": entry(52.0, 13.0, None),
    }


def test_families_drop_the_budget_and_default_knobs(metrics):
    (context, chosen), *others = points(metrics).items()
    assert context == "qwen | 4096 float32" and not others
    by = {(p.family, p.budget): p for p in chosen}
    assert by[("snapkv", "retain_rate=0.05")].kv_mib == pytest.approx(2.4)
    assert by[("snapkv", "retain_rate=0.5")].score == 60.0
    assert by[("fullkv", "")].prefill_s == 20.0
    # The two FastKV families differ only in an auto knob (tsp_layer): both keep it to stay apart.
    assert ("fastkv(kernel_size=17, pooling='avg', tsp_layer=11)", "retain_rate=0.1") in by
    assert by[("fastkv(kernel_size=17, pooling='avg', tsp_layer=15)", "retain_rate=0.1")].kv_mib is None
    assert short_spec(spec("fastkv(kernel_size=17, pooling=avg)", 0.1)) == "fastkv(kernel_size=17, pooling='avg')"
    assert short_spec(spec("snapkv", 0.05)) == "snapkv(retain_rate=0.05)"  # not the default budget: shown
    assert short_spec(spec("fastkv(tsp_rate=0.3)+adakv", 0.1)) == "fastkv(tsp_rate=0.3)+adakv"


def test_figure_and_cli(metrics, tmp_path):
    from fastkv.cli import app

    files = pareto(metrics, tmp_path)
    assert [f.name for f in files] == ["pareto.png"] and files[0].read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    (tmp_path / "pareto.png").unlink()
    result = CliRunner().invoke(app, ["eval", "pareto", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "pareto.png").exists()
    missing = CliRunner().invoke(app, ["eval", "pareto", str(tmp_path / "nothing")])
    # the path is printed whole, on one line, for copying (console.fail does not wrap it)
    assert missing.exit_code == 2 and f"{tmp_path / 'nothing' / 'metrics.json'} not found" in missing.stderr
