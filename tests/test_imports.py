"""The modules of `src/fastkv` import each other without a cycle, lazy imports inside functions included, and
no module imports another module's private names. Read from the source with `ast`, nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import fastkv

ROOT = Path(fastkv.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> list[tuple[str, str, int]]:
    """(imported module, name or "", line) for every import of a fastkv module anywhere in the file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, "", node.lineno) for a in node.names if a.name.startswith("fastkv")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if not base.startswith("fastkv"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub, "", node.lineno) if sub in modules else (base, alias.name, node.lineno))
    return found


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    files = {module_name(p): p for p in root.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        for target, _, _ in imports(path, set(files)):
            while target not in files and "." in target:
                target = target.rsplit(".", 1)[0]
            # importing from a package runs its __init__, which imports its children: an edge to the package
            if target != module and target in files:
                edges[module].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by depth-first search (each reported once, from its smallest module)."""
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt) :]
                found.append(cycle[cycle.index(min(cycle)) :] + cycle[: cycle.index(min(cycle))])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    return found


def test_no_import_cycles_among_fastkv_modules():
    edges = graph()
    assert len(edges) > 40 and edges["fastkv.engine"] >= {"fastkv.cache", "fastkv.adapters", "fastkv.methods"}
    assert cycles(edges) == []


def test_the_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]


def test_no_module_imports_private_names_of_another():
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    private = [
        f"{module}:{line} imports {name} from {target}"
        for module, path in files.items()
        for target, name, line in imports(path, set(files))
        if name.startswith("_") and target != module
    ]
    assert private == []
