"""The import graph of jaxseg/, drawn from the source (ast, every import statement, the ones inside
functions included): the core imports no method package, and the top-level subpackages form no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "jaxseg"
METHODS = {"dlb", "neonatal"}
# The command line sits above everything: it may import any package.
ENTRY = {"launch"}


def _unit(module: str) -> str:
    """jaxseg.train.loop -> train; jaxseg.fileio -> fileio."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imports() -> dict[str, set[str]]:
    """module name -> the jaxseg modules it imports."""
    out: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        package = name if rel.name == "__init__" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.split(".")[0] == "jaxseg"}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                if mod.split(".")[0] == "jaxseg":
                    # `from jaxseg.train import checkpoint` may name a submodule (other names add nothing:
                    # the graph below is between top-level subpackages)
                    found |= {mod} | {f"{mod}.{a.name}" for a in node.names}
        out[name] = found
    return out


def unit_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    units: dict[str, set[str]] = {}
    for mod, targets in graph.items():
        u = _unit(mod)
        units.setdefault(u, set()).update(_unit(t) for t in targets if _unit(t) not in ("", u))
    units.pop("", None)
    return units


def test_the_graph_is_drawn():
    graph = imports()
    assert "jaxseg.train.loop" in graph and "jaxseg.dlb.train" in graph and "jaxseg.neonatal.transfer" in graph
    assert "jaxseg.train.checkpoint" in graph["jaxseg.dlb.train"]  # DLB builds on the core
    units = unit_graph(graph)
    assert {"train", "data", "config"} <= units["dlb"] and "config" in units["train"]


def test_core_imports_no_method_package():
    bad = sorted(f"{mod} imports {t}" for mod, targets in imports().items() for t in targets
                 if _unit(mod) not in METHODS | ENTRY and _unit(t) in METHODS)
    assert not bad, "\n".join(bad)


def test_method_packages_do_not_import_each_other():
    bad = sorted(f"{mod} imports {t}" for mod, targets in imports().items() for t in targets
                 if _unit(mod) in METHODS and _unit(t) in METHODS - {_unit(mod)})
    assert not bad, "\n".join(bad)


def _cycles(units: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one unit (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(units.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(units):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_cycle_between_top_level_subpackages():
    units = unit_graph(imports())
    cycles = _cycles(units)
    detail = [f"{c}: " + "; ".join(f"{u} -> {sorted(units[u] & set(c))}" for u in c) for c in cycles]
    assert cycles == [], "\n".join(detail)
