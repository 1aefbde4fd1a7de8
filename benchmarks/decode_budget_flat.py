"""Does decoding stay flat over a long generation? Decode ms/token and KV MiB every 1K new tokens, with and
without a decode-time budget, in one process (issue 30).

    python benchmarks/decode_budget_flat.py          # qwen2.5-0.5b, 4K prompt, 8K new tokens (EOS ignored)
    python benchmarks/decode_budget_flat.py --new 2048 --every 256 --methods 'fullkv,fullkv(decode_budget=256)'

Each method: one prompt prefilled (random token ids), then `--new` tokens decoded greedily, EOS ignored. ms/token
is the mean step time over each block of `--every` tokens; KV MiB is what the cache holds at the block's end
(the prompt's entries and the generated ones). Without a budget both grow with every token; with one, the
generated part is cut back to `decode_budget` every `decode_interval` tokens, so both stay flat.
"""

from __future__ import annotations

import argparse
import time

import torch

from fastkv import LLM
from fastkv.batch import DecodeBatch, prefill_prompt
from fastkv.layer import PrefillOptions
from fastkv.methods import split_specs
from fastkv.precision import header
from fastkv.sampling import SamplingParams


def run(llm: LLM, ids: list[int], spec: str, new: int, every: int) -> list[tuple[int, float, float]]:
    """(tokens so far, mean ms/token of the block, KV MiB at its end) per block of `every` new tokens."""
    method, _ = llm.resolve(spec)
    params = SamplingParams(max_tokens=new + 2, ignore_eos=True)  # the row outlives the last block
    prefilled = prefill_prompt(llm.adapter, ids, method, PrefillOptions(params.max_tokens))
    batch = DecodeBatch(llm.model, llm.tokenizer)
    batch.join(0, prefilled, params)
    rows, done = [], 0
    while done < new:
        start = time.perf_counter()
        for _ in range(every):
            batch.step()
        seconds = time.perf_counter() - start
        done += every
        rows.append((done, 1000 * seconds / every, batch.cache.nbytes() / 2**20 if batch.cache else float("nan")))
        print(f"# {spec}: {done} new tokens, {rows[-1][1]:.1f} ms/token, {rows[-1][2]:.1f} KV MiB", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--length", type=int, default=4096, help="prompt tokens")
    ap.add_argument("--new", type=int, default=8192, help="new tokens (a multiple of --every)")
    ap.add_argument("--every", type=int, default=1024)
    ap.add_argument("--methods", default="fullkv,fullkv(decode_budget=1024)", help="two or more method specs")
    ap.add_argument("--precision", default="auto", help="auto, or dtype[+int8]")
    args = ap.parse_args()
    if args.new % args.every:
        ap.error(f"--new ({args.new}) must be a multiple of --every ({args.every})")
    dtype, _, quantize = args.precision.partition("+")
    llm = LLM.load(args.model, dtype=dtype, quantize=quantize or ("auto" if dtype == "auto" else "none"),
                   progress=False)  # fmt: skip
    specs = split_specs(args.methods)  # a spec's own commas sit inside its parentheses
    ids = torch.randint(1000, 20000, (args.length,), generator=torch.Generator().manual_seed(0)).tolist()
    llm.generate(ids[:256], "fullkv", max_tokens=4, ignore_eos=True)  # warm up
    print(header(llm.precision))
    print(f"# {args.model}, {args.length}-token random prompt, {args.new} new tokens (EOS ignored), greedy; "
          f"ms/token: mean over each block of {args.every}; KV MiB: held at the block's end")  # fmt: skip
    results = {spec: run(llm, ids, spec, args.new, args.every) for spec in specs}
    print("| new tokens | " + " | ".join(f"{s} ms/token | {s} KV MiB" for s in specs) + " |")
    print("|---|" + "---|---|" * len(specs))
    for b in range(args.new // args.every):
        cells = " | ".join(f"{results[s][b][1]:.1f} | {results[s][b][2]:.1f}" for s in specs)
        print(f"| {results[specs[0]][b][0]} | {cells} |")


if __name__ == "__main__":
    main()
