"""`fastkv generate`: a long context (a file or stdin) and a question, answered on stdout."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from ..console import err, fail, load_llm
from ..frontier import check_spec
from ..layer import check_chunk
from ..methods import spec_name
from ..models import DEFAULT_MODEL, DTYPE_HELP
from ..quantize import QUANTIZE_HELP
from ..sampling import SamplingParams
from .common import COMPILE_HELP, METHOD_HELP, MODEL_HELP, prefill_progress, rate
from .knobs import with_knob_options


@with_knob_options
def generate(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help=MODEL_HELP),
    method: str = typer.Option("fastkv", "--method", help=METHOD_HELP),
    prompt_file: Path | None = typer.Option(None, "--prompt-file", "-f", help="context file (default: stdin)"),
    question: str | None = typer.Option(None, "--question", "-q", help="appended after the context"),
    max_tokens: int = typer.Option(128, "--max-tokens", "-n", help="new tokens at most"),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    top_p: float = typer.Option(1.0),
    seed: int | None = typer.Option(None),
    stop: list[str] = typer.Option([], help="stop string (repeatable)"),
    chat: bool | None = typer.Option(
        None, "--chat/--no-chat", help="apply the model's chat template (default: where the model has one)"
    ),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
    quantize: str = typer.Option("auto", help=QUANTIZE_HELP),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:1, ..."),
    prefill_chunk: int | None = typer.Option(
        None, help="attend and run MLPs over this many prompt tokens at a time in prefill (bounds its memory)"
    ),
    compile: bool = typer.Option(False, "--compile", help=COMPILE_HELP),
    batch: Path | None = typer.Option(
        None, "--batch", help='JSONL file, one {"prompt": ..., "id": ...} per line: decoded as one ragged batch'
    ),
    out_file: Path | None = typer.Option(None, "--out", "-o", help="with --batch: write the JSONL results here"),
    **knobs,
) -> None:
    """Generate a completion for a long context (from a file or stdin), streaming it to stdout.

    With --batch, generate for every prompt of a JSONL file at once and write one JSON line per prompt,
    in order (text, finish_reason, token counts, timings). Progress and stats go to stderr.
    """
    from .batch import read_prompts, run_batch

    try:
        check_spec(method, knobs)  # fail fast, before loading the model
        check_chunk(prefill_chunk)
        sampling = SamplingParams(max_tokens, temperature, top_p, seed, tuple(stop))
    except ValueError as e:
        fail(str(e).replace("prefill_chunk", "--prefill-chunk").replace("max_tokens", "--max-tokens"))
    if batch is not None:
        if prompt_file is not None or question is not None:
            fail("--batch takes its prompts from the file: leave out --prompt-file and --question")
        try:
            rows = read_prompts(batch)
        except ValueError as e:
            fail(str(e))
        llm = load_llm(model, dtype, device, quantize)
        try:
            chosen, _ = llm.resolve(method, **knobs)
            run_batch(llm, chosen, rows, out_file, sampling, chat=chat, prefill_chunk=prefill_chunk, compile=compile)
        except ValueError as e:
            fail(str(e))
        return
    if out_file is not None:
        fail("--out goes with --batch (a single answer streams to stdout)")
    text = read_prompt(prompt_file, question)
    llm = load_llm(model, dtype, device, quantize)
    try:
        chosen, defaults = llm.resolve(method, **knobs)  # with the model's calibrated FastKV defaults, if any
    except ValueError as e:
        fail(f"{e} (with the defaults of {llm.profile.source})" if llm.profile and "max_loss" not in method else str(e))
    progress, on_layer = prefill_progress(llm.adapter.num_layers, f"prefill ({spec_name(chosen)})")

    def write(piece: str) -> None:
        if progress.live.is_started:
            progress.stop()  # the answer begins: the transient progress bar goes
        sys.stdout.write(piece)
        sys.stdout.flush()

    progress.start()
    try:
        result = llm.generate(text, chosen, sampling, on_text=write, chat=chat, on_layer=on_layer,
                              prefill_chunk=prefill_chunk, compile=compile)  # fmt: skip
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


def read_prompt(prompt_file: Path | None, question: str | None) -> str:
    """The context (a file, else stdin when it is not a terminal) and the question after it."""
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
    return text
