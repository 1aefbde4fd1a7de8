"""The CLI's method handling, without loading a model: specs and knob options reach the method, or are
refused by name with exit code 2."""

from __future__ import annotations

import dataclasses

import pytest
from typer.testing import CliRunner

from fastkv.cli import app
from fastkv.cli.knobs import knob_types
from fastkv.cli.methods import DECODE_KNOBS
from fastkv.methods import PRESETS

runner = CliRunner()


def knob_values(output: str, preset: str) -> dict[str, str]:
    """knob -> shown value in a preset's block of `fastkv methods`."""
    block = output.split(f"\n{preset}: ", 1)[1].split("\n\n", 1)[0]
    found = {}
    for line in block.splitlines():
        if line.startswith("    ") and " = " in line and not line.startswith("     "):
            name, rest = line.strip().split(" = ", 1)
            found[name.strip()] = rest.split("  ")[0].strip()
    return found


@pytest.mark.parametrize("columns", ["80", "250"])
def test_methods_lists_presets_parts_and_knobs(columns):
    result = runner.invoke(app, ["methods"], env={"COLUMNS": columns})
    assert result.exit_code == 0
    for name, cls in PRESETS.items():
        assert f"\n{name}: reduces {cls.prototype.reduces}" in "\n" + result.output
        # (every method's decode-time budget is listed once, in its own section)
        assert set(knob_values(result.output, name)) == {f.name for f in dataclasses.fields(cls)} - set(DECODE_KNOBS)
    decoding = result.output.split("DECODE-TIME BUDGET", 1)[1].split("\nPARTS", 1)[0]
    assert [line.split()[0] for line in decoding.splitlines() if " = " in line] == list(DECODE_KNOBS)
    for part in ("tsp", "filter", "schedule", "sinkrecent", "topk", "accumulated", "adaptive", "pyramid"):
        assert f" {part}:" in result.output
    # every knob with the value it takes when it is not set
    fastkv = knob_values(result.output, "fastkv")
    assert fastkv["tsp_rate"] == "0.2" and fastkv["retain_rate"] == "0.1" and fastkv["min_budget"] == "256"
    assert fastkv["tsp_layer"] == "auto (layers//2-1)" and fastkv["budget"] == "-"
    assert knob_values(result.output, "gemfilter")["retain_rate"] == "0.1"
    # nothing is cut in the middle of a word, and at 80 columns no line is wider
    assert max(len(line) for line in result.output.splitlines()) <= int(columns)
    words = {w for line in result.output.splitlines() for w in line.split()}
    for knob in knob_types():
        assert knob in words or f"{knob}:" in words


def test_every_knob_is_an_option_of_generate():
    result = runner.invoke(app, ["generate", "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0
    for name in knob_types():
        assert f"--{name.replace('_', '-')}" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "streamingllm", "--tsp-rate", "0.2"], "has no knob 'tsp_rate'"),
        (["--method", "streamingllm(tsp_rate=0.2)"], "has no knob(s) ['tsp_rate']"),
        (["--method", "streamingllm", "--sink", "-3"], "SinkRecent.sink"),
        (["--method", "adakv", "--alpha", "2"], "Adaptive.alpha"),
        (["--method", "adakv(alpha=2)"], "Adaptive.alpha"),
        (["--method", "pyramidinfer", "--decay", "0"], "LayerSchedule.decay"),
        (["--method", "h2o", "--budget", "4"], "budget=4 is smaller than the 8 entries it always keeps"),
        (["--method", "snapkv(budget=64)", "--budget", "32"], "knob budget is given twice"),
        (["--method", "nosuch"], "unknown method 'nosuch'"),
        (["--method", "fastkv(kernel_size=13"], "bad method spec"),
        (["--method", "fastkv(13)"], "give knobs by name"),
        (["--method", "fastkv+adakv+h2o"], "two parts at most"),
        (["--method", "fastkv(retain_rate=0.2)+adakv"], "has no knob(s) ['retain_rate']"),
        (["--method", "gemfilter+snapkv"], "give the reducer window_size=8 or more"),
        (["--method", "topk+tsp"], "'topk' is a policy"),
        (["--method", "topk(scorer=nosuch)"], "unknown scorer 'nosuch'"),
        # a valid spec passes the method check and fails later, on the model
        (["--method", "gemfilter(filter_layer=3)", "--model", "no-such-model"], "unknown model"),
        (["--method", "fastkv+adakv", "--tsp-rate", "0.3", "--model", "no-such-model"], "unknown model"),
    ],
)
def test_generate_checks_methods_and_knobs(args, message):
    result = runner.invoke(app, ["generate", *args, "-q", "hello"])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


@pytest.mark.parametrize("device", ["cuda", "cuda:3", "mps", "tpu"])
def test_a_device_that_is_not_there_is_refused(device):
    import torch

    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 3:
        pytest.skip("this machine has that device")
    result = runner.invoke(app, ["generate", "--method", "fullkv", "--device", device, "-q", "hello"])
    assert result.exit_code == 2
    assert device.split(":")[0] in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--budget", "0"], "--budget must be in (0, 1]"),
        (["--min-speedup", "-1"], "--min-speedup > 0"),
        (["--candidates", "0"], "--candidates >= 1"),
        (["no-such-model"], "unknown model"),
    ],
)
def test_calibrate_refuses_bad_input(args, message):
    result = runner.invoke(app, ["calibrate", *args])
    assert result.exit_code == 2 and message in " ".join(result.output.split())
