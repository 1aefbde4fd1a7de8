"""`fastkv serve --ray` with 1 and with 2 replicas on the same cores: a 4K passkey, then 8 concurrent clients.

    python benchmarks/ray_replicas.py                       # qwen2.5-0.5b, default method and dtype
    python benchmarks/ray_replicas.py --replicas 1,2,4 --clients 16 --prompt-tokens 1024

For each replica count it starts the Ray Serve deployment on a local cluster of --cpus CPUs, each replica
getting cpus / replicas of them (its torch threads), and then:
- streams a chat completion of a --passkey-tokens passkey prompt with the openai client and checks the
  answer;
- runs `serve_load.run_load`: one client alone, then --clients clients at once (--requests in all),
  streaming chat completions of --prompt-tokens prompts with --max-tokens new tokens (ignore_eos);
- reads from /metrics how many requests each replica answered.
It prints aggregate throughput, decode tokens/s while all decode at once, TTFT and the split over
replicas. On one small machine, more replicas only split the same cores: expect no gain, only balance.
"""

from __future__ import annotations

import argparse
import os
import time

import httpx
from openai import OpenAI
from serve_load import External, prompt, run_load  # this directory's load benchmark

from fastkv import passkey_prompt
from fastkv.models import load_tokenizer
from fastkv.precision import header
from fastkv.serve.ray_app import PATIENT_PROXY, ReplicaOptions, Scaling, start
from fastkv.serve.thread import free_port


def per_replica(url: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("fastkv_requests_total{") and 'status="200"' in line:
            replica = line.split('replica="')[1].split('"')[0]
            found[replica] = found.get(replica, 0) + float(line.split()[-1])
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--method", default="fastkv")
    ap.add_argument("--replicas", default="1,2")
    ap.add_argument("--cpus", type=int, default=os.cpu_count())
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=2048)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--passkey-tokens", type=int, default=4096)
    ap.add_argument("--kv-mib", type=float, default=2048, help="per replica")
    args = ap.parse_args()
    import ray
    from ray import serve

    for key, value in PATIENT_PROXY.items():
        os.environ.setdefault(key, value)
    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    tokenizer = load_tokenizer(args.model, progress=False)
    texts = [prompt(tokenizer, args.prompt_tokens, seed) for seed in range(args.requests)]
    needle = passkey_prompt(tokenizer, args.passkey_tokens, depth=0.5, seed=7)
    print(header())
    print(f"# {args.model}, method {args.method}, {args.cpus} CPUs shared by the replicas, {args.clients} clients, "
          f"{args.requests} requests of {args.prompt_tokens} prompt + {args.max_tokens} new tokens")  # fmt: skip
    rows = []
    port = free_port()  # Serve's proxy starts once, on this port; each replica count redeploys behind it
    for n in [int(x) for x in args.replicas.split(",")]:
        options = ReplicaOptions(args.model, args.method, kv_mib=args.kv_mib, max_batch=args.clients,
                                 max_queue=args.requests)  # fmt: skip
        begin = time.perf_counter()
        start(options, Scaling(replicas=n, cpus=args.cpus / n), "127.0.0.1", port)
        ready = time.perf_counter() - begin
        url = f"http://127.0.0.1:{port}"
        client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=3600)
        stream = client.chat.completions.create(model=args.model, messages=[{"role": "user", "content": needle.text}],
                                                max_tokens=16, temperature=0, stream=True)  # fmt: skip
        answer = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        print(f"{n} replica(s) ready in {ready:.0f} s; passkey {needle.answer} at {args.passkey_tokens} tokens, "
              f"streamed answer {answer.strip()!r}: {'correct' if needle.is_correct(answer) else 'WRONG'}")  # fmt: skip
        server = External(url)
        one = run_load(server, args.model, texts[:1], 1, 1, args, args.method)
        before = per_replica(url)
        load = run_load(server, args.model, texts, args.clients, args.requests, args, args.method)
        after = per_replica(url)
        split = {r: after.get(r, 0) - before.get(r, 0) for r in after}
        rows.append((n, one, load, split))
        serve.delete("fastkv")
    print()
    print("| replicas | one client decode tok/s | 8 clients tok/s | decode tok/s all at once | TTFT p50 s | "
          "requests per replica |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for n, one, load, split in rows:
        shares = ", ".join(f"{int(v)}" for v in sorted(split.values(), reverse=True))
        print(f"| {n} | {one['decode_tok_s']:.1f} | {load['throughput']:.1f} | {load['decode_tok_s']:.1f} | "
              f"{load['ttft_p50']:.1f} | {shares} |")  # fmt: skip
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
