"""Where does TSP lose a fact that SnapKV keeps? A trace over the multi-question documents (issue 29, item 1).

For every document of `fastkv eval multiq` and every turn, one full prefill of the session's last turn
(every earlier turn is a prefix of it, and attention is causal, so each turn's window queries and keys are
in that one pass) records, at every layer:

- what the observation window holds: the last `window` tokens of the turn's prompt, as text;
- TSP's verdict on the asked fact's code tokens: the share of them among the top `tsp_rate` of the prompt
  (the window kept), ranked by the scores summed over KV heads, as `TSP` ranks them;
- SnapKV's verdict at every layer: the share of the code's tokens kept, per KV head, at the cache budget;
- the same for the other facts of the document (is it where the fact lies, or what the window asks?);
- and the same with an observation window that covers the whole question (`What is ... number.` plus the
  template's tail) instead of the last `window` tokens.

    python benchmarks/tsp_diagnosis.py --docs 12 --out results/multiq-diagnosis-qwen2.5-0.5b

Prints a markdown table per turn and writes rows.jsonl and README-ready summary.md into --out.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastkv import LLM
from fastkv.chat import encode_rendered, render_chat
from fastkv.engine import prefill
from fastkv.eval import multiq as M
from fastkv.methods import Composed, LayerState, Reducer, Selection
from fastkv.methods.registry import KeepAll
from fastkv.precision import header as machine_header
from fastkv.scoring import window_scores


def spans(tokenizer, text: str, start: int, end: int) -> list[int]:
    """Token positions of the characters text[start:end] in the rendered prompt."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start]


def turn_marks(tokenizer, session: M.Session, rooms: list[str], messages: list[list[dict]]) -> list[dict]:
    """For every turn: its length, its question's first token, and every fact's code tokens."""
    marks = []
    for k, turn in enumerate(messages):
        text = render_chat(tokenizer, turn)
        if encode_rendered(tokenizer, text) != session.turns[k]:
            raise ValueError("the rendered turn does not tokenize to the session's turn")
        codes = []
        for room, code in zip(rooms, session.codes, strict=True):
            at = text.index(f"The code of the {room} room is {code}.") + len(f"The code of the {room} room is ")
            codes.append(spans(tokenizer, text, at, at + len(code)))
        ask = text.rindex("What is the code of the")
        marks.append({"length": len(session.turns[k]), "question": spans(tokenizer, text, ask, ask + 1)[0],
                      "codes": codes})  # fmt: skip
    return marks


@dataclass(frozen=True, kw_only=True)
class Trace(Reducer):
    """Reduces nothing; at every layer scores each turn's window and records what TSP and SnapKV would keep."""

    name = "trace"
    window: int
    kernel: int
    pooling: str
    tsp_rate: float
    retain_rate: float = 0.1
    min_budget: int = 256
    snap: tuple[int, str] = (7, "max")  # SnapKV's kernel and pooling
    marks: list = field(default_factory=list, compare=False)
    rows: list = field(default_factory=list, compare=False)

    def tokens(self, layer: LayerState) -> Selection | None:
        for k, mark in enumerate(self.marks):
            n = mark["length"]
            keys = layer.k[:, :, :n]
            windows = {"last": self.window, "question": n - mark["question"], **{f"w{w}": w for w in (16, 32, 64)}}
            row = {"turn": k + 1, "layer": layer.index}
            for label, w in windows.items():
                q = layer.q[:, :, n - w : n]
                tsp = window_scores(q, keys, layer.scale, self.kernel, self.pooling).sum(dim=1)[0]  # [n - w]
                keep = max(int(self.tsp_rate * n), 512) - w
                top = set(tsp.topk(keep).indices.tolist())
                order = tsp.argsort(descending=True).tolist()
                rank = {p: i for i, p in enumerate(order)}
                row[f"tsp_{label}"] = [sum(p in top for p in c) / len(c) for c in mark["codes"]]
                row[f"rank_{label}"] = [min(rank.get(p, n) for p in c) / (n - w) for c in mark["codes"]]
                snap = window_scores(q, keys, layer.scale, *self.snap)[0]  # [Hkv, n - w]
                budget = max(int(self.retain_rate * n), self.min_budget) - w
                kept = snap.topk(budget, dim=-1).indices
                row[f"snap_{label}"] = [
                    [float(torch.isin(torch.tensor(c), kept[h]).float().mean()) for h in range(kept.shape[0])]
                    for c in mark["codes"]
                ]
            self.rows.append(row)
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="qwen2.5-0.5b")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--docs", type=int, default=12)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    llm = LLM.load(args.model, dtype=args.dtype, quantize="none")
    knobs = llm.profile.knobs if llm.profile is not None else {}
    window, kernel = knobs.get("window_size", 8), knobs.get("kernel_size", 7)
    pooling, tsp_rate = knobs.get("pooling", "max"), knobs.get("tsp_rate", 0.2)
    path = args.out / "rows.jsonl"
    done = {json.loads(line)["doc"] for line in path.read_text().splitlines()} if path.exists() else set()
    with path.open("a") as f:
        for index in range(args.docs):
            if index in done:
                continue
            start = time.perf_counter()
            s = M.session(llm.tokenizer, args.length, args.seed, index)
            doc, found = M.document(llm.tokenizer, args.length, args.seed * 1000 + index, len(s.codes))
            messages = M.conversation(doc, found)
            marks = turn_marks(llm.tokenizer, s, [room for room, _ in found], messages)
            trace = Trace(window=window, kernel=kernel, pooling=pooling, tsp_rate=tsp_rate, marks=marks)
            ids = torch.tensor([s.turns[-1]])
            prefill(llm.adapter, ids, Composed(reducer=trace, policy=KeepAll()))
            tails = [llm.tokenizer.decode(t[-window:]) for t in s.turns]
            for row in trace.rows:
                row.update(doc=index, window_text=tails[row["turn"] - 1], question_tokens=marks[row["turn"] - 1]
                           ["length"] - marks[row["turn"] - 1]["question"])  # fmt: skip
                f.write(json.dumps(row) + "\n")
            f.flush()
            print(f"document {index + 1}/{args.docs}: {time.perf_counter() - start:.0f} s", flush=True)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    table = summary(rows, window, kernel, pooling, tsp_rate, llm.profile.knobs.get("tsp_layer", 11))
    header = f"{machine_header(args.dtype)}\n{args.model}, {len({r['doc'] for r in rows})} documents\n\n"
    (args.out / "summary.md").write_text(header + table)
    print(header + table)


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def summary(rows: list[dict], window: int, kernel: int, pooling: str, tsp_rate: float, tsp_layer: int) -> str:
    """Per turn: the share of the asked code's tokens TSP keeps at the TSP layer under each window, the asked
    code's best rank, the other facts' share, and SnapKV's later layers. Per layer: TSP's share."""
    labels = ["last", "w16", "w32", "w64", "question"]
    names = [f"last {window}", "last 16", "last 32", "last 64", "the question"]
    lines = [
        f"TSP at layer {tsp_layer}, rate {tsp_rate}, kernel {kernel} {pooling}; SnapKV kernel 7 max, retain 0.1.",
        "",
        "Share of the asked code's tokens that TSP lets through, by observation window:",
        "",
        f"| turn | what the last {window} tokens hold | {' | '.join(names)} | best-ranked code token, share of"
        f" the prompt above it (last {window} / question) | other facts' codes let through (last {window}) |"
        " SnapKV, layers after TSP: some head keeps the whole code | mean share over heads |",
        "|---|---|" + "---|" * (len(names) + 4),
    ]
    at = [r for r in rows if r["layer"] == tsp_layer]
    late = [r for r in rows if r["layer"] > tsp_layer]
    for turn in sorted({r["turn"] for r in rows}):
        t = [r for r in at if r["turn"] == turn]
        k = turn - 1
        kept = [f"{mean(r[f'tsp_{label}'][k] for r in t):.2f}" for label in labels]
        rank = mean(r["rank_last"][k] for r in t)
        rank_q = mean(r["rank_question"][k] for r in t)
        others = mean(v for r in t for j, v in enumerate(r["tsp_last"]) if j != k)
        lt = [r for r in late if r["turn"] == turn]
        some = mean(float(max(r["snap_last"][k]) == 1.0) for r in lt)
        heads = mean(mean(r["snap_last"][k]) for r in lt)
        text = t[0]["window_text"].replace("\n", "\\n").replace("|", "\\|")
        lines.append(f"| {turn} | `{text}` | " + " | ".join(kept)
                     + f" | {rank:.3f} / {rank_q:.3f} | {others:.2f} | {some:.2f} | {heads:.2f} |")  # fmt: skip
    lines += ["", f"TSP at each layer (rate {tsp_rate}): share of the asked code let through, turns 1-2 and 3-5:", "",
              f"| layer | last {window}, turns 1-2 | last {window}, turns 3-5 | question, turns 1-2 |"
              " question, turns 3-5 |",
              "|---|---|---|---|---|"]  # fmt: skip
    for layer in sorted({r["layer"] for r in rows}):
        here = [r for r in rows if r["layer"] == layer]

        def share(label: str, turns: tuple[int, ...], here=here) -> float:
            return mean(r[f"tsp_{label}"][r["turn"] - 1] for r in here if r["turn"] in turns)

        lines.append(f"| {layer} | {share('last', (1, 2)):.2f} | {share('last', (3, 4, 5)):.2f} | "
                     f"{share('question', (1, 2)):.2f} | {share('question', (3, 4, 5)):.2f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
