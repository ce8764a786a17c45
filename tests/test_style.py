"""The code reads on the website without sideways scrolling: every Python file and
every notebook's code cells are formatted by ruff at the line length configured once
in pyproject.toml (88 columns)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def ruff(*arguments):
    executable = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(executable).exists():
        pytest.fail("ruff is not installed: pip install -r requirements.txt")
    return subprocess.run(
        [executable, *arguments], cwd=ROOT, capture_output=True, text=True
    )


def test_code_is_formatted():
    result = ruff("format", "--check", ".")
    assert result.returncode == 0, "run `ruff format .`:\n" + result.stdout


def test_no_line_is_longer_than_the_configured_length():
    result = ruff("check", "--select", "E501", "--output-format", "concise", ".")
    assert result.returncode == 0, result.stdout
