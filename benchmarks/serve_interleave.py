"""Do running streams keep flowing while a long prompt prefills? Inter-token latency, with and without
chunked prefill interleaved with decode steps, side by side in one run.

    python benchmarks/serve_interleave.py                        # 4 streams at 2K, an 8K prompt arriving
    python benchmarks/serve_interleave.py --chunks 0,256 --budgets 1024,8192 --shares 0,1

For each server setting (`--prefill-chunk` x `--prefill-budget` x `--prefill-share`; chunk 0: whole
prefills) the server runs in this process (127.0.0.1) with `--streams` clients streaming chat completions
of `--stream-tokens`-token prompts (EOS ignored), with logprobs, so that every token is timed as it
arrives. Once every stream is decoding, a request with a `--long-tokens` prompt arrives. The
gaps between a stream's tokens before it arrived give the p50 inter-token latency with no prefill running;
every gap that overlaps the time from its arrival to its answer gives p99 and max. Run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import httpx

from fastkv import LLM
from fastkv.eval.multiq import document
from fastkv.precision import header
from fastkv.serve.thread import ServerThread


def stream(url: str, model: str, text: str, tokens: int, arrivals: list[float], stop: threading.Event) -> None:
    # logprobs, so that every token arrives in its own chunk, its text final or not (an unfinished character,
    # an end-of-turn token skipped as special): each token's arrival is timed, not only visible text's.
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "logprobs": True}  # fmt: skip
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                choices = json.loads(line[6:])["choices"]
                logprobs = choices[0].get("logprobs") if choices else None
                arrivals.extend([time.perf_counter()] * len(logprobs["content"] if logprobs else []))
            if stop.is_set():
                break


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def run(llm: LLM, args, chunk: int, budget: int, share: float) -> dict:
    server = ServerThread(llm, args.model, args.method, kv_mib=4096, prefix_cache_mib=0, max_batch=8,
                          prefill_chunk=chunk or None, prefill_budget=budget, prefill_share=share)  # fmt: skip
    try:
        short = [document(llm.tokenizer, args.stream_tokens, 100 + i, 1)[0] + "\n\nSummarise."
                 for i in range(args.streams)]  # fmt: skip
        arrivals: list[list[float]] = [[] for _ in short]
        stop = threading.Event()
        threads = [threading.Thread(target=stream, args=(server.url, args.model, text, 1000, arrivals[i], stop),
                                    daemon=True) for i, text in enumerate(short)]  # fmt: skip
        for t in threads:
            t.start()
        while min(len(a) for a in arrivals) < 8:  # every stream decoding
            time.sleep(0.05)
        decoding = time.perf_counter()  # every stream past its own prefill
        time.sleep(args.settle)
        long_text = document(llm.tokenizer, args.long_tokens, 7, 1)[0] + "\n\nSummarise."
        arrived = time.perf_counter()
        body = {"model": args.model, "messages": [{"role": "user", "content": long_text}], "max_tokens": 1,
                "temperature": 0}  # fmt: skip
        reply = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=900).json()
        answered = time.perf_counter()
        time.sleep(1.0)
        stop.set()
        quiet, busy = [], []
        for a in arrivals:
            for t0, t1 in zip(a, a[1:], strict=False):
                if t1 <= arrived:
                    if t0 >= decoding:
                        quiet.append(t1 - t0)
                elif t0 < answered:  # a gap that overlaps the long prompt's prefill (or its queueing)
                    busy.append(t1 - t0)
        return {"quiet_p50": statistics.median(quiet), "quiet_max": max(quiet),
                "busy_p50": statistics.median(busy) if busy else float("nan"),
                "busy_p99": percentile(busy, 0.99), "busy_max": max(busy) if busy else float("nan"),
                "prefill_s": reply["fastkv"]["prefill_seconds"], "tokens_during": len(busy),
                "long_tokens": reply["usage"]["prompt_tokens"]}  # fmt: skip
    finally:
        server.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--method", default="fastkv")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--stream-tokens", type=int, default=2048)
    ap.add_argument("--long-tokens", type=int, default=8192)
    ap.add_argument("--chunks", default="0,256", help="comma-separated --prefill-chunk values (0: whole prefills)")
    ap.add_argument("--budgets", default="8192", help="comma-separated --prefill-budget values")
    ap.add_argument("--shares", default="1", help="comma-separated --prefill-share values (0: the token budget alone)")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds of decoding before the long prompt arrives")
    args = ap.parse_args()
    llm = LLM.load(args.model)
    print(header(f"{args.model} {llm.precision}"))
    print(f"# {args.streams} streams of "
          f"{args.stream_tokens}-token prompts decoding, then a {args.long_tokens}-token prompt arrives "
          f"({args.method})")  # fmt: skip
    print("| --prefill-chunk | --prefill-budget | --prefill-share | ITL p50 s, no prefill | max, no prefill | during "
          "the prefill: p50 | p99 | max | max / quiet p50 | long prefill s | tokens streamed during it |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    settings = [(0, 0, 0.0)] if "0" in args.chunks.split(",") else []
    settings += [(int(c), int(b), float(s)) for c in args.chunks.split(",") if int(c)
                 for b in args.budgets.split(",") for s in args.shares.split(",")]  # fmt: skip
    for chunk, budget, share in settings:
        r = run(llm, args, chunk, budget or 1, share)
        print(f"| {chunk or 'whole'} | {budget or '-'} | {share:g} | {r['quiet_p50']:.3f} | {r['quiet_max']:.3f} | "
              f"{r['busy_p50']:.3f} | "
              f"{r['busy_p99']:.3f} | {r['busy_max']:.3f} | {r['busy_max'] / r['quiet_p50']:.1f}x | "
              f"{r['prefill_s']:.1f} | {r['tokens_during']} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
