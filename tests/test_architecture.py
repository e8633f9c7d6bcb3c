"""Layers point one way, and no import cycle, between modules or between packages.

Layers, lowest first: utils < data < models, losses < metrics < training, scoring, calibration
< inference < stages < studies < cli. On top of that, metrics reads no data formats, scoring and
calibration never import training, and inference imports neither training nor the stages.
"""

import ast
import re
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qmargin_spk"
LAYERS = [
    ("utils",),
    ("data",),
    ("models", "losses"),
    ("metrics",),
    ("training", "scoring", "calibration"),
    ("inference",),
    ("stages",),
    ("studies",),
    ("cli",),
]
EXTRA_FORBIDDEN = {
    "metrics": ("data",),
    "scoring": ("training",),
    "calibration": ("training",),
    "inference": ("training",),
}


def forbidden_imports() -> dict[str, tuple[str, ...]]:
    """Package -> the ``qmargin_spk.*`` prefixes it must not import (every higher layer, and the extra rules)."""
    table = {}
    for level, packages in enumerate(LAYERS):
        higher = [name for layer in LAYERS[level + 1 :] for name in layer]
        for package in packages:
            table[package] = tuple(f"qmargin_spk.{name}" for name in [*higher, *EXTRA_FORBIDDEN.get(package, ())])
    return table


FORBIDDEN = forbidden_imports()


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_every_package_has_a_layer():
    packages = {path.parent.name for path in PACKAGE.glob("*/__init__.py")} | {"cli"}
    assert packages == set(FORBIDDEN), "add the new package to LAYERS"


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_does_not_import_higher_layers(package):
    files = sorted((PACKAGE / package).rglob("*.py")) if (PACKAGE / package).is_dir() else [PACKAGE / f"{package}.py"]
    offending = [
        f"{path.relative_to(PACKAGE.parent)} imports {name}"
        for path in files
        for name in imported_modules(path)
        if name.startswith(FORBIDDEN[package])
    ]
    assert not offending, offending


def test_code_cites_only_docs_that_exist():
    docs = PACKAGE.parent / "docs"
    cited = {
        name
        for path in PACKAGE.rglob("*.py")
        for name in re.findall(r"docs/([\w./-]+\.md)", path.read_text(encoding="utf-8"))
    }
    missing = sorted(name for name in cited if not (docs / name).is_file())
    assert cited and not missing, missing


# ---------------------------------------------------------------- import cycles


def module_files(package: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name of every source file of ``package`` (a package's ``__init__`` is the package)."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports, anywhere in the file (function bodies included).

    Relative imports are resolved; ``from pkg import name`` imports ``pkg.name`` when that is a
    module, else ``pkg`` itself (its ``__init__``); ``import a.b.c`` imports ``a.b.c``. A package
    ``__init__`` that re-exports lazily (``importlib.import_module``) imports every submodule it
    names in a string.
    """
    modules = module_files(package)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        home = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        lazy = path.name == "__init__.py" and any(
            isinstance(node, ast.Attribute) and node.attr == "import_module" for node in ast.walk(tree)
        )
        for node in ast.walk(tree):
            targets = []
            if lazy and isinstance(node, ast.Constant) and isinstance(node.value, str):
                targets = [f"{home}.{node.value}"]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = home.split(".")[: len(home.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    targets.append(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
            graph[name].update(target for target in targets if target in modules and target != name)
    return graph


def subpackage_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph between ``qmargin_spk.X`` nodes (a top-level module is its own node)."""

    def node(module: str) -> str:
        return ".".join(module.split(".")[:2])

    packages: dict[str, set[str]] = {}
    for source, targets in graph.items():
        packages.setdefault(node(source), set()).update(node(t) for t in targets if node(t) != node(source))
    return packages


def knots(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one node (iterative Tarjan): the import cycles."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []
    for root in sorted(graph):
        if root in index:
            continue
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        work = [(root, iter(sorted(graph[root])))]
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = {node}
                    while stack[-1] != node:
                        on_stack.discard(stack[-1])
                        component.add(stack.pop())
                    on_stack.discard(stack.pop())
                    if len(component) > 1:
                        components.append(component)
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return components


def shortest_cycle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first node (breadth first inside the component)."""
    start = min(component)
    paths, frontier = {start: [start]}, [start]
    while True:
        closing = [node for node in frontier if start in graph[node]]
        if closing:
            return paths[closing[0]] + [start]
        following = []
        for node in frontier:
            for target in sorted(graph[node] & component):
                if target not in paths:
                    paths[target] = paths[node] + [target]
                    following.append(target)
        frontier = following


def cycle_report(graph: dict[str, set[str]]) -> list[str]:
    """One line per knot: a shortest cycle, and the other members of the knot if there are more."""
    lines = []
    for component in knots(graph):
        cycle = shortest_cycle(graph, component)
        others = sorted(component - set(cycle))
        lines.append(" -> ".join(cycle) + (f"  (same knot: {', '.join(others)})" if others else ""))
    return sorted(lines)


def test_the_import_graph_sees_every_kind_of_import(tmp_path):
    files = {
        "pkg/__init__.py": "",
        "pkg/low/__init__.py": "from pkg.low.core import thing\n",
        "pkg/low/core.py": "def thing():\n    from ..high import view  # inside a function, relative\n",
        "pkg/low/other.py": "from . import core\n",
        "pkg/high/__init__.py": "import importlib\n_EXPORTS = {'view': 'view'}\n"
        "def __getattr__(name):\n    return importlib.import_module(f'{__name__}.x')\n",
        "pkg/high/view.py": "import pkg.low.other\n",
        "pkg/top.py": "from pkg import low\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(textwrap.dedent(text))
    graph = import_graph(tmp_path / "pkg")
    assert graph == {
        "pkg": set(),
        "pkg.low": {"pkg.low.core"},
        "pkg.low.core": {"pkg.high.view"},
        "pkg.low.other": {"pkg.low.core"},
        "pkg.high": {"pkg.high.view"},
        "pkg.high.view": {"pkg.low.other"},
        "pkg.top": {"pkg.low"},
    }
    assert cycle_report(graph) == ["pkg.high.view -> pkg.low.other -> pkg.low.core -> pkg.high.view"]
    assert cycle_report(subpackage_graph(graph)) == ["pkg.high -> pkg.low -> pkg.high"]


def test_no_import_cycle_between_modules():
    cycles = cycle_report(import_graph())
    assert not cycles, "import cycles between modules:\n" + "\n".join(cycles)


def test_no_import_cycle_between_subpackages():
    cycles = cycle_report(subpackage_graph(import_graph()))
    assert not cycles, "import cycles between subpackages (qmargin_spk.X):\n" + "\n".join(cycles)
