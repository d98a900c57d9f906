"""The package as users install it: console scripts that resolve, entry-point modules without import-time side
effects, no ``sys.path`` edits in the checkout, and a wheel that carries its data file and its commands."""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.tier("unit")

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SCRIPTS = PYPROJECT["project"]["scripts"]
GPU_EXTRAS = ("te",)
"""Extras for GPU machines only, not in requirements.txt (the CPU environment)."""
ENTRY_MODULES = sorted({target.split(":")[0] for target in SCRIPTS.values()})


def test_console_scripts_name_callables():
    assert {"hyperp-train", "hyperp-plan", "hyperp-convert"} <= SCRIPTS.keys()
    for name, target in SCRIPTS.items():
        module, attr = target.split(":")
        assert callable(getattr(importlib.import_module(module), attr)), name


def test_entry_modules_import_without_side_effects():
    """Importing an entry point (as the tests and other tools do) changes no process-wide warning filter and
    imports no megatron-core: the trainer's quieting filters are installed by its main(), before megatron."""
    probe = ("import importlib, json, sys, warnings\nimport numpy, torch\nout = {}\n"
             f"for name in {ENTRY_MODULES!r}:\n"
             "    before = list(warnings.filters)\n"
             "    importlib.import_module(name)\n"
             "    out[name] = [warnings.filters == before, sorted(m for m in sys.modules if m.startswith('megatron'))]\n"
             "print(json.dumps(out))")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, (filters_unchanged, megatron) in json.loads(proc.stdout.splitlines()[-1]).items():
        assert filters_unchanged and not megatron, (name, filters_unchanged, megatron)


def test_nothing_edits_sys_path():
    edit = re.compile(r"sys\.path\.(insert|append|extend)|sys\.path\s*(\+?=)")
    found = [f"{path.relative_to(REPO)}:{n}" for folder in ("hyperp_megatron", "tools", "bench", "tests", "launch")
             for path in sorted((REPO / folder).rglob("*")) if path.suffix in (".py", ".sh", ".sbatch")
             and path.name != "test_packaging.py"
             for n, line in enumerate(path.read_text().splitlines(), 1) if edit.search(line)]
    assert not found, found


def test_wheel_carries_the_modeling_file_and_the_console_scripts(tmp_path):
    """``pip wheel`` of a copy of the package (building in the checkout would leave build/ behind)."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "hyperp_megatron", source / "hyperp_megatron",
                    ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                           "--wheel-dir", str(tmp_path / "dist"), str(source)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("hyperp_megatron-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    sources = {str(p.relative_to(REPO)) for p in (REPO / "hyperp_megatron").rglob("*.py")}
    assert sources <= set(names), sorted(sources - set(names))
    assert "hyperp_megatron/convert/hf_modeling/modeling_hyperp.py" in names
    assert not [n for n in names if n.startswith(("tests/", "bench/", "tools/"))]
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    for name, target in SCRIPTS.items():
        assert f"{name} = {target}" in entry_points, entry_points


def test_requirements_txt_lists_the_package_dependencies():
    """requirements.txt (an environment without the package) = pyproject's dependencies and extras, torch pinned."""
    lines = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    listed = {line for line in lines if line}
    project = PYPROJECT["project"]
    declared = set(project["dependencies"]) | {dep for name, extra in project["optional-dependencies"].items()
                                               if name not in GPU_EXTRAS for dep in extra}
    assert listed - {"torch==2.13.0"} == declared - {"torch"}, (listed ^ declared)
    assert "torch==2.13.0" in (REPO / "constraints.txt").read_text()
