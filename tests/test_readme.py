"""The README's Python examples run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_the_readme_has_a_quickstart():
    """The README shows at least one Python example."""
    assert python_blocks()


def test_every_python_example_in_the_readme_runs(tmp_path):
    """Each ```python block of the README runs to completion in a fresh interpreter."""
    for block in python_blocks():
        result = subprocess.run(
            [sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, result.stderr
        assert "poolkeeper shutdown ok" in result.stdout
