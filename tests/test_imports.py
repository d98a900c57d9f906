"""The package's import structure: no import cycle between its modules (counting imports inside functions,
which only hide a cycle), every module imports in a fresh interpreter, and the light modules stay light."""

import ast
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "hyperp_megatron"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of the package that ``name`` imports anywhere in its file (module level or in a function)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # ``from a import b``: the submodule a.b when it is one, else (a name in it) a itself
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # a.b.func -> a.b
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph[node]:
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
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

    for node in graph:
        if node not in index:
            visit(node)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def test_no_import_cycle():
    graph = _graph()
    assert "hyperp_megatron.optim.builder" in graph and "hyperp_megatron.model.params" in graph
    assert "hyperp_megatron.optim.sphere_builder" not in graph  # merged into optim/builder.py
    assert "hyperp_megatron.coord_check" not in graph  # a research tool: tools/coord_check.py
    assert _cycles(graph) == []


def test_cycle_detector_finds_a_cycle():
    """Control: the old optim/builder.py <-> optim/sphere_builder.py pair (each imported the other inside a
    function) is reported."""
    graph = {"a.builder": {"a.sphere_builder"}, "a.sphere_builder": {"a.builder", "a.params"}, "a.params": set()}
    assert _cycles(graph) == [["a.builder", "a.sphere_builder"]]


def test_checkpoint_is_not_where_unwrap_lives():
    graph = _graph()
    users = ("hyperp_megatron.optim.param_groups", "hyperp_megatron.optim.builder", "hyperp_megatron.monitors",
             "hyperp_megatron.model.init")
    for user in users:
        assert "hyperp_megatron.checkpoint" not in graph[user], user
    assert "hyperp_megatron.optim.reference" not in graph["hyperp_megatron.optim.sphere_muon"]


def test_every_module_imports_in_a_fresh_interpreter():
    """One fresh interpreter imports every module (in file order); the light ones first, checking that the
    optimizer package, the parameter roles and the derived values do not pull in megatron."""
    light = ["hyperp_megatron.optim", "hyperp_megatron.model.params", "hyperp_megatron.derived",
             "hyperp_megatron.config", "hyperp_megatron.transfer", "hyperp_megatron.budget"]
    names = [name for name in _modules() if not name.startswith("hyperp_megatron.convert.hf_modeling")]
    code = (
        "import importlib, sys\n"
        f"for name in {light!r}:\n"
        "    importlib.import_module(name)\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] == 'megatron')\n"
        "assert not heavy, heavy[:5]\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "print('imported', len(" f"{names!r}" "))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"imported {len(names)}" in out.stdout
