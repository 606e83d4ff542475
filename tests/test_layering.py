"""The package's imports point one way, read from the source (every import, also those inside
functions): no cycle, each layer imports only its own and the layers below, and only the backends
and the registries name a backend or an export format."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tformer.backends import BACKENDS
from tformer.export.formats import FORMATS

PACKAGE = Path(__file__).resolve().parent.parent / "tformer"

# Lowest first. A module may import from its own layer and the layers before it.
LAYERS = [
    ("core", ["errors", "inputs", "config", "files", "reference", "model", "tokenizer", "checkpoint", "train",
              "kernels"]),
    ("export", ["export"]),  # writes and reads export directories: depends on the model only
    ("backends", ["backends"]),
    ("engine", ["engine"]),  # continuous batching: the one generation loop, over any backend
    ("api", ["runtime", "exporter"]),  # exporter: validation runs the backends
    ("serve", ["serve"]),  # the HTTP server: on the runtime and its engine
    ("apps", ["cli", "bench", "__main__"]),
]  # fmt: skip


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(name: str) -> set[str]:
    """The tformer modules that module `name` imports (the module itself when `from m import x`
    names an attribute, the submodule when it names one), plus, for a module of another package,
    that package: importing it runs the package's __init__ first. The root package,
    tformer/__init__.py, is the public facade run before anything else and is left out."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                         for a in node.names)  # fmt: skip
    own_package = name if MODULES[name].name == "__init__.py" else name.rsplit(".", 1)[0]
    found |= {m.rsplit(".", 1)[0] for m in found if not m.startswith(own_package + ".")}
    return {m for m in found if m in MODULES and m not in ("tformer", name)}


GRAPH = {name: imports(name) for name in MODULES if name != "tformer"}


def layer_of(name: str) -> int:
    top = name.split(".")[1]
    return next(i for i, (_, tops) in enumerate(LAYERS) if top in tops)


def test_every_module_has_a_layer():
    for name in GRAPH:
        layer_of(name)  # raises StopIteration for a module no layer lists


def test_no_import_cycle():
    """Tarjan's strongly connected components: any with more than one module is a cycle."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
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
                cycles.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_imports_point_down_the_layers():
    upward = [f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
              for a, targets in GRAPH.items() for b in targets if layer_of(b) > layer_of(a)]  # fmt: skip
    assert not upward, "\n".join(upward)


def test_exports_depend_on_the_model_only():
    allowed = {"errors", "inputs", "config", "files", "model", "tokenizer", "export"}
    for name, targets in GRAPH.items():
        if name.startswith("tformer.export."):
            assert {t.split(".")[1] for t in targets} <= allowed, (name, targets)


def compared_names(tree: ast.AST, names: set[str]) -> list[int]:
    """Lines where one of `names` is compared (==, !=, in, not in) as a literal string."""

    def literals(node: ast.AST) -> set[str]:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return {node.value}
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return set().union(*(literals(e) for e in node.elts)) if node.elts else set()
        return set()

    return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Compare)
            and any(literals(side) & names for side in [node.left, *node.comparators])]  # fmt: skip


@pytest.mark.parametrize(
    "names, owners",
    [
        (set(BACKENDS), ("tformer.backends", "tformer.bench.kernels")),  # kernels' "naive" is an attention, not the backend
        ({f.name for f in FORMATS.values()}, ("tformer.export.formats",)),
    ],
    ids=["backend names", "format names"],
)
def test_only_the_registries_name_backends_and_formats(names, owners):
    found = {}
    for name, path in MODULES.items():
        if name.startswith(owners):
            continue
        tree = ast.parse(path.read_text())
        lines = compared_names(tree, names)
        if names & {f.name for f in FORMATS.values()}:  # format names: not even spelled elsewhere
            lines += [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in names]
        if lines:
            found[name] = lines
    assert not found, f"named outside {owners}: {found}"
