"""What one evaluation sample costs when one prefill serves every method, against one FullKV run.

    python benchmarks/shared_eval.py                         # 4K RULER niah_single_1, seven methods
    python benchmarks/shared_eval.py --task vt --length 8192

Times, in one process: FullKV alone on the sample (prefill + generation), then the seven methods
{fullkv, snapkv, adakv, pyramidkv, gemfilter, fastkv (paper defaults), fastkv (the model's calibrated
profile)} from one shared prefill (`generate_many`), then each method alone, and checks that the shared
answers equal the separate ones token for token (and the first-token logits bit for bit).
"""

from __future__ import annotations

import argparse
import time

import torch

from fastkv import LLM
from fastkv.eval import ruler
from fastkv.methods import parse
from fastkv.precision import header


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--task", default="niah_single_1", choices=ruler.TASKS)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--retain-rate", type=float, default=0.1)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    llm = LLM.load(args.model, dtype=args.dtype, progress=False)
    sample = ruler.generate(args.task, llm.tokenizer, args.length, seed=42, index=0, chat=True)
    text = ruler.render(llm.tokenizer, sample.input, sample.answer_prefix, True)
    ids = llm.tokenizer(text, add_special_tokens=False)["input_ids"]
    r = args.retain_rate
    calibrated, source = llm.resolve(f"fastkv(retain_rate={r})")
    # Method objects, so that no profile applies: fastkv here is the paper's
    specs = ["fullkv", f"snapkv(retain_rate={r})", f"adakv(retain_rate={r})", f"pyramidkv(retain_rate={r})"]
    methods = [parse(s) for s in [*specs, f"gemfilter(retain_rate={r})", f"fastkv(retain_rate={r})"]]
    methods.append(calibrated if source != "paper" else parse(f"fastkv(retain_rate={r}, kernel_size=13)"))
    options = {"max_tokens": sample.max_tokens}
    print(header())
    print(f"# {args.model} {args.dtype}, RULER {args.task}, {len(ids)} tokens")
    print(f"# calibrated fastkv: {source or 'none'}")

    llm.generate(ids[:256], "fullkv", max_tokens=2)  # warm-up
    full, full_s = timed(lambda: llm.generate(ids, "fullkv", **options))
    many, many_s = timed(lambda: llm.generate_many(ids, methods, **options))
    alone = [timed(lambda m=m: llm.generate(ids, m, **options)) for m in methods]
    print(f"\n{'method':<70} {'alone s':>8} {'tokens':>6} {'same':>5}  answer")
    for result, (solo, seconds) in zip(many, alone, strict=True):
        same = result.token_ids == solo.token_ids and torch.equal(result.first_logits, solo.first_logits)
        print(
            f"{result.method[:70]:<70} {seconds:>8.1f} {len(result.token_ids):>6} {'yes' if same else 'NO':>5}  "
            f"{result.text.strip()[:30]!r}"
        )
    separate = sum(s for _, s in alone)
    print(f"\nFullKV alone (prefill + {len(full.token_ids)} tokens): {full_s:.1f} s")
    print(f"{len(methods)} methods, one shared prefill:     {many_s:.1f} s = {many_s / full_s:.2f}x FullKV alone")
    print(f"{len(methods)} methods, each alone:             {separate:.1f} s = {separate / full_s:.2f}x FullKV alone")
    same = all(r.token_ids == s.token_ids for r, (s, _) in zip(many, alone, strict=True))
    print(f"shared answers equal separate answers: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
