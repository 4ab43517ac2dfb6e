"""The packages import one way: each imports only packages below it in LAYERS (function-local imports count;
imports for type checking only do not)."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Repo folder -> the package it installs as (pyproject.toml's package-dir).
FOLDERS = {"kvcache": "kvcache", "kernels": "kvcache.kernels", "engine": "kvcache.engine", "bench": "kvcache.bench"}
# Bottom first. The modules kvcache.config, kvcache.errors and kvcache.stats sit under every layer but kernels.
LAYERS = [
    "kvcache.kernels",
    "kvcache.store",
    "kvcache.methods",
    "kvcache.prefill",
    "kvcache.wire",
    "kvcache.clients",
    "kvcache.integrations",
    "kvcache.service",
    "kvcache.engine",
    "kvcache.bench",
    "kvcache.cli",
]
BASE = ("kvcache.config", "kvcache.errors", "kvcache.stats")


def _modules() -> dict[str, pathlib.Path]:
    """Every project module by its installed name."""
    found = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


MODULES = _modules()


def _type_checking_only(tree: ast.Module) -> set[int]:
    """ids of the import nodes under `if TYPE_CHECKING:`, which never run."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def _imports(name: str, path: pathlib.Path) -> set[str]:
    """Project modules `name` imports anywhere in its file (relative imports resolved), except those under
    `if TYPE_CHECKING:`."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_only(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in MODULES)
    return out


def _layer(module: str) -> int | None:
    for i, layer in enumerate(LAYERS):
        if module == layer or module.startswith(layer + "."):
            return i
    return None


EDGES = {name: _imports(name, path) for name, path in MODULES.items()}


def test_every_module_is_in_a_layer_or_the_base():
    loose = [m for m in MODULES if _layer(m) is None and m not in BASE and m != "kvcache" and m != "kvcache.wire"]
    assert not loose, f"modules outside every layer: {loose}"


@pytest.mark.parametrize("layer", LAYERS)
def test_a_layer_imports_only_layers_below_it(layer):
    mine = _layer(layer)
    upward = sorted(f"{m} -> {t}" for m, targets in EDGES.items() if _layer(m) == mine
                    for t in targets if (_layer(t) if _layer(t) is not None else -1) > mine)
    assert not upward, "imports that run up the layers:\n" + "\n".join(upward)


def test_the_base_modules_import_only_each_other():
    assert {t for m in BASE for t in EDGES[m]} <= set(BASE)


def test_kernels_import_nothing_of_the_project():
    outside = sorted(f"{m} -> {t}" for m, targets in EDGES.items() if m.startswith("kvcache.kernels")
                     for t in targets if not t.startswith("kvcache.kernels"))
    assert not outside, "\n".join(outside)
    for path in (ROOT / "kernels").rglob("*.py"):
        for line in path.read_text().splitlines():
            assert not line.startswith(("from kvcache", "import kvcache", "from engine", "import engine")), path


def test_modules_within_a_package_import_without_cycles():
    graph = {m: {t for t in targets if t != m and t.rpartition(".")[0] == m.rpartition(".")[0]}
             for m, targets in EDGES.items()}
    state: dict[str, int] = {}

    def visit(m: str, trail: list[str]) -> None:
        state[m] = 1
        for t in graph[m]:
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(t):] + [t]))
            if t not in state:
                visit(t, trail + [t])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])
