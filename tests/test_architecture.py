"""The house plan, checked: which room may import which, no import cycles, the trainer and the
service share no code, and the heavy runtimes stay in the one module that owns them.

Reads every module's imports with `ast` (module level, inside functions and under
TYPE_CHECKING alike: a lazy import is still a dependency). The rooms and their allowed
directions are written down here and in docs/architecture.md; change both together.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("elit_stream", "trainer")

# room -> rooms it may import (itself included). A module's room is its first subpackage.
ALLOWED = {
    "elit_stream.protocol": {"elit_stream.protocol"},
    "elit_stream.core": {"elit_stream.core"},
    "elit_stream.service": {"elit_stream.service", "elit_stream.core", "elit_stream.protocol"},
    "elit_stream.tools": {"elit_stream.tools", "elit_stream.service", "elit_stream.core",
                          "elit_stream.protocol"},
    "trainer.data": {"trainer.data"},
    "trainer.model": {"trainer.model", "trainer.data"},
    "trainer.elit": {"trainer.elit", "trainer.model", "trainer.data"},
    "trainer.cli": {"trainer.cli", "trainer.elit", "trainer.model", "trainer.data"},
}
# Modules outside the rooms and the room they count as.
TOP_LEVEL = {
    "elit_stream.client": "elit_stream.protocol",      # the public alias of protocol.client
    "elit_stream.__main__": "elit_stream.tools",
    "elit_stream": None, "trainer": None,              # package docstrings (trainer: __version__)
}
# Third-party packages only one room (or one module) may import.
OWNED = {
    "onnxruntime": {"elit_stream.core.engine", "trainer.model"},   # trainer: export check, predict
    "openvino": {"elit_stream.core.engine"},
    "torch": {"trainer.model", "trainer.elit", "trainer.cli"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _all_modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


MODULES = _all_modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every module `name` imports, resolved to a module of this repository where it is one
    (`from a.b import c` names a.b.c when that is a module), else the top-level package."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in MODULES else base)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def room_of(module: str) -> str | None:
    if module in TOP_LEVEL:
        return TOP_LEVEL[module]
    for room in ALLOWED:
        if module == room or module.startswith(room + "."):
            return room
    raise AssertionError(f"{module} is in no room: add it to ALLOWED or TOP_LEVEL")


def test_every_module_is_in_a_room():
    for name in MODULES:
        room_of(name)


def test_imports_point_only_in_allowed_directions():
    wrong = []
    for name, deps in GRAPH.items():
        src = room_of(name)
        for dep in deps:
            if dep.split(".")[0] not in PACKAGES or dep in PACKAGES:
                continue
            dst = room_of(dep)
            if src is not None and dst is not None and dst not in ALLOWED[src]:
                wrong.append(f"{name} -> {dep}  ({src} may not import {dst})")
    assert not wrong, "\n".join(wrong)


def test_trainer_and_service_share_no_code():
    crossing = [f"{name} -> {dep}" for name, deps in GRAPH.items() for dep in deps
                if dep.split(".")[0] in PACKAGES and dep.split(".")[0] != name.split(".")[0]]
    assert not crossing, "\n".join(crossing)


@pytest.mark.parametrize("package", sorted(OWNED))
def test_heavy_runtimes_stay_in_their_owner(package):
    owners = OWNED[package]
    users = sorted(name for name, deps in GRAPH.items()
                   if any(d == package or d.startswith(package + ".") for d in deps))
    intruders = [u for u in users if not any(u == o or u.startswith(o + ".") for o in owners)]
    assert not intruders, f"{package} imported outside {sorted(owners)}: {intruders}"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    nodes = {n: sorted(d for d in deps if d in graph and d != n) for n, deps in graph.items()}

    def visit(root: str) -> None:
        work = [(root, iter(nodes[root]))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        comp.append(top)
                        if top == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
            elif child not in index:
                index[child] = low[child] = counter[0]
                counter[0] += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(nodes[child])))
            elif child in on_stack:
                low[node] = min(low[node], index[child])

    for n in sorted(nodes):
        if n not in index:
            visit(n)
    return out


def test_no_import_cycles():
    assert _cycles(GRAPH) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_direction_check_catches_a_wrong_import():
    assert "elit_stream.tools" not in ALLOWED[room_of("elit_stream.core.engine")]
    assert "trainer.elit" not in ALLOWED[room_of("trainer.data.synth")]
