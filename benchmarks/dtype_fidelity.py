"""What bfloat16 costs against float32 on passkey retrieval: first-token KL, greedy agreement, accuracy, speed.

    python benchmarks/dtype_fidelity.py                               # qwen2.5-0.5b, 4K, FullKV and FastKV
    python benchmarks/dtype_fidelity.py --lengths 2048,8192 --methods fullkv,snapkv,fastkv --seeds 3

The model is loaded once in each dtype. Every passkey prompt (`fastkv.passkey_prompt`, one per length x
depth x seed) runs greedily under each method in both dtypes, one after the other in this process. Per
method it prints: the mean and largest first-token KL(float32 || bfloat16), how often the first token's
argmax agrees, how many answers are identical, passkey accuracy in each dtype, and the mean prefill
seconds and decode ms/token in each dtype with their ratio. `fastkv` takes the model's calibrated
profile, as `fastkv generate` would.

The RULER half of the fidelity check compares two committed evaluation runs instead:
`benchmarks/compare_runs.py results/ruler-4k-7methods-qwen2.5-0.5b results/ruler-4k-sweep-qwen2.5-0.5b-bfloat16`.
"""

from __future__ import annotations

import argparse
import platform
import statistics
from collections import defaultdict

import torch

from fastkv import LLM, passkey_prompt
from fastkv.eval.runner import first_token_kl

DTYPES = ("float32", "bfloat16")


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
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    llms = {dtype: LLM.load(args.model, dtype=dtype) for dtype in DTYPES}
    tokenizer = llms["float32"].tokenizer
    prompts = [
        passkey_prompt(tokenizer, int(length), depth=float(depth), seed=seed)
        for length in args.lengths.split(",")
        for depth in args.depths.split(",")
        for seed in range(args.seeds)
    ]
    print(f"# {args.model}, {len(prompts)} passkey prompts ({args.lengths} tokens), greedy, {args.max_new_tokens} new")
    print(f"# {platform.machine()}, {args.threads} threads, torch {torch.__version__}")
    rows: dict[str, list[dict]] = defaultdict(list)
    for n, needle in enumerate(prompts):
        for method in methods:
            got = {
                dtype: llm.generate(needle.text, method, max_new_tokens=args.max_new_tokens, chat=True)
                for dtype, llm in llms.items()
            }
            a, b = got["float32"], got["bfloat16"]
            row = {
                "kl": first_token_kl(a.first_logits, b.first_logits),
                "argmax": int(a.first_logits.argmax() == b.first_logits.argmax()),
                "same": int(a.token_ids == b.token_ids),
            }
            for dtype, r in got.items():
                row[f"correct {dtype}"] = int(needle.is_correct(r.text))
                row[f"prefill {dtype}"] = r.stats.prefill_seconds
                if r.stats.decode_steps:
                    row[f"decode {dtype}"] = 1000 * r.stats.decode_seconds / r.stats.decode_steps
            rows[method].append(row)
            print(
                f"[{n + 1}/{len(prompts)}] {method:>8}: depth {needle.depth:.1f} key {needle.answer} "
                f"f32 {a.text.strip()[:24]!r} bf16 {b.text.strip()[:24]!r} KL {row['kl']:.4f}",
                flush=True,
            )
    print()
    print(
        "| method | first-token KL mean / max | argmax agrees | identical answers | passkey f32 | passkey bf16 "
        "| prefill s f32 / bf16 | decode ms/token f32 / bf16 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for method, found in rows.items():
        n = len(found)
        kl = [r["kl"] for r in found]
        pf, pb = mean(found, "prefill float32"), mean(found, "prefill bfloat16")
        df, db = mean(found, "decode float32"), mean(found, "decode bfloat16")
        print(
            f"| {method} | {statistics.mean(kl):.4f} / {max(kl):.4f} | {sum(r['argmax'] for r in found)}/{n} "
            f"| {sum(r['same'] for r in found)}/{n} | {sum(r['correct float32'] for r in found)}/{n} "
            f"| {sum(r['correct bfloat16'] for r in found)}/{n} | {pf:.2f} / {pb:.2f} ({pf / pb:.2f}x) "
            f"| {df:.1f} / {db:.1f} ({df / db:.2f}x) |"
        )


if __name__ == "__main__":
    main()
