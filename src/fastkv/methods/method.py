"""A method: one context reducer and one cache policy; presets are named methods with flat knobs.

`Composed(reducer, policy)` holds the two parts. A `Preset` subclass (`presets.py`) is a frozen dataclass
whose fields are the knobs of its prototype's two parts, every one None until set: a knob the two parts
share (FastKV's window_size, kernel_size and pooling) configures both, and an unset knob takes the
prototype's value, or a model's calibrated profile where one applies (`spec.parse`).

Every method also remembers how it was written (`recipe`: the preset or part names with the knobs set),
so that a spec string and a preset object built without some knobs take the same defaults.
"""

from __future__ import annotations

import typing
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from .base import CachePolicy, Part, Reducer, build, is_sub

# (name, knobs set) for each side of a method as written: one side, or REDUCER+POLICY
Side = tuple[str, dict[str, Any]]
Recipe = tuple[Side, ...]
# Budget warnings already given (`Composed.warn_if_budget_unreachable`), at most this many per process.
_UNREACHABLE_WARNED: set[str] = set()
MAX_UNREACHABLE_WARNINGS = 32
# Every preset by name, in the order they are defined (filled by `Preset.__init_subclass__`).
PRESETS: dict[str, type[Preset]] = {}


class Method:
    """What the engine runs: `reducer` (which tokens continue) and `policy` (which entries are cached)."""

    reducer: Reducer
    policy: CachePolicy

    @property
    def recipe(self) -> Recipe | None:
        """How this method is written, side by side, with the knobs set (None: built from parts by hand)."""
        return None

    def bind(self, num_layers: int, global_layers: Sequence[int] | None = None) -> Composed:
        """The same method with every default resolved for a model of `num_layers` layers (global_layers: see
        `Part.bind`; `Adapter.bind` passes a model's own). A method already bound for this model is returned
        as it is: a request binds its method once, however many layers (LLM, generate, prefill) ask."""
        model = (num_layers, None if global_layers is None else tuple(global_layers))
        if isinstance(self, Composed) and self.bound_for == model:
            return self
        reducer, policy = self.reducer.bind(num_layers, global_layers), self.policy.bind(num_layers, global_layers)
        bound = Composed(reducer=reducer, policy=policy, recipe=self.recipe, bound_for=model)
        bound.warn_if_budget_unreachable()
        return bound

    @property
    def reduces(self) -> str:
        if type(self.reducer).name != "none":
            return "prefill + KV cache"
        return "nothing" if type(self.policy).name == "all" else "KV cache"

    def same_parts(self, other: Method) -> bool:
        return (self.reducer, self.policy) == (other.reducer, other.policy)

    def __add__(self, other: Method) -> Composed:
        """self's context reducer with other's cache policy: `FastKV() + AdaKV()`."""
        sides = (self.recipe, other.recipe)
        recipe = sides[0] + sides[1] if all(s is not None and len(s) == 1 for s in sides) else None
        return Composed(reducer=self.reducer, policy=other.policy, recipe=recipe)


@dataclass(frozen=True)
class Composed(Method):
    """Any reducer with any cache policy. Refused where the policy could not work after the reducer."""

    reducer: Reducer
    policy: CachePolicy
    recipe: Recipe | None = field(default=None, compare=False, repr=False)  # type: ignore[assignment]
    # (layers, global layers) of the model it was bound for, or None: not bound (`Method.bind`).
    bound_for: tuple[int, tuple[int, ...] | None] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        need, tail = self.policy.observed_window(), self.reducer.tail()
        if tail is not None and need > tail:
            raise ValueError(
                f"the {self.reducer.name!r} reducer keeps only the last {tail} prompt token(s) whole "
                f"(window_size={tail}), but the cache policy scores with the queries of the last {need} "
                f"(window_size={need}): give the reducer window_size={need} or more"
            )

    def warn_if_budget_unreachable(self, prompt_len: int = 1 << 20) -> None:
        """Warn where the cache budget exceeds what the reducer passes on: the layers after its cut then
        cache every token they see, and the cache holds less than the budget asks (not an error: the
        layers before the cut still keep the budget). Compared on a long prompt, where rates decide."""
        passed, budget = self.reducer.passed_on(prompt_len), self.policy.kv_budget(prompt_len)
        if passed is None or budget is None or budget <= passed:
            return

        def amount(n: int) -> str:  # a rate as a share, a count as a count
            return f"{n / prompt_len:.0%} of the prompt" if n >= prompt_len // 1000 else f"{n} tokens"

        message = (
            f"the cache budget ({amount(budget)}) is above what the {self.reducer.name!r} reducer passes on "
            f"({amount(passed)}): the layers after its cut cache every token they see, "
            "so the cache holds less than the budget asks; raise the reducer's rate to the budget's or lower the "
            "budget"
        )
        # Each distinct message once, and a bounded number of them: a server binds every request's method,
        # and the warnings registry would otherwise keep one entry per distinct budget a client sends.
        if message in _UNREACHABLE_WARNED or len(_UNREACHABLE_WARNED) >= MAX_UNREACHABLE_WARNINGS:
            return
        _UNREACHABLE_WARNED.add(message)
        warnings.warn(message, UserWarning, stacklevel=3)


def shape(part: Part) -> tuple:
    """A part's structure: its class and its sub-parts' classes, without knob values."""
    return (type(part), *(shape(getattr(part, f.name)) for f in fields(part) if is_sub(f)))


REFERENCE_LAYERS = 32  # any count: `in_force` shows knobs resolved per model as their rule, not this count's value


def in_force(part: Part) -> dict[str, tuple[Any, str]]:
    """knob -> (the value it takes when left unset, its help): rates as `bind` resolves them, knobs resolved
    per model as their rule ("auto (layers//2-1)"), counts that stay unset (a rate applies) as "-"."""
    bound = part.bind(REFERENCE_LAYERS)
    out = {}
    for k, (_, value, help) in knob_fields(type(bound), bound).items():
        if k in type(part).auto:
            value = f"auto ({type(part).auto[k]})"
        out[k] = ("-" if value is None else value, help)
    return out


def knob_fields(part_cls: type[Part], like: Part | None = None) -> dict[str, tuple[Any, Any, str]]:
    """name -> (type, default, help) of a part's knobs, flattened over its sub-parts (not their names)."""
    hints = typing.get_type_hints(part_cls)
    out = {}
    for f in fields(part_cls):
        value = getattr(like, f.name) if like is not None else (f.default_factory() if is_sub(f) else f.default)
        if is_sub(f):
            out.update(knob_fields(type(value), value))
        else:
            out[f.name] = (hints[f.name], value, f.metadata.get("help", ""))
    return out


@dataclass(frozen=True, kw_only=True)
class Preset(Method):
    """A named method with flat knobs, each None until set; subclasses declare them (see `presets.py`)."""

    name: ClassVar[str]
    paper: ClassVar[str] = ""
    prototype: ClassVar[Composed]

    # The cache policy's decode-time budget (`fastkv.methods.decoding.budget.DecodeBudget`): every method has it.
    decode_budget: int | None = None
    decode_interval: int | None = None
    decode_window: int | None = None
    decode_scorer: str | None = None

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        PRESETS[cls.name] = cls

    def __post_init__(self) -> None:
        knobs = self.given
        proto = self.prototype
        try:
            parts = Composed(
                reducer=build(type(proto.reducer), knobs, proto.reducer),
                policy=build(type(proto.policy), knobs, proto.policy),
            )
        except ValueError as e:
            raise ValueError(f"{self.name}: {e}") from None
        object.__setattr__(self, "_parts", parts)

    @property
    def given(self) -> dict[str, Any]:
        """The knobs that are set."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @property
    def recipe(self) -> Recipe:
        return ((self.name, self.given),)

    @property
    def reducer(self) -> Reducer:
        return self._parts.reducer

    @property
    def policy(self) -> CachePolicy:
        return self._parts.policy

    @classmethod
    def knobs_in_force(cls) -> dict[str, tuple[Any, str]]:
        """Each knob (in field order) with the value it takes when left unset and its help (`in_force`)."""
        found = {**in_force(cls.prototype.policy), **in_force(cls.prototype.reducer)}
        return {f.name: found[f.name] for f in fields(cls)}

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """The value each knob takes when it is not set (before `bind`, which resolves model-dependent ones)."""
        proto = cls.prototype
        parts = (proto.reducer, proto.policy)
        return {k: v for part in parts for k, (_, v, _) in knob_fields(type(part), part).items()}
