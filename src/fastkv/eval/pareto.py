"""Score against cost: the Pareto figure of an evaluation run at several KV budgets.

One line per method family (a spec with its KV budget left out), one point per budget, in two panels:
average score against the measured prefill time (each method alone, `timing.py`) and against the bytes
its cache holds after prefill. A method with no budget (FullKV) is one point. Read from metrics.json,
so it needs nothing but a finished or partial run.
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from pathlib import Path

from ..methods.spec import short_spec
from .store import Run

BUDGET = re.compile(r"\b(retain_rate|budget)=([0-9.e-]+)(, )?")


@dataclasses.dataclass(frozen=True)
class Point:
    family: str  # the spec without its KV budget
    budget: str  # "retain_rate=0.1", "budget=512", or "" for a method without one
    score: float
    prefill_s: float | None
    kv_mib: float | None
    samples: int


def points(metrics: dict) -> dict[str, list[Point]]:
    """{context (model | setting dtype): points} from metrics.json."""
    found: dict[str, list[Point]] = defaultdict(list)
    for label, m in metrics.items():
        model, setting, spec = Run.parse(label)
        context = f"{model} | {setting}"
        budget = BUDGET.search(spec.split("+")[-1])
        family = BUDGET.sub("", spec).replace(", )", ")").replace("()", "")
        kv = m.get("kv_bytes")
        found[context].append(
            Point(
                family,
                f"{budget.group(1)}={budget.group(2)}" if budget else "",
                m["average"],
                m.get("prefill_s"),
                kv / 2**20 if kv else None,
                m["samples"],
            )
        )
    for context, chosen in found.items():  # short names, unless two families would share one
        names = {f: short_spec(f) for f in {p.family for p in chosen}}
        clash = {f for f in names if list(names.values()).count(names[f]) > 1}
        found[context] = [dataclasses.replace(p, family=short_spec(p.family, p.family in clash)) for p in chosen]
    return dict(found)


def figure(context: str, chosen: list[Point], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families: dict[str, list[Point]] = defaultdict(list)
    for p in chosen:
        families[p.family].append(p)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    for family, group in sorted(families.items(), key=lambda kv: (kv[0] != "fullkv", kv[0])):
        group.sort(key=lambda p: p.kv_mib or 0)
        style = {"marker": "*", "markersize": 14} if len(group) == 1 else {"marker": "o"}
        for ax, x in zip(axes, ("prefill_s", "kv_mib"), strict=True):
            shown = [p for p in group if getattr(p, x) is not None]
            if not shown:
                continue
            line = ax.plot([getattr(p, x) for p in shown], [p.score for p in shown], label=family, **style)[0]
            if x == "kv_mib":
                for p in shown:
                    tag = p.budget.split("=")[-1]
                    ax.annotate(tag, (p.kv_mib, p.score), textcoords="offset points", xytext=(4, 3), fontsize=7)
                    ax.set_xscale("log")
            line.set_linewidth(1.5)
    samples = sorted({p.samples for p in chosen})
    axes[0].set_xlabel("prefill seconds (each method alone, measured side by side)")
    axes[1].set_xlabel("KV cache after prefill, MiB (log; labels: KV budget)")
    axes[0].set_ylabel("average score")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{context}: samples per method {'/'.join(map(str, samples))}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def pareto(metrics: dict, out_dir: str | Path) -> list[Path]:
    """Write pareto.png (pareto_<setting>.png when the run holds several settings); return the files."""
    by_context = points(metrics)
    if not by_context:
        raise ValueError("no results to plot")
    out = Path(out_dir)
    files = []
    for context, chosen in by_context.items():
        name = "pareto.png" if len(by_context) == 1 else f"pareto_{re.sub(r'[^A-Za-z0-9.]+', '_', context)}.png"
        files.append(figure(context, chosen, out / name))
    return files


def frontier_table(frontier) -> str:
    """A markdown table of a `fastkv.frontier.Frontier`: every setting, fastest first, the Pareto ones marked."""
    from .report import markdown

    on = set(frontier.pareto())
    rows = [
        [short_spec(s.spec), f"{s.score:.1f}", f"{s.loss:.1f} [{s.loss_low:.1f}, {s.loss_high:.1f}]",
         f"{s.prefill_speedup:.2f}", f"{100 * s.kv_share:.1f}", "yes" if s in on else ""]
        for s in frontier.fastest_first()
    ]  # fmt: skip
    header = ["setting", "score", "loss vs FullKV, points [95% CI]", "prefill x FullKV", "KV %", "Pareto"]
    intro = (
        f"# Frontier of {frontier.model}\n\n{frontier.suite}; speed-ups measured on {frontier.machine}; "
        f"built {frontier.created}.\n\n"
    )
    return intro + "\n".join(markdown(header, rows)) + "\n"


def frontier_figure(frontier, path: Path) -> Path:
    """Loss against prefill speed-up, one colour per method, the Pareto frontier as a step line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for preset in sorted({s.preset for s in frontier.settings}):
        group = [s for s in frontier.settings if s.preset == preset]
        style = {"marker": "*", "s": 140, "color": "black"} if preset == "fullkv" else {"s": 28}
        ax.scatter([s.prefill_speedup for s in group], [s.loss for s in group], label=preset, **style)
    best = sorted(frontier.pareto(), key=lambda s: s.prefill_speedup)
    # the least loss at a speed-up of at least x: each step takes the value of the next point to the right
    ax.step([s.prefill_speedup for s in best], [s.loss for s in best], where="pre", color="black", lw=1,
            label="Pareto frontier")  # fmt: skip
    for s in best:
        ax.annotate(short_spec(s.spec), (s.prefill_speedup, s.loss), textcoords="offset points", xytext=(4, 4),
                    fontsize=6)  # fmt: skip
    ax.set_xlabel("prefill speed-up over FullKV (each alone, side by side)")
    ax.set_ylabel("loss against FullKV, points (lower is better)")
    ax.axhline(0, color="grey", lw=0.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{frontier.model}: {frontier.suite}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")  # long labels at the right edge stay whole
    plt.close(fig)
    return path
