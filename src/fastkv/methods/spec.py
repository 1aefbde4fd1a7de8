"""Spec strings: one way to name a method everywhere (API, CLI, evaluation, benchmarks), read by `parse`
and written by `format_spec`.

    snapkv                          a preset with its defaults
    fastkv(kernel_size=13, tsp_layer=15)
    fastkv+adakv                    FastKV's context reducer (TSP) with AdaKV's cache policy
    gemfilter(window_size=8)+snapkv(budget=512)
    tsp(tsp_rate=0.3)+topk(scorer=accumulated, allocator=pyramid)   parts by their registry names
    fullkv, fastkv(kernel_size=13)  a list (`split_specs`): commas inside parentheses belong to a spec

A spec is a Python expression, read with `ast` (never evaluated): names, keyword arguments with literal
values (a bare word is a string: `pooling=avg`) and at most one `+`. Knobs written on the left of `+`
configure its reducer only, knobs on the right its policy only. `format_spec` writes the canonical form,
with every knob that is set (after `Method.bind`, all of them); parsing it gives the same method.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from dataclasses import fields, replace
from typing import Any

from . import presets  # noqa: F401  (defines the presets: PRESETS is filled on import)
from .base import EXCLUSIVE, PARTS, RETAIN_RATE, TSP_RATE, Part, build
from .method import PRESETS, Composed, Method, Recipe, Side, shape

ROLES = ("reducer", "policy")
PARTNER = {a: b for pair in EXCLUSIVE for a, b in (pair, pair[::-1])}
MAX_SPEC_CHARS = 2000  # a spec is a name and a few knobs; longer text is refused before it is parsed


def parse(
    spec: str | Method,
    knobs: Mapping[str, Any] | None = None,
    defaults: Mapping[str, Any] | None = None,
    preset_defaults: Mapping[str, Mapping[str, Any]] | None = None,
) -> Method:
    """The method a spec string (or a method, as written) names. ValueError names what is wrong.

    knobs: set apart from the spec (a command's options); each goes to the side(s) whose part has it, and it
        is an error when no side has it or the spec sets it too. None values mean "not given".
    defaults: one setting for many methods (an evaluation's budget); it goes where a side has the knob and
        sets neither it nor its exclusive partner (retain_rate/budget, tsp_rate/tsp_len).
    preset_defaults: {preset name: knobs} for a side of that name (the only side, or the left one, which
        gives the reducer) wherever it leaves them unset: a model's calibrated profile for "fastkv".

    A Method is re-read from its `recipe` (a preset object, or one made by parse or `+`), so a preset object
    and its spec string take the same defaults; a method built from parts by hand is returned as it is.
    """
    if isinstance(spec, Method):
        if spec.recipe is None:
            if any(v is not None for v in (knobs or {}).values()):
                raise ValueError("knobs go into the spec string, or into the method's constructor")
            return spec
        sides, text = [(name, dict(k)) for name, k in spec.recipe], "+".join(n for n, _ in spec.recipe)
    else:
        (sides,), text = _parse_sides(spec, one=True), spec
    sides = _place(text, sides, knobs or {}, shared=False)
    sides = _place(text, sides, defaults or {}, shared=True)
    for name, extra in (preset_defaults or {}).items():
        head, side_knobs = sides[0]
        if head != name:
            continue
        if len(sides) == 2:  # a combination takes this preset's reducer knobs only
            extra = {k: v for k, v in extra.items() if k in _knob_names(name, "reducer", side_knobs)}
        sides[0] = _place(text, [sides[0]], extra, shared=True)[0]
    return _assemble(text, sides)


def split_specs(text: str) -> list[str]:
    """The specs of a comma-separated list ('all': every preset)."""
    if text.strip().lower() == "all":
        return list(PRESETS)
    text = _bounded(text)
    return [_segment(text, node) for node in _nodes(text)]


def format_spec(method: Method) -> str:
    """The canonical spec: a preset's name with its knobs, or REDUCER(...)+POLICY(...).

    Every knob is written as it resolves: rates left unset as their defaults (retain_rate=0.1, tsp_rate=0.2).
    Knobs resolved per model (tsp_layer, filter_layer) appear once the method is bound to one
    (`method.bind(num_layers)`, as in `result.stats.method`); before that they are left out."""
    r, p = _resolved(method.reducer), _resolved(method.policy)
    for name, cls in PRESETS.items():
        proto = cls.prototype
        if (shape(proto.reducer), shape(proto.policy)) == (shape(r), shape(p)):
            rk, pk = _flat(r, False), _flat(p, False)
            if all(rk[k] == pk[k] for k in rk.keys() & pk.keys()):
                return _render(name, {**rk, **pk})
    (rname, r_preset), (pname, p_preset) = _label(r, "reducer"), _label(p, "policy")
    return _render(rname, _flat(r, not r_preset)) + "+" + _render(pname, _flat(p, not p_preset))


UNBOUNDED_LAYERS = 1 << 20  # binds a part without limiting the layer a knob may name


def _resolved(part: Part) -> Part:
    """part with its model-independent defaults resolved (rates), its per-model knobs as they were."""
    bound = part.bind(UNBOUNDED_LAYERS)
    return replace(bound, **{k: None for k in type(part).auto if getattr(part, k) is None})


def spec_name(method: Method | str) -> str:
    """The spec without knobs, e.g. "fastkv" or "fastkv+adakv"."""
    spec = method if isinstance(method, str) else format_spec(method)
    return "+".join(name for name, _ in _parse_sides(spec, one=True)[0])


def short_spec(spec: str, keep_auto: bool = False) -> str:
    """A spec without the knobs at their defaults, for tables and legends: `fastkv(window_size=8,
    kernel_size=17, ..., retain_rate=0.1, tsp_layer=11)` -> `fastkv(kernel_size=17, pooling='avg')`.

    Knobs resolved per model (tsp_layer, filter_layer) are left out too, unless keep_auto. A side named
    after a part rather than a preset keeps every knob.
    """
    per_model = {k for parts in PARTS.values() for cls in parts.values() for k in cls.auto}
    rates = {"retain_rate": RETAIN_RATE, "tsp_rate": TSP_RATE}  # what None resolves to

    def default(name: str, knob: str, value: Any) -> bool:
        if name not in PRESETS:
            return False
        preset = PRESETS[name].defaults().get(knob, ...)
        if preset is None and knob in per_model:
            return not keep_auto
        return value == (rates.get(knob) if preset is None else preset)

    return "+".join(
        _render(name, {k: v for k, v in knobs.items() if not default(name, k, v)})
        for name, knobs in _parse_sides(spec, one=True)[0]
    )


def names() -> list[str]:
    """Every name a spec may start with: presets, then registered reducers and policies."""
    return [*PRESETS, *PARTS["reducer"], *PARTS["policy"]]


# -- reading ---------------------------------------------------------------------------------------------
def _bounded(text: str) -> str:
    if not isinstance(text, str):
        raise ValueError(f"a method spec is a string, got {type(text).__name__}")
    text = text.strip()
    if len(text) > MAX_SPEC_CHARS:
        raise ValueError(f"bad method spec: {len(text)} characters, more than the {MAX_SPEC_CHARS} a spec may have")
    return text


def _nodes(text: str) -> list[ast.AST]:
    try:
        tree = ast.parse(text, mode="eval").body
    except (SyntaxError, RecursionError, MemoryError) as e:
        raise ValueError(f"bad method spec {text!r}: {getattr(e, 'msg', None) or 'too deeply nested'}") from None
    return tree.elts if isinstance(tree, ast.Tuple) else [tree]


def _segment(text: str, node: ast.AST) -> str:
    return ast.get_source_segment(text, node) or text


def _parse_sides(text: str, one: bool = False) -> list[list[Side]]:
    """[(name, knobs)] per spec of a spec (or a comma-separated list)."""
    text = _bounded(text)
    nodes = _nodes(text)
    if one and len(nodes) != 1:
        raise ValueError(f"{text!r} names {len(nodes)} methods; one is expected here")
    return [_sides(node, _segment(text, node)) for node in nodes]


def _value(node: ast.AST, spec: str) -> Any:
    if isinstance(node, ast.Name):
        return node.id  # a bare word: a string such as avg or accumulated
    try:
        value = ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        value = ...
    if value is not None and not isinstance(value, (int, float, str)):
        raise ValueError(f"bad method spec {spec!r}: knob values are numbers, strings or None")
    return value


def _side(node: ast.AST, spec: str) -> Side:
    if isinstance(node, ast.Name):
        return node.id.lower(), {}
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        if node.args or any(kw.arg is None for kw in node.keywords):
            raise ValueError(f"bad method spec {spec!r}: give knobs by name, as in snapkv(budget=512)")
        return node.func.id.lower(), {kw.arg: _value(kw.value, spec) for kw in node.keywords}
    raise ValueError(f"bad method spec {spec!r}: expected NAME, NAME(knob=value, ...) or REDUCER+POLICY")


def _sides(node: ast.AST, spec: str) -> list[Side]:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        if isinstance(node.left, ast.BinOp) or isinstance(node.right, ast.BinOp):
            raise ValueError(f"bad method spec {spec!r}: a spec combines two parts at most, REDUCER+POLICY")
        return [_side(node.left, spec), _side(node.right, spec)]
    return [_side(node, spec)]


# -- knobs given apart -------------------------------------------------------------------------------------
def _knob_names(name: str, role: str | None, knobs: dict[str, Any]) -> set[str]:
    if name in PRESETS:
        cls = PRESETS[name]
        return set(cls.__dataclass_fields__) if role is None else set(getattr(cls(), role).knobs())
    for kind in (role,) if role else ROLES:
        if name in PARTS[kind]:
            return set(build(PARTS[kind][name], knobs).knobs())
    return set()


def _place(spec: str, sides: list[Side], extra: Mapping[str, Any], shared: bool) -> list[Side]:
    """Place knobs given apart from the spec on the side(s) whose part has them.

    shared=False (options of a command): a knob no side has, or one the spec gives too, is an error.
    shared=True (defaults): it goes only where the spec sets neither it nor its exclusive partner, and nowhere
    else.
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


# -- building --------------------------------------------------------------------------------------------
def _unknown(where: str, given: set[str], accepted: set[str]) -> None:
    if given - accepted:
        raise ValueError(f"{where} has no knob(s) {sorted(given - accepted)}; it takes {sorted(accepted)}")


def _registered(name: str, role: str, knobs: dict[str, Any]) -> Part:
    used: set[str] = set()
    part = build(PARTS[role][name], knobs, used=used)
    _unknown(f"{role} {name!r}", set(knobs), used | set(part.knobs()))
    return part


def _preset(name: str, knobs: dict[str, Any]) -> Method:
    cls = PRESETS[name]
    _unknown(f"method {name!r}", set(knobs), {f.name for f in fields(cls)})  # not its ClassVars (name, paper)
    return cls(**knobs)


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
    if name in PARTS[role]:
        return _registered(name, role, knobs)
    other = ROLES[1 - ROLES.index(role)]
    if name in PARTS[other]:
        raise ValueError(
            f"in {spec!r}, {name!r} is a {other}; the {'left' if role == 'reducer' else 'right'} side of + is a {role}"
        )
    raise ValueError(f"unknown method {name!r}: choose one of {names()}")


def _assemble(spec: str, sides: list[Side]) -> Method:
    recipe: Recipe = tuple((name, dict(knobs)) for name, knobs in sides)
    if len(sides) == 1:
        name, knobs = sides[0]
        if name in PRESETS:
            return _preset(name, knobs)
        if name in PARTS["reducer"]:  # alone: every token it lets through is cached
            reducer, policy = _registered(name, "reducer", knobs), PARTS["policy"]["all"]()
            return Composed(reducer=reducer, policy=policy, recipe=recipe)
        if name in PARTS["policy"]:  # alone: a full prefill
            reducer, policy = PARTS["reducer"]["none"](), _registered(name, "policy", knobs)
            return Composed(reducer=reducer, policy=policy, recipe=recipe)
        raise ValueError(f"unknown method {name!r}: choose one of {names()}")
    (left, lk), (right, rk) = sides
    return Composed(reducer=_part(left, "reducer", lk, spec), policy=_part(right, "policy", rk, spec), recipe=recipe)


# -- writing ---------------------------------------------------------------------------------------------
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
    subs = {f.name for f in part.__dataclass_fields__.values() if "kind" in f.metadata}
    return {k: v for k, v in part.knobs().items() if keep_choices or k not in subs}
