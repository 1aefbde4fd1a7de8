"""Why does FastKV lose digits on RULER niah at 4K? Propagation of the needle's tokens under variants."""
import json, sys, time, torch
from fastkv import LLM, FastKV, SnapKV, prefill, decode_step
from fastkv.eval import ruler

llm = LLM.load("qwen2.5-0.5b", progress=False)
tok = llm.tokenizer
cases = [("niah_multikey_2", 0), ("niah_single_2", 1), ("niah_multikey_1", 1)]
variants = {
    "fastkv default (L11, r0.2, k7 max)": FastKV(retain_rate=0.1),
    "tsp_rate 0.4": FastKV(retain_rate=0.1, tsp_rate=0.4),
    "tsp_layer 15": FastKV(retain_rate=0.1, tsp_layer=15),
    "tsp_layer 17": FastKV(retain_rate=0.1, tsp_layer=17),
    "kernel 13": FastKV(retain_rate=0.1, kernel_size=13),
    "window 32": FastKV(retain_rate=0.1, window_size=32),
}
for task, index in cases:
    s = ruler.generate(task, tok, 4096, seed=42, index=index)
    prompt = ruler.render(tok, s.input, s.answer_prefix, chat=True)
    enc = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)
    ids = torch.tensor([enc["input_ids"]])
    # tokens of the answer's needle value
    val = s.outputs[0]
    start = prompt.index(val); end = start + len(val)
    key = {i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start}
    print(f"\n{task}[{index}] answer {val}, value tokens {sorted(key)}")
    for name, m in variants.items():
        cache, logits, trace = prefill(llm.parts, ids, m, max_new_tokens=12)
        prop = set(next(iter(trace.propagated.values()))[0].tolist()) if trace.propagated else set(range(ids.shape[1]))
        toks = []
        for step in range(12):
            toks.append(int(logits.argmax()))
            logits = decode_step(llm.parts, cache, torch.tensor(toks[-1:]), cache.position_base + step)
        text = tok.decode(toks, skip_special_tokens=True)
        print(f"  {name:<36} propagated {len(key & prop)}/{len(key)} value tokens; answer {text.strip()[:20]!r} {'OK' if val in text else 'wrong'}")
