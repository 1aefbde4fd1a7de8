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


def test_stdout_holds_only_answers_on_a_first_and_a_warm_run(tmp_path, monkeypatch):
    """The first run (--batch) assembles and converts the model: its stdout is still JSONL alone. A warm
    `generate` prints the answer alone (the stats line on stderr), and a warm --batch the same rows."""
    prompts = tmp_path / "in.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Count to {i}.", "id": f"p{i}"}) + "\n" for i in range(3)))
    batch = ["generate", "-m", "smollm2-135m", "--method", "fullkv", "--batch", str(prompts), "-n", "4"]
    cache = tmp_path / "cache"
    first = fastkv(cache, *batch)
    assert "assembling smollm2-135m" in first.stderr  # the first run did assemble it, and said so on stderr
    args = ["generate", "-m", "smollm2-135m", "--method", "fullkv", "-q", QUESTION, "-n", "6"]
    warm = fastkv(cache, *args)
    assert warm.returncode == 0, warm.stderr
    assert "assembling" not in warm.stderr and "finish:" in warm.stderr  # the stats line
    answers = []
    for run in (first, fastkv(cache, *batch)):
        assert run.returncode == 0, run.stderr
        rows = [json.loads(line) for line in run.stdout.splitlines()]  # every line is JSON
        assert [r["id"] for r in rows] == ["p0", "p1", "p2"] and all(r["finish_reason"] for r in rows)
        answers.append([(r["text"], r["new_tokens"]) for r in rows])  # timings differ between runs
    assert answers[0] == answers[1]
    from fastkv import LLM

    monkeypatch.setenv("FASTKV_CACHE", str(cache))
    answer = LLM.load("smollm2-135m", progress=False).generate(QUESTION, "fullkv", max_tokens=6, chat=True).text
    assert answer.strip() and warm.stdout == answer + "\n"
