"""RULER generation (determinism, needle depths, lengths), NIAH prompts and heatmaps, and an end-to-end
evaluation of two samples on a tiny model through the runner and the CLI.

These need qwen2.5-0.5b's tokenizer and the data packages installed by scripts/setup.sh; they skip when
those are missing, unless FASTKV_REQUIRE_MODELS=1 (CI), where they fail.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fastkv.eval import niah, ruler
from fastkv.eval.data import DataNotInstalledError, essay_words, sentences
from fastkv.methods import format_spec, parse
from fastkv.models import MODELS, load_tokenizer, part_paths

try:
    essay_words()
    missing = None if part_paths(MODELS["qwen2.5-0.5b"]) else "qwen2.5-0.5b is not installed"
except DataNotInstalledError as e:
    missing = str(e)
if missing:
    if os.environ.get("FASTKV_REQUIRE_MODELS") == "1":
        raise RuntimeError(missing)
    pytest.skip(missing, allow_module_level=True)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("qwen2.5-0.5b", progress=False)


@pytest.mark.parametrize("task", ruler.TASKS)
def test_samples_are_reproducible_and_fit_the_length(tokenizer, task):
    a = ruler.generate(task, tokenizer, 4096, seed=7, index=1)
    b = ruler.generate(task, tokenizer, 4096, seed=7, index=1)
    assert json.dumps(a.to_dict()) == json.dumps(b.to_dict())  # byte-identical
    assert ruler.generate(task, tokenizer, 4096, seed=8, index=1).input != a.input
    prompt = ruler.render(tokenizer, a.input, a.answer_prefix, chat=True)
    measured = len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) + a.max_tokens
    assert measured == a.length
    assert 0.98 * 4096 <= a.length <= 4096
    assert a.outputs and all(isinstance(o, str) and o for o in a.outputs)


@pytest.mark.parametrize("task", [t for t in ruler.TASKS if t.startswith("niah")])
def test_needles_sit_at_their_depths(tokenizer, task):
    sample = ruler.generate(task, tokenizer, 4096, seed=3, index=0)
    start = sample.input.index("\n") + 1
    end = sample.input.rindex("\n")
    context = sample.input[start:end]
    essay = ruler.NIAH[task][0] == "essay"
    texts = [n["needle"] for n in sample.needles]
    for needle in sample.needles:
        assert context.count(needle["needle"]) == 1
        prefix = context[: context.index(needle["needle"])]
        earlier = sum(t in prefix for t in texts)  # needles placed before this one
        # haystack units (essay sentences, or lines) before the needle, as the generator intended
        units = len(sentences(prefix)) if essay else prefix.count("\n")
        assert units - earlier == needle["before"], (needle, units, earlier)
        assert abs(needle["before"] / needle["units"] - needle["depth"]) <= 1 / needle["units"] + 1e-9
    for answer in sample.outputs:  # every answer is stated by a needle
        assert any(answer in n["needle"] for n in sample.needles)


def test_unknown_task_and_short_length_raise(tokenizer):
    with pytest.raises(ValueError, match="unknown RULER task"):
        ruler.generate("niah_single_9", tokenizer, 4096)
    with pytest.raises(ValueError, match="too short"):
        ruler.generate("niah_single_1", tokenizer, 150)


def test_niah_prompt_and_heatmaps(tokenizer, tmp_path):
    prompt = niah.prompt(tokenizer, 1024, 0.5)
    assert niah.NEEDLE in prompt
    assert len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) + niah.MAX_NEW_TOKENS <= 1024
    # 11 of the needle's 19 distinct words
    assert niah.score("Eat a sandwich and sit in Dolores Park on a sunny day.") == pytest.approx(11 / 19)
    assert niah.score(niah.NEEDLE.upper()) == 1.0
    assert niah.score("I do not know.") < 0.2
    rows = [
        {"method": m, "length": n, "depth": d, "score": s}
        for m, s in (("fullkv", 1.0), ("snapkv", 0.5))
        for n in (1024, 2048)
        for d in (0.0, 0.5, 1.0)
    ]
    files = niah.heatmaps(rows, tmp_path)
    assert [f.name for f in files] == ["niah_fullkv.png", "niah_snapkv.png", "niah_methods.png"]
    assert all(f.read_bytes()[:4] == b"\x89PNG" for f in files)


def test_end_to_end_ruler_eval_resumes(tiny_dir, tmp_path):
    from fastkv.cli import app

    out = tmp_path / "run"
    args = [
        "eval",
        "ruler",
        "--model",
        str(tiny_dir),
        "--methods",
        "fullkv,snapkv,fastkv(kernel_size=13)",
        "--length",
        "1024",
        "--samples",
        "2",
        "--tasks",
        "niah_single_1,qa_1",
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * 3  # tasks x samples x methods
    # results are labelled by canonical spec, every knob resolved for the 4-layer model
    specs = [
        format_spec(parse(m, defaults={"retain_rate": 0.1}).bind(4))
        for m in ("fullkv", "snapkv", "fastkv(kernel_size=13)")
    ]
    assert specs[2].startswith("fastkv(window_size=8, kernel_size=13, pooling='max', tsp_layer=1, tsp_rate=0.2")
    assert {r["method"] for r in rows} == set(specs)
    for r in rows:
        assert 0 <= r["score"] <= 1 and r["prompt_tokens"] <= 1024
        assert r["settings"] == {"length": 1024, "chat": True, "dtype": "float32", "seed": 42}
        if r["method"] != "fullkv":
            assert r["first_token_kl"] >= 0 and isinstance(r["agrees_with_fullkv"], bool)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {f"{tiny_dir} | 1024 float32 | {m}" for m in specs}
    assert "agreement" in metrics[f"{tiny_dir} | 1024 float32 | {specs[1]}"]
    text = (out / "summary.md").read_text()
    compact, per_task = (part.split("\n\n", 1)[1].strip().splitlines() for part in text.split("## ")[1:])
    assert compact[0].startswith("| setting | method | average | vs SnapKV [95% CI] |")
    assert [line.split(" | ")[1] for line in compact[2:]] == ["fastkv(kernel_size=13)", "fullkv", "snapkv"]
    assert per_task[0].startswith("| model | setting | method | niah_single_1 | qa_1 | average |")
    for table in (compact, per_task):
        assert len(table) == 2 + 3 and all(line.count("|") == table[0].count("|") for line in table)
    assert (out / "summary.csv").exists()
    record = json.loads((out / "run.json").read_text())
    assert record["versions"]["torch"] and record["machine"]["cpus"] and record["duration_s"] > 0
    assert record["config"]["samples"] == 2
    # The shared run timed each method's prefill alone, once, on its first item (niah_single_1 #0).
    timings = json.loads((out / "timings.json").read_text())
    assert set(timings) == set(metrics)
    for t in timings.values():
        assert t["prefill_s"] > 0 and t["item"] == "niah_single_1/0" and t["prompt_tokens"] <= 1024
    for label, m in metrics.items():
        assert m["prefill_s"] == timings[label]["prefill_s"]
        full = timings[label.rsplit(" | ", 1)[0] + " | fullkv"]["prefill_s"]
        assert m["prefill_speedup"] == pytest.approx(full / m["prefill_s"])
    assert per_task[0].endswith("| prefill s | prefill x FullKV |") and "shared" not in text
    # A second run finds everything done and adds nothing, not even timings.
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert len((out / "predictions.jsonl").read_text().splitlines()) == len(rows)
    assert json.loads((out / "timings.json").read_text()) == timings
    # Another KV budget is another method: computed anew and labelled apart; FullKV's results are reused.
    other = CliRunner().invoke(app, [*args, "--retain-rate", "0.2"])
    assert other.exit_code == 0, other.output
    more = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()][len(rows) :]
    assert len(more) == 2 * 2 * 2
    assert all("retain_rate=0.2" in r["method"] for r in more)
    assert len(json.loads((out / "metrics.json").read_text())) == 5
    assert len(json.loads((out / "timings.json").read_text())) == 5  # the new budgets timed beside FullKV
    # Every method alone (its own prefill) answers exactly as from the shared prefill.
    alone = CliRunner().invoke(app, [*args[:-1], str(tmp_path / "alone"), "--separate"])
    assert alone.exit_code == 0, alone.output
    separate = [json.loads(line) for line in (tmp_path / "alone" / "predictions.jsonl").read_text().splitlines()]

    def answers(rs):
        return sorted((r["method"], r["task"], r["index"], r["prediction"], r.get("first_token_kl")) for r in rs)

    assert answers(separate) == answers(rows)
    assert all(r["prefill_shared_by"] == 1 for r in separate) and all(r["prefill_shared_by"] == 3 for r in rows)
    assert not (tmp_path / "alone" / "timings.json").exists()  # separate rows time themselves


def test_summaries_take_prefill_times_from_unshared_rows_else_timings():
    from fastkv.eval.report import summarize

    def row(method, index, shared_by, seconds):
        return {
            "model": "m", "setting": "4096", "settings": {"dtype": "float32"}, "method": method, "task": "t",
            "index": index, "score": 1.0, "kv_ratio": 1.0, "prefill_s": seconds, "prefill_shared_by": shared_by,
        }  # fmt: skip

    rows = [row("fullkv", 0, 2, 9.0), row("snapkv", 0, 2, 9.0), row("fullkv", 1, 1, 10.0), row("fullkv", 2, 1, 12.0)]
    timings = {"m | 4096 float32 | fullkv": {"prefill_s": 50.0}, "m | 4096 float32 | snapkv": {"prefill_s": 4.4}}
    metrics = summarize(rows, timings)
    assert metrics["m | 4096 float32 | fullkv"]["prefill_s"] == 11.0  # its own unshared rows win
    assert metrics["m | 4096 float32 | fullkv"]["prefill_speedup"] == 1.0
    assert metrics["m | 4096 float32 | snapkv"]["prefill_s"] == 4.4
    assert metrics["m | 4096 float32 | snapkv"]["prefill_speedup"] == pytest.approx(2.5)
    assert "prefill_speedup" not in summarize(rows[1:2])["m | 4096 float32 | snapkv"]  # no time, no ratio


def test_eval_refuses_bad_numbers_and_a_missing_extra(tiny_dir, monkeypatch):
    from fastkv.cli import app

    bad = CliRunner().invoke(app, ["eval", "ruler", "--model", str(tiny_dir), "--length", "4k"])
    assert bad.exit_code == 2 and "--length takes comma-separated ints, got '4k'" in bad.output
    bad = CliRunner().invoke(app, ["eval", "niah", "--model", str(tiny_dir), "--depths", "half"])
    assert bad.exit_code == 2 and "--depths takes comma-separated floats" in bad.output
    bad = CliRunner().invoke(app, ["eval", "ruler", "--model", str(tiny_dir), "--methods", "fastkv(kernel_size=4)"])
    assert bad.exit_code == 2 and "kernel_size must be odd" in bad.output

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "rapidfuzz" else real(name, *a))
    bad = CliRunner().invoke(app, ["eval", "ruler", "--model", str(tiny_dir)])
    assert bad.exit_code == 2 and "pip install 'fastkv[eval]' (missing: rapidfuzz)" in " ".join(bad.output.split())


def test_eval_rejects_unknown_methods_and_tasks(tiny_dir):
    from fastkv.cli import app

    bad = CliRunner().invoke(app, ["eval", "ruler", "--model", str(tiny_dir), "--methods", "nosuch"])
    assert bad.exit_code == 2 and "unknown method" in bad.output
    bad = CliRunner().invoke(app, ["eval", "ruler", "--model", str(tiny_dir), "--tasks", "nosuch"])
    assert bad.exit_code == 2 and "unknown RULER task" in bad.output


def test_end_to_end_niah_writes_heatmaps(tiny_dir, tmp_path):
    from fastkv.cli import app

    out = tmp_path / "niah"
    args = [
        "eval",
        "niah",
        "--model",
        str(tiny_dir),
        "--methods",
        "fullkv,fastkv",
        "--lengths",
        "512,1024",
        "--depths",
        "0,1",
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 2 * 2 * 2
    fastkv = format_spec(parse("fastkv", knobs={"retain_rate": 0.1}).bind(4))
    for name in (
        "niah_fullkv.png",
        f"niah_fastkv-{hashlib.sha1(fastkv.encode()).hexdigest()[:8]}.png",
        "niah_methods.png",
    ):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_eval_runs_the_models_profile_unless_told_not_to(tiny_dir, tmp_path, monkeypatch):
    """`fastkv eval` measures what `generate` and `serve` run: the profile fills fastkv's unset knobs (and
    says so on stderr); --no-profile gives the paper's FastKV; a knob set in the spec still wins."""
    from fastkv.cli import app
    from fastkv.profiles import user_path

    monkeypatch.setenv("FASTKV_CACHE", str(tmp_path / "cache"))
    knobs = {"tsp_layer": 2, "kernel_size": 13, "pooling": "avg", "window_size": 8, "tsp_rate": 0.3}
    path = user_path(str(tiny_dir))
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"model": str(tiny_dir), "knobs": knobs, "created": "2026-12-07"}))
    args = ["eval", "ruler", "--model", str(tiny_dir), "--tasks", "niah_single_1", "--samples", "1"]
    args += ["--length", "1024", "--no-time-prefill", "--methods", "fastkv,fastkv(pooling=max)"]

    def ran(out: Path, *extra: str) -> tuple[list[str], str]:
        result = CliRunner().invoke(app, [*args, "--out", str(out), *extra])
        assert result.exit_code == 0, result.output
        rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        return sorted({r["method"] for r in rows}), " ".join(result.stderr.split())  # as read, not as wrapped

    methods, said = ran(tmp_path / "profiled")
    profiled = "fastkv(window_size=8, kernel_size=13, pooling='avg', tsp_layer=2, tsp_rate=0.3"
    assert methods[0].startswith(profiled), methods
    assert methods[1].startswith(profiled.replace("'avg'", "'max'")), methods
    assert "profile" in said and "user" in said and all(m in said for m in methods[:2])
    paper, said = ran(tmp_path / "paper", "--no-profile")
    assert paper[0].startswith("fastkv(window_size=8, kernel_size=7, pooling='max', tsp_layer=1, tsp_rate=0.2")
    assert "the paper (--no-profile)" in said
    # An explicit --tsp-rate is the evaluation's choice: it beats the profile's.
    rated, _ = ran(tmp_path / "rated", "--tsp-rate", "0.25")
    assert all("tsp_rate=0.25" in m and "kernel_size=13" in m for m in rated[:2])


def test_run_record_names_the_program_not_its_installed_path(monkeypatch):
    from fastkv.eval.provenance import command_line

    argv = ["/home/someone/repo/.venv/bin/fastkv", "eval", "ruler", "--methods", "fastkv(kernel_size=17, pooling=avg)"]
    monkeypatch.setattr("sys.argv", argv)
    line = command_line()
    assert line == "fastkv eval ruler --methods 'fastkv(kernel_size=17, pooling=avg)'"
    assert "/home/someone" not in line
