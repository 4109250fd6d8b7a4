"""Lint and types as part of the suite: ruff over the tree, mypy --strict on the core maths (reward, GRPO, agent loop,
curriculum), as configured in pyproject.toml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STRICT = [
    "searchrl/reward/scoring.py",
    "trainer/searchrl/trainer/grpo.py",
    "searchrl/agent/loop.py",
    "simulator/searchrl/simulator/curriculum.py",
]


def test_ruff_clean() -> None:
    res = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_mypy_strict_core() -> None:
    res = subprocess.run([sys.executable, "-m", "mypy", "--strict", *STRICT], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
