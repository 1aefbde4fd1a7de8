"""What lower precision costs against float32 on passkey retrieval: first-token KL, greedy agreement,
accuracy, speed. Precisions: a dtype, with "+int8" for int8 weight-only linears (`fastkv.quantize`) and
"+compiled" for decoding under torch.compile (int8 weights on a CPU are frozen into the graph then).

    python benchmarks/dtype_fidelity.py          # qwen2.5-0.5b, 4K, FullKV and FastKV: float32, bfloat16, bfloat16+int8
    python benchmarks/dtype_fidelity.py --lengths 2048,8192 --methods fullkv,snapkv,fastkv --seeds 3
    python benchmarks/dtype_fidelity.py --precisions float32,bfloat16+int8,bfloat16+int8+compiled

The model is loaded once in each precision. Every passkey prompt (`fastkv.passkey_prompt`, one per length
x depth x seed) runs greedily under each method in every precision, one after the other in this process.
Per method and precision it prints, against the first precision (the reference): the mean and largest
first-token KL(reference || it), how often the first token's argmax agrees, how many answers are
identical, passkey accuracy, and the mean prefill seconds and decode ms/token with their ratio to the
reference. `fastkv` takes the model's calibrated profile, as `fastkv generate` would.

The RULER half of the fidelity check compares committed evaluation runs instead:
`benchmarks/compare_runs.py results/ruler-4k-7methods-qwen2.5-0.5b results/ruler-4k-sweep-qwen2.5-0.5b-bfloat16`.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict

import torch

from fastkv import LLM, passkey_prompt
from fastkv.eval.metrics import first_token_kl
from fastkv.precision import header


def mean(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if key in r]
    return statistics.mean(values) if values else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--methods", default="fullkv,fastkv", help="comma-separated method specs")
    ap.add_argument("--lengths", default="4096", help="prompt lengths in tokens")
    ap.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9", help="needle depths, shares of the filler")
    ap.add_argument("--seeds", type=int, default=2, help="passkeys per length and depth")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--precisions", default="float32,bfloat16,bfloat16+int8", help="the first is the reference")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    llms = {p: load(args.model, p) for p in precisions}
    compiled = {p: "compiled" in p.split("+")[1:] for p in precisions}
    for p in precisions:
        if compiled[p]:  # compile outside the timed prompts (minutes for int8 weights: autotuning)
            llms[p].generate("Warm up.", max_tokens=2, compile=True)
    reference = precisions[0]
    tokenizer = llms[reference].tokenizer
    prompts = [
        passkey_prompt(tokenizer, int(length), depth=float(depth), seed=seed)
        for length in args.lengths.split(",")
        for depth in args.depths.split(",")
        for seed in range(args.seeds)
    ]
    print(f"# {args.model}, {len(prompts)} passkey prompts ({args.lengths} tokens), greedy, {args.max_tokens} new")
    print(header())
    rows: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for n, needle in enumerate(prompts):
        for method in methods:
            got = {
                p: llm.generate(needle.text, method, max_tokens=args.max_tokens, compile=compiled[p])
                for p, llm in llms.items()
            }
            ref = got[reference]
            for p, r in got.items():
                row = {
                    "kl": first_token_kl(ref.first_logits, r.first_logits),
                    "argmax": int(ref.first_logits.argmax() == r.first_logits.argmax()),
                    "same": int(ref.token_ids == r.token_ids),
                    "correct": int(needle.is_correct(r.text)),
                    "prefill": r.stats.prefill_seconds,
                }
                if r.stats.decode_steps:
                    row["decode"] = 1000 * r.stats.decode_seconds / r.stats.decode_steps
                rows[method, p].append(row)
            answers = " ".join(f"{p} {r.text.strip()[:16]!r}" for p, r in got.items())
            head = f"[{n + 1}/{len(prompts)}] {method:>8}: depth {needle.depth:.1f} key {needle.answer}"
            print(f"{head} {answers}", flush=True)
    print()
    print(
        f"| method | precision | first-token KL vs {reference} mean / max | argmax agrees | identical answers "
        f"| passkey correct | prefill s (x {reference}) | decode ms/token (x {reference}) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for (method, p), found in rows.items():
        n = len(found)
        kl = [r["kl"] for r in found]
        base = rows[method, reference]
        pf, df = mean(found, "prefill"), mean(found, "decode")
        print(
            f"| {method} | {p} | {statistics.mean(kl):.4f} / {max(kl):.4f} | {sum(r['argmax'] for r in found)}/{n} "
            f"| {sum(r['same'] for r in found)}/{n} | {sum(r['correct'] for r in found)}/{n} "
            f"| {pf:.2f} ({mean(base, 'prefill') / pf:.2f}x) | {df:.1f} ({mean(base, 'decode') / df:.2f}x) |"
        )


def load(model: str, precision: str) -> LLM:
    """A model in "dtype", "dtype+int8" (either with "+compiled", which `main` reads)."""
    dtype, *options = precision.split("+")
    unknown = set(options) - {"int8", "compiled"}
    if unknown:
        raise SystemExit(f"unknown precision option(s) {', '.join(sorted(unknown))} in {precision!r}: int8, compiled")
    return LLM.load(model, dtype=dtype, quantize="int8" if "int8" in options else "none")


if __name__ == "__main__":
    main()
