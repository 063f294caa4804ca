"""The code base stays clean: ruff lint and format, mypy types, and no pickle."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True)


def test_ruff_lint_passes():
    result = run("ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_applied():
    result = run("ruff", "format", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_mypy_finds_no_type_errors():
    result = run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_pickle_in_the_product():
    offenders = []
    for path in REPO.glob("*_service/**/*.py"):
        offenders += [
            str(path)
            for line in path.read_text().splitlines()
            if "import pickle" in line or "allow_pickle=True" in line
        ]
    for path in (REPO / "shared").rglob("*.py"):
        offenders += [
            str(path)
            for line in path.read_text().splitlines()
            if "import pickle" in line or "allow_pickle=True" in line
        ]
    assert offenders == []
