"""What the CLI prints fits 80 columns without cutting a word: every `--help`, `fastkv models`, `fastkv methods`,
the demo's table and the eval results table. A word is cut where it is truncated ("…"), folded over two
lines, or lost (rich markup eating "[...]"); so each line must fit, and every word of what was meant to be
shown (help texts, cells, headers, keys) must appear whole in the output."""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from fastkv.cli import app, demo
from fastkv.cli import eval as eval_cli
from fastkv.cli import methods as methods_cli
from fastkv.cli import models as models_cli
from fastkv.results import GenerationResult, GenerationStats

WIDTH = 80
BOX = re.compile(r"[\u2500-\u257f]")  # box-drawing characters: table and panel borders


def words(text: str) -> set[str]:
    return set(BOX.sub(" ", text).split())


def check_fits(output: str, meant: list[str]) -> None:
    """Every line at most WIDTH columns, nothing truncated, and every word of `meant` whole in the output."""
    too_long = [line for line in output.splitlines() if len(line.rstrip()) > WIDTH]
    assert not too_long, "lines wider than 80 columns:\n" + "\n".join(too_long)
    assert "…" not in output, f"something was truncated:\n{output}"
    shown = words(output)
    lost = sorted({w for text in meant for w in BOX.sub(" ", text).split()} - shown)
    assert not lost, f"words cut or lost: {lost}\n{output}"


def narrow(monkeypatch) -> io.StringIO:
    """Point the CLI's consoles at an 80-column buffer."""
    buffer = io.StringIO()
    for module in (demo, eval_cli, models_cli):
        monkeypatch.setattr(module, "out", Console(file=buffer, width=WIDTH, color_system=None))
    return buffer


def commands(group, path: tuple[str, ...] = ()):
    """(path, command) of every command and subcommand, the groups included (typer's own click: a group is
    what has subcommands)."""
    yield path, group
    for name, command in getattr(group, "commands", {}).items():
        if hasattr(command, "commands"):
            yield from commands(command, (*path, name))
        else:
            yield (*path, name), command


HELP_COMMANDS = list(commands(typer.main.get_command(app)))


@pytest.mark.parametrize("path,command", HELP_COMMANDS, ids=[" ".join(p) or "fastkv" for p, _ in HELP_COMMANDS])
def test_every_help_fits_80_columns_with_every_word_whole(path, command):
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": str(WIDTH), "TERMINAL_WIDTH": str(WIDTH)})
    assert result.exit_code == 0, result.output
    meant = [p.help for p in command.params if getattr(p, "help", None) and not getattr(p, "hidden", False)]
    meant += [(command.help or "").split("\n\n")[0]]
    meant += [opt for p in command.params for opt in getattr(p, "opts", []) if not getattr(p, "hidden", False)]
    check_fits(result.output, meant)
    short = CliRunner().invoke(app, [*path, "-h"], env={"COLUMNS": str(WIDTH)})
    assert short.exit_code == 0 and short.output == result.output  # -h is --help everywhere


def test_models_list_fits_80_columns(monkeypatch):
    from fastkv.models import MODELS

    buffer = narrow(monkeypatch)
    models_cli.models()
    meant = [spec.description for spec in MODELS.values()] + [" ".join(spec.packages) for spec in MODELS.values()]
    check_fits(buffer.getvalue(), meant)
    assert "sha256" in buffer.getvalue()


def test_methods_list_fits_80_columns_and_says_whole_sentences(monkeypatch, capsys):
    from fastkv.methods import PARTS, PRESETS

    monkeypatch.setattr(methods_cli, "width", lambda: WIDTH)
    methods_cli.methods(model=None)
    output = capsys.readouterr().out
    meant = [methods_cli.summary(cls) for cls in [*PRESETS.values(), *(c for p in PARTS.values() for c in p.values())]]
    check_fits(output, meant)
    for text in meant:  # each description is a whole first paragraph: it ends a sentence
        assert text.rstrip().endswith((".", ")")), text


def test_eval_results_table_fits_80_columns_for_nine_methods(monkeypatch):
    from fastkv.eval import ruler

    buffer = narrow(monkeypatch)
    specs = ["fullkv", "snapkv(retain_rate=0.1)", "fastkv(kernel_size=17, pooling='avg', tsp_rate=0.2)"]
    specs += [f"h2o(retain_rate={r})" for r in (0.05, 0.1, 0.2, 0.3, 0.4, 0.5)]
    metrics = {}
    for i, spec in enumerate(specs):
        tasks = {t: float(10 * (i + j) % 100) for j, t in enumerate(ruler.TASKS)}
        metrics[f"qwen2.5-0.5b | 4096 float32 | {spec}"] = {
            "tasks": tasks, "average": 55.5, "agreement": 80.0, "first_token_kl": 0.1234, "prefill_speedup": 1.7
        }  # fmt: skip
    eval_cli.show(metrics, eval_cli.Path("runs/ruler-4k"))
    output = buffer.getvalue()
    check_fits(output, [*ruler.TASKS, "average", "first-token KL", "runs/ruler-4k"])
    for spec in ("fullkv", "snapkv", "fastkv(kernel_size=17, pooling='avg')", "h2o(retain_rate=0.5)"):
        assert spec in " ".join(output.split())  # the key names each run
    assert len(re.findall(r"^#\d+ ", output, flags=re.M)) == len(specs)


@dataclass
class FakeNeedle:
    answer: str = "71432"

    def is_correct(self, text: str) -> bool:
        return self.answer in text


def test_demo_table_fits_80_columns(monkeypatch):
    from fastkv import FastKV, FullKV, SnapKV
    from fastkv.eval.timing import DecodeTiming

    buffer = narrow(monkeypatch)
    monkeypatch.setattr(demo, "decode_weight_bytes", lambda model: 500 * 2**20)

    class Llm:
        model, precision = None, "bfloat16+int8"

    answered = []
    for i, method in enumerate([FullKV(), SnapKV(), FastKV()]):
        stats = GenerationStats(method=method.name, prompt_tokens=4090, new_tokens=9, prefill_seconds=12.5 - i,
                                decode_seconds=0.5, decode_steps=8, kv_entries_per_layer=[409] * 24,
                                tokens_per_layer=[4090] * 24, kv_bytes=(3 - i) * 2**20,
                                kv_bytes_full=48 * 2**20)  # fmt: skip
        text = "The pass key is 71432. It was hidden in the middle of a very long and repetitive haystack."
        result = GenerationResult(text=text, token_ids=[1] * 9, finish_reason="eos", method=method.name,
                                  first_logits=None, stats=stats)  # fmt: skip
        answered.append(demo.Answered(result, DecodeTiming(0.05 - 0.01 * i, 0.5 * i, 24), "profile x (shipped)"))
    demo.show(Llm(), "qwen2.5-0.5b", FakeNeedle(), [FullKV(), SnapKV(), FastKV()], answered)
    output = buffer.getvalue()
    check_fits(output, ["method found prefill s ms/token KV MiB KV share prefill x decode x", "fullkv snapkv fastkv"])
    assert "~" in output and "more than 20% of their median" in output  # a spread that is too wide is said
