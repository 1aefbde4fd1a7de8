"""Time to answer a long prompt: fastkv at its CPU default against llama.cpp on the same GGUF, side by side.

    python -m venv .venv-llamacpp && .venv-llamacpp/bin/pip install llama-cpp-python   # once; builds llama.cpp
    python benchmarks/vs_llamacpp.py                          # qwen2.5-0.5b, 8K-token prompt, 64 new tokens
    python benchmarks/vs_llamacpp.py --length 4096 --methods fastkv --dtype float32

llama-cpp-python is not a dependency of fastkv: it runs in its own environment (--llama-python), in a
child process fed the very token ids fastkv prefills. Both sides use the same number of threads and
generate exactly --new-tokens tokens greedily (EOS does not stop either), so both do the same work:

- llama.cpp: the registered model's original GGUF file (for qwen2.5-0.5b, Q4_K_M quantized weights),
  written once next to the cache by `fastkv.models.write_gguf`; prompt evaluation in batches of
  --n-batch tokens, then one `eval` per new token;
- fastkv: `LLM.generate` under each method, in --dtype and --quantize (default: the device's default,
  bfloat16 with int8 weight-only linears on CPUs with AVX512-BF16), on the same GGUF dequantized.

Each side first runs a short warm-up prompt; then the long prompt is timed once. It prints prefill
seconds, decode ms/token and time to answer (prefill + all new tokens) for each, and each fastkv
method's speedup over llama.cpp. The machine is shared: run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from fastkv import LLM
from fastkv.chat import encode_prompt
from fastkv.models import cache_root, write_gguf
from fastkv.needle import passkey_prompt
from fastkv.precision import header

# Runs inside the llama.cpp environment: reads {"gguf", "ids", "warmup", "new", "threads", "n_batch"} on
# stdin, prints one JSON line of timings.
WORKER = r"""
import json, sys, time
from llama_cpp import Llama, __version__
job = json.load(sys.stdin)
llm = Llama(model_path=job["gguf"], n_ctx=len(job["ids"]) + job["new"] + 16, n_threads=job["threads"],
            n_threads_batch=job["threads"], n_batch=job["n_batch"], n_ubatch=job["n_batch"], verbose=False)
def answer(ids, new):
    llm.reset()
    start = time.perf_counter()
    llm.eval(ids)
    prefilled = time.perf_counter()
    out = []
    for i in range(new):
        token = llm.sample(top_k=1, temp=0.0)
        out.append(token)
        if i + 1 < new:
            llm.eval([token])
    done = time.perf_counter()
    return {"prefill_s": prefilled - start, "decode_s": done - prefilled, "steps": new - 1, "tokens": out}
answer(job["warmup"], 4)
found = answer(job["ids"], job["new"])
found["version"] = __version__
found["text"] = llm.detokenize(found["tokens"]).decode("utf-8", "replace")
print(json.dumps(found))
"""


def run_llamacpp(python: Path, gguf: Path, ids: list[int], warmup: list[int], args) -> dict:
    job = {"gguf": str(gguf), "ids": ids, "warmup": warmup, "new": args.new_tokens, "threads": args.threads,
           "n_batch": args.n_batch}  # fmt: skip
    done = subprocess.run([str(python), "-c", WORKER], input=json.dumps(job), capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"llama.cpp worker failed ({python}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_fastkv(llm: LLM, ids: list[int], warmup: list[int], method: str, args) -> dict:
    options = {"max_tokens": args.new_tokens, "ignore_eos": True, "compile": args.compile}
    llm.generate(warmup, method, **{**options, "max_tokens": 4})
    start = time.perf_counter()
    result = llm.generate(ids, method, **options)
    total = time.perf_counter() - start
    s = result.stats
    return {"prefill_s": s.prefill_seconds, "decode_s": s.decode_seconds, "steps": s.decode_steps, "total_s": total,
            "text": result.text, "spec": s.method}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-0.5b", help="a registered model (llama.cpp reads its GGUF)")
    ap.add_argument("--length", type=int, default=8192, help="prompt tokens (a passkey prompt, chat template)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--methods", default="fastkv,fullkv", help="comma-separated fastkv method specs")
    ap.add_argument("--dtype", default="auto", help="fastkv's dtype (auto: the device's default)")
    ap.add_argument("--quantize", default="auto", help="fastkv's weights (auto: int8 with bfloat16 on CPU), none, int8")
    ap.add_argument("--compile", action="store_true", help="fastkv decodes under torch.compile")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--n-batch", type=int, default=512, help="llama.cpp's prompt batch size")
    ap.add_argument("--llama-python", type=Path, default=Path(".venv-llamacpp/bin/python"),
                    help="python of an environment with llama-cpp-python")  # fmt: skip
    args = ap.parse_args()
    if not args.llama_python.exists():
        ap.error(
            f"no llama.cpp environment at {args.llama_python}: create one with\n"
            "    python -m venv .venv-llamacpp && .venv-llamacpp/bin/pip install llama-cpp-python"
        )
    torch.set_num_threads(args.threads)
    gguf = write_gguf(args.model, cache_root() / "gguf" / f"{args.model}.gguf")
    llm = LLM.load(args.model, dtype=args.dtype, quantize=args.quantize)
    needle = passkey_prompt(llm.tokenizer, args.length, depth=0.5)
    ids = encode_prompt(llm.tokenizer, needle.text, chat=True)
    warmup = ids[:64]
    print(header())
    print(f"# {args.model}: {len(ids)}-token passkey prompt (answer {needle.answer}), {args.new_tokens} new tokens, "
          f"greedy, EOS ignored; {args.threads} threads, {platform.machine()}, torch {torch.__version__}")  # fmt: skip
    rows = {}
    cpp = run_llamacpp(args.llama_python, gguf, ids, warmup, args)
    cpp["total_s"] = cpp["prefill_s"] + cpp["decode_s"]
    rows[f"llama.cpp {cpp['version']} ({gguf.name}, quantized as shipped)"] = cpp
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        found = run_fastkv(llm, ids, warmup, method, args)
        rows[f"fastkv {method} ({llm.precision}{', compiled' if args.compile else ''})"] = found
    print()
    print("| engine | prefill s | decode ms/token | time to answer s | vs llama.cpp | passkey found |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        per, speedup = 1000 * r["decode_s"] / max(r["steps"], 1), cpp["total_s"] / r["total_s"]
        print(f"| {name} | {r['prefill_s']:.2f} | {per:.1f} | {r['total_s']:.2f} | {speedup:.2f}x "
              f"| {needle.answer in r['text']} |")  # fmt: skip
    for name, r in rows.items():
        print(f"# {name}: {r['text'][:80]!r}")


if __name__ == "__main__":
    main()
