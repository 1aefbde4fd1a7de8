"""`fastkv info`: this machine as torch sees it, and the precision `auto` picks here for a model, with the
timings behind the choice."""

from __future__ import annotations

from dataclasses import asdict

import typer
from rich.table import Table

from ..console import out
from ..models import DEFAULT_MODEL, model_config
from ..precision import Machine, auto, largest_linear, machine


def info(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="registered name, local directory or .gguf file"),
    remeasure: bool = typer.Option(False, help="time the kernels again instead of reading the cache"),
) -> None:
    """Print the CPU (model, flags), torch's capability (ATen's vector ISA, oneDNN's cap), and for MODEL what
    dtype and weight format `auto` picks for prefill and decode here, with the micro-benchmark behind it."""
    where = machine()
    show_machine(where)
    try:
        config = model_config(model)
    except (OSError, ValueError) as err:
        raise typer.BadParameter(f"could not read model {model!r}: {err}", param_hint="--model") from err
    choice = auto(largest_linear(config), remeasure=remeasure)
    timings = Table(title=f"kernels at {model}'s largest decoder linear {list(choice.timings.shape)} (median ms)")
    timings.add_column("kernel")
    timings.add_column("ms", justify="right")
    for name, value in asdict(choice.timings).items():
        if name != "shape":
            timings.add_row(name, "not measured (bfloat16 is emulated here)" if value is None else f"{value:.3f}")
    out.print(timings)
    out.print(f"[bold]auto for {model}[/]: dtype {choice.dtype}, quantize {choice.quantize}")
    out.print(f"  prefill: {choice.prefill}")
    out.print(f"  decode:  {choice.decode}")
    out.print(f"  why: {choice.why}")
    out.print(f"  measured {choice.measured.get('at', '?')}; cached in {choice.measured.get('cache', '?')}")


def show_machine(where: Machine) -> None:
    table = Table(title="this machine", show_header=False)
    table.add_column("what")
    table.add_column("value", overflow="fold")
    table.add_row("CPU", where.cpu)
    table.add_row("kind", where.kind + (" (bfloat16 native)" if where.native_bf16 else " (bfloat16 emulated)"))
    table.add_row("flags", " ".join(where.flags) or "none read (no /proc/cpuinfo)")
    table.add_row("ATen CPU capability", where.aten + "  (ATEN_CPU_CAPABILITY caps it)")
    table.add_row("oneDNN ISA cap", (where.onednn_cap or "none: the best the CPU has") + "  (ONEDNN_MAX_CPU_ISA)")
    table.add_row("torch", f"{where.torch}, {where.threads} threads")
    out.print(table)
