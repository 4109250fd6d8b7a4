"""Lint, types and layering as part of the suite: ruff over the tree, mypy --strict on the core with our own imports
resolved (``ignore_missing_imports`` is off for ``searchrl.*``), and import-linter's contracts (pyproject.toml
``[tool.importlinter]``): the layers of ARCHITECTURE.md, and no production import of the test kit."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
# The folders that hold the searchrl namespace ("" is the root): pyproject.toml's dev-mode-dirs, the editable install.
PORTIONS = [
    d.strip(".")
    for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"][
        "dev-mode-dirs"
    ]
]
# The core, checked with --strict (pyproject.toml [[tool.mypy.overrides]] strict = true lists the same modules).
STRICT = [
    *("-p", "searchrl.agent", "-p", "searchrl.reward", "-p", "searchrl.data", "-p", "searchrl.serving"),
    *("-p", "searchrl.client", "-m", "searchrl.errors", "-m", "searchrl.assets", "-m", "searchrl.tracking"),
    *("-m", "searchrl.trainer.grpo", "-m", "searchrl.simulator.curriculum"),
]


def test_ruff_clean() -> None:
    res = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_mypy_strict_core() -> None:
    res = subprocess.run([sys.executable, "-m", "mypy", "--strict", *STRICT], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_mypy_resolves_our_own_imports(tmp_path: Path) -> None:
    """A misspelt searchrl import is an error, not a silent ``Any`` (the strict check above would otherwise pass)."""
    bad = tmp_path / "probe.py"
    bad.write_text("from searchrl.agent.loop import AgentLoop\nfrom searchrl.agent.no_such_module import x\n")
    cmd = [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "cache"), str(bad)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 1, res.stdout + res.stderr
    (error,) = [line for line in res.stdout.splitlines() if ": error:" in line]
    assert error.startswith(f"{bad}:2: error:") and '"searchrl.agent.no_such_module"' in error


def _lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` over the searchrl namespace found in ``tree`` (not in the installed checkout)."""
    paths = [str(tree / p).rstrip("/") for p in PORTIONS]
    installed = [str(ROOT / p).rstrip("/") for p in PORTIONS]
    code = (
        "import sys; "
        f"sys.path[:] = {paths!r} + [p for p in sys.path if p.rstrip('/') not in {installed!r}]; "
        "from importlinter.cli import lint_imports_command; "
        "lint_imports_command(['--no-cache'])"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True, text=True, env=env)


def test_import_layers_kept() -> None:
    res = _lint_imports(ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Contracts: 2 kept, 0 broken." in res.stdout


def test_import_layers_catch_a_service_importing_the_trainer(tmp_path: Path) -> None:
    """The contract is not vacuous: a copy of the tree where the policy service imports the trainer breaks it."""
    tree = tmp_path / "tree"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for portion in PORTIONS[1:]:
        shutil.copytree(ROOT / portion / "searchrl", tree / portion / "searchrl", ignore=ignore)
    shutil.copytree(ROOT / "searchrl", tree / "searchrl", ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    server = tree / "services" / "searchrl" / "services" / "policy" / "server.py"
    server.write_text(
        server.read_text() + "\n\ndef _probe() -> None:\n    import searchrl.trainer.local  # noqa: F401\n"
    )
    res = _lint_imports(tree)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "searchrl.services is not allowed to import searchrl.trainer" in res.stdout
    assert "searchrl.services.policy.server -> searchrl.trainer.local" in res.stdout


# Imported only inside the GPU images, which install them from their own locks (deploy/docker/locks/*-gpu.lock): no
# extra can hold them next to the CPU torch pin (pyproject.toml, the comment above [project.optional-dependencies].dev).
GPU_IMAGE_ONLY = {"vllm", "sglang", "ray"}
# Modules that belong to a declared distribution's own release (pydantic pins its pydantic-core exactly).
PART_OF = {"pydantic_core": "pydantic"}


def test_every_third_party_import_is_declared() -> None:
    """Every module the product code imports (lazily too) comes from a distribution pyproject.toml declares."""
    import ast
    import importlib.metadata
    import re

    def canonical(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + sum(project["optional-dependencies"].values(), [])
    declared = {canonical(re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0]) for r in requirements}
    distributions = importlib.metadata.packages_distributions()
    undeclared = []
    for portion in PORTIONS:
        for path in sorted((ROOT / portion / "searchrl").rglob("*.py")):
            if "_pb2" in path.name:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for top in {n.split(".")[0] for n in names}:
                    if top in sys.stdlib_module_names or top == "searchrl" or top in GPU_IMAGE_ONLY:
                        continue
                    dists = {canonical(d) for d in distributions.get(PART_OF.get(top, top), [])}
                    if not dists & declared:
                        undeclared.append(
                            f"{path.relative_to(ROOT)}: {top} (from {sorted(dists) or 'nothing installed'})"
                        )
    assert not undeclared, "imports no pyproject.toml requirement declares:\n" + "\n".join(undeclared)
