"""What the runtime (dicom_node/ and pipelines/) imports, read from its source: no training code,
no package of the train extra, every other package a declared runtime dependency, and no node
code in the pipelines."""

from __future__ import annotations

import ast
import hashlib
import re
import subprocess
import sys
import tomllib
import zipfile
from functools import cache
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
RUNTIME = ("dicom_node", "pipelines")
FIRST_PARTY = {"dicom_node", "pipelines", "training"}


def imported_modules(path: Path) -> set[str]:
    """Return the absolute module names a source file imports, at any depth (lazy imports too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def imports_of(*packages: str) -> dict[str, set[str]]:
    """Return {file relative to the checkout: top-level modules it imports} for the packages' files."""
    found = {}
    for package in packages:
        files = sorted((ROOT / package).rglob("*.py"))
        assert files, f"no modules under {package}/"
        for path in files:
            found[str(path.relative_to(ROOT))] = {name.split(".")[0] for name in imported_modules(path)}
    return found


def distribution(requirement: str) -> str:
    """Return the normalised distribution name of a PEP 508 requirement."""
    return re.sub(r"[-_.]+", "-", re.split(r"[\s\[<>=!~;@]", requirement, maxsplit=1)[0]).lower()


def declared() -> tuple[set[str], set[str]]:
    """Return the distributions of the runtime dependencies and of the train extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    runtime = {distribution(r) for r in project["dependencies"]}
    train = {distribution(r) for r in project["optional-dependencies"]["train"]}
    return runtime, train


@cache
def providers() -> dict[str, list[str]]:
    """Return {top-level module: installed distributions that provide it} (read once: it is slow)."""
    return packages_distributions()


def third_party(module: str) -> set[str]:
    """Return the normalised distributions that provide a top-level module (empty if none)."""
    return {distribution(d) for d in providers().get(module, [])}


def test_runtime_imports_nothing_of_training() -> None:
    runtime, train = declared()
    train_only = train - runtime
    assert {"scikit-image", "scikit-learn"} <= train_only
    bad = {
        file: sorted(m for m in modules if m == "training" or third_party(m) & train_only)
        for file, modules in imports_of(*RUNTIME).items()
    }
    assert {file: mods for file, mods in bad.items() if mods} == {}


def test_runtime_imports_only_declared_dependencies() -> None:
    runtime, _ = declared()
    undeclared = {}
    for file, modules in imports_of(*RUNTIME).items():
        missing = sorted(
            m for m in modules - FIRST_PARTY - set(sys.stdlib_module_names) - {"__future__"}
            if not third_party(m) & runtime
        )
        if missing:
            undeclared[file] = missing
    assert undeclared == {}


def test_pipelines_import_nothing_of_the_node() -> None:
    bad = {file: "dicom_node" for file, modules in imports_of("pipelines").items() if "dicom_node" in modules}
    assert bad == {}


def test_the_node_imports_no_pipeline_but_through_pipelines_base() -> None:
    """The node and its writers know pipelines only by the contract (entry points find the plug-ins);
    a site override's file is part of it: the node writes it, plug-ins read it."""
    allowed = {"pipelines.base", "pipelines.errors", "pipelines.site_override"}
    bad = {}
    for path in sorted((ROOT / "dicom_node").rglob("*.py")):
        pipeline_modules = {m for m in imported_modules(path) if m == "pipelines" or m.startswith("pipelines.")}
        if pipeline_modules - allowed:
            bad[str(path.relative_to(ROOT))] = sorted(pipeline_modules - allowed)
    assert bad == {}


def test_the_wheel_carries_the_node_the_pipelines_and_the_weights(tmp_path):
    """The built wheel holds the runtime, the migrations and every file of the weights manifest (checked
    against its sha256), so that `pip install dicom-node` runs `serve` with no checkout beside it."""
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:  # the build requirement, used without isolation
        pytest.skip(f"setuptools {setuptools.__version__} here; building the wheel needs setuptools>=77")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    [wheel] = tmp_path.glob("dicom_node-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        weights = "pipelines/chest_xray/weights/"
        manifest = yaml.safe_load(archive.read(weights + "manifest.yaml"))
        entries = [manifest["lung"], manifest["content_check"], *manifest["findings"]]
        for entry in entries:
            assert hashlib.sha256(archive.read(weights + entry["file"])).hexdigest() == entry["sha256"]
    assert {"dicom_node/cli/serve.py", "pipelines/base.py", "dicom_node/migrations/env.py",
            "pipelines/chest_xray/plugin.py", weights + "MODEL_CARD.md"} <= names
    assert any(name.startswith("dicom_node/migrations/versions/node_0001") for name in names)
