"""Every module of flatfsc_jax imports, and no two modules import each other, even lazily.

An import cycle (``a`` imports ``b``, which imports ``a`` back, if only inside a function)
means two modules that cannot be read, tested or moved one without the other; a lazy
import only hides it from Python. The graph is read from the source with ``ast``: every
``import`` statement of a module, at any depth, that names a module of the package.
Importing a package's ``__init__`` first (which may re-export its submodules) is how
Python works and is not counted as an edge.
"""

import ast
import importlib
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = "flatfsc_jax"
# A module longer than this holds more than one idea: split it along its seam.
LONG_MODULE_LINES = 600
# Modules allowed over the limit while others rewrite them; an entry goes with its rewrite.
LONG_MODULE_ALLOWED = {
    # Over the line by the keys and checks of config.flat and config.data: the checks read
    # base_config's defaults, so splitting them out would make two modules import each other.
    "flatfsc_jax/config_lib.py",
    # The episode plan and Meta-Dataset's formulas, plus ImageNet's missing-hierarchy stop.
    "flatfsc_jax/data/sampling.py",
    "flatfsc_jax/data/pipeline.py",  # being split by the input-pipeline rewrite
}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted((ROOT / PACKAGE).rglob("*.py"))}


def _imported_modules(name: str, path: pathlib.Path) -> set[str]:
    """The package modules ``name`` imports, anywhere in its source."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against this module's package
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            # ``from package import module`` imports that module, else the package itself.
            targets = [
                f"{module}.{alias.name}" if f"{module}.{alias.name}" in MODULES else module
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # ``import a.b.c`` of a name in a.b
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    return {name: _imported_modules(name, path) for name, path in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle ``[a, b, ..., a]`` of the directed graph, or None (depth-first search)."""
    state: dict[str, str] = {}  # "open" while on the DFS stack, then "done"
    stack: list[str] = []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for succ in sorted(graph.get(node, ())):
            if state.get(succ) == "open":
                return stack[stack.index(succ) :] + [succ]
            if succ not in state:
                cycle = visit(succ)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_find_cycle_finds_a_cycle_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_lazy_and_from_imports():
    graph = import_graph()
    # a module-level ``from flatfsc_jax.data import sources``
    assert "flatfsc_jax.data.sources" in graph["flatfsc_jax.data.benchmarks"]
    # a function-level ``from flatfsc_jax.data import glyphs``
    assert "flatfsc_jax.data.glyphs" in graph["flatfsc_jax.data.benchmarks"]
    # ``from flatfsc_jax.data.meta_dataset.specs import ...``
    assert "flatfsc_jax.data.meta_dataset.specs" in graph["flatfsc_jax.data.meta_dataset.convert"]


def test_no_import_cycle_in_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _front_door(name: str) -> bool:
    """Command lines define absl flags when imported, and two that share a flag name
    (``--zoo``, ``--out``) cannot be imported into one process: each gets its own."""
    return name == f"{PACKAGE}.main" or name.startswith(f"{PACKAGE}.cli.")


def test_every_module_imports():
    for name in sorted(MODULES):
        if not _front_door(name):
            importlib.import_module(name)
    doors = [name for name in sorted(MODULES) if _front_door(name)]
    assert f"{PACKAGE}.main" in doors
    for name in doors:
        subprocess.run([sys.executable, "-c", f"import {name}"], check=True, cwd=ROOT)


def test_no_module_over_the_line_limit():
    too_long = []
    for path in sorted(MODULES.values()):
        name = path.relative_to(ROOT).as_posix()
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > LONG_MODULE_LINES and name not in LONG_MODULE_ALLOWED:
            too_long.append(f"{name} ({lines} lines)")
    assert not too_long, f"split these modules (at most {LONG_MODULE_LINES} lines): {too_long}"


def test_the_allow_list_names_existing_modules():
    # A stale entry would silently allow a future module of that name.
    missing = [name for name in LONG_MODULE_ALLOWED if not (ROOT / name).is_file()]
    assert not missing, f"LONG_MODULE_ALLOWED names modules that do not exist: {missing}"
