"""Five questions about one long document, asked turn by turn in a chat: with and without the prefix store,
and against llama.cpp with its own prefix reuse, side by side in one run.

    python benchmarks/multi_turn.py                                   # 4K and 8K, fullkv/snapkv/fastkv
    python benchmarks/multi_turn.py --lengths 8192 --methods fastkv   # the session the issue asks about
    python benchmarks/multi_turn.py --llama-python .venv-llamacpp/bin/python

The session is `fastkv eval multiq`'s (`fastkv.eval.multiq.session`): five facts ("The code of the red room
is 48213.") at even depths in Paul Graham's essays; question k asks for fact k; turn k's prompt is the
conversation so far under the chat template, with a fixed reply (the fact itself) after every earlier
question, so that every engine sees the very same token ids in every turn, whatever it answered. Each turn
generates exactly --new-tokens tokens (greedy, EOS ignored).

- fastkv: each method without a store (every turn a fresh prefill) and with one (`LLM(prefix_cache_mib=...)`:
  turn k + 1 starts from turn k's stored state and recompresses for its own question);
- llama.cpp (llama-cpp-python in its own environment, as benchmarks/vs_llamacpp.py): one `Llama` object
  for the session, whose `generate` reuses the longest common prefix of the tokens it evaluated before;
  same GGUF (quantized as shipped), same threads.

It prints, per engine: turn 1's time to first token, the mean over turns 2-5, the whole session's time, the
KV bytes of the running request after its prefill and of the store, the prompt tokens reused, and how many
answers hold their fact. The machine is shared: run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from fastkv import LLM
from fastkv.eval.multiq import session
from fastkv.models import cache_root, write_gguf
from fastkv.precision import header
from fastkv.sampling import eos_ids

# Runs inside the llama.cpp environment: {"gguf", "turns": [ids, ...], "new", "threads", "n_batch"} on stdin.
WORKER = r"""
import json, sys, time
from llama_cpp import Llama, __version__
job = json.load(sys.stdin)
llm = Llama(model_path=job["gguf"], n_ctx=max(len(t) for t in job["turns"]) + job["new"] + 16,
            n_threads=job["threads"], n_threads_batch=job["threads"], n_batch=job["n_batch"],
            n_ubatch=job["n_batch"], verbose=False)
for _ in llm.generate(job["turns"][0][:64], top_k=1, temp=0.0):  # warm-up, then a clean start
    break
llm.reset()
out = []
for ids in job["turns"]:
    start = time.perf_counter()
    tokens, first = [], None
    for token in llm.generate(ids, top_k=1, temp=0.0, reset=True):  # reuses the common prefix
        first = first or time.perf_counter()
        tokens.append(token)
        if len(tokens) == job["new"]:
            break
    done = time.perf_counter()
    text = llm.detokenize(tokens).decode("utf-8", "replace")
    out.append({"ttft": first - start, "total": done - start, "text": text})
print(json.dumps({"version": __version__, "turns": out}))
"""


def run_fastkv(llm: LLM, turns: list[list[int]], method: str, store_mib: float, new: int) -> dict:
    llm.use_prefix_cache(store_mib)
    llm.generate(turns[0][:32], method, max_tokens=2)  # warm-up (shorter than a block: never stored)
    out = []
    for ids in turns:
        start = time.perf_counter()
        result = llm.generate(ids, method, max_tokens=new, ignore_eos=True)
        s = result.stats
        eos = [i for i, t in enumerate(result.token_ids) if t in eos_ids(llm.model, llm.tokenizer)]
        out.append({
            "ttft": s.prefill_seconds, "total": time.perf_counter() - start, "text": result.text,
            "answer": result.token_ids[: eos[0] + 1] if eos else result.token_ids,  # up to its first EOS
            "kv": s.kv_bytes, "reused": s.prefix_tokens_reused, "spec": s.method,
            "store": llm.prefix_cache.bytes if llm.prefix_cache else 0, "prompt": s.prompt_tokens,
        })  # fmt: skip
    llm.use_prefix_cache(0)
    return {"turns": out}


def run_llamacpp(python: Path, gguf: Path, turns: list[list[int]], args) -> dict:
    job = {"gguf": str(gguf), "turns": turns, "new": args.new_tokens, "threads": args.threads, "n_batch": 512}
    done = subprocess.run([str(python), "-c", WORKER], input=json.dumps(job), capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"llama.cpp worker failed ({python}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(name: str, run: dict, codes: list[str]) -> tuple[str, float]:
    turns = run["turns"]
    later = turns[1:]
    right = sum(code in t["text"] for t, code in zip(turns, codes, strict=True))
    kv = f"{turns[-1]['kv'] / 2**20:.1f}" if "kv" in turns[-1] else "-"
    store = f"{max(t['store'] for t in turns) / 2**20:.1f}" if "store" in turns[-1] else "-"
    reused = "/".join(str(t["reused"]) for t in turns) if "reused" in turns[-1] else "longest common prefix"
    mean = sum(t["ttft"] for t in later) / len(later) if later else float("nan")
    session = sum(t["total"] for t in turns)
    return (f"| {name} | {turns[0]['ttft']:.2f} | {mean:.2f} | {session:.2f} | {kv} | {store} | {reused} "
            f"| {right}/{len(turns)} |"), session  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--lengths", default="4096,8192", help="document lengths in tokens")
    ap.add_argument("--methods", default="fullkv,snapkv,fastkv", help="comma-separated fastkv method specs")
    ap.add_argument("--questions", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--store-mib", type=float, default=1024, help="the prefix store's size")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--quantize", default="auto")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--llama-python", type=Path, default=Path(".venv-llamacpp/bin/python"),
                    help="python of an environment with llama-cpp-python (skipped if absent)")  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM.load(args.model, dtype=args.dtype, quantize=args.quantize)
    print(header(f"{args.model} {llm.precision}"))
    print(f"# {args.questions} questions per document, {args.new_tokens} new tokens per turn, greedy, EOS ignored")
    for length in [int(x) for x in args.lengths.split(",") if x.strip()]:
        s = session(llm.tokenizer, length, args.seed, 0, args.questions)
        turns, facts = s.turns, s.codes
        print(f"\n## {len(turns[0])}-token document; turn prompts of {', '.join(str(len(t)) for t in turns)} tokens\n")
        print("| engine | turn 1 TTFT s | turns 2-5 TTFT s | session s | KV MiB (running) | store MiB "
              "| tokens reused per turn | answers right |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|")
        sessions = {}
        if args.llama_python.exists():
            gguf = write_gguf(args.model, cache_root() / "gguf" / f"{args.model}.gguf")
            cpp = run_llamacpp(args.llama_python, gguf, turns, args)
            line, sessions["llama.cpp"] = report(f"llama.cpp {cpp['version']} ({gguf.name}), prefix reuse", cpp, facts)
            print(line, flush=True)
        same = {}
        for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
            fresh = None
            for mib in (0, args.store_mib):
                run = run_fastkv(llm, turns, method, mib, args.new_tokens)
                name = f"fastkv {method}, {'store' if mib else 'no store'}"
                line, sessions[name] = report(name, run, facts)
                print(line, flush=True)
                if fresh is None:
                    fresh = run
                else:  # the store's follow-ups against fresh prefills of the same prompts
                    pairs = list(zip(fresh["turns"][1:], run["turns"][1:], strict=True))
                    speedup = sum(a["ttft"] for a, _ in pairs) / sum(b["ttft"] for _, b in pairs)
                    answers = sum(a["answer"] == b["answer"] for a, b in pairs)
                    tokens = sum(a["text"] == b["text"] for a, b in pairs)
                    n = len(pairs)
                    same[method] = (
                        f"follow-up prefill {speedup:.2f}x faster; answers (to their first EOS) the "
                        f"same in {answers}/{n}, all {args.new_tokens} tokens the same in {tokens}/{n}"
                    )
        for method, line in same.items():
            print(f"# fastkv {method} with the store against without: {line}")
        if "llama.cpp" in sessions:
            for name, seconds in sessions.items():
                print(f"# {name}: session {seconds:.1f} s, {sessions['llama.cpp'] / seconds:.2f}x llama.cpp's")


if __name__ == "__main__":
    main()
