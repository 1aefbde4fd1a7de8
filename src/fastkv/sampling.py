"""How tokens are chosen and when a sequence ends: `SamplingParams`, `sample`, `Transcript`.

`SamplingParams` is the one object every path passes (the Python API, the CLI, batches, the server's
scheduler), validated once, when it is made.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

GREEDY_BELOW = 1e-5  # a temperature below this is greedy (as in vLLM): dividing by it overflows the logits
INT64 = (-(2**63), 2**63 - 1)
MAX_STOPS, MAX_STOP_CHARS = 16, 512


class SamplingError(ValueError):
    """A sampling option out of range; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field} {message}")
        self.field = field


@dataclass(frozen=True)
class SamplingParams:
    """How to sample and when to stop. Checked on construction: ValueError names the field.

    max_tokens: most tokens to generate (EOS and stop strings may end sooner).
    temperature: 0 (or below 1e-5) is greedy; otherwise logits / temperature, then nucleus sampling.
    top_p: the nucleus: the smallest set of tokens whose probabilities sum to at least top_p.
    seed: a seed for this sequence's own generator (int64), for reproducible sampling.
    stop: strings that end the text where they first appear (not included).
    ignore_eos: go on past EOS to max_tokens (benchmarks want fixed lengths).
    """

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, Sequence):
            object.__setattr__(self, "stop", tuple(self.stop))
        if _not_int(self.max_tokens) or self.max_tokens < 1:
            raise SamplingError("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if _not_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise SamplingError("temperature", f"must be a finite number >= 0, got {self.temperature!r}")
        if _not_number(self.top_p) or not 0 < self.top_p <= 1:
            raise SamplingError("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (_not_int(self.seed) or not INT64[0] <= self.seed <= INT64[1]):
            raise SamplingError("seed", f"must be an integer that fits in 64 bits (int64), got {self.seed!r}")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise SamplingError("stop", f"must be a string or a list of non-empty strings, got {self.stop!r}")
        if len(self.stop) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in self.stop):
            raise SamplingError("stop", f"takes at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters")
        if not isinstance(self.ignore_eos, bool):
            raise SamplingError("ignore_eos", f"must be true or false, got {self.ignore_eos!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def generator(self, device: torch.device) -> torch.Generator | None:
        """A fresh generator for one sequence, seeded; None without a seed (torch's global one)."""
        return None if self.seed is None else torch.Generator(device=device).manual_seed(self.seed)

    @classmethod
    def of(cls, sampling: SamplingParams | None, options: Mapping[str, Any]) -> SamplingParams:
        """`sampling`, or one made of keyword options (`llm.generate(p, max_tokens=64)`); not both."""
        if sampling is not None and options:
            raise ValueError(f"give a SamplingParams or sampling options ({', '.join(options)}), not both")
        if sampling is not None:
            return sampling
        unknown = set(options) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"unknown option(s) {sorted(unknown)}: sampling takes {[f.name for f in fields(cls)]}")
        return cls(**options)


def _not_int(value) -> bool:
    return isinstance(value, bool) or not isinstance(value, int)


def _not_number(value) -> bool:
    return isinstance(value, bool) or not isinstance(value, (int, float))


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """A token from logits [V]: the argmax when greedy, else a draw from the nucleus."""
    if params.greedy:
        return int(logits.argmax())
    probs = (logits.float() / params.temperature).softmax(-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Drop a token when the tokens ranked above it already cover top_p.
        drop = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        sorted_probs[drop] = 0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return ids


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters could still become a stop string (or an unfinished character)."""
    hold = 1 if text.endswith("\ufffd") else 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    return hold


class Transcript:
    """The text of one sequence's generated tokens, ended by EOS or cut at the first stop string."""

    def __init__(self, tokenizer, eos: set[int], stop: Sequence[str]) -> None:
        self.tokenizer, self.eos, self.stops = tokenizer, eos, list(stop)
        self.out: list[int] = []
        self.text, self.emitted, self.finish = "", 0, "length"

    def add(self, token: int) -> bool:
        """Take the next token; False once the sequence has ended (this token was EOS or made a stop string)."""
        if token in self.eos:
            self.finish = "eos"
            return False
        self.out.append(token)
        self.text = self.tokenizer.decode(self.out, skip_special_tokens=True)
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.finish = self.text[: min(hits)], "stop"
            return False
        return True

    def ready(self, final: bool = False) -> str:
        """Text not emitted yet that no later token can change (all of it when final)."""
        end = len(self.text) if final else len(self.text) - _held_back(self.text, self.stops)
        piece = self.text[self.emitted : end] if end > self.emitted else ""
        self.emitted += len(piece)
        return piece
