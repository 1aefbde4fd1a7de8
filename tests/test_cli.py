"""The CLI's method handling, without loading a model: knobs reach the method or are refused by name."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from fastkv.cli import app
from fastkv.methods import METHODS

runner = CliRunner()


def test_methods_lists_every_method_with_what_it_reduces():
    result = runner.invoke(app, ["methods"], env={"COLUMNS": "250"})
    assert result.exit_code == 0
    for name, cls in METHODS.items():
        assert name in result.output and cls.reduces in result.output
    assert "tsp_layer=layers//2-1" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "streamingllm", "--tsp-rate", "0.2"], "has no knob(s) ['tsp_rate']"),
        (["--method", "streamingllm", "--sink", "-3"], "StreamingLLM.sink"),
        (["--method", "adakv", "--alpha", "2"], "AdaKV.alpha"),
        (["--method", "pyramidinfer", "--decay", "0"], "PyramidInfer.decay"),
        (["--method", "h2o", "--budget", "4"], "H2O.window_size (8) is larger than budget (4)"),
        (["--method", "nosuch"], "unknown method 'nosuch'"),
        # a valid knob passes the method check and fails later, on the model
        (["--method", "gemfilter", "--filter-layer", "3", "--model", "no-such-model"], "unknown model"),
    ],
)
def test_generate_checks_methods_and_knobs(args, message):
    result = runner.invoke(app, ["generate", *args, "-q", "hello"])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
