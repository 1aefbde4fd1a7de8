"""Is our SnapKV a faithful SnapKV? The same RULER token ids through fastkv's `snapkv` and NVIDIA kvpress's
`SnapKVPress` at the same budget, answer by answer.

    python benchmarks/kvpress_check.py                     # 4K, 2 samples per task, retain 0.1 and 0.5
    python benchmarks/kvpress_check.py --samples 3 --retains 0.1,0.25,0.5

kvpress is not a dependency of fastkv: it runs in its own virtual environment with the transformers it
supports, made once with

    python -m venv ../.venv-kvpress && ../.venv-kvpress/bin/pip install torch==2.13.0 kvpress

Each RULER sample (`fastkv.eval.ruler`, seed 42, chat template, the question inside the prompt) is
tokenized here; the ids go to a worker in that environment, which loads the same float32 checkpoint
(fastkv's converted copy of the model) and prefills under `SnapKVPress(compression_ratio=1 - retain)`,
once with kvpress's defaults (window 64, kernel 5) and once with fastkv's snapkv window and kernel (8, 7),
then decodes greedily with explicit positions after the compressed cache. Here, fastkv runs FullKV,
`snapkv(retain_rate=r)` (max-pooled scores, the paper's code) and `snapkv(retain_rate=r, pooling=avg)`
(kvpress's pooling) on the same ids in float32. Per budget it prints each run's RULER score, paired 95%
intervals against fastkv's snapkv, and how many answers are identical. Outputs (resumable: the worker's
answers are kept) go to --out. Run nothing else meanwhile only if you read its seconds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from fastkv import LLM
from fastkv.eval import ruler as R
from fastkv.eval.paired import paired_difference
from fastkv.eval.report import interval
from fastkv.models import MODELS, prepare
from fastkv.precision import header
from fastkv.sampling import eos_ids

# Runs inside the kvpress environment: argv[1] = jobs.json, argv[2] = answers.jsonl (appended, resumable).
WORKER = r"""
import json, sys, time
import torch
from transformers import AutoModelForCausalLM, DynamicCache
from importlib.metadata import version
from kvpress import SnapKVPress
job = json.load(open(sys.argv[1]))
done = set()
try:
    for line in open(sys.argv[2]):
        r = json.loads(line); done.add((r["run"], r["task"], r["index"]))
except FileNotFoundError:
    pass
torch.set_num_threads(job["threads"])
model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32).eval()
eos = set(job["eos"])
with open(sys.argv[2], "a") as out:
    for s in job["samples"]:  # every run on a sample before the next sample: a stopped run still pairs
        for run in job["runs"]:
            if (run["name"], s["task"], s["index"]) in done:
                continue
            press = SnapKVPress(compression_ratio=run["compression_ratio"], window_size=run["window_size"],
                                kernel_size=run["kernel_size"])
            ids = torch.tensor([s["ids"]])
            cache = DynamicCache()
            start = time.perf_counter()
            with torch.inference_mode():
                with press(model):
                    logits = model(ids, past_key_values=cache, use_cache=True).logits[:, -1]
                kept = cache.get_seq_length()
                tokens, position = [], ids.shape[1]
                for _ in range(s["max_tokens"]):
                    token = int(logits.argmax(-1))
                    tokens.append(token)
                    if token in eos:
                        break
                    logits = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True,
                                   position_ids=torch.tensor([[position]])).logits[:, -1]
                    position += 1
            out.write(json.dumps({"run": run["name"], "task": s["task"], "index": s["index"], "tokens": tokens,
                                  "kept": kept, "seconds": time.perf_counter() - start,
                                  "kvpress": version("kvpress")}) + "\n")
            out.flush()
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=2, help="samples per RULER task (indices 0..n-1)")
    ap.add_argument("--tasks", default=",".join(R.TASKS), help="comma-separated RULER tasks")
    ap.add_argument("--retains", default="0.1,0.5", help="comma-separated retain rates (kvpress: 1 - compression)")
    ap.add_argument("--kvpress-python", type=Path, default=Path("../.venv-kvpress/bin/python"))
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", type=Path, default=Path("results/kvpress-snapkv-4k-qwen2.5-0.5b"))
    ap.add_argument("--report-only", action="store_true", help="report what --out holds, running nothing new")
    args = ap.parse_args()
    if not args.kvpress_python.exists():
        ap.error(f"no kvpress environment at {args.kvpress_python}: see this script's help for the two commands")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    llm = LLM.load(args.model, dtype="float32", quantize="none", progress=False)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    samples = [R.generate(task, llm.tokenizer, args.length, index=i) for task in tasks for i in range(args.samples)]
    ids = {(s.task, s.index): llm.tokenizer(R.render(llm.tokenizer, s.input, s.answer_prefix, True),
                                            add_special_tokens=False)["input_ids"] for s in samples}  # fmt: skip
    retains = [float(r) for r in args.retains.split(",")]
    kinds = (("defaults (window 64, kernel 5)", 64, 5), ("window 8, kernel 7", 8, 7))
    runs = [{"name": f"kvpress {kind} r={r:g}", "compression_ratio": round(1 - r, 6), "window_size": w,
             "kernel_size": k} for r in retains for kind, w, k in kinds]  # fmt: skip
    eos = sorted(eos_ids(llm.model, llm.tokenizer))
    model_dir = str(prepare(MODELS[args.model], progress=False))
    ours_path, answers = args.out / "fastkv.jsonl", args.out / "kvpress.jsonl"
    ours = {}
    if ours_path.exists():
        for line in ours_path.read_text().splitlines():
            r = json.loads(line)
            ours[(r["run"], r["task"], r["index"])] = r
    ours_runs = [("fastkv fullkv", "fullkv")]
    ours_runs += [(f"fastkv snapkv r={r:g}", f"snapkv(retain_rate={r})") for r in retains]
    # kvpress's SnapKV average-pools the scores; ours max-pools by default (the paper's code). With
    # pooling=avg at kvpress's window 8, kernel 7, the two should pick the same entries.
    ours_runs += [(f"fastkv snapkv avg-pool r={r:g}", f"snapkv(retain_rate={r}, pooling=avg)") for r in retains]
    # In waves of one sample per task (index 0 of every task, then index 1, ...), each wave through both
    # sides before the next: a run stopped early still pairs on whole tasks.
    for wave in [] if args.report_only else range(args.samples):
        batch = [s for s in samples if s.index == wave]
        with ours_path.open("a") as out:
            for name, spec in ours_runs:
                for s in batch:
                    if (name, s.task, s.index) in ours:
                        continue
                    result = llm.generate(ids[(s.task, s.index)], spec, max_tokens=s.max_tokens)
                    row = {"run": name, "task": s.task, "index": s.index, "tokens": result.token_ids,
                           "kept": result.stats.kv_entries_per_layer[0], "seconds": result.stats.prefill_seconds,
                           "spec": result.stats.method}  # fmt: skip
                    ours[(name, s.task, s.index)] = row
                    out.write(json.dumps(row) + "\n")
                    out.flush()
        job = {"model_dir": model_dir, "threads": args.threads, "eos": eos, "runs": runs,
               "samples": [{"task": s.task, "index": s.index, "ids": ids[(s.task, s.index)],
                            "max_tokens": s.max_tokens} for s in batch]}  # fmt: skip
        (args.out / "jobs.json").write_text(json.dumps(job))
        done = subprocess.run([str(args.kvpress_python), "-c", WORKER, str(args.out / "jobs.json"), str(answers)])
        if done.returncode != 0:
            sys.exit("the kvpress worker failed (its error is above)")
    theirs = {}
    for line in answers.read_text().splitlines() if answers.exists() else []:
        r = json.loads(line)
        theirs[(r["run"], r["task"], r["index"])] = r
    by_key = {(s.task, s.index): s for s in samples}
    names = [(name, ours) for name, _ in ours_runs]
    names += [(run["name"], theirs) for run in runs]
    common = [k for k in by_key if all((name, *k) in table for name, table in names)]  # answered by every run

    def rows_of(table: dict, name: str) -> list[dict]:
        found = []
        for (run, task, index), r in table.items():
            if run == name and (task, index) in common:
                text = llm.tokenizer.decode(r["tokens"], skip_special_tokens=True)
                found.append({**r, "text": text, "score": R.score(by_key[(task, index)], text)})
        return found

    print(header(f"{args.model} float32, both sides"))
    version = next(iter(theirs.values()))["kvpress"] if theirs else "?"
    print(f"# RULER {len(tasks)} tasks x {args.samples} samples at {args.length} tokens (the question inside the "
          f"compressed prompt), greedy; kvpress {version}; {len(common)} of {len(by_key)} samples answered by "
          "every run so far")  # fmt: skip
    print("| run | KV entries kept (layer 0, mean) | score | vs fastkv snapkv [95% CI] | identical answers to it "
          "| identical to fastkv snapkv avg-pool |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    full = rows_of(ours, "fastkv fullkv")
    if not full:
        print("(no sample answered by every run yet: run without --report-only to extend it)")
        return
    print(f"| fastkv fullkv | {sum(r['kept'] for r in full) / len(full):.0f} | "
          f"{100 * sum(r['score'] for r in full) / len(full):.1f} | - | - | - |")  # fmt: skip
    for r in retains:
        mine = rows_of(ours, f"fastkv snapkv r={r:g}")
        avg = rows_of(ours, f"fastkv snapkv avg-pool r={r:g}")
        mine_text = {(x["task"], x["index"]): x["text"].strip() for x in mine}
        avg_text = {(x["task"], x["index"]): x["text"].strip() for x in avg}
        for name, found in [(f"fastkv snapkv r={r:g}", mine), (f"fastkv snapkv avg-pool r={r:g}", avg)] + [
            (run["name"], rows_of(theirs, run["name"])) for run in runs if run["name"].endswith(f"r={r:g}")
        ]:
            same = sum(mine_text.get((x["task"], x["index"])) == x["text"].strip() for x in found)
            same_avg = sum(avg_text.get((x["task"], x["index"])) == x["text"].strip() for x in found)
            versus = interval(paired_difference(found, mine)) if found is not mine else "-"
            kept = sum(x["kept"] for x in found) / len(found)
            print(f"| {name} | {kept:.0f} | {100 * sum(x['score'] for x in found) / len(found):.1f} | {versus} | "
                  f"{same}/{len(found)} | {same_avg}/{len(found)} |")  # fmt: skip
    # Per task: each run's score (mean over the common samples), and for kvpress how many answers are
    # fastkv snapkv's at the same budget.
    order = ["fastkv fullkv"]
    for r in retains:
        order += [f"fastkv snapkv r={r:g}", f"fastkv snapkv avg-pool r={r:g}"]
        order += [run["name"] for run in runs if run["name"].endswith(f"r={r:g}")]
    by_run = {}
    for n in order:
        by_run[n] = {(x["task"], x["index"]): x for x in rows_of(ours if n.startswith("fastkv") else theirs, n)}
    print("\nPer task (score; for kvpress, answers identical to fastkv snapkv's at the same budget):\n")
    print("| task | " + " | ".join(order) + " |")
    print("|---|" + "---|" * len(order))
    for task in tasks:
        cells = []
        for n in order:
            mine = by_run[f"fastkv snapkv {n.rsplit(' ', 1)[-1]}"] if n.startswith("kvpress") else None
            rows = [x for (t, _), x in by_run[n].items() if t == task]
            cell = f"{100 * sum(x['score'] for x in rows) / len(rows):.0f}" if rows else "-"
            if mine is not None and rows:
                same = sum(mine[(x["task"], x["index"])]["text"].strip() == x["text"].strip() for x in rows)
                cell += f" ({same}/{len(rows)})"
            cells.append(cell)
        print(f"| {task} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
