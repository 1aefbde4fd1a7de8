"""Chat turns on one long document through `fastkv serve` and the openai client: what each turn reuses.

    python benchmarks/serve_turns.py                       # qwen2.5-0.5b, an 8K-token document, 3 turns
    python benchmarks/serve_turns.py --length 4096 --method 'snapkv(retain_rate=0.1)'

The server runs in this process (127.0.0.1, a free port) with its prefix store (`--prefix-cache-mib`); the
conversation is `fastkv eval multiq`'s (a fixed reply after each question, so the turns extend each other
through the chat template). Each turn's `fastkv` response field gives its prefill seconds and the prompt
tokens it took from the store; /metrics gives the store's counters. Run nothing else meanwhile.
"""

from __future__ import annotations

import argparse

from openai import OpenAI

from fastkv import LLM
from fastkv.eval.multiq import conversation, document
from fastkv.precision import header
from fastkv.serve.thread import ServerThread


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--length", type=int, default=8192, help="document tokens")
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--method", default="fastkv", help="the server's method (default: FastKV with the profile)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--prefix-cache-mib", type=float, default=1024)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    llm = LLM.load(args.model)
    server = ServerThread(llm, args.model, args.method, kv_mib=2048, prefix_cache_mib=args.prefix_cache_mib)
    try:
        client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        doc, facts = document(llm.tokenizer, args.length, args.seed, args.turns)
        print(header(f"{args.model} {llm.precision}"))
        print(f"# server method {args.method}, --prefix-cache-mib {args.prefix_cache_mib:g}")
        print("| turn | prompt tokens | prefill s | reused tokens | prefill / turn 1 | answer |")
        print("|---|---|---|---|---|---|")
        first = None
        for k, messages in enumerate(conversation(doc, facts), 1):
            reply = client.chat.completions.create(model=args.model, messages=messages, max_tokens=args.max_tokens,
                                                   temperature=0)  # fmt: skip
            extra = reply.model_extra["fastkv"]
            first = first or extra["prefill_seconds"]
            print(f"| {k} | {reply.usage.prompt_tokens} | {extra['prefill_seconds']:.2f} | "
                  f"{extra['prefix_tokens_reused']} | {extra['prefill_seconds'] / first:.3f} | "
                  f"{reply.choices[0].message.content.strip()[:40]!r} |", flush=True)  # fmt: skip
        names = ("fastkv_prefix_hits_total", "fastkv_prefix_misses_total", "fastkv_prefix_tokens_reused_total",
                 "fastkv_prefix_store_bytes")  # fmt: skip
        print("# /metrics: " + ", ".join(f"{n} {server.metric(n):.0f}" for n in names))
    finally:
        server.close()


if __name__ == "__main__":
    main()
