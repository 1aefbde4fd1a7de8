"""`fastkv demo`: a passkey in a long haystack, answered by FullKV, SnapKV and FastKV side by side."""

from __future__ import annotations

from dataclasses import dataclass

import typer
from rich import box
from rich.table import Table

from ..batch import decode_alone, prefill_prompt
from ..cache import keep_rows
from ..chat import encode_prompt
from ..console import err, fail, load_llm, out
from ..eval.timing import DecodeTiming, time_decode
from ..generate import drain
from ..layer import PrefillOptions
from ..methods import FastKV, FullKV, Method, SnapKV, short_spec
from ..models import DEFAULT_MODEL, DTYPE_HELP
from ..needle import passkey_prompt
from ..precision import decode_weight_bytes
from ..quantize import QUANTIZE_HELP
from ..results import GenerationResult
from ..sampling import SamplingParams
from .common import prefill_progress, rate

# Decode speed is timed apart from the answer, which may end after a few tokens: this many steps of the same
# cache after WARMUP untimed ones, the median reported, and a spread (interquartile range over the median)
# above NOISY said to be unreliable.
DECODE_STEPS, WARMUP, NOISY = 32, 4, 0.2


@dataclass
class Answered:
    result: GenerationResult
    decode: DecodeTiming
    source: str  # where FastKV's defaults came from ("" for other methods)


def run_demo_method(llm, method: Method, prompt: str, max_tokens: int) -> Answered:
    """The method's answer (as `llm.generate` gives it) and its decode speed, timed on a copy of the cache the
    prefill made: WARMUP + DECODE_STEPS steps, whatever the answer's length."""
    chosen, source = llm.resolve(method)
    ids = encode_prompt(llm.tokenizer, prompt)
    progress, on_layer = prefill_progress(llm.adapter.num_layers, f"{method.name:>7}: prefill")
    with progress:
        options = PrefillOptions(max(max_tokens, WARMUP + DECODE_STEPS), on_layer=on_layer)
        prefilled = prefill_prompt(llm.adapter, ids, chosen, options)
    spare = keep_rows(prefilled.cache, [0])  # a copy, so that timing does not use the answer's room
    result = drain(decode_alone(llm.model, llm.tokenizer, prefilled, SamplingParams(max_tokens=max_tokens)))
    result.stats.defaults = source
    return Answered(result, time_decode(llm.adapter, spare, DECODE_STEPS, WARMUP), source)


def demo(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m"),
    tokens: int = typer.Option(4096, help="prompt length in tokens"),
    depth: float = typer.Option(0.5, help="needle depth in the haystack, 0 (start) to 1 (end)"),
    max_tokens: int = typer.Option(16, "--max-tokens", "-n", help="new tokens at most"),
    seed: int = typer.Option(0, help="chooses the passkey"),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
    quantize: str = typer.Option("auto", help=QUANTIZE_HELP),
    device: str = typer.Option("cpu"),
) -> None:
    """Needle in a haystack: FullKV, SnapKV and FastKV on one long prompt, side by side."""
    if max_tokens < 1:
        fail(f"--max-tokens must be >= 1, got {max_tokens}")
    llm = load_llm(model, dtype, device, quantize)
    try:
        needle = passkey_prompt(llm.tokenizer, tokens, depth=depth, seed=seed)
    except ValueError as e:
        fail(str(e))
    runs = [FullKV(), SnapKV(retain_rate=0.1), FastKV(tsp_rate=0.2, retain_rate=0.1)]
    err.print(f"passkey {needle.answer} hidden at depth {depth:.0%} of a ~{tokens}-token prompt for {model}")
    answered = []
    for method in runs:
        try:
            answered.append(run_demo_method(llm, method, needle.text, max_tokens))
        except ValueError as e:
            fail(str(e))
    show(llm, model, needle, runs, answered)


def show(llm, model: str, needle, runs: list[Method], answered: list[Answered]) -> None:
    """The side-by-side table (it fits 80 columns: short headers, their key below), then each answer."""
    base = answered[0]
    weights = decode_weight_bytes(llm.model)
    tokens = base.result.stats.prompt_tokens
    # No vertical rules: eight columns and their headers fit 80 columns whole.
    table = Table(title=f"{model}: passkey {needle.answer} in {tokens} tokens", title_justify="left", box=box.SIMPLE,
                  pad_edge=False, collapse_padding=True)  # fmt: skip
    for col in ("method", "found", "prefill s", "ms/token", "KV MiB", "KV share", "prefill x", "decode x"):
        table.add_column(col, justify="left" if col == "method" else "right", no_wrap=True)
    for method, a in zip(runs, answered, strict=True):
        s = a.result.stats
        table.add_row(
            method.name,
            "yes" if needle.is_correct(a.result.text) else "NO",
            f"{s.prefill_seconds:.2f}",
            f"{a.decode.median * 1e3:.1f}" + ("~" if a.decode.spread > NOISY else ""),
            f"{s.kv_bytes / 2**20:.1f}",
            f"{s.kv_bytes / (s.kv_bytes + weights):.0%}",
            rate(base.result.stats.prefill_seconds / s.prefill_seconds),
            rate(base.decode.median / a.decode.median),
        )
    out.print(table)
    out.print(
        f"x: speedup against FullKV in this run ({llm.precision}). ms/token: median of {DECODE_STEPS} decode steps "
        f"after {WARMUP} warm-up steps. KV share: the KV cache's share of what a decode step reads (every weight "
        f"once, {weights / 2**20:.0f} MiB, plus the cache): where it is small, compressing the cache cannot speed "
        "decoding much, and the weights' format decides (`fastkv info`).",
        highlight=False,
    )
    if any(a.decode.spread > NOISY for a in answered):
        out.print(
            f"~: the middle half of those steps spread over more than {NOISY:.0%} of their median (a busy machine?): "
            "read the decode column with care, or run the demo again.",
            highlight=False,
        )
    out.print("The answers:", highlight=False)
    for method, a in zip(runs, answered, strict=True):
        text = " ".join(a.result.text.split())
        out.print(f"  {method.name}: {text[:60]}{'...' if len(text) > 60 else ''}", highlight=False, markup=False)
    out.print("The methods as they ran:", highlight=False)
    for a in answered:
        source = f" (FastKV defaults: {a.source})" if a.source else ""
        out.print(f"  {short_spec(a.result.stats.method)}{source}", highlight=False, markup=False)
