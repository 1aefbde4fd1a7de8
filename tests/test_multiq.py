"""The multi-question evaluation (`fastkv eval multiq`): its turns extend each other token by token, and with
nothing compressed the three setups (per question, compressed once, question-agnostic) answer alike, so
what they differ by in the committed table is the compression alone."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

pytest.importorskip("wonderwords")
from fastkv import LLM  # noqa: E402
from fastkv.cli import app  # noqa: E402
from fastkv.eval import multiq  # noqa: E402


@pytest.fixture(scope="module")
def llm(tiny_dir):
    return LLM.load(str(tiny_dir), dtype="float32", progress=False)


def test_turns_extend_each_other_and_hold_their_facts(llm):
    s = multiq.session(llm.tokenizer, 600, seed=3, index=0, facts=3)
    assert len(s.turns) == 3 and all(b[: len(a)] == a for a, b in zip(s.turns, s.turns[1:], strict=False))
    text = llm.tokenizer.decode(s.turns[-1])
    assert all(code in text for code in s.codes) and 0 < s.document_tokens < len(s.turns[0])
    assert "What is the code" not in llm.tokenizer.decode(s.turns[0][: s.document_tokens])


@pytest.mark.parametrize("method", ["fullkv", "snapkv(retain_rate=1.0)"])
def test_without_compression_every_setup_answers_alike(llm, method):
    s = multiq.session(llm.tokenizer, 500, seed=4, index=1, facts=3)
    got = {setup: multiq.answers(llm, s, method, setup, 6) for setup in multiq.SETUPS}
    assert got["per question"] == got["compressed once"] == got["question-agnostic"]
    assert llm.prefix_cache is None  # the per-question store was this session's alone


def test_the_command_writes_a_resumable_table(tiny_dir, tmp_path):
    args = ["eval", "multiq", "--model", str(tiny_dir), "--methods", "snapkv(budget=300)", "--length", "500",
            "--docs", "2", "--questions", "2", "--new-tokens", "4", "--out", str(tmp_path)]  # fmt: skip
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * 4  # documents x questions x (fullkv + three setups)
    table = (tmp_path / "summary.md").read_text()
    assert "[per question]" in table and "[compressed once]" in table and "[question-agnostic]" in table
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and len((tmp_path / "predictions.jsonl").read_text().splitlines()) == len(rows)


def test_the_table_pairs_every_method_with_snapkv_in_its_setup():
    # Scores made up for 3 documents x 2 turns; the SnapKV column is the mean paired difference (macro over
    # turns), as computed here by hand.
    snap, fast = "snapkv(budget=4)", "fastkv(budget=4)"
    scores = {"fullkv": [1, 1, 1, 1, 0, 1], f"{snap} [per question]": [1, 0, 1, 1, 0, 0],
              f"{fast} [per question]": [0, 0, 1, 1, 1, 1]}  # fmt: skip
    rows = [{"method": label, "task": f"q{k % 2 + 1}", "index": k // 2, "score": float(score)}
            for label, values in scores.items() for k, score in enumerate(values)]  # fmt: skip
    table = multiq.summary(rows, [snap, fast]).splitlines()
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    column = header.index("vs SnapKV [95% CI]")
    cells = {line.split("|")[1].strip(): line.strip("|").split("|")[column].strip() for line in table[2:]}
    # q1: docs (1,1,0) vs (0,1,1) -> 0; q2: (0,1,0) vs (0,1,1) -> +1/3; macro: +16.7 points
    assert cells["fastkv(budget=4) [per question]"].startswith("+16.7 [")
    assert cells["snapkv(budget=4) [per question]"] == "-" and cells["fullkv"] == "-"


def test_the_command_runs_the_setups_asked_for(tiny_dir, tmp_path):
    args = ["eval", "multiq", "--model", str(tiny_dir), "--methods", "snapkv(budget=300)", "--length", "500",
            "--docs", "1", "--questions", "2", "--new-tokens", "2", "--out", str(tmp_path)]  # fmt: skip
    done = CliRunner().invoke(app, [*args, "--setups", "per question"])
    assert done.exit_code == 0, done.output
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert sorted({r["method"].rsplit(" [", 1)[-1] for r in rows}) == ["fullkv", "per question]"]
    assert json.loads((tmp_path / "run.json").read_text())["duration_s"] > 0  # it says how long it took
    bad = CliRunner().invoke(app, [*args, "--setups", "per question,twice"])
    assert bad.exit_code == 2 and "unknown setup(s) ['twice']" in bad.stderr
