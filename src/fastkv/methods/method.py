"""A method: one context reducer and one cache policy. Presets are flat dataclasses over both.

`Composed(reducer, policy)` holds the two parts; `preset(...)` makes a named, flat, frozen dataclass
(`SnapKV(budget=512)`, `FastKV(kernel_size=13)`) whose fields are the knobs of its two parts: a knob the
two share (FastKV's window_size, kernel_size and pooling) configures both.
"""

from __future__ import annotations

import re
import typing
from dataclasses import MISSING, dataclass, field, fields, make_dataclass
from typing import Any, ClassVar

from .base import CachePolicy, Part, Reducer, build, is_sub


class Method:
    """What the engine runs: `reducer` (which tokens continue) and `policy` (which entries are cached)."""

    reducer: Reducer
    policy: CachePolicy

    def bind(self, num_layers: int) -> Composed:
        """The same method with every default resolved for a model of `num_layers` layers."""
        return Composed(reducer=self.reducer.bind(num_layers), policy=self.policy.bind(num_layers))

    @property
    def spec(self) -> str:
        """The canonical spec string: parsing it gives this method back (after `bind`, every knob)."""
        from .spec import format_spec

        return format_spec(self)

    def describe(self) -> str:
        return self.spec

    @property
    def name(self) -> str:
        """The spec without knobs, e.g. "fastkv" or "fastkv+adakv"."""
        return re.sub(r"\([^)]*\)", "", self.spec)

    @property
    def reduces(self) -> str:
        if type(self.reducer).name != "none":
            return "prefill + KV cache"
        return "nothing" if type(self.policy).name == "all" else "KV cache"

    def same_parts(self, other: Method) -> bool:
        return (self.reducer, self.policy) == (other.reducer, other.policy)

    def __add__(self, other: Method) -> Composed:
        """self's context reducer with other's cache policy: `FastKV() + AdaKV()`."""
        return Composed(reducer=self.reducer, policy=other.policy)


@dataclass(frozen=True)
class Composed(Method):
    """Any reducer with any cache policy. Refused where the policy could not work after the reducer."""

    reducer: Reducer
    policy: CachePolicy

    def __post_init__(self) -> None:
        need, tail = self.policy.observed_window(), self.reducer.tail()
        if tail is not None and need > tail:
            raise ValueError(
                f"the {self.reducer.name!r} reducer keeps only the last {tail} prompt token(s) whole "
                f"(window_size={tail}), but the cache policy scores with the queries of the last {need} "
                f"(window_size={need}): give the reducer window_size={need} or more"
            )


def shape(part: Part) -> tuple:
    """A part's structure: its class and its sub-parts' classes, without knob values."""
    return (type(part), *(shape(getattr(part, f.name)) for f in fields(part) if is_sub(f)))


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


class Preset(Method):
    """A named method with flat knobs; see `preset`."""

    name: ClassVar[str]  # type: ignore[assignment]
    paper: ClassVar[str]
    prototype: ClassVar[Composed]

    def __post_init__(self) -> None:
        knobs = {f.name: getattr(self, f.name) for f in fields(self)}
        try:
            parts = Composed(
                reducer=build(type(self.prototype.reducer), knobs, self.prototype.reducer),
                policy=build(type(self.prototype.policy), knobs, self.prototype.policy),
            )
        except ValueError as e:
            raise ValueError(f"{self.name}: {e}") from None
        object.__setattr__(self, "_parts", parts)

    @property
    def reducer(self) -> Reducer:
        return self._parts.reducer

    @property
    def policy(self) -> CachePolicy:
        return self._parts.policy


def preset(class_name: str, name: str, prototype: Composed, doc: str, paper: str = "") -> type[Preset]:
    """A frozen, keyword-only dataclass named `class_name` whose fields are the knobs of the prototype's
    parts, with the prototype's values as defaults."""
    knobs = knob_fields(type(prototype.reducer), prototype.reducer)
    for key, (kind, default, help) in knob_fields(type(prototype.policy), prototype.policy).items():
        if key in knobs and knobs[key][1] != default:
            raise TypeError(f"preset {name}: its parts disagree on the default of {key}")
        knobs.setdefault(key, (kind, default, help))
    specs = [
        (key, kind, field(default=default, metadata={"help": help})) for key, (kind, default, help) in knobs.items()
    ]
    cls = make_dataclass(
        class_name,
        specs,
        bases=(Preset,),
        frozen=True,
        kw_only=True,
        namespace={"name": name, "paper": paper, "prototype": prototype, "__doc__": doc},
    )
    cls.__module__ = "fastkv.methods.presets"  # where it is bound, so that it pickles
    return cls


def defaults(cls: type) -> dict[str, Any]:
    """A dataclass's knob defaults, by field name."""
    return {f.name: f.default for f in fields(cls) if f.default is not MISSING}
