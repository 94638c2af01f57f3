"""The packages' import graph: no cycles, and every import points down the layers.

Layers, bottom to top (a module may import its own layer and those below):

    gpu_worker                      the engine; never imports stemset_assets
    stemset_assets.config           typed config
    stemset_assets.core             rules without Dagster
    stemset_assets.defs             Dagster definitions (and stemset_assets.definitions, their entry point)
    stemset_assets.cli, .api        interfaces; cli may start the api, the api never imports the cli

Every import counts, wherever it is written: at module top, inside a function, under
``if TYPE_CHECKING:``. The graph is read from the source (ast), so nothing is imported here.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("gpu_worker", "stemset_assets")

# (prefix, layer name, rank); the first matching prefix wins, so longer prefixes come first.
LAYERS = (
    ("gpu_worker", "gpu_worker", 0),
    ("stemset_assets.config", "config", 1),
    ("stemset_assets.core", "core", 2),
    ("stemset_assets.defs", "defs", 3),
    ("stemset_assets.definitions", "defs", 3),
    ("stemset_assets.cli", "cli", 4),
    ("stemset_assets.api", "api", 4),
)
ROOT_PACKAGE = "stemset_assets"  # its __init__ runs before any submodule: it may import nothing of ours
ALLOWED_SAME_RANK = {("cli", "api")}  # `stemset api serve` starts the API; the API never calls the CLI
NO_DAGSTER = {"gpu_worker", "config", "core"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_files() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            if "__pycache__" not in path.parts:
                out[module_name(path)] = path
    return out


MODULES = package_files()


def imports_of(name: str, path: Path) -> Iterator[tuple[str, int]]:
    """``(imported module, line)`` for every import in the file, resolved to the longest known
    module name for our packages (``from pkg import sub`` -> ``pkg.sub`` when it is a module)."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = name.split(".") if is_package else name.split(".")[:-1]
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                yield (candidate if candidate in MODULES else base), node.lineno


def internal(target: str) -> str | None:
    """The module of ours that ``target`` names (a module or the package holding a name), or None."""
    while target:
        if target in MODULES:
            return target
        target = target.rpartition(".")[0]
    return None


def layer_of(module: str) -> tuple[str, int] | None:
    for prefix, layer, rank in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return layer, rank
    if module == ROOT_PACKAGE:
        return "root", 0
    return None


EDGES: dict[str, dict[str, int]] = {m: {} for m in MODULES}  # module -> {imported module: line}
EXTERNAL: dict[str, dict[str, int]] = {m: {} for m in MODULES}
for _name, _path in MODULES.items():
    for _target, _line in imports_of(_name, _path):
        _mine = internal(_target) if _target.split(".")[0] in PACKAGES else None
        if _mine is not None:
            if _mine != _name:
                EDGES[_name].setdefault(_mine, _line)
        else:
            EXTERNAL[_name].setdefault(_target, _line)


def strongly_connected(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative): every component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_the_graph_is_read():
    """The parser sees both packages and their imports (a guard against a test that checks nothing)."""
    assert any(m.startswith("gpu_worker.") for m in MODULES)
    assert any(m.startswith("stemset_assets.") for m in MODULES)
    assert sum(len(e) for e in EDGES.values()) > 20
    assert any("dagster" in ext for m in MODULES for ext in EXTERNAL[m])


def test_every_module_belongs_to_a_layer():
    unplaced = sorted(m for m in MODULES if layer_of(m) is None)
    assert not unplaced, f"modules outside the layers (move them into config/, core/, defs/, cli/ or api/): {unplaced}"


def test_no_import_cycles():
    cycles = strongly_connected(EDGES)
    detail = []
    for component in cycles:
        members = set(component)
        links = [f"{a} -> {b} (line {EDGES[a][b]})" for a in component for b in sorted(EDGES[a]) if b in members]
        detail.append("cycle among " + ", ".join(component) + ":\n    " + "\n    ".join(links))
    assert not cycles, "\n".join(detail)


def test_imports_point_down_the_layers():
    upward = []
    for module, targets in EDGES.items():
        mine = layer_of(module)
        if mine is None:
            continue
        for target, line in targets.items():
            theirs = layer_of(target)
            if theirs is None:
                continue
            if module == ROOT_PACKAGE:
                upward.append(f"{module} imports {target} (line {line}): the package's __init__ must import nothing")
            elif theirs[1] > mine[1] or (
                theirs[1] == mine[1] and theirs[0] != mine[0] and (mine[0], theirs[0]) not in ALLOWED_SAME_RANK
            ):
                upward.append(f"{module} ({mine[0]}) imports {target} ({theirs[0]}) at line {line}")
    assert not upward, "imports against the layers:\n  " + "\n  ".join(upward)


@pytest.mark.parametrize("layer", sorted(NO_DAGSTER))
def test_lower_layers_import_no_dagster(layer):
    found = [
        f"{m} imports {ext} (line {line})"
        for m in MODULES
        if (layer_of(m) or ("", 0))[0] == layer
        for ext, line in EXTERNAL[m].items()
        if ext.split(".")[0] in ("dagster", "dagster_aws", "dagster_webserver")
    ]
    assert not found, "\n".join(found)
