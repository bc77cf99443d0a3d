"""hhdpo's layers (docs/architecture.md): every import, top-level or inside a function, goes down.

    core (0) < data (1) < training (2), evaluation (2) < launch (3) < the top-level faces (4)

training and evaluation are siblings: neither imports the other. Inside one package modules may
import each other, but no set of modules anywhere imports itself round in a circle.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "hhdpo"
LAYERS = {"core": 0, "data": 1, "training": 2, "evaluation": 2, "launch": 3}
TOP = 4


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> tuple[int, str]:
    """(rank, package) of a module ``hhdpo.<pkg>.<mod>``; top-level modules are the faces."""
    parts = module.split(".")
    if len(parts) == 1:
        return (-1, "")  # ``from hhdpo import __version__``: the package's own metadata
    if len(parts) >= 3 or parts[1] in LAYERS:
        return (LAYERS[parts[1]], parts[1])
    return (TOP, "top")  # the faces may use each other (cli <- __main__); circles are still caught


def hhdpo_imports(path: Path, modules: set[str]) -> set[str]:
    """Every hhdpo module ``path`` imports, anywhere in the file."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # ``from hhdpo.core import io`` imports hhdpo.core.io; ``from hhdpo.core.io import x`` the module
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        else:
            assert not (isinstance(node, ast.ImportFrom) and node.level), f"{path}: relative import"
            continue
        out |= {n for n in names if n == "hhdpo" or n.startswith("hhdpo.")}
    return out


@functools.cache
def import_graph() -> dict[str, set[str]]:
    paths = sorted(PKG.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    graph = {}
    for p in paths:
        me = module_name(p)
        deps = hhdpo_imports(p, modules)
        unknown = deps - modules
        assert not unknown, f"{p}: imports modules that do not exist: {sorted(unknown)}"
        graph[me] = {d for d in deps if d != me and not me.startswith(d + ".") and d != "hhdpo"}
    return graph


def test_layer_rules_see_every_package():
    packages = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages == set(LAYERS), "a new package needs its place in LAYERS (and in docs/architecture.md)"
    top = sorted(p.name for p in PKG.glob("*.py"))
    assert len(top) <= 12, f"the top level keeps at most a dozen modules: {top}"


@pytest.mark.parametrize("module", sorted(import_graph()))
def test_imports_only_go_down(module):
    rank, pkg = layer(module)
    for dep in sorted(import_graph()[module]):
        dep_rank, dep_pkg = layer(dep)
        same_package = pkg and dep_pkg == pkg
        assert same_package or dep_rank < rank, (
            f"{module} (layer {rank}) imports {dep} (layer {dep_rank}): imports go only down the layers")


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None (iterative DFS, white/grey/black)."""
    state, stack_of = {}, []
    for start in sorted(graph):
        if state.get(start):
            continue
        stack = [(start, iter(sorted(graph[start])))]
        state[start] = 1
        stack_of = [start]
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
                stack_of.pop()
            elif state.get(nxt) == 1:
                return stack_of[stack_of.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                stack.append((nxt, iter(sorted(graph.get(nxt, ())))))
                stack_of.append(nxt)
    return None


def test_no_circular_imports():
    cycle = find_cycle(import_graph())
    assert cycle is None, "circular import: " + " -> ".join(cycle)


def test_the_checks_catch_what_they_guard(tmp_path):
    """The rules themselves: an upward import and a circle are both seen."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer("hhdpo.core.io") == (0, "core") and layer("hhdpo.submit") == (TOP, "top")
    assert layer("hhdpo.training.loss")[0] == layer("hhdpo.evaluation.judge")[0]
    up = tmp_path / "m.py"
    up.write_text("def f():\n    from hhdpo.launch.slurm import plan\n")
    assert hhdpo_imports(up, {"hhdpo.launch.slurm"}) == {"hhdpo.launch.slurm"}
