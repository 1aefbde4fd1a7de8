"""One method in two evaluation runs on the same items (float32 against bfloat16, say): scores, answers, logits.

    python benchmarks/compare_runs.py results/ruler-4k-7methods-qwen2.5-0.5b \\
        results/ruler-4k-sweep-qwen2.5-0.5b-bfloat16 --method fullkv

On the items both runs answered with the method: each run's macro-averaged score, the paired difference
(second - first) with its bootstrap 95% interval, the share of identical answers, and for FullKV (whose
first-token logits the runner keeps in logits/) the mean first-token KL(first || second) and how often
the first token's argmax agrees.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from fastkv.eval.metrics import first_token_kl
from fastkv.eval.paired import paired_difference
from fastkv.eval.store import logits_name


def rows(run: Path, method: str) -> dict[tuple, dict]:
    found = {}
    for line in (run / "predictions.jsonl").read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if row["method"] == method:
                found[(row["model"], row["setting"], row["task"], row["index"])] = row
    return found


def macro(chosen: list[dict]) -> float:
    by_task = defaultdict(list)
    for r in chosen:
        by_task[r["task"]].append(r["score"])
    return 100 * sum(sum(v) / len(v) for v in by_task.values()) / len(by_task)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("first", type=Path)
    ap.add_argument("second", type=Path)
    ap.add_argument("--method", default="fullkv", help="the canonical spec, as in predictions.jsonl")
    args = ap.parse_args()
    a, b = rows(args.first, args.method), rows(args.second, args.method)
    common = sorted(a.keys() & b.keys())
    if not common:
        ap.error(f"no item answered with {args.method!r} in both runs")
    ra, rb = [a[k] for k in common], [b[k] for k in common]
    diff = paired_difference(rb, ra)
    same = sum(x["prediction"].strip() == y["prediction"].strip() for x, y in zip(ra, rb, strict=True))
    print(f"# {args.method} on {len(common)} items answered in both runs")
    for run, chosen in ((args.first, ra), (args.second, rb)):
        print(f"{run}: {chosen[0]['settings'].get('dtype', '?')}, average {macro(chosen):.1f}")
    print(f"second - first: {diff['diff']:+.1f} points [95% CI {diff['low']:+.1f}, {diff['high']:+.1f}]")
    print(f"identical answers: {same}/{len(common)} ({100 * same / len(common):.0f}%)")
    if args.method != "fullkv":
        print("first-token KL: the runner keeps first-token logits for FullKV only (see --method fullkv)")
        return
    kls, top = [], 0
    for x, y in zip(ra, rb, strict=True):
        paths = [
            run / "logits" / logits_name(r["model"], r["setting"], r["settings"], r["task"], r["index"])
            for run, r in ((args.first, x), (args.second, y))
        ]
        if all(p.exists() for p in paths):
            la, lb = (torch.load(p) for p in paths)
            kls.append(first_token_kl(la, lb))
            top += int(la.argmax() == lb.argmax())
    if kls:
        print(f"first-token KL(first || second): mean {sum(kls) / len(kls):.4f}, max {max(kls):.4f} ({len(kls)} items)")
        print(f"first-token argmax agrees: {top}/{len(kls)}")


if __name__ == "__main__":
    main()
