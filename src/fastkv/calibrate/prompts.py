"""Calibration prompts, built offline from this file alone: haystacks of prose, code and logs, each with
one needle to retrieve (a number, a word, a UUID, a code identifier, a two-hop lookup, or one of five facts
of the same form).

Nothing here comes from RULER's seeds, tasks or haystack files (essays, SQuAD, HotpotQA, word lists), so
a profile calibrated on these prompts can be evaluated on RULER without leaking its samples.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass

from ..chat import has_template

NEEDLES = ("number", "word", "uuid", "identifier", "two_hop", "one_of_five")
DISTRACTORS = 4  # facts of the same form beside the asked one, in "one_of_five"
HAYSTACKS = ("prose", "code", "logs")
PER_KIND = 2  # prompts per needle kind in a calibration
LENGTHS = (2048, 4096, 8192)  # prompt lengths in tokens, taken in turn

# Word lists, kept compact (split at import).
NOUNS = "river engine garden ledger lantern harbor circuit meadow archive tower valley signal orchard compass bridge furnace quarry beacon workshop glacier canal observatory granary vineyard".split()  # noqa: E501, SIM905
VERBS = "repairs measures paints guards inspects carries follows records polishes watches counts".split()  # noqa: SIM905
ADJECTIVES = "quiet copper narrow ancient bright hollow patient restless silver careful distant".split()  # noqa: SIM905
SERVICES = "auth billing search gateway scheduler indexer mailer storage metrics cache".split()  # noqa: SIM905
LEVELS = ("INFO", "INFO", "INFO", "DEBUG", "WARN", "ERROR")
SYLLABLES = "ka lo mi ra ven tor sel bru qua dim fen gol hux pri zan wob".split()  # noqa: SIM905


@dataclass
class Prompt:
    kind: str  # needle kind
    haystack: str
    text: str  # the user message: haystack with the needle, then the question
    answer: str  # the value to retrieve, as it appears in the text


def _name(rng: random.Random, parts: int = 3) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(parts))


def _unit(kind: str, rng: random.Random) -> str:
    """One filler unit of a haystack."""
    if kind == "prose":
        a, b = rng.sample(NOUNS, 2)
        return f"The {rng.choice(ADJECTIVES)} {a} {rng.choice(VERBS)} the {b} near the {rng.choice(NOUNS)}."
    if kind == "code":
        x, y = rng.sample("abcdxyzuvw", 2)
        op = rng.choice("+-*")
        return f"def {_name(rng, 2)}_{_name(rng, 2)}({x}, {y}):\n    return {x} {op} {y} * {rng.randint(2, 99)}\n"
    ts = f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}"
    message = f"{rng.choice(VERBS)} {rng.choice(NOUNS)} batch {rng.randint(100, 9999)} in {rng.randint(1, 900)} ms"
    return f"{ts} {rng.choice(LEVELS)} {rng.choice(SERVICES)}[{rng.randint(100, 65000)}]: {message}"


def _needle(kind: str, rng: random.Random) -> tuple[list[str], str, str]:
    """(sentences to hide, question, answer)."""
    key = _name(rng)
    if kind == "number":
        value = str(rng.randint(1_000_000, 9_999_999))
        return (
            [f"The access number of the {key} project is {value}."],
            f"What is the access number of the {key} project?",
            value,
        )
    if kind == "word":
        value = _name(rng, 4)
        return [f"The codeword of the {key} team is {value}."], f"What is the codeword of the {key} team?", value
    if kind == "uuid":
        value = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        return (
            [f"The record id of the {key} shipment is {value}."],
            f"What is the record id of the {key} shipment?",
            value,
        )
    if kind == "identifier":
        value = f"{_name(rng, 2)}_{_name(rng, 2)}_{_name(rng, 2)}"
        return (
            [f"The function that handles {key} requests is named {value}."],
            f"What is the name of the function that handles {key} requests?",
            value,
        )
    if kind == "one_of_five":
        # Five facts alike, one asked: only the question's own words tell them apart, so a selection that
        # ranks by a window holding the chat template instead keeps a fact at random (the multi-question
        # diagnosis, results/multiq-diagnosis-qwen2.5-0.5b). One needle alone cannot show that.
        keys = [key, *(_name(rng) for _ in range(DISTRACTORS))]
        codes = [str(c) for c in rng.sample(range(100_000, 1_000_000), len(keys))]  # distinct
        facts = [f"The access code of the {k} depot is {c}." for k, c in zip(keys, codes, strict=True)]
        rng.shuffle(facts)
        return facts, f"What is the access code of the {key} depot?", codes[0]
    other, value = _name(rng), str(rng.randint(10_000, 99_999))
    hops = [
        f"The vault of {key} opens with the same combination as the vault of {other}.",
        f"The vault of {other} opens with the combination {value}.",
    ]
    return hops, f"Which combination opens the vault of {key}?", value


def build(tokenizer, kind: str, haystack: str, length: int, seed: int) -> Prompt:
    """A prompt of about `length` tokens (chat template included) with one needle at a random depth."""
    rng = random.Random(f"fastkv-calibrate/{kind}/{haystack}/{length}/{seed}")
    hidden, question, answer = _needle(kind, rng)
    question = f"{question} Answer with the value only."
    budget = length - 40 - len(tokenizer(question)["input_ids"])  # room for the template and the answer
    units, used = [], 0
    while True:
        unit = _unit(haystack, rng)
        cost = len(tokenizer(unit, add_special_tokens=False)["input_ids"]) + 1
        if used + cost > budget - sum(len(tokenizer(h)["input_ids"]) + 1 for h in hidden):
            break
        units.append(unit)
        used += cost
    # The hidden sentences (hops, or the five facts) go in order at random depths between 10% and 90%.
    for depth, sentence in sorted(zip(sorted(rng.uniform(0.1, 0.9) for _ in hidden), hidden, strict=True)):
        units.insert(int(depth * len(units)), sentence)
    joiner = "\n" if haystack != "prose" else " "
    text = joiner.join(units) + "\n\n" + question
    if not has_template(tokenizer):  # a base model completes text: the prompt starts its answer
        text += "\nAnswer:"
    return Prompt(kind, haystack, text, answer)


def prompt_set(tokenizer, lengths: tuple[int, ...] = LENGTHS, per_kind: int = PER_KIND) -> list[Prompt]:
    """Every needle kind `per_kind` times, haystacks and lengths taken in turn."""
    out = []
    for i in range(per_kind):
        for j, kind in enumerate(NEEDLES):
            n = i * len(NEEDLES) + j
            out.append(build(tokenizer, kind, HAYSTACKS[n % len(HAYSTACKS)], lengths[n % len(lengths)], seed=n))
    return out
