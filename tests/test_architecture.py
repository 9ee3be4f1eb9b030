"""Architecture checks (issue #12): the import graph of ``src/lowbitsr`` has no cycles, no
library module imports the command line, and every module imports only its own layer or the
layers below it (:data:`LAYERS`, the diagram of README "Architecture").

The graph is built with :mod:`ast` from every ``import`` statement, including the ones inside
functions and under ``TYPE_CHECKING`` (lazy imports still tie modules together). Edges:

* ``import lowbitsr.a.b`` imports ``lowbitsr.a.b``;
* ``from .pkg import name`` imports ``pkg`` (its ``__init__``) and, when ``name`` is a
  submodule of ``pkg``, that submodule too;
* ``from . import x`` imports the submodule ``x`` (and the package ``__init__`` only when ``x``
  is not a submodule but a name defined there).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "lowbitsr"
SRC = Path(__file__).resolve().parents[1] / "src" / PACKAGE
CLI_PACKAGE = f"{PACKAGE}.cli"


def is_cli(module: str) -> bool:
    """Whether ``module`` is the command line (``lowbitsr.cli`` and its submodules, or
    ``lowbitsr.__main__``)."""
    return module == f"{PACKAGE}.__main__" or (
        module == CLI_PACKAGE or module.startswith(CLI_PACKAGE + ".")
    )


def _module_name(path: Path, src: Path = SRC) -> str:
    parts = list(path.relative_to(src.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _collect_modules(src: Path = SRC) -> dict[str, Path]:
    return {_module_name(p, src): p for p in sorted(src.rglob("*.py"))}


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    """Absolute name of a ``from <level dots><target> import ...`` made inside ``module``."""
    if level == 0:
        return target or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """Map each module of the package at ``src`` to the package's modules it imports anywhere
    in it (top level, functions, ``TYPE_CHECKING`` blocks)."""
    package = src.name
    modules = _collect_modules(src)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == package:
                        edges.add(alias.name)
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node.level, node.module)
                if base.split(".")[0] != package:
                    continue
                # ``from . import x`` names no module of its own: only the submodules count
                # (plus the package itself when a non-module name is imported from it).
                own_package = node.module is None and node.level > 0
                names_module = False
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if sub in modules:
                        edges.add(sub)
                    else:
                        names_module = True
                if names_module or not own_package:
                    edges.add(base)
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (sorted module names)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def _cycle_in(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """One cycle through the component's first module (breadth-first, shortest)."""
    start = min(comp)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if w not in parents:
                    parents[w] = v
                    nxt.append(w)
        frontier = nxt
    return sorted(comp)  # unreachable for a strongly connected component


def _describe(graph: dict[str, set[str]], components: list[list[str]]) -> str:
    lines = []
    for members in components:
        comp = set(members)
        lines.append(f"import cycle among {len(members)} modules: " + ", ".join(members))
        lines.append("  e.g. " + " -> ".join(_cycle_in(graph, comp)))
        for mod in members:
            lines.append(f"  {mod} -> " + ", ".join(sorted(graph[mod] & comp)))
    return "\n".join(lines)


def test_graph_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import f\n")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n    return b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from ..a import f\nfrom . import c\n")
    (pkg / "sub" / "c.py").write_text("import pkg.sub\n")
    graph = import_graph(pkg)
    assert graph["pkg"] == {"pkg.a"}
    assert graph["pkg.a"] == {"pkg.sub", "pkg.sub.b"}  # inside a function
    assert graph["pkg.sub.b"] == {"pkg.a", "pkg.sub.c"}
    assert graph["pkg.sub.c"] == {"pkg.sub"}
    assert find_cycles(graph) == [["pkg.a", "pkg.sub.b"]]
    # and on the real package: checkpoint loads quant lazily, inside load_model
    assert f"{PACKAGE}.quant" in import_graph()[f"{PACKAGE}.checkpoint"]


def test_no_import_cycles() -> None:
    graph = import_graph()
    cycles = find_cycles(graph)
    if cycles:
        print(_describe(graph, cycles))
    assert not cycles, "import cycles in src/lowbitsr:\n" + _describe(graph, cycles)


def test_no_library_module_imports_the_cli() -> None:
    graph = import_graph()
    offenders = sorted(
        f"{mod} imports {', '.join(sorted(d for d in deps if is_cli(d)))}"
        for mod, deps in graph.items()
        if not is_cli(mod) and any(is_cli(d) for d in deps)
    )
    assert not offenders, "library modules importing the CLI:\n" + "\n".join(offenders)


#: The layers of README "Architecture", bottom first: a module may import its own layer and the
#: layers below it, never one above (package prefixes; the first match wins).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "foundation",
        ("errors", "fileio", "config", "recipe", "losses", "metrics", "imresize", "distributed"),
    ),
    ("data", ("data",)),
    ("models", ("models",)),
    ("quant", ("quant",)),
    ("evaluation", ("evaluate", "viz")),
    ("training", ("checkpoint", "pretrained", "train", "training")),
    ("deploy", ("deploy",)),
    ("applications", ("specs", "demo")),
    ("interface", ("cli", "__main__", "report", "")),
)


def layer_of(module: str) -> int:
    """Index in :data:`LAYERS` of ``module`` (``lowbitsr`` itself is the top, interface)."""
    rel = module.removeprefix(PACKAGE).removeprefix(".")
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if prefix and (rel == prefix or rel.startswith(prefix + ".")):
                return i
    if rel == "":
        return len(LAYERS) - 1
    raise AssertionError(f"{module}: in no layer of LAYERS; add it to one")


def test_layers_import_only_downwards() -> None:
    graph = import_graph()
    upward = sorted(
        f"{mod} ({LAYERS[layer_of(mod)][0]}) imports {dep} ({LAYERS[layer_of(dep)][0]})"
        for mod, deps in graph.items()
        for dep in deps
        if layer_of(dep) > layer_of(mod)
    )
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)
