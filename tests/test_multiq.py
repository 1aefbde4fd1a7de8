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
