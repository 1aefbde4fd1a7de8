"""`fastkv calibrate --model NAME`: find the FastKV settings that fit a model and save them as its profile."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..console import err, fail, load_llm, out
from ..models import DEFAULT_MODEL
from .common import MODEL_HELP


def calibrate(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help=MODEL_HELP),
    positional: str | None = typer.Argument(None, hidden=True, help="the model, as earlier versions took it"),
    budget: float = typer.Option(0.1, "--budget", help="the KV budget (retain rate) to calibrate at"),
    min_speedup: float = typer.Option(1.6, help="least prefill speedup over FullKV at 8K tokens (predicted)"),
    candidates: int = typer.Option(4, help="settings with the best recall that are run for fidelity"),
    out_file: Path | None = typer.Option(None, "--out", help="profile file (default: the user's profile)"),
    dtype: str = typer.Option("float32", help="float32 (the precision the shipped profiles were found in), bfloat16"),
    device: str = typer.Option("cpu"),
) -> None:
    """Find the FastKV settings that fit a model and save them as its profile (it resumes if stopped)."""
    from ..calibrate.prompts import NEEDLES, PER_KIND
    from ..calibrate.search import calibrate as run_calibration
    from ..paths import cache_root
    from ..profiles import user_path

    if positional is not None:  # `fastkv calibrate NAME`, as before every command took --model
        if model not in (DEFAULT_MODEL, positional):
            fail(f"the model is given twice: {positional!r} and --model {model!r}")
        model = positional
    if not 0 < budget <= 1 or min_speedup <= 0 or candidates < 1:
        fail("--budget must be in (0, 1], --min-speedup > 0 and --candidates >= 1")
    llm = load_llm(model, dtype, device)
    llm.profile = None  # calibration compares settings as written, whatever profile the model has now
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err
    )
    with progress:
        task = progress.add_task(f"calibrating {model}", total=2 * PER_KIND * len(NEEDLES))  # 2 stages
        record = run_calibration(
            llm,
            model,
            cache_root(),
            retain_rate=budget,
            min_speedup=min_speedup,
            candidates=candidates,
            on_step=lambda: progress.advance(task),
        )
    path = out_file or user_path(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    table = Table(
        title=f"{model}: FastKV finalists at retain {budget} ({record['prompts']} prompts, {record['seconds']:.0f} s)"
    )
    for col in ("spec", "TSP recall", "agreement", "correct", "KL", "speedup 8K"):
        table.add_column(col, overflow="fold")
    for e in [record["snapkv"], *record["finalists"]]:
        table.add_row(
            e["spec"],
            f"{e['tsp_recall']:.2f}" if "tsp_recall" in e else "-",
            f"{e['agreement']:.2f}",
            f"{e['correct']:.2f}",
            f"{e['first_token_kl']:.3f}",
            f"{e['predicted_speedup_8k']:.2f}" if "predicted_speedup_8k" in e else "-",
        )
    out.print(table)
    out.print(f"chosen: {record['chosen']['spec']}\nprofile written to {path}")
