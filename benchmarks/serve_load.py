"""Load on `fastkv serve`: concurrent clients with long prompts over real HTTP (the openai client).

    python benchmarks/serve_load.py                                   # qwen2.5-0.5b, 8 clients, 2K prompts
    python benchmarks/serve_load.py --clients 32 --prompt-tokens 8192 --max-tokens 64 --kv-mib 256 \\
        --requests 32 --methods 'fullkv,fastkv'                       # how many 8K conversations fit
    python benchmarks/serve_load.py --requests 240 --prompt-tokens 512 --max-tokens 16 --methods fastkv  # leaks?
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --methods fastkv   # a running `fastkv serve --ray`

For each method it starts a server in this process (127.0.0.1, a free port) and runs, one after the other:
- one client alone (its decode tokens/s is the baseline);
- `--clients` clients at once, each sending requests until `--requests` are done in all: throughput,
  time to first token p50/p95, inter-token latency p50/p95, aggregate decode tokens/s while all
  requests decode at once (`steady_decode_rate`) and its ratio to one client's, the most requests
  running at once (from /metrics), and the process's resident memory before the load, at its peak, and
  after it (a leak shows as after >> before).
Every request streams a chat completion with ignore_eos, so that each generates exactly --max-tokens.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from openai import OpenAI

from fastkv import LLM
from fastkv.models import load_tokenizer
from fastkv.precision import header as machine_header
from fastkv.serve.thread import ServerThread, metric_total


class External:
    """A server already running at a URL (`fastkv serve --ray`): metrics summed over its replicas; its memory
    is not this process's, so the RSS columns are left out."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def metric(self, name: str) -> float:
        return metric_total(self.url, name)

    def close(self) -> None:
        pass


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def prompt(tokenizer, tokens: int, seed: int) -> str:
    rng = random.Random(seed)
    words = " ".join(
        rng.choice(["alpha", "delta", "river", "stone", "cloud", "maple", "ember", "quartz"]) for _ in range(tokens)
    )
    ids = tokenizer(words, add_special_tokens=False)["input_ids"][: tokens - 40]
    return tokenizer.decode(ids) + "\n\nWhich word comes most often above?"


def one_request(client: OpenAI, name: str, text: str, max_tokens: int, method: str) -> dict:
    start = time.perf_counter()
    stamps = []
    stream = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": text}], max_tokens=max_tokens, temperature=0,
        stream=True, extra_body={"ignore_eos": True, "fastkv": {"method": method}},
    )  # fmt: skip
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
    return {"start": start, "stamps": stamps, "end": time.perf_counter()}


def percentile(values: list[float], q: float) -> float:
    return (
        statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else (values[0] if values else float("nan"))
    )


def steady_decode_rate(results: list[dict]) -> float:
    """Aggregate decode tokens/s while every request of a wave decodes: the tokens that arrive between the
    last first token (every prompt prefilled) and the first last token (a request ends), over that time.
    Prefill is not batched, so the time before the window is prefill-bound; this is the decode rate the
    batch sustains. With a single request: its first to its last token. Requests are grouped in waves of
    overlapping lifetimes; the rate is taken over the wave with the most requests."""
    waves: list[list[dict]] = []
    for r in sorted((r for r in results if len(r["stamps"]) > 1), key=lambda r: r["stamps"][0]):
        if waves and r["stamps"][0] < min(x["stamps"][-1] for x in waves[-1]):
            waves[-1].append(r)
        else:
            waves.append([r])
    if not waves:
        return float("nan")
    wave = max(waves, key=len)
    begin, end = max(r["stamps"][0] for r in wave), min(r["stamps"][-1] for r in wave)
    if end <= begin:
        return float("nan")
    inside = sum(begin < t <= end for r in wave for t in r["stamps"])
    return inside / (end - begin)


def run_load(server: ServerThread, name: str, texts: list[str], clients: int, requests: int, args, method: str) -> dict:
    client = OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=3600)
    peak = {"running": 0.0, "rss": rss_mib()}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak["running"] = max(peak["running"], server.metric("fastkv_running_requests"))
            peak["rss"] = max(peak["rss"], rss_mib())
            time.sleep(0.05)

    counter = iter(range(requests))
    lock = threading.Lock()

    def worker(_: int) -> list[dict]:
        done = []
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return done
            done.append(one_request(client, name, texts[i % len(texts)], args.max_tokens, method))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(worker, range(clients)) for r in rs]
    wall = time.perf_counter() - start
    stop.set()
    watcher.join()
    ttft = [r["stamps"][0] - r["start"] for r in results if r["stamps"]]
    gaps = [b - a for r in results for a, b in zip(r["stamps"], r["stamps"][1:], strict=False)]
    tokens = sum(len(r["stamps"]) for r in results)
    return {
        "requests": len(results),
        "tokens": tokens,
        "throughput": tokens / wall,
        "decode_tok_s": steady_decode_rate(results),
        "ttft_p50": percentile(ttft, 50),
        "ttft_p95": percentile(ttft, 95),
        "itl_p50_ms": 1e3 * percentile(gaps, 50),
        "itl_p95_ms": 1e3 * percentile(gaps, 95),
        "running_max": int(peak["running"]),
        "rss_peak": float("nan") if isinstance(server, External) else peak["rss"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--methods", default="fullkv,fastkv", help="comma-separated specs (each request's method)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=None, help="requests in all (default: one per client)")
    ap.add_argument("--prompt-tokens", type=int, default=2048)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--kv-mib", type=float, default=4096)
    ap.add_argument("--dtype", default="auto", help="auto (the device's default), float32, bfloat16")
    ap.add_argument("--quantize", default="auto", help="auto (int8 weights with bfloat16 on CPU), none, int8")
    ap.add_argument(
        "--prefill-chunks",
        default="256",
        help="comma-separated `--prefill-chunk` settings to run one after the other (0: whole prefills)",
    )
    ap.add_argument("--prefill-share", type=float, default=1.0, help="the server's --prefill-share")
    ap.add_argument("--repeat", type=int, default=1, help="run the load this many times; RSS after each")
    ap.add_argument("--url", help="load a running server instead (fastkv serve --ray); it has its own precision")
    args = ap.parse_args()
    requests = args.requests or args.clients
    if args.url:
        llm, dtype = None, "(the server's dtype)"
        tokenizer = load_tokenizer(args.model, progress=False)
    else:
        llm = LLM.load(args.model, dtype=args.dtype, progress=False, quantize=args.quantize)
        dtype, tokenizer = llm.precision, llm.tokenizer
    texts = [prompt(tokenizer, args.prompt_tokens, seed) for seed in range(max(requests, 1))]
    print(machine_header())
    print(
        f"# {args.model} {dtype}, {os.cpu_count()} CPUs, {args.clients} clients, {requests} requests of "
        f"{args.prompt_tokens} prompt tokens and {args.max_tokens} new tokens, "
        + (f"server {args.url}" if args.url else f"--kv-mib {args.kv_mib:g}")
    )
    header = (
        f"{'method':<10} {'clients':>7} {'reqs':>5} {'tok/s':>7} {'decode tok/s':>12} {'x one':>6} {'TTFT p50':>8} "
        f"{'p95':>6} {'ITL p50 ms':>10} {'p95':>6} {'max running':>11} {'RSS before':>10} {'peak':>6} {'after':>6}"
    )
    print(header)
    chunks = [int(c) for c in args.prefill_chunks.split(",")]
    runs = [(m.strip(), c) for m in args.methods.split(",") if m.strip() for c in chunks]
    for method, chunk in runs:
        if args.url:
            server = External(args.url)
        else:
            server = ServerThread(llm, args.model, method, kv_mib=args.kv_mib, max_batch=args.clients,
                                  max_queue=max(requests, args.clients), prefill_chunk=chunk or None,
                                  prefill_share=args.prefill_share)  # fmt: skip
        if len(chunks) > 1:
            print(f"# {method}, --prefill-chunk {chunk}" + (" (whole prefills)" if not chunk else ""))
        try:
            httpx.get(server.url + "/health")
            single = run_load(server, args.model, texts[:1], 1, 1, args, method)
            before = rss_mib() if llm else float("nan")
            load = run_load(server, args.model, texts, args.clients, requests, args, method)
            after = rss_mib() if llm else float("nan")
            rounds = [after]
            for _ in range(args.repeat - 1):  # the same load again: a leak keeps growing, a high-water mark not
                run_load(server, args.model, texts, args.clients, requests, args, method)
                rounds.append(rss_mib() if llm else float("nan"))
            if args.repeat > 1:
                print(
                    f"# {method}: RSS after each of {args.repeat} rounds of {requests} requests (MiB): "
                    + ", ".join(f"{x:.0f}" for x in rounds)
                    + f"; before the first: {before:.0f}"
                )
            for label, r in (("one", single), ("all", load)):
                ratio = r["decode_tok_s"] / single["decode_tok_s"]
                clients = 1 if label == "one" else args.clients
                print(
                    f"{method:<10} {clients:>7} {r['requests']:>5} {r['throughput']:>7.1f} {r['decode_tok_s']:>12.1f} "
                    f"{ratio:>6.2f} {r['ttft_p50']:>8.2f} {r['ttft_p95']:>6.2f} {r['itl_p50_ms']:>10.1f} "
                    f"{r['itl_p95_ms']:>6.1f} {r['running_max']:>11} {before:>10.0f} {r['rss_peak']:>6.0f} "
                    f"{after:>6.0f}"
                )
        finally:
            server.close()


if __name__ == "__main__":
    main()
