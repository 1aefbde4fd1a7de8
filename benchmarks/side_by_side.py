"""One benchmark under two source trees (a commit before a change, and now), alternating, in one sitting.

    git worktree add /tmp/old e02edfb
    python benchmarks/side_by_side.py --old /tmp/old/src --rounds 2 -- \
        benchmarks/prefill_decode.py --lengths 8192 --methods fullkv,fastkv --decode-lengths 4096 --quantize int8

The benchmark must take `--json FILE` (benchmarks/prefill_decode.py does). Each round runs it once with the
old tree first on PYTHONPATH, once with this checkout's `src`, so that a host that slows down part way
affects both alike. It prints each run's output, then every timing's median over the rounds per tree and the
ratio new / old (below 1: faster now). The benchmark script itself is this checkout's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

NEW = Path(__file__).resolve().parents[1] / "src"


def timings(result: dict) -> dict[str, float]:
    """Flat {name: seconds or ms} of prefill_decode.py's --json."""
    out = {}
    for row in result.get("prefill", []):
        for run, values in row.items():
            if isinstance(values, dict):
                out[f"{row['tokens']} {run} prefill s"] = values["prefill_s"]
                out[f"{row['tokens']} {run} decode ms"] = values["decode_ms"]
    for row in result.get("decode_at", []):
        out[f"decode at {row['cache']}: full cache ms"] = row["full_ms"]
        out[f"decode at {row['cache']}: 10% cache ms"] = row["ten_percent_ms"]
    return out


def run(tree: Path, command: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = {**os.environ, "PYTHONPATH": str(tree)}
        done = subprocess.run([sys.executable, *command, "--json", str(out)], env=env, text=True, capture_output=True)
        print(done.stdout, flush=True)
        if done.returncode != 0:
            sys.exit(f"{' '.join(command)} with {tree} failed:\n{done.stderr[-3000:]}")
        return timings(json.loads(out.read_text()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, type=Path, help="the earlier tree's src folder")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- the benchmark script and its options")
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("give the benchmark after --")
    seen: dict[str, dict[str, list[float]]] = {"old": {}, "new": {}}
    for r in range(args.rounds):
        for label, tree in (("old", args.old), ("new", NEW)):
            print(f"# round {r + 1}, {label}: {tree}", flush=True)
            for name, value in run(tree, command).items():
                seen[label].setdefault(name, []).append(value)
    print(f"\n{'timing':<44} {'old':>9} {'new':>9} {'new/old':>8}   (medians of {args.rounds} rounds)")
    for name in seen["old"]:
        if name in seen["new"]:
            old, new = statistics.median(seen["old"][name]), statistics.median(seen["new"][name])
            print(f"{name:<44} {old:>9.2f} {new:>9.2f} {new / old:>8.2f}")


if __name__ == "__main__":
    main()
