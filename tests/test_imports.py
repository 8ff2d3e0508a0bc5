"""The package's module graph, read from the source with ``ast`` (nothing is imported).

Every ``import`` / ``from ... import`` of a module is an edge, at the top of the module or
inside a function. ``from pkg import name`` points at ``pkg.name`` when that is a module
and otherwise at ``pkg`` itself, i.e. its ``__init__``, whose own imports (the names it
re-exports) are edges in turn. Checked: no cycle, and the direction rules of the design
(models and cpsl import no data, train, grain, orbax or tfds; data imports no train; torch
only in the PyTorch mirror, the converter and the benchmark).
"""

from __future__ import annotations

import ast
import pathlib
from typing import Callable, Iterator

PACKAGE = "cpsl_jax"
SOURCE = pathlib.Path(__file__).resolve().parents[1] / PACKAGE
TORCH_ALLOWED = ("cpsl_jax.torch_mirror", "cpsl_jax.convert", "cpsl_jax.benchmark",
                 "cpsl_jax.models.torch_reference")
Graph = dict[str, set[str]]


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(SOURCE.rglob("*.py"))}


def _within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _imported(node: ast.Import | ast.ImportFrom, module: str) -> list[str]:
    """Modules named by one import statement of ``module`` (project or third-party)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: from the module's package, one level up per further dot
        package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}".rstrip(".")
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def _statements(tree: ast.Module) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement of a module, and whether it sits in a function (runs lazily)."""
    stack = [(tree, False)]
    while stack:
        node, lazy = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, lazy
        lazy = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        stack.extend((child, lazy) for child in ast.iter_child_nodes(node))


def _scan() -> tuple[Graph, Graph, Graph, Graph]:
    """Per module: the project modules and the third-party top-level packages it imports,
    each anywhere in it and at module level only (what runs when the module is imported)."""
    edges, eager = {m: set() for m in MODULES}, {m: set() for m in MODULES}
    external, external_eager = {m: set() for m in MODULES}, {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for node, lazy in _statements(ast.parse(path.read_text(), str(path))):
            for name in _imported(node, module):
                if name == module:
                    continue
                project = _within(name, (PACKAGE,))
                name = name if project else name.partition(".")[0]
                (edges if project else external)[module].add(name)
                if not lazy:
                    (eager if project else external_eager)[module].add(name)
    return edges, eager, external, external_eager


EDGES, EAGER, EXTERNAL, EXTERNAL_EAGER = _scan()


def _with_parents(graph: Graph) -> Graph:
    """What importing a module runs: its imports and, as Python does, their packages' ``__init__``."""
    out = {}
    for module, names in graph.items():
        parts = [name.split(".") for name in names]
        out[module] = {".".join(p[:i]) for p in parts for i in range(1, len(p) + 1)} - {module}
    return out


def _path(graph: Graph, start: str, found: Callable[[str], bool]) -> list[str] | None:
    """Shortest chain of imports from ``start`` (included) to a module satisfying ``found``."""
    if found(start):
        return [start]
    parent, frontier = {start: None}, [start]
    while frontier:
        following = []
        for module in frontier:
            for name in sorted(graph.get(module, ())):
                if name in parent:
                    continue
                parent[name] = module
                if found(name):
                    chain = [name]
                    while parent[chain[-1]] is not None:
                        chain.append(parent[chain[-1]])
                    return chain[::-1]
                following.append(name)
        frontier = following
    return None


def _cycles(graph: Graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, out = {}, {}, [], []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = [stack.pop()]
            while component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def _violations(sources: list[str], modules: tuple[str, ...], libraries: tuple[str, ...],
                graph: Graph, imports: Graph) -> list[str]:
    """Chains of ``graph`` from each module of ``sources`` (itself included) to a module of the
    packages ``modules`` or to one whose ``imports`` name one of ``libraries``."""
    def bad(module: str) -> bool:
        return _within(module, modules) or bool(imports.get(module, set()) & set(libraries))

    out = []
    for module in sources:
        chain = _path(graph, module, bad)
        if chain:
            named = sorted(imports.get(chain[-1], set()) & set(libraries))
            out.append(" -> ".join(chain) + (f" (imports {', '.join(named)})" if named else ""))
    return out


def _modules_of(*packages: str) -> list[str]:
    return sorted(m for m in MODULES if _within(m, packages))


def test_the_graph_is_read():
    assert len(MODULES) > 20 and "cpsl_jax.data.readers" in MODULES
    assert "cpsl_jax.data.decode" in EAGER["cpsl_jax.data.readers"]
    assert "cpsl_jax.data.tfds_builders" in EDGES["cpsl_jax.data.readers"] - EAGER["cpsl_jax.data.readers"]
    assert "cpsl_jax.data.readers" in EAGER["cpsl_jax.data"]  # a package's re-export
    assert "tensorflow_datasets" in EXTERNAL_EAGER["cpsl_jax.data.tfds_builders"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _path({"a": {"b"}, "b": {"c"}}, "a", lambda m: m == "c") == ["a", "b", "c"]


def test_no_import_cycle():
    lines = []
    for component in _cycles(EDGES):
        inside = {m: EDGES[m] & set(component) for m in component}
        first = component[0]
        loop = _path(inside, first, lambda m: first in inside[m])
        lines.append(", ".join(component) + "; e.g. " + " -> ".join(loop + [first]))
    assert not lines, "import cycles:\n" + "\n".join(lines)


def test_models_and_cpsl_import_no_data_train_or_input_libraries():
    bad = _violations(_modules_of("cpsl_jax.models", "cpsl_jax.cpsl"), ("cpsl_jax.data", "cpsl_jax.train"),
                      ("grain", "orbax", "tensorflow_datasets"), _with_parents(EDGES), EXTERNAL)
    assert not bad, "\n".join(bad)


def test_data_imports_no_train():
    bad = _violations(_modules_of("cpsl_jax.data"), ("cpsl_jax.train",), (), _with_parents(EDGES), EXTERNAL)
    assert not bad, "\n".join(bad)


def test_torch_only_in_the_mirror_the_converter_and_the_benchmark():
    """No other module imports torch, in a function or at its top, nor runs on import a module
    that imports torch at its top (the mirror, converter and benchmark are imported lazily)."""
    others = [m for m in MODULES if not _within(m, TORCH_ALLOWED)]
    bad = [f"{m} (imports torch in a function)" for m in others
           if "torch" in EXTERNAL[m] - EXTERNAL_EAGER[m]]
    bad += _violations(others, (), ("torch",), _with_parents(EAGER), EXTERNAL_EAGER)
    assert not bad, "\n".join(bad)
