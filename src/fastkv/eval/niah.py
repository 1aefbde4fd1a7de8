"""Needle in a haystack over a grid of context lengths and depths, with heatmaps.

The haystack is Paul Graham's essays (from the installed data package); the needle is the classic
"best thing to do in San Francisco" sentence, inserted at a sentence boundary at each depth. A
prediction scores the share of the needle's words that appear in it.
"""

from __future__ import annotations

import hashlib
import re
import string
import textwrap
from pathlib import Path

from . import data
from .report import shorter
from .ruler import count_tokens, essay_sentences, largest_fitting, render

NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
# The question alone: an extra instruction here becomes the "most relevant sentence" small models quote.
QUESTION = "What is the best thing to do in San Francisco?"
ANSWER_PREFIX = " Here is the most relevant sentence in the context:"
MAX_NEW_TOKENS = 48


def words(text: str) -> set[str]:
    return set(text.lower().translate(str.maketrans("", "", string.punctuation)).split())


def score(prediction: str) -> float:
    """Share of the needle's words found in the prediction, in [0, 1]."""
    needle = words(NEEDLE)
    return len(needle & words(prediction)) / len(needle)


def build(words: int, depth: float) -> str:
    hay = list(essay_sentences(words))
    cut = round(len(hay) * depth)
    context = " ".join(hay[:cut] + [NEEDLE] + hay[cut:])
    return f"{context}\n\n{QUESTION}"


def prompt(tokenizer, length: int, depth: float, chat: bool = True) -> str:
    """The rendered prompt whose tokens plus the answer's fit within `length`."""
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1], got {depth}")

    def total(n: int) -> int:
        return count_tokens(tokenizer, render(tokenizer, build(n, depth), ANSWER_PREFIX, chat), chat) + MAX_NEW_TOKENS

    n = largest_fitting(total, 1, len(data.essay_words()), length, "the needle")
    return render(tokenizer, build(n, depth), ANSWER_PREFIX, chat)


def file_name(spec: str) -> str:
    """A file name for a method spec: its preset names, plus a digest of the knobs when it has any."""
    name = re.sub(r"\([^)]*\)", "", spec)
    return name if name == spec else f"{name}-{hashlib.sha1(spec.encode()).hexdigest()[:8]}"


def heatmaps(rows: list[dict], out_dir: str | Path) -> list[Path]:
    """One heatmap per method (depth on y, length on x) and a side-by-side figure; returns the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    methods = sorted({r["method"] for r in rows}, key=lambda m: (m != "fullkv", m))
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})

    def grid(method: str):
        cells = [[float("nan")] * len(lengths) for _ in depths]
        for r in rows:
            if r["method"] == method:
                cells[depths.index(r["depth"])][lengths.index(r["length"])] = 100 * r["score"]
        return cells

    def draw(ax, method: str):
        image = ax.imshow(grid(method), cmap="RdYlGn", vmin=0, vmax=100, aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(textwrap.fill(shorter(method), 40), fontsize=8)
        return image

    files = []
    for method in methods:
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.5 * len(depths)))
        fig.colorbar(draw(ax, method), ax=ax, label="score %")
        fig.tight_layout()
        path = out / f"niah_{file_name(method)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods), 1.5 + 0.5 * len(depths)), squeeze=False)
    for i, (ax, method) in enumerate(zip(axes[0], methods, strict=True)):
        image = draw(ax, method)
        if i:  # one depth axis for the row
            ax.set_ylabel("")
            ax.set_yticklabels([])
    fig.colorbar(image, ax=axes[0].tolist(), label="score %")
    path = out / "niah_methods.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    files.append(path)
    return files
