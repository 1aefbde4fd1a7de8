"""Several questions about one document, asked turn by turn: why compression must be chosen per question.

Each document hides `facts` facts ("The code of the red room is 48213.") at even depths in Paul Graham's
essays; turn k asks for fact k. Turn k's prompt is the conversation so far under the chat template: the
document and question 1, then for every earlier turn a fixed reply (the fact itself) and the next question,
so every setup sees the same tokens. A turn is right when its answer holds the fact's code. Setups:

- `fullkv`: every turn uncompressed (the reference);
- `SPEC | per question`: each turn prefilled and compressed for its own question, through the prefix store
  (the same as a fresh prefill of each turn's whole prompt, by construction);
- `SPEC | compressed once`: turn 1 prefilled and compressed for question 1; each later turn's new tokens
  (the previous reply and the next question) appended to that cache and never recompressed: the reuse that
  SCBench (Li et al., 2024) shows failing in multi-turn use;
- `SPEC | question-agnostic`: the document alone prefilled and compressed (its window ends the document:
  no question), then every turn's tokens appended: kvpress's default pipeline.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..chat import encode_prompt
from ..decode import decode_step
from ..engine import prefill
from ..layer import PrefillOptions
from ..methods import parse
from ..sampling import eos_ids
from .ruler import essay_sentences

ROOMS = ("red", "blue", "green", "yellow", "white", "black", "orange", "purple")
SETUPS = ("per question", "compressed once", "question-agnostic")


@dataclass
class Session:
    """One document's turns: token ids of every turn's prompt, each extending the one before, and the codes."""

    index: int
    turns: list[list[int]]
    codes: list[str]
    document_tokens: int  # tokens of the prompt before the first question (the question-agnostic prefix)

    def score(self, turn: int, text: str) -> float:
        return float(self.codes[turn] in text)


def document(tokenizer, length: int, seed: int, facts: int) -> tuple[str, list[tuple[str, str]]]:
    """Essay text of about `length` tokens with `facts` (room, code) facts at even depths."""
    rng = random.Random(seed)
    found = [(room, str(rng.randint(10000, 99999))) for room in rng.sample(ROOMS, facts)]
    text, total = [], 0
    for sentence in essay_sentences(length * 2):  # more words than tokens are needed
        total += len(tokenizer(" " + sentence, add_special_tokens=False)["input_ids"])
        if total > length:
            break
        text.append(sentence)
    for k, (room, code) in enumerate(found):
        text.insert(int((k + 0.5) * len(text) / facts), f"The code of the {room} room is {code}.")
    return " ".join(text), found


def question(room: str) -> str:
    return f"What is the code of the {room} room? Answer with the number."


def conversation(doc: str, facts: list[tuple[str, str]]) -> list[list[dict]]:
    """The messages of each turn: the document and question 1, then a fixed reply and the next question."""
    turns, messages = [], []
    for k, (room, code) in enumerate(facts):
        messages.append({"role": "user", "content": f"{doc}\n\n{question(room)}" if k == 0 else question(room)})
        turns.append(list(messages))
        messages.append({"role": "assistant", "content": f"The code of the {room} room is {code}."})
    return turns


def session(tokenizer, length: int, seed: int, index: int, facts: int = 5) -> Session:
    doc, found = document(tokenizer, length, seed * 1000 + index, facts)
    turns = [encode_prompt(tokenizer, messages, chat=True) for messages in conversation(doc, found)]
    for a, b in zip(turns, turns[1:], strict=False):
        if b[: len(a)] != a:
            raise ValueError("this chat template does not extend a conversation's earlier turns token by token")
    # The question-agnostic prefix: what turn 1 shares with the same document asked something else.
    other = encode_prompt(tokenizer, [{"role": "user", "content": f"{doc}\n\nSummarise it."}], chat=True)
    shared = next((i for i, (a, b) in enumerate(zip(turns[0], other, strict=False)) if a != b), len(other))
    return Session(index, turns, [code for _, code in found], shared)


@torch.inference_mode()
def appended(llm, s: Session, method, base: int, new_tokens: int) -> list[str]:
    """Answers of every turn from one cache: the first `base` prompt tokens prefilled and compressed under
    `method`, then each turn's further tokens fed into that cache one by one, never recompressed. Each
    answer's tokens leave the cache again before the next turn (it continues with the fixed reply)."""
    adapter, last, eos = llm.adapter, s.turns[-1], eos_ids(llm.model, llm.tokenizer)
    room = len(last) - base + len(s.turns) * new_tokens
    cache, logits, _ = prefill(
        adapter, torch.tensor([last[:base]], device=adapter.device), method, PrefillOptions(room)
    )
    if cache.decoding is not None:  # answers are taken back out of the cache below, which a decode budget's cuts forbid
        raise ValueError("the 'compressed once' setup cannot run a method with a decode_budget")
    fed, answers = base, []
    for turn in s.turns:
        for position in range(fed, len(turn)):
            logits = decode_step(adapter, cache, torch.tensor([turn[position]], device=adapter.device), position)
        fed = len(turn)
        marks, steps = [int(slot[0]) for slot in cache.slots], cache.steps
        out, step_logits = [], logits
        for i in range(new_tokens):
            out.append(int(step_logits.argmax()))
            if out[-1] in eos or i == new_tokens - 1:
                break
            step_logits = decode_step(adapter, cache, torch.tensor([out[-1]], device=adapter.device), fed + i)
        for layer, slot in enumerate(marks):  # take the answer back out of the cache
            cache.attend[layer][:, :, slot:] = False
            cache.slots[layer].fill_(slot)
        cache.steps = steps
        answers.append(llm.tokenizer.decode([t for t in out if t not in eos], skip_special_tokens=True))
    return answers


def per_question(llm, s: Session, method, new_tokens: int) -> list[str]:
    """Answers of every turn, each prompt prefilled and compressed for its own question, through a prefix
    store of this session alone."""
    llm.use_prefix_cache(1024)
    try:
        return [llm.generate(turn, method, max_tokens=new_tokens).text for turn in s.turns]
    finally:
        llm.use_prefix_cache(0)


def answers(llm, s: Session, method, setup: str, new_tokens: int) -> list[str]:
    """The answer of every turn of a session under a method (a spec or a Method) in one setup."""
    method = llm.adapter.bind(parse(method))
    if setup == "per question":
        return per_question(llm, s, method, new_tokens)
    if setup == "compressed once":
        return appended(llm, s, method, len(s.turns[0]), new_tokens)
    if setup == "question-agnostic":
        return appended(llm, s, method, s.document_tokens, new_tokens)
    raise ValueError(f"unknown setup {setup!r}: choose one of {SETUPS}")


def summary(rows: list[dict], specs: list[str]) -> str:
    """A markdown table: each setup's share of right answers per turn and on average, with paired 95%
    intervals against FullKV, against SnapKV in the same setup (when a SnapKV spec ran) and, for compressing
    once or with no question, against per-question."""
    from .paired import paired_difference
    from .report import interval, markdown, shorter

    by_label: dict[str, list[dict]] = {}
    for row in rows:
        by_label.setdefault(row["method"], []).append(row)
    turns = sorted({r["task"] for r in rows}, key=lambda t: int(t[1:]))
    snapkv = next((spec for spec in specs if spec.split("(")[0] == "snapkv"), None)
    header = ["setup", *turns, "average", "vs FullKV [95% CI]", "vs SnapKV [95% CI]", "vs per question [95% CI]",
              "answers"]  # fmt: skip
    lines = []
    for label in ["fullkv"] + [f"{spec} [{setup}]" for spec in specs for setup in SETUPS]:
        group = by_label.get(label, [])
        if not group:
            continue
        cells = []
        for turn in turns:
            scores = [r["score"] for r in group if r["task"] == turn]
            cells.append(f"{100 * sum(scores) / len(scores):.0f}" if scores else "-")
        average = sum(100 * r["score"] for r in group) / len(group)
        spec = label.rsplit(" [", 1)[0]
        full = paired_difference(group, by_label.get("fullkv", [])) if label != "fullkv" else None
        own = by_label.get(f"{spec} [per question]", [])
        versus = paired_difference(group, own) if own and "per question" not in label else None
        setup = label.rsplit(" [", 1)[1] if label != "fullkv" else ""
        snap = by_label.get(f"{snapkv} [{setup}") if snapkv and label != "fullkv" and spec != snapkv else None
        against_snapkv = paired_difference(group, snap) if snap else None
        name = label if label == "fullkv" else f"{shorter(spec)} [{setup}"
        lines.append([name, *cells, f"{average:.1f}", interval(full), interval(against_snapkv), interval(versus),
                      str(len(group))])  # fmt: skip
    return "\n".join(markdown(header, lines)) + "\n"
