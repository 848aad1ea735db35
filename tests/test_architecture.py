"""The package's import graph: no cycles, and the layering each folder's docstring states.

Every import counts, module-level and inside functions (a function-level import is still a dependency;
it only moves the moment it is paid). Relative imports are resolved; ``from pkg import name`` counts as
an import of ``pkg.name`` when that is a module, else of ``pkg``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lctw"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


MODULES = _modules()


def _imports(name: str, path: Path) -> tuple[set[str], set[str]]:
    """(lctw modules, top-level third-party packages) that ``name`` imports anywhere in its source."""
    ours, theirs = set(), set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] != "lctw":
                theirs.add(target.split(".")[0])
                continue
            while target not in MODULES and "." in target:
                target = target.rpartition(".")[0]
            if target != name:
                ours.add(target)
    return ours, theirs


GRAPH = {name: _imports(name, path)[0] for name, path in MODULES.items()}
THIRD_PARTY = {name: _imports(name, path)[1] for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def _reach(name: str) -> set[str]:
    """Every lctw module ``name`` imports, directly or through others."""
    seen, todo = set(), [name]
    while todo:
        for dep in GRAPH[todo.pop()]:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_the_finder_sees_function_level_and_relative_imports():
    assert "lctw.training.stages" in GRAPH["lctw.cache.fill"]  # imported inside fill_cache()
    assert "lctw.eval.harness.tasks" in GRAPH["lctw.eval.harness"]  # from .tasks import ...
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_import_graph_has_no_cycles():
    assert _cycles(GRAPH) == []


@pytest.mark.parametrize("spec", ["lctw.models.specs", "lctw.models.smollm2"])
def test_model_specs_are_data_plus_a_loader(spec):
    forbidden = ("lctw.training", "lctw.method.scorers", "lctw.method.weighting", "lctw.data", "lctw.config",
                 "lctw.cache")
    assert not {m for m in _reach(spec) if m.startswith(forbidden)}
    assert not THIRD_PARTY[spec] & {"hydra", "omegaconf", "lightning"}


@pytest.mark.parametrize("formula", ["lctw.method.weighting", "lctw.method.kernels", "lctw.method.context"])
def test_the_method_formulas_import_nothing_above_them(formula):
    assert _reach(formula) <= {m for m in MODULES if m.startswith("lctw.method")}


def test_the_method_package_stays_below_everything_else():
    for name in (m for m in MODULES if m.startswith("lctw.method")):
        assert {m for m in _reach(name) if not m.startswith("lctw.method")} == set(), name


@pytest.mark.parametrize("name", ["lctw.method.scoring", "lctw.method.scorers", "lctw.training.module"])
def test_scoring_and_the_module_never_import_the_cache_or_the_config(name):
    assert not {m for m in _reach(name) if m.startswith(("lctw.cache", "lctw.config"))}


def test_run_records_never_import_the_report():
    for name in ("lctw.runs.jobs", "lctw.runs.loggers", "lctw.runs.checkpoints"):
        assert not {m for m in _reach(name) if m.startswith("lctw.runs.report")}, name


def test_every_folder_says_what_it_owns_and_what_it_may_import():
    for folder in (p for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()):
        doc = ast.get_docstring(ast.parse((folder / "__init__.py").read_text())) or ""
        assert "import" in doc.lower() and len(doc) > 200, folder.name


def test_what_the_config_layer_uses_of_training_never_imports_it_back():
    for name in ("lctw.training.trainer", "lctw.training.module"):
        assert not {m for m in _reach(name) if m.startswith(("lctw.config", "lctw.training.experiment"))}, name
