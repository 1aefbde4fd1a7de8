"""What a method is made of, and the two questions the engine asks it at every layer of prefill.

FastKV's point is that two decisions are independent (arXiv 2502.01068, "decoupling context reduction
and KV cache compression"), so a method here is two parts:

- a **context reducer** (`Reducer`) answers *which tokens continue to the next layer*
  (`tokens(layer) -> Selection | None`): none, TSP, GemFilter's filter-and-rerun, PyramidInfer's schedule;
- a **cache policy** (`CachePolicy`) answers *which KV entries this layer caches for decoding*
  (`entries(layer) -> Selection | None`): all, sinks + recent, or top-k by a `Scorer` with an `Allocator`.

Every part is a frozen, keyword-only dataclass whose fields are its knobs. Validation only reads fields,
so `dataclasses.replace` works; a bad value raises `ValueError` naming the field. Parts that need scores
ask `layer.scores(scorer)`, which computes each distinct scorer once per layer: a reducer and a policy
with the same scorer (FastKV's TSP and its cache) share one computation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch

if TYPE_CHECKING:
    from ..cache import KVCache

# Part classes by kind and name, filled by `fastkv.methods.registry`: "reducer", "policy", "scorer",
# "allocator" -> {name: class}.
PARTS: dict[str, dict[str, type[Part]]] = {
    "reducer": {},
    "policy": {},
    "scorer": {},
    "allocator": {},
    "decoding": {},
    "decode_scorer": {},
}
# A share and an absolute count of the same thing: a part takes one of them, never both.
EXCLUSIVE = (("retain_rate", "budget"), ("tsp_rate", "tsp_len"))
# Below these, rate-derived sizes are raised: a short prompt (a chat turn) is left uncompressed.
MIN_BUDGET, MIN_TSP_LEN = 256, 512
# The paper's rates, used where neither a rate nor a count is given.
RETAIN_RATE, TSP_RATE = 0.1, 0.2


def knob(default: Any, help: str, **kw) -> Any:
    """A dataclass field that is a method knob, with the help text that `fastkv methods` and the CLI show."""
    return field(default=default, metadata={"help": help}, **kw)


def sub_part(kind: str, default: Callable[[], Part], help: str, named: bool = True) -> Any:
    """A field holding another part (a TopK's scorer or allocator), chosen by its registry name. named=False: a
    part with one kind only (a policy's decode-time budget), whose knobs appear without its name."""
    return field(default_factory=default, metadata={"help": help, "kind": kind, "named": named})


@dataclass(frozen=True)
class Selection:
    """Which of the tokens present at a layer a part picks.

    indices: [B, 1, k] (the same tokens for every KV head) or [B, Hkv, k] (per head), into the
        tokens present at that layer (0..n-1).
    valid: None, or [B, Hkv, k] marking the real entries when heads keep different counts and the
        shorter ones are padded (AdaKV). The engine checks range, uniqueness and, for token selections,
        order (see `layer.checked`).
    """

    indices: torch.Tensor
    valid: torch.Tensor | None = None

    @classmethod
    def same_for_all_heads(cls, indices: torch.Tensor) -> Selection:
        """From token indices [B, k]."""
        return cls(indices.unsqueeze(1))


class NotReusable(Exception):
    """A layer continued from a prefix store lacks what a part needs (queries of stored tokens, residuals at a
    layer that reduces): the prompt must be prefilled fresh."""


@dataclass
class LayerState:
    """What a part sees of one layer during prefill: q [B, Hq, m, d] and k, v [B, Hkv, n, d] of the n tokens
    present, q and k after RoPE, and their original positions [B, n]. q holds the last m <= n tokens'
    queries: all of them, except where earlier tokens' K/V come from a prefix store."""

    index: int
    num_layers: int
    prompt_len: int  # the prompt's length: budgets are relative to it, whatever n is here
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor
    scale: float
    _scores: dict = field(default_factory=dict, repr=False)

    @property
    def present(self) -> int:
        return self.k.shape[2]

    def scores(self, scorer: Scorer) -> torch.Tensor:
        """scorer(q, k, scale), computed once per layer for equal scorers."""
        if scorer not in self._scores:
            need = scorer.queries_needed(self.present)
            if self.q.shape[2] < need:
                raise NotReusable(f"{scorer.name} scores with {need} queries; {self.q.shape[2]} were computed")
            self._scores[scorer] = scorer(self.q, self.k, self.scale)
        return self._scores[scorer]


def knob_error(part: Part, name: str, message: str) -> ValueError:
    return ValueError(f"{type(part).__name__}.{name} {message}")


# The most a count may be, and the knobs whose work grows with them beyond the prompt's own: a window's
# queries score every key, a pooling kernel slides over every score, a chunk is held at once.
MAX_COUNT = 2**31 - 1
KNOB_MAX = {"window_size": 1024, "kernel_size": 1023, "chunk_mib": 4096, "beta": 10_000}


def check_int(part: Part, name: str, minimum: int = 1, allow_none: bool = False) -> None:
    value = getattr(part, name)
    if value is None and allow_none:
        return
    maximum = KNOB_MAX.get(name, MAX_COUNT)
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise knob_error(part, name, f"must be {kind} of at most {maximum}, got {shorter_repr(value)}")


def shorter_repr(value: Any, chars: int = 40) -> str:
    """repr(value), cut to `chars` characters (a 400-digit number in an error message helps nobody)."""
    if isinstance(value, int) and abs(value) >= 10**30:
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
    text = repr(value)
    return text if len(text) <= chars else text[: chars - 3] + "..."


def check_rate(part: Part, name: str) -> None:
    value = getattr(part, name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise knob_error(part, name, f"must be in (0, 1], got {shorter_repr(value)}")


def check_choice(part: Part, name: str, choices: tuple[str, ...]) -> None:
    if getattr(part, name) not in choices:
        raise knob_error(part, name, f"must be one of {choices}, got {getattr(part, name)!r}")


def check_exclusive(part: Part, rate: str, size: str) -> None:
    """A share and an absolute size of the same thing are exclusive."""
    if getattr(part, rate) is not None and getattr(part, size) is not None:
        raise ValueError(
            f"{type(part).__name__}: give {rate} or {size}, not both "
            f"(got {rate}={getattr(part, rate)!r}, {size}={getattr(part, size)!r})"
        )
    check_rate(part, rate)
    check_int(part, size, allow_none=True)


def check_odd(part: Part, name: str) -> None:
    check_int(part, name)
    if getattr(part, name) % 2 == 0:
        raise knob_error(part, name, f"must be odd, got {getattr(part, name)}")


def check_not_larger(part: Part, small: str, large: str, small_value: int | None = None) -> None:
    a = getattr(part, small) if small_value is None else small_value
    b = getattr(part, large)
    if a is not None and b is not None and a > b:
        raise knob_error(part, small, f"({a}) is larger than {large} ({b})")


def check_layer(part: Part, name: str, num_layers: int) -> None:
    value = getattr(part, name)
    if value is not None and value >= num_layers:
        raise ValueError(
            f"{type(part).__name__}.{name}={value} is outside the model: it has {num_layers} layers "
            f"(0..{num_layers - 1})"
        )


def ranking_layer(part: Part, name: str, default: int, global_layers: Sequence[int] | None) -> int:
    """The layer a part ranks the whole prompt at: its knob, else `default`; on a hybrid model a global layer,
    the one nearest `default` (the earlier on a tie) when the knob is unset. A sliding-window layer's queries
    were trained on nearby keys only: ranked there, distant facts are lost (gemma3-270m: the passkey at 4K
    found 0/4 times by TSP at local layer 8, 4/4 at global layers 5 and 11), so it is refused."""
    value = getattr(part, name)
    if global_layers is None:
        return default if value is None else value
    if value is None:
        return min(global_layers, key=lambda g: (abs(g - default), g))
    if value not in global_layers:
        raise ValueError(
            f"{type(part).__name__}.{name}={value} is a sliding-window layer of this model, whose queries see only "
            f"nearby tokens: rank the prompt at a layer that sees all of it, one of {list(global_layers)}"
        )
    return value


def share_of(rate: float, length: int) -> int:
    # The epsilon keeps 0.1 * 4000 = 400.00000000000006 and 0.29 * 100 = 28.999999999999996 exact.
    return math.floor(rate * length + 1e-9)


def sized(count: int | None, rate: float, length: int, floor: int) -> int:
    """An explicit count as given, else `rate` of `length`, never below `floor`."""
    return count if count is not None else max(floor, share_of(rate, length))


@dataclass(frozen=True, kw_only=True)
class Part:
    """Base of reducers, cache policies, scorers and allocators."""

    kind: ClassVar[str]
    name: ClassVar[str]  # its registry name
    # Knobs whose default depends on the model, for listings: field -> rule
    auto: ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise ValueError naming the field of a bad value. Reads fields only."""

    def bind(self, num_layers: int, global_layers: Sequence[int] | None = None) -> Part:
        """This part with model-dependent and rate defaults resolved (fields that are None filled).
        global_layers: on a hybrid model (some layers see only a sliding window), the layers that see every
        token: where a part that ranks the whole prompt at one layer must do it (None: all of them)."""
        subs = {f.name: getattr(self, f.name).bind(num_layers, global_layers) for f in fields(self) if is_sub(f)}
        return replace(self, **subs)

    def knobs(self) -> dict[str, Any]:
        """Every knob, flattened over sub-parts; a sub-part appears as its registry name."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if is_sub(f):
                if f.metadata["named"]:
                    out[f.name] = value.name
                out.update(value.knobs())
            else:
                out[f.name] = value
        return out


def is_sub(f) -> bool:
    return "kind" in f.metadata


def build(cls: type[Part], knobs: dict[str, Any], like: Part | None = None, used: set[str] | None = None) -> Part:
    """A part of class `cls` from flat knobs; knobs it lacks are ignored (and not added to `used`).

    Unset knobs take `like`'s values (a preset's prototype), else the class defaults. A sub-part is
    chosen by its registry name in `knobs` (e.g. scorer="accumulated"), else like `like`'s.
    """
    used = used if used is not None else set()
    args = {}
    for f in fields(cls):
        if is_sub(f):
            choices = PARTS[f.metadata["kind"]]
            current = getattr(like, f.name) if isinstance(like, cls) else f.default_factory()
            chosen = knobs.get(f.name)
            if chosen is not None:
                used.add(f.name)
                if chosen not in choices:
                    raise ValueError(f"unknown {f.metadata['kind']} {chosen!r}: choose one of {sorted(choices)}")
            sub_cls = choices[chosen] if chosen is not None else type(current)
            args[f.name] = build(sub_cls, knobs, current if type(current) is sub_cls else None, used)
        elif f.name in knobs:
            used.add(f.name)
            args[f.name] = knobs[f.name]
        elif isinstance(like, cls):
            args[f.name] = getattr(like, f.name)
    return cls(**args)


@dataclass(frozen=True, kw_only=True)
class Scorer(Part):
    """Token importance at a layer: scorer(q, k, scale) -> float32 [B, Hkv or 1, n - window_size].

    The last `window_size` tokens present are not scored: a cache policy always keeps them.
    `observes` is True when those tokens' queries are the signal, so a reducer must keep them too.
    """

    kind = "scorer"
    observes: ClassVar[bool] = True
    window_size: int = knob(8, "last prompt tokens, always kept (a recent window)")

    def __call__(self, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
        raise NotImplementedError

    def queries_needed(self, present: int) -> int:
        """How many of the last tokens' queries it scores with, of `present` tokens (the window by default)."""
        return self.window_size


@dataclass(frozen=True, kw_only=True)
class Allocator(Part):
    """How a KV budget is spread over layers and heads."""

    kind = "allocator"

    def layer_budget(self, budget: int, window: int, layer: int, num_layers: int) -> int:
        """Entries per head that `layer` keeps (window included); the mean over layers is `budget`."""
        return budget

    def longest_head(self, per_head: int, kv_heads: int) -> int:
        """At most how many prefix entries one head keeps when heads keep `per_head` on average."""
        return per_head

    def select(self, scores: torch.Tensor, per_head: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prefix entries to keep from scores [B, Hkv, p], `per_head` per head on average.

        Returns indices [B, Hkv, k], sorted per head, and None, or (when heads keep different counts)
        a mask [B, Hkv, k] of the real entries; padding entries must still be distinct indices.
        """
        return scores.topk(per_head, dim=-1).indices.sort(dim=-1).values, None


@dataclass
class PrefillTrace:
    """What a prefill pass did: tokens each layer computed on, and positions after each reduction."""

    prompt_len: int
    tokens_per_layer: list[int] = field(default_factory=list)
    # layer index -> original positions [B, T] of the tokens that continue past that layer
    propagated: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class Pass:
    """One pass over the model: the cache it wrote, the float32 logits of its last token [B, V], its trace."""

    cache: KVCache
    logits: torch.Tensor
    trace: PrefillTrace


class Passes(Protocol):
    """What the engine offers a reducer to drive prefill with (`Reducer.prefill`)."""

    def run(self, input_ids: torch.Tensor, reducer: Reducer, policy: CachePolicy) -> Pass:
        """One pass over every layer on input_ids [B, n] at positions 0..n-1."""
        ...

    def look(self, input_ids: torch.Tensor, layer: int) -> LayerState:
        """The state of `layer` over input_ids [B, n], after the layers below it ran on every token, caching
        nothing."""
        ...


@dataclass(frozen=True, kw_only=True)
class Reducer(Part):
    """Which tokens continue through depth during prefill."""

    kind = "reducer"

    def tokens(self, layer: LayerState) -> Selection | None:
        """Sorted token indices [B, 1, T] that continue past this layer, or None for all of them."""
        return None

    def tail(self) -> int | None:
        """Trailing prompt tokens that always continue (None: every token does)."""
        return None

    def passed_on(self, prompt_len: int) -> int | None:
        """Tokens of a prompt of prompt_len tokens that the layers after this reducer's cut see (None: all)."""
        return None

    def prefill(self, passes: Passes, input_ids: torch.Tensor, policy: CachePolicy) -> Pass:
        """Drive prefill: one pass in which this reducer picks the tokens at every layer. A reducer that needs
        more than one pass (a filter-and-rerun) overrides this and drives them itself."""
        return passes.run(input_ids, self, policy)


@dataclass(frozen=True, kw_only=True)
class CachePolicy(Part):
    """Which KV entries each layer keeps for decoding: of the prompt (`entries`), and of the generated tokens
    (`decoding`, a `DecodeBudget`: all of them unless its decode_budget is set)."""

    kind = "policy"

    decoding: Part = sub_part("decoding", lambda: PARTS["decoding"]["budget"](), "decode-time budget", named=False)

    def entries(self, layer: LayerState) -> Selection | None:
        """Entries of the tokens present to cache, or None for all of them."""
        return None

    def observed_window(self) -> int:
        """Trailing tokens whose queries this policy scores with (0: none)."""
        return 0

    def kv_budget(self, prompt_len: int) -> int | None:
        """Mean entries per layer and head it keeps of a prompt of prompt_len tokens (None: all)."""
        return None

    def max_entries(self, prompt_len: int, layer: int, num_layers: int, kv_heads: int) -> int:
        """At most how many entries per KV head `layer` caches from a prompt of prompt_len tokens, padding
        included: what a server reserves before the prefill that tells the exact count."""
        budget = self.kv_budget(prompt_len)
        return prompt_len if budget is None else min(prompt_len, budget)

    def generated_entries(self, max_tokens: int) -> int:
        """At most how many generated entries per KV head a (non-sliding) layer holds over `max_tokens` new
        tokens: all of them, or under a decode budget its budget plus one interval."""
        return min(max_tokens, self.decoding.held) if self.decoding.active else max_tokens

    def for_prompt(self, prompt_len: int) -> CachePolicy:
        """This policy with its budgets fixed as they are for a prompt of prompt_len tokens, for a pass that
        runs on fewer (a rerun on selected tokens keeps the budget of the whole prompt)."""
        return self


@dataclass(frozen=True, kw_only=True)
class Budgeted(CachePolicy):
    """A KV budget per layer: `budget` entries, or `retain_rate` of the prompt (default 0.1).

    A budget from a rate never falls below `min_budget` (nor the entries always kept), so a prompt of at
    most `min_budget` tokens is cached whole. A budget is relative to the original prompt length, whatever
    a layer sees, so layers after TSP keep the same count as the others.
    """

    budget: int | None = knob(None, "KV entries kept per layer and KV head, window included (instead of a rate)")
    retain_rate: float | None = knob(None, "KV budget as a share of the prompt (default 0.1)")
    min_budget: int = knob(MIN_BUDGET, "smallest budget a rate gives: shorter prompts are cached whole")

    def check(self) -> None:
        check_exclusive(self, "retain_rate", "budget")
        check_int(self, "min_budget")
        if self.budget is not None and self.always_kept() > self.budget:
            raise ValueError(
                f"{type(self).__name__}: budget={self.budget} is smaller than the {self.always_kept()} entries "
                f"it always keeps ({self.kept_why()})"
            )

    def bind(self, num_layers: int, global_layers: Sequence[int] | None = None) -> Budgeted:
        bound = super().bind(num_layers, global_layers)
        if self.budget is None and self.retain_rate is None:
            return replace(bound, retain_rate=RETAIN_RATE)
        return bound

    def always_kept(self) -> int:
        return 1

    def kept_why(self) -> str:
        return "the last token"

    def kv_budget(self, prompt_len: int) -> int:
        rate = RETAIN_RATE if self.retain_rate is None else self.retain_rate
        return sized(self.budget, rate, prompt_len, max(self.always_kept(), self.min_budget))

    def for_prompt(self, prompt_len: int) -> Budgeted:
        return replace(self, budget=self.kv_budget(prompt_len), retain_rate=None)
