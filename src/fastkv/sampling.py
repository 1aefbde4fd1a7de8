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
MAX_LOGPROBS = 20


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
    logprobs: None, or record each generated token's log-probability under the model (its raw distribution,
        before temperature and top_p) with that many of the most likely alternatives (0..20).
    """

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None

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
        if self.logprobs is not None and (_not_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise SamplingError("logprobs", f"must be an integer in 0..{MAX_LOGPROBS} or None, got {self.logprobs!r}")

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


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model, and the most likely tokens' ((id, logprob), ...)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """The log-probability of `token` under logits [V] (float32, no temperature), with the `top` best."""
    logprobs = logits.float().log_softmax(-1)
    best = logprobs.topk(top) if top else None
    alternatives = tuple(zip(best.indices.tolist(), best.values.tolist(), strict=True)) if best is not None else ()
    return TokenLogprob(token, float(logprobs[token]), alternatives)


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
    """The text of one sequence's generated tokens, ended by EOS or cut at the first stop string.

    Text grows by decoding only the last few tokens (a window from `prefix` on, which holds the bytes a
    multi-byte character or a leading space may need), and stop strings are looked for only where the new
    text could complete one: both take time linear in the output, not quadratic.
    """

    def __init__(self, tokenizer, eos: set[int], stop: Sequence[str]) -> None:
        self.tokenizer, self.eos, self.stops = tokenizer, eos, list(stop)
        self.out: list[int] = []
        self.logprobs: list[TokenLogprob] = []  # one per token of `out`, when asked for
        self.text, self.emitted, self.finish = "", 0, "length"
        self.prefix = self.read = 0  # out[prefix:read] is decoded into the end of `text` already

    def add(self, token: int, logprob: TokenLogprob | None = None) -> bool:
        """Take the next token; False once the sequence has ended (this token was EOS or made a stop string)."""
        if token in self.eos:
            self.finish = "eos"
            return False
        self.out.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
        before = len(self.text)
        self.text += self._delta()
        if self.stops and len(self.text) > before:
            longest = max(map(len, self.stops))
            start = max(0, before - longest + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                self.text, self.finish = self.text[: min(hits)], "stop"
                return False
        return True

    def _delta(self) -> str:
        """The text the newest token adds (empty while it ends inside a character)."""
        decode = self.tokenizer.decode
        done = decode(self.out[self.prefix : self.read], skip_special_tokens=True)
        now = decode(self.out[self.prefix :], skip_special_tokens=True)
        if len(now) <= len(done) or now.endswith("\ufffd"):
            return ""  # an unfinished character: wait for its next byte
        self.prefix, self.read = self.read, len(self.out)
        return now[len(done) :]

    def ready(self, final: bool = False) -> str:
        """Text not emitted yet that no later token can change (all of it when final)."""
        if final and self.read < len(self.out):  # bytes that never made a whole character
            self.text += self._rest()
        end = len(self.text) if final else len(self.text) - _held_back(self.text, self.stops)
        piece = self.text[self.emitted : end] if end > self.emitted else ""
        self.emitted += len(piece)
        return piece

    def _rest(self) -> str:
        decode = self.tokenizer.decode
        done = decode(self.out[self.prefix : self.read], skip_special_tokens=True)
        now = decode(self.out[self.prefix :], skip_special_tokens=True)
        self.prefix = self.read = len(self.out)
        return now[len(done) :] if now.startswith(done) else ""
