"""Passkey (needle-in-a-haystack) prompts of a chosen token length, built offline.

The haystack is the classic passkey-retrieval filler (Mohtashami & Jaggi, 2023): repetitive sentences
in which one line holds a random number. A model that can use its context answers with the number;
a cache that dropped the needle's entries cannot.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .chat import encode_prompt, has_template

INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it.\n\n"
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? Answer with the number only."
ANSWER = "\nThe pass key is"  # a base model (no chat template) completes text: the prompt starts its answer


@dataclass(frozen=True)
class Passkey:
    text: str  # the user message (apply the chat template on top); for a base model, the text to complete
    answer: str
    depth: float  # where the needle sits, as a share of the filler

    def is_correct(self, output: str) -> bool:
        return self.answer in output


def passkey_prompt(tokenizer, n_tokens: int, depth: float = 0.5, seed: int = 0, digits: int = 5) -> Passkey:
    """A passkey prompt whose chat-formatted token count is close to (at most) n_tokens, with a key of
    `digits` digits."""
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    if not 1 <= digits <= 30:
        raise ValueError(f"digits must be in 1..30, got {digits}")
    key = str(random.Random(seed).randint(10 ** (digits - 1), 10**digits - 1))
    needle = NEEDLE.format(key=key)

    ending = QUESTION if has_template(tokenizer) else QUESTION + ANSWER

    def build(repeats: int) -> str:
        before = round(repeats * depth)
        return INTRO + FILLER * before + needle + FILLER * (repeats - before) + ending

    def length(repeats: int) -> int:
        return len(encode_prompt(tokenizer, build(repeats), chat=has_template(tokenizer)))

    per_repeat = max(1, len(tokenizer(FILLER * 10)["input_ids"]) // 10)
    repeats = max(0, (n_tokens - length(0)) // per_repeat)
    while repeats > 0 and length(repeats) > n_tokens:
        repeats -= 1
    return Passkey(text=build(repeats), answer=key, depth=depth)
