"""7-digit passkeys at 4K on qwen2.5-0.5b: the paper's FastKV setting against the shipped profile (default).

    python results/calibration/passkey_check.py
"""

from fastkv import LLM, FastKV, passkey_prompt

llm = LLM.load("qwen2.5-0.5b", progress=False)
for seed in (11, 12, 13, 14):
    needle = passkey_prompt(llm.tokenizer, 4096, depth=0.5, seed=seed, digits=7)
    paper = llm.generate(needle.text, FastKV(), max_new_tokens=12, chat=True).text.strip()
    profile = llm.generate(needle.text, max_new_tokens=12, chat=True).text.strip()
    print(f"seed {seed}: key {needle.answer}, paper setting {paper!r}, profile {profile!r}")
