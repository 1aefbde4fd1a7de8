"""Spec strings: one way to name a method everywhere (API, CLI, evaluation, benchmarks).

    snapkv                          a preset with its defaults
    fastkv(kernel_size=13, tsp_layer=15)
    fastkv+adakv                    FastKV's context reducer (TSP) with AdaKV's cache policy
    gemfilter(window_size=8)+snapkv(budget=512)
    tsp(tsp_rate=0.3)+topk(scorer=accumulated, allocator=pyramid)   parts by their registry names
    fullkv, fastkv(kernel_size=13)  a list (evaluation): commas inside parentheses belong to a spec

A spec is a Python expression, read with `ast` (never evaluated): names, keyword arguments with literal
values (a bare word is a string: `pooling=avg`) and at most one `+`. Knobs written on the left of `+`
configure its reducer only, knobs on the right its policy only. `format_spec` writes the canonical form,
with every knob that is set (after `Method.bind`, all of them); parsing it gives the same method.
"""

from __future__ import annotations

import ast
import dataclasses
from typing import Any

from .base import EXCLUSIVE, REGISTRY, RETAIN_RATE, TSP_RATE, Part, build
from .method import Composed, Method, shape
from .presets import PRESETS
from .registry import KeepAll, NoReduction

ROLES = ("reducer", "policy")
PARTNER = {a: b for pair in EXCLUSIVE for a, b in (pair, pair[::-1])}
Side = tuple[str, dict[str, Any]]


def _value(node: ast.AST, spec: str) -> Any:
    if isinstance(node, ast.Name):
        return node.id  # a bare word: a string such as avg or accumulated
    try:
        value = ast.literal_eval(node)
    except ValueError:
        value = ...
    if value is not None and not isinstance(value, (int, float, str)):
        raise ValueError(f"bad method spec {spec!r}: knob values are numbers, strings or None")
    return value


def _side(node: ast.AST, spec: str) -> Side:
    if isinstance(node, ast.Name):
        return node.id.lower(), {}
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        if node.args:
            raise ValueError(f"bad method spec {spec!r}: give knobs by name, as in snapkv(budget=512)")
        return node.func.id.lower(), {kw.arg: _value(kw.value, spec) for kw in node.keywords}
    raise ValueError(f"bad method spec {spec!r}: expected NAME, NAME(knob=value, ...) or REDUCER+POLICY")


def _sides(node: ast.AST, spec: str) -> list[Side]:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        if isinstance(node.left, ast.BinOp) or isinstance(node.right, ast.BinOp):
            raise ValueError(f"bad method spec {spec!r}: a spec combines two parts at most, REDUCER+POLICY")
        return [_side(node.left, spec), _side(node.right, spec)]
    return [_side(node, spec)]


def parse_specs(text: str) -> list[list[Side]]:
    """Parse one spec or a comma-separated list of specs into [(name, knobs)] per spec."""
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as e:
        raise ValueError(f"bad method spec {text!r}: {e.msg}") from None
    nodes = tree.elts if isinstance(tree, ast.Tuple) else [tree]
    return [_sides(node, ast.get_source_segment(text.strip(), node) or text) for node in nodes]


def _unknown(where: str, given: set[str], accepted: set[str]) -> None:
    if given - accepted:
        raise ValueError(f"{where} has no knob(s) {sorted(given - accepted)}; it takes {sorted(accepted)}")


def _registered(name: str, role: str, knobs: dict[str, Any]) -> Part:
    used: set[str] = set()
    part = build(REGISTRY[role][name], knobs, used=used)
    _unknown(f"{role} {name!r}", set(knobs), used | set(part.knobs()))
    return part


def _part(name: str, role: str, knobs: dict[str, Any], spec: str) -> Part:
    """The `role` part of a spec side: a preset's reducer or policy, or a registered part."""
    if name in PRESETS:
        part = getattr(_preset(name, knobs), role)
        stray = set(knobs) - set(part.knobs())
        if stray:
            raise ValueError(
                f"in {spec!r}, {name} gives the {role} ({part.name!r}), which has no knob(s) {sorted(stray)}; "
                f"{'the right' if role == 'reducer' else 'the left'} side's part takes them"
            )
        return part
    if name in REGISTRY[role]:
        return _registered(name, role, knobs)
    other = ROLES[1 - ROLES.index(role)]
    if name in REGISTRY[other]:
        raise ValueError(
            f"in {spec!r}, {name!r} is a {other}; the {'left' if role == 'reducer' else 'right'} side of + is a {role}"
        )
    raise ValueError(f"unknown method {name!r}: choose one of {names()}")


def _preset(name: str, knobs: dict[str, Any]) -> Method:
    cls = PRESETS[name]
    _unknown(f"method {name!r}", set(knobs), set(cls.__dataclass_fields__))
    return cls(**knobs)


def names() -> list[str]:
    """Every name a spec may start with: presets, then registered reducers and policies."""
    return [*PRESETS, *REGISTRY["reducer"], *REGISTRY["policy"]]


def _knob_names(name: str, role: str | None, knobs: dict[str, Any]) -> set[str]:
    if name in PRESETS:
        cls = PRESETS[name]
        return set(cls.__dataclass_fields__) if role is None else set(getattr(cls(), role).knobs())
    for kind in (role,) if role else ROLES:
        if name in REGISTRY[kind]:
            return set(build(REGISTRY[kind][name], knobs).knobs())
    return set()


def _add(spec: str, sides: list[Side], extra: dict[str, Any], shared: bool) -> list[Side]:
    """Place knobs given apart from the spec on the side(s) whose part has them.

    shared=False (options of a command): a knob no side has, or one the spec gives too, is an error.
    shared=True (one setting for many methods): it goes only where the spec sets neither it nor its
    exclusive partner (retain_rate/budget, tsp_rate/tsp_len), and nowhere else.
    """
    for name, _ in sides:
        if name not in names():
            raise ValueError(f"unknown method {name!r}: choose one of {names()}")
    roles = [None] if len(sides) == 1 else list(ROLES)
    out = [(name, dict(knobs)) for name, knobs in sides]
    for key, value in extra.items():
        if value is None:
            continue
        placed = False
        for (name, knobs), role in zip(out, roles, strict=True):
            if key not in _knob_names(name, role, knobs):
                continue
            if key in knobs or (shared and PARTNER.get(key) in knobs):
                if not shared:
                    raise ValueError(f"knob {key} is given twice: in {spec!r} and as an option")
                continue
            knobs[key] = value
            placed = True
        if not placed and not shared:
            raise ValueError(f"{spec!r} has no knob {key!r}")
    return out


def _assemble(spec: str, sides: list[Side]) -> Method:
    if len(sides) == 1:
        name, knobs = sides[0]
        if name in PRESETS:
            return _preset(name, knobs)
        if name in REGISTRY["reducer"]:
            return Composed(reducer=_registered(name, "reducer", knobs), policy=KeepAll())
        if name in REGISTRY["policy"]:
            return Composed(reducer=NoReduction(), policy=_registered(name, "policy", knobs))
        raise ValueError(f"unknown method {name!r}: choose one of {names()}")
    (left, lk), (right, rk) = sides
    return Composed(reducer=_part(left, "reducer", lk, spec), policy=_part(right, "policy", rk, spec))


def make_method(spec: str | Method, defaults: dict[str, dict] | None = None, **knobs) -> Method:
    """A method from a spec string, with more knobs given apart (None values mean 'not given').

    defaults: {preset name: knobs} that fill what a side of that name leaves unset (a model's calibrated
    profile for "fastkv"); knobs in the spec or given here win.
    """
    if isinstance(spec, Method):
        if any(v is not None for v in knobs.values()):
            raise ValueError("knobs go into the spec string, or into the method's constructor")
        return spec
    parsed = parse_specs(spec)
    if len(parsed) != 1:
        raise ValueError(f"{spec!r} names {len(parsed)} methods; one is expected here")
    sides = _add(spec, parsed[0], knobs, shared=False)
    for name, extra in (defaults or {}).items():
        for j, (side, side_knobs) in enumerate(sides):
            if side != name or j == 1:  # the left side, or the only one
                continue
            if len(sides) == 2:  # a combination takes this preset's reducer knobs only
                extra = {k: v for k, v in extra.items() if k in _knob_names(name, "reducer", side_knobs)}
            sides[j] = _add(spec, [sides[j]], extra, shared=True)[0]
    return _assemble(spec, sides)


def uses_defaults(spec: str | Method, name: str) -> bool:
    """Whether a spec string has a side named `name` (that a profile's defaults would fill)."""
    return isinstance(spec, str) and any(side[0] == name for side in parse_specs(spec)[0])


def make_methods(text: str, **shared) -> list[Method]:
    """Methods from a comma-separated list of specs ('all': every preset), with settings shared by all
    of them where a method has the knob and its spec does not set it (see `_add`)."""
    text = ",".join(PRESETS) if text.strip().lower() == "all" else text
    return [_assemble(text, _add(text, sides, shared, shared=True)) for sides in parse_specs(text)]


def make_with_shared(spec: str, **shared) -> Method:
    """One method from its spec, with shared settings where it has them (see `make_methods`)."""
    (method,) = make_methods(spec, **shared)
    return method


def short_spec(spec: str, keep_auto: bool = False) -> str:
    """A spec without the knobs at their defaults, for tables and legends: `fastkv(window_size=8,
    kernel_size=17, ..., retain_rate=0.1, tsp_layer=11)` -> `fastkv(kernel_size=17, pooling='avg')`.

    Knobs resolved per model (tsp_layer, filter_layer) are left out too, unless keep_auto. A side named
    after a part rather than a preset keeps every knob.
    """
    per_model = {k for parts in REGISTRY.values() for cls in parts.values() for k in cls.auto}
    rates = {"retain_rate": RETAIN_RATE, "tsp_rate": TSP_RATE}  # what None resolves to

    def default(name: str, knob: str, value: Any) -> bool:
        if name not in PRESETS:
            return False
        preset = {f.name: f.default for f in dataclasses.fields(PRESETS[name])}.get(knob, ...)
        if preset is None and knob in per_model:
            return not keep_auto
        return value == (rates.get(knob) if preset is None else preset)

    return "+".join(
        _render(name, {k: v for k, v in knobs.items() if not default(name, k, v)})
        for name, knobs in parse_specs(spec)[0]
    )


def _render(name: str, knobs: dict[str, Any]) -> str:
    shown = ", ".join(f"{k}={v!r}" for k, v in knobs.items() if v is not None)
    return f"{name}({shown})" if shown else name


def _label(part: Part, role: str) -> tuple[str, bool]:
    """The name a part is written with: the first preset that has it, else its registry name."""
    for name, cls in PRESETS.items():
        if shape(getattr(cls.prototype, role)) == shape(part):
            return name, True
    return part.name, False


def _flat(part: Part, keep_choices: bool) -> dict[str, Any]:
    subs = {f for f in part.__dataclass_fields__.values() if "kind" in f.metadata}
    return {k: v for k, v in part.knobs().items() if keep_choices or k not in {f.name for f in subs}}


def format_spec(method: Method) -> str:
    """The canonical spec: a preset's name with its knobs, or REDUCER(...)+POLICY(...)."""
    r, p = method.reducer, method.policy
    for name, cls in PRESETS.items():
        proto = cls.prototype
        if (shape(proto.reducer), shape(proto.policy)) == (shape(r), shape(p)):
            rk, pk = _flat(r, False), _flat(p, False)
            if all(rk[k] == pk[k] for k in rk.keys() & pk.keys()):
                return _render(name, {**rk, **pk})
    (rname, r_preset), (pname, p_preset) = _label(r, "reducer"), _label(p, "policy")
    return _render(rname, _flat(r, not r_preset)) + "+" + _render(pname, _flat(p, not p_preset))
