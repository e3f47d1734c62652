"""The package's shape is its architecture: folders stacked in one direction, imports only downward, no cycles.

    (bts/errors, atomic, faults)  <  data  <  core  <  train  <  eval  <  baselines  <  report  <  pipeline  <  cli

Every import is read with `ast`, including those inside functions (a lazy import is still a dependency). A module
may import from its own folder or from a folder below it; `import bts` / `from bts import BTSForCausalLM` is the
public façade over `bts.core` and counts as core.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "bts"
LAYERS = ["", "data", "core", "train", "eval", "baselines", "report", "pipeline", "cli"]
FACADE_RANK = LAYERS.index("core")
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def folder_of(module: str) -> str:
    parts = module.split(".")
    if module in ("bts", "bts.__main__"):
        return "(facade)"
    if len(parts) == 2 and f"bts.{parts[1]}" in MODULES and not MODULES[module].name == "__init__.py":
        return ""  # a module at the package root (errors, atomic, faults)
    return parts[1] if parts[1] in LAYERS else ""  # bts.recipes (data files only) sits at the root


def rank(module: str) -> int:
    folder = folder_of(module)
    return FACADE_RANK if folder == "(facade)" else LAYERS.index(folder)


def imports_of(module: str, source: str | None = None) -> set[str]:
    """The bts modules a module imports, anywhere in its body: `from bts import hf` names the submodule."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source if source is not None else path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name == "bts" or a.name.startswith("bts.")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            if base != "bts" and not base.startswith("bts."):
                continue
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
            found |= set(subs) if subs else {base}
            if len(subs) < len(node.names):  # names that are not submodules come from the module itself
                found.add(base)
    return {m for m in found if m in MODULES and m != module}


GRAPH = {m: imports_of(m) for m in MODULES}


def test_imports_point_only_downward():
    upward = [f"{m} (layer '{folder_of(m)}') imports {dep} (layer '{folder_of(dep)}')"
              for m, deps in GRAPH.items() if folder_of(m) != "(facade)"
              for dep in sorted(deps) if rank(dep) > rank(m)]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycle_between_files():
    # A package's __init__ importing its own submodules is how packages re-export; a submodule importing its
    # package's __init__ back would be a cycle and is counted.
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for dep in sorted(GRAPH[m]):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[m] = "done"

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_layers_are_known_folders():
    folders = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders - {"recipes"} <= set(LAYERS), f"a folder outside the layer order: {folders - set(LAYERS)}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_file_over_the_line_limit(module):
    lines = MODULES[module].read_text().count("\n")
    assert lines <= MAX_LINES, f"{MODULES[module].relative_to(SRC)} has {lines} lines (limit {MAX_LINES})"


def test_the_checker_sees_lazy_relative_and_submodule_imports():
    """The reader can fail: in-function, relative and `from bts import <submodule>` imports are all seen."""
    source = ("from . import hf\n"
              "from bts import faults\n"
              "def f():\n"
              "    from bts.pipeline.run import Run\n"
              "    import bts.report\n")
    found = imports_of("bts.core.model", source)
    assert found == {"bts.core.hf", "bts.faults", "bts.pipeline.run", "bts.report"}
    assert {d for d in found if rank(d) > rank("bts.core.model")} == {"bts.pipeline.run", "bts.report"}


def test_test_files_have_unique_names():
    """pytest imports test files by basename (rootdir mode): two test_x.py in different folders cannot both load."""
    names = [p.name for p in (SRC.parents[1] / "tests").rglob("test_*.py")]
    assert len(names) == len(set(names)), sorted({n for n in names if names.count(n) > 1})
