"""`fastkv demo`: a passkey in a long haystack, answered by FullKV, SnapKV and FastKV side by side."""

from __future__ import annotations

import typer
from rich.table import Table

from ..console import err, fail, load_llm, out
from ..methods import FastKV, FullKV, Method, SnapKV, short_spec
from ..models import DEFAULT_MODEL, DTYPE_HELP
from ..needle import passkey_prompt
from ..precision import decode_weight_bytes
from ..quantize import QUANTIZE_HELP
from .common import prefill_progress, rate


def run_demo_method(llm, method: Method, prompt: str, max_new_tokens: int):
    progress, on_layer = prefill_progress(llm.adapter.num_layers, f"{method.name:>7}: prefill")
    with progress:
        return llm.generate(prompt, method, max_tokens=max_new_tokens, chat=True, on_layer=on_layer)


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
    weights = decode_weight_bytes(llm.model)
    for col in ("method", "answer", "correct", "prefill s", "decode tok/s", "KV MiB", "KV share of a step's reads",
                "prefill x", "decode x"):  # fmt: skip
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
            f"{s.kv_bytes / (s.kv_bytes + weights):.0%}",
            rate(base.prefill_seconds / s.prefill_seconds),
            rate(s.decode_tokens_per_s / base.decode_tokens_per_s),
        )
    out.print(table)
    out.print(
        f"speedups are against FullKV in this run ({llm.precision}). A decode step reads every weight once "
        f"({weights / 2**20:.0f} MiB) plus the KV cache: where the KV is a small share of that, compressing "
        "it cannot speed decode much, and the weights' format decides (`fastkv info`). The methods as they ran:"
    )
    for r in results:
        source = f" (FastKV defaults: {r.stats.defaults})" if r.stats.defaults else ""
        out.print(f"  {short_spec(r.stats.method)}{source}", highlight=False)
