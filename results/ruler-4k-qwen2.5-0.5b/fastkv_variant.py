"""FastKV variants on the committed RULER samples (FullKV rows and logits are reused from the directory)."""
import sys
from pathlib import Path

from fastkv import FastKV, LLM
from fastkv.eval import ruler as R
from fastkv.eval.runner import Item, run

out = Path("results/ruler-4k-qwen2.5-0.5b")
llm = LLM.load("qwen2.5-0.5b", progress=False)
variants = {"fastkv-kernel13": FastKV(retain_rate=0.1, tsp_rate=0.2, kernel_size=13)}
items = []
for task in R.TASKS:
    for index in range(2):
        s = R.generate(task, llm.tokenizer, 4096, seed=42, index=index, chat=True)
        items.append(Item(task, index, R.render(llm.tokenizer, s.input, s.answer_prefix, True), False,
                          s.max_new_tokens, s.outputs, lambda text, s=s: R.score(s, text), {"length": s.length}))
config = {"suite": "ruler", "note": "FastKV variant on the same samples", "methods": {k: m.describe() for k, m in variants.items()}}
run(llm, "qwen2.5-0.5b", "4096", variants, items, out, config, progress=False, seed=42)
