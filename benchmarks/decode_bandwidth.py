"""How close does a decode step come to the machine's memory bandwidth? Bytes a step reads (every weight
once, plus the KV cache) over its time, against a measured read bandwidth, in one run.

    python benchmarks/decode_bandwidth.py                       # qwen2.5-0.5b, 4K prompt, default precision
    python benchmarks/decode_bandwidth.py --precisions float32,auto --methods fullkv,fastkv

Read bandwidth: the median time of summing a 1 GiB float32 tensor (`--threads` threads: all the reading a
decode step can do), and of copying it (read + write). A decode step's bytes: the decoder layers' and the
output layer's weights as held (`fastkv.precision.decode_weight_bytes`), plus its KV cache after prefill
(the method's budget). Its time: the engine's mean step over `--steps` greedy tokens after a 4K prefill.
The share is bytes / time / read bandwidth: what is left to gain by reading faster, not by reading less.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fastkv import LLM
from fastkv.precision import decode_weight_bytes, header


def bandwidth_gb_s(gib: float = 1.0, reps: int = 5) -> tuple[float, float]:
    """(read, copy) GB/s: summing a tensor of `gib` GiB, and copying it (counting both directions)."""
    a = torch.ones(int(gib * 2**30) // 4)
    b = torch.empty_like(a)
    reads, copies = [], []
    for _ in range(reps):
        start = time.perf_counter()
        a.sum()
        reads.append(time.perf_counter() - start)
        start = time.perf_counter()
        b.copy_(a)
        copies.append(time.perf_counter() - start)
    size = a.numel() * 4
    return size / statistics.median(reads) / 1e9, 2 * size / statistics.median(copies) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--methods", default="fastkv", help="comma-separated method specs")
    ap.add_argument("--precisions", default="auto", help="auto, or dtype[+int8], comma-separated")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    read, copy = bandwidth_gb_s()
    print(header())
    print(f"# measured bandwidth: read {read:.1f} GB/s, copy (read + write) {copy:.1f} GB/s; {args.model}, "
          f"{args.length}-token random prompt, mean of {args.steps} decode steps")  # fmt: skip
    print("| precision | method | weights MiB | KV MiB | step ms | GB/s read | share of read bandwidth |")
    print("|---|---|---|---|---|---|---|")
    for precision in [p.strip() for p in args.precisions.split(",") if p.strip()]:
        dtype, _, quantize = precision.partition("+")
        llm = LLM.load(args.model, dtype=dtype, quantize=quantize or ("auto" if dtype == "auto" else "none"),
                       progress=False)  # fmt: skip
        weights = decode_weight_bytes(llm.model)
        ids = torch.randint(1000, 20000, (args.length,), generator=torch.Generator().manual_seed(0)).tolist()
        for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
            llm.generate(ids[:256], method, max_tokens=4, ignore_eos=True)  # warm up
            s = llm.generate(ids, method, max_tokens=args.steps + 1, ignore_eos=True).stats
            step = s.decode_seconds / max(1, s.decode_steps)
            moved = weights + s.kv_bytes
            print(f"| {llm.precision} | {method} | {weights / 2**20:.0f} | {s.kv_bytes / 2**20:.1f} | "
                  f"{1000 * step:.1f} | {moved / step / 1e9:.1f} | {moved / step / 1e9 / read:.0%} |")  # fmt: skip


if __name__ == "__main__":
    main()
