"""The engine's layers: each sub-package of gali.engine imports only the layers listed before it, and no
module of gali imports itself back through others (docs/architecture.md)."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"gali.engine": ROOT / "engine", "gali.kernels": ROOT / "kernels", "gali.pipelines": ROOT / "pipelines"}
# gali.engine's layers, lowest first: the base modules, the sub-packages, the command line and `python -m gali`.
LAYERS = ["errors", "files", "ranges", "config", "method", "nets", "step", "metrics", "loop", "eval", "cli", "entry"]
# What gali.kernels and gali.pipelines may use of the engine (the engine builds on them, not the reverse).
BASE = {"errors", "files"}


def modules() -> dict[str, Path]:
    """Every module of gali by dotted name (a package by its ``__init__``)."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            found[".".join((package, *parts)).removesuffix(".__init__")] = path
    return found


MODULES = modules()


def imports(name: str, path: Path) -> set[str]:
    """The gali modules ``name`` imports anywhere in its file (top level, functions, TYPE_CHECKING)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {module for module in found if module in MODULES and module != name}


def layer(name: str) -> int | None:
    """The layer index of a gali.engine module, None outside gali.engine."""
    parts = name.split(".")
    if parts[:2] != ["gali", "engine"] or len(parts) == 2:
        return None
    return LAYERS.index(parts[2])


def test_every_engine_module_belongs_to_a_listed_layer():
    unlisted = sorted(name for name in MODULES if name.startswith("gali.engine.") and name.split(".")[2] not in LAYERS)
    assert not unlisted, f"add these to a layer of docs/architecture.md and LAYERS: {unlisted}"


def test_each_layer_imports_only_the_layers_before_it():
    wrong = []
    for name, path in MODULES.items():
        own = layer(name)
        for target in imports(name, path):
            below = layer(target)
            if name.startswith("gali.engine.") and below is not None and below > own:
                wrong.append(f"{name} ({LAYERS[own]}) imports {target} ({LAYERS[below]})")
            if not name.startswith("gali.engine") and below is not None and LAYERS[below] not in BASE:
                wrong.append(f"{name} imports {target}; kernels and pipelines may use only {sorted(BASE)}")
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_itself_back():
    graph = {name: imports(name, path) for name, path in MODULES.items()}
    cycles = []

    def visit(node: str, trail: list[str], done: set[str]) -> None:
        if node in trail:
            cycles.append(" -> ".join([*trail[trail.index(node) :], node]))
            return
        if node in done:
            return
        for target in sorted(graph[node]):
            if not (target.startswith(node + ".") or node.startswith(target + ".")):  # a package and its own modules
                visit(target, [*trail, node], done)
        done.add(node)

    done: set[str] = set()
    for name in graph:
        visit(name, [], done)
    assert not cycles, "\n".join(cycles)


def test_every_engine_module_imports_in_a_fresh_interpreter_in_layer_order():
    names = sorted(
        (name for name in MODULES if name.startswith("gali.engine.") and not name.endswith(".__main__")),
        key=lambda n: (layer(n), n),
    )  # a __main__ runs its program when imported
    code = f"import importlib\nfor name in {names!r}:\n    importlib.import_module(name)\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
