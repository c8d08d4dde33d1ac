"""Lint, formatting and types are part of the test run: ``ruff check`` and ``ruff format --check`` over the tree,
and mypy over the package as it installs (``tools/typecheck.py``, the same check the pre-commit hook runs)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tools.typecheck import run_mypy

REPO = Path(__file__).resolve().parents[1]


def _ruff(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("ruff")
    cmd = [exe] if exe else [sys.executable, "-m", "ruff"]
    return subprocess.run([*cmd, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args", [("check", "."), ("format", "--check", ".")], ids=["check", "format"])
def test_ruff(args: tuple[str, ...]) -> None:
    out = _ruff(*args)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def test_mypy() -> None:
    """mypy finds no error in the installed ``blindnet`` package (the job folders mapped in as the wheel maps them).

    Settings: pyproject.toml's ``[tool.mypy]``. The cache in ``.mypy_cache`` makes a repeated run re-read only what
    changed (seconds); a first run reads everything (about a minute on two cores).
    """
    out = run_mypy(timeout=540)
    assert out.returncode == 0, out.stdout[-8000:] + out.stderr[-2000:]
