"""`fastkv eval ruler | niah | longbench`: accuracy and fidelity of methods on long prompts."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from ..console import fail, load_llm, out
from ..methods import METHODS, Method, make_with_shared

app = typer.Typer(help="Offline long-context evaluation: RULER, needle in a haystack, LongBench files.")


def split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def build_methods(names: str, retain_rate: float | None, tsp_rate: float | None) -> dict[str, Method]:
    """Methods by name ('all' for every one), with the shared KV budget and TSP rate where they apply."""
    chosen = list(METHODS) if names == "all" else [n.lower() for n in split(names)]
    methods = {}
    for name in chosen:
        if name not in METHODS:
            fail(f"unknown method {name!r}: choose from {sorted(METHODS)} or 'all'")
        try:
            methods[name] = make_with_shared(name, retain_rate=retain_rate, tsp_rate=tsp_rate)
        except ValueError as e:
            fail(str(e))
    return methods


def show(metrics: dict, out_dir: Path) -> None:
    tasks = sorted({t for m in metrics.values() for t in m["tasks"]})
    table = Table(title=f"results in {out_dir}")
    for col in ["run", *tasks, "avg", "agree %", "KL"]:
        table.add_column(col, justify="left" if col == "run" else "right")
    for label, m in metrics.items():
        table.add_row(
            label,
            *[f"{m['tasks'].get(t, float('nan')):.0f}" for t in tasks],
            f"{m['average']:.1f}",
            f"{m['agreement']:.0f}" if "agreement" in m else "-",
            f"{m['first_token_kl']:.3f}" if "first_token_kl" in m else "-",
        )
    out.print(table)


MODEL = typer.Option("qwen2.5-0.5b", "--model", "-m", help="a registered name, local dir, .gguf or HF id")
METHODS_OPT = typer.Option("fullkv,snapkv,fastkv", "--methods", help="comma-separated names, or 'all'")
RETAIN = typer.Option(0.1, help="KV budget of every method that has one, as a share of the prompt")
TSP = typer.Option(0.2, help="FastKV's TSP rate")
OUT = typer.Option(None, "--out", "-o", help="output directory (default: runs/<suite>)")
LIMIT = typer.Option(None, help="answer at most N items per task (quick runs)")


@app.command()
def ruler(
    model: str = MODEL,
    methods: str = METHODS_OPT,
    length: str = typer.Option("4096", help="target lengths in tokens, comma-separated"),
    samples: int = typer.Option(10, help="samples per task and length"),
    tasks: str = typer.Option("all", help="comma-separated RULER tasks, or 'all' (13)"),
    seed: int = typer.Option(42),
    retain_rate: float = RETAIN,
    tsp_rate: float = TSP,
    out_dir: Path | None = OUT,
    limit: int | None = LIMIT,
    chat: bool = typer.Option(True, help="apply the chat template"),
    dtype: str = typer.Option("float32"),
    device: str = typer.Option("cpu"),
) -> None:
    """RULER's 13 synthetic tasks at the given lengths."""
    from . import ruler as R
    from .data import DataNotInstalledError
    from .runner import Item, run

    chosen = R.TASKS if tasks == "all" else split(tasks)
    for task in chosen:
        if task not in R.TASKS:
            fail(f"unknown RULER task {task!r}: choose from {R.TASKS}")
    lengths = [int(x) for x in split(length)]
    count = min(samples, limit) if limit else samples
    built = build_methods(methods, retain_rate, tsp_rate)
    llm = load_llm(model, dtype, device)
    out_path = out_dir or Path("runs") / "ruler"
    config = {
        "suite": "ruler",
        "tasks": chosen,
        "lengths": lengths,
        "samples": count,
        "seed": seed,
        "methods": {k: m.describe() for k, m in built.items()},
        "model": model,
        "chat": chat,
    }
    metrics = {}
    for target in lengths:
        items = []
        for task in chosen:
            for index in range(count):
                try:
                    sample = R.generate(task, llm.tokenizer, target, seed=seed, index=index, chat=chat)
                except (ValueError, DataNotInstalledError) as e:
                    fail(str(e))
                items.append(
                    Item(
                        task,
                        index,
                        R.render(llm.tokenizer, sample.input, sample.answer_prefix, chat),
                        not (chat and llm.tokenizer.chat_template),
                        sample.max_new_tokens,
                        sample.outputs,
                        lambda text, s=sample: R.score(s, text),
                        {"length": sample.length},
                    )
                )
        metrics = run(llm, model, f"{target}", built, items, out_path, config, seed=seed)
    show(metrics, out_path)


@app.command()
def niah(
    model: str = MODEL,
    methods: str = METHODS_OPT,
    lengths: str = typer.Option("1024,2048,4096", help="context lengths in tokens"),
    depths: str = typer.Option("0,0.25,0.5,0.75,1", help="needle depths, 0 (start) to 1 (end)"),
    retain_rate: float = RETAIN,
    tsp_rate: float = TSP,
    out_dir: Path | None = OUT,
    dtype: str = typer.Option("float32"),
    device: str = typer.Option("cpu"),
) -> None:
    """Needle in a haystack over lengths x depths; writes one heatmap per method and a side-by-side."""
    from . import niah as N
    from .runner import Item, run

    built = build_methods(methods, retain_rate, tsp_rate)
    llm = load_llm(model, dtype, device)
    out_path = out_dir or Path("runs") / "niah"
    grid = [(int(n), float(d)) for n in split(lengths) for d in split(depths)]
    items = []
    for i, (n, d) in enumerate(grid):
        try:
            text = N.prompt(llm.tokenizer, n, d)
        except ValueError as e:
            fail(str(e))
        items.append(
            Item(
                "niah",
                i,
                text,
                not llm.tokenizer.chat_template,
                N.MAX_NEW_TOKENS,
                [N.NEEDLE],
                N.score,
                {"length": n, "depth": d},
            )
        )
    config = {"suite": "niah", "grid": grid, "model": model, "methods": {k: m.describe() for k, m in built.items()}}
    metrics = run(llm, model, "niah", built, items, out_path, config)
    rows = [json.loads(line) for line in (out_path / "predictions.jsonl").read_text().splitlines() if line]
    files = N.heatmaps([r for r in rows if r["model"] == model], out_path)
    show(metrics, out_path)
    out.print("heatmaps: " + ", ".join(str(f) for f in files))


@app.command()
def longbench(
    data_dir: Path = typer.Option(..., "--data-dir", help="directory with LongBench's {task}.jsonl files"),
    model: str = MODEL,
    methods: str = METHODS_OPT,
    tasks: str = typer.Option("narrativeqa,qasper,hotpotqa,gov_report,trec,passage_count,lcc"),
    max_length: int | None = typer.Option(None, help="prompt window in tokens (default: the model's, less answer)"),
    retain_rate: float = RETAIN,
    tsp_rate: float = TSP,
    out_dir: Path | None = OUT,
    limit: int | None = LIMIT,
    dtype: str = typer.Option("float32"),
    device: str = typer.Option("cpu"),
) -> None:
    """LongBench tasks from local jsonl files, with LongBench's prompts, truncation and metrics."""
    from . import longbench as LB
    from .ruler import render
    from .runner import Item, run

    built = build_methods(methods, retain_rate, tsp_rate)
    examples = []
    for task in split(tasks):
        try:
            examples += LB.load_task(data_dir, task)[:limit]
        except (ValueError, FileNotFoundError) as e:
            fail(str(e))
    llm = load_llm(model, dtype, device)
    window = llm.parts.max_positions
    items = []
    for ex in examples:
        text = LB.truncate_middle(llm.tokenizer, ex.prompt, (max_length or window) - ex.max_new_tokens - 64)
        chat = ex.chat and bool(llm.tokenizer.chat_template)
        prompt = render(llm.tokenizer, text, "", chat)
        items.append(
            Item(ex.task, ex.index, prompt, not chat, ex.max_new_tokens, ex.answers, lambda p, e=ex: LB.score(e, p))
        )
    config = {
        "suite": "longbench",
        "data_dir": str(data_dir),
        "tasks": split(tasks),
        "limit": limit,
        "model": model,
        "methods": {k: m.describe() for k, m in built.items()},
    }
    out_path = out_dir or Path("runs") / "longbench"
    show(run(llm, model, "longbench", built, items, out_path, config), out_path)


@app.command()
def report(out_dir: Path = typer.Argument(..., help="an evaluation output directory")) -> None:
    """Rebuild metrics.json and the summaries of a run from its predictions.jsonl (e.g. after a stop)."""
    from .runner import summarize, write_reports

    path = out_dir / "predictions.jsonl"
    if not path.is_file():
        fail(f"{path} not found")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    record = json.loads((out_dir / "run.json").read_text()) if (out_dir / "run.json").exists() else {}
    metrics = summarize(rows)
    write_reports(out_dir, metrics, record.get("config", {}), started=None)
    show(metrics, out_dir)
