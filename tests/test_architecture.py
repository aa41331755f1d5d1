"""The shape of the code, read from its imports with `ast`: dependencies run one way and never in a circle.

    quant <- models <- lora, prompt <- adapters <- train, serve <- demo <- benchmarks

A package may import its own modules and any package of a lower layer, nothing else: the decoder knows
nothing of adapters, the adapters nothing of the trainer or the server, and neither of those two of
the other. Imports of the project's own modules sit at the top of a module, where a reader sees which
way the dependencies run; benchmarks are the exception, since each of their worker processes imports
only the side it measures. Imports under TYPE_CHECKING (type hints only, never executed) count for the
layers but not as cycles.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"quant": 0, "models": 1, "lora": 2, "prompt": 2, "adapters": 3, "train": 4, "serve": 4, "demo": 5,
          "benchmarks": 6}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def project_imports(path: Path) -> list[tuple[str, int, str]]:
    """(imported project module, line, where) for every import in the file; see imports_in."""
    return imports_in(path.read_text(), str(path))


def imports_in(source: str, filename: str = "<source>") -> list[tuple[str, int, str]]:
    """(imported project module, line, where): "top" of the module, "typing" (under TYPE_CHECKING) or "inside"."""
    tree = ast.parse(source, filename)
    where = {id(n): "top" for n in tree.body}
    where |= {id(n): "typing" for node in tree.body if _type_checking(node) for n in node.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from pkg import name` imports pkg.name when that is a module, else pkg itself
            names = [f"{node.module}.{a.name}" if is_module(f"{node.module}.{a.name}") else node.module for a in node.names]
        else:
            continue
        at = where.get(id(node), "inside")
        found += [(n, node.lineno, at) for n in names if n.split(".")[0] in LAYERS and is_module(n)]
    return found


def project_sources() -> list[Path]:
    return sorted(p for package in LAYERS for p in (ROOT / package).rglob("*.py"))


def import_graph(typing: bool = True) -> dict[str, set[str]]:
    """Module -> the project modules it imports (with those under TYPE_CHECKING, or not)."""
    return {module_name(p): {name for name, _, at in project_imports(p) if typing or at != "typing"}
            for p in project_sources()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, colouring modules)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, imported in graph.items():
        mine = module.split(".")[0]
        for name in imported:
            theirs = name.split(".")[0]
            if theirs != mine and LAYERS[theirs] >= LAYERS[mine]:
                bad.append(f"{module} imports {name}")
    return sorted(bad)


def test_no_import_cycle_among_the_project_modules():
    cycle = find_cycle(import_graph(typing=False))
    assert cycle is None, " -> ".join(cycle)


def test_dependencies_run_one_way():
    assert layer_violations(import_graph()) == []


def test_project_imports_sit_at_the_top_of_modules():
    hidden = [f"{p.relative_to(ROOT)}:{line} imports {name}" for p in project_sources()
              if p.parts[len(ROOT.parts)] != "benchmarks" for name, line, at in project_imports(p) if at == "inside"]
    assert hidden == []


@pytest.mark.parametrize("graph,cycle", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
    ({"a": {"a"}}, ["a", "a"]),
])
def test_the_cycle_finder_finds_cycles(graph, cycle):
    assert find_cycle(graph) == cycle


def test_the_layer_rule_catches_an_upward_import():
    graph = {"models.decoder": {"lora.linear", "quant.nf4"}, "quant.nf4": {"train.run"}, "lora.inject": {"quant"},
             "train.run": {"serve.engine"}}
    assert layer_violations(graph) == ["models.decoder imports lora.linear", "quant.nf4 imports train.run",
                                       "train.run imports serve.engine"]


def test_the_import_reader_sees_hidden_and_aliased_imports():
    source = ("from train import run as r\nimport quant.nf4\nif True:\n    from lora.linear import LoRALinear\n"
              "def f():\n    import serve.engine\nimport torch\n")
    found = sorted(imports_in(source))
    assert found == [("lora.linear", 4, "inside"), ("quant.nf4", 2, "top"), ("serve.engine", 6, "inside"),
                     ("train.run", 1, "top")]


def test_type_checking_imports_are_told_apart():
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from train.config import TrainConfig\n"
    assert imports_in(source) == [("train.config", 3, "typing")]
