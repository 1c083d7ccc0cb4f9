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


ROOT = README.parent
CI_RUN = ROOT / ".ci" / "run"


def marked_command(name: str) -> str:
    """The one line of the bash block under the README's ``<!-- ci: NAME command`` marker."""
    match = re.search(rf"^<!-- ci: {name} command.*-->\n```bash\n(.*)\n```$", README.read_text(), flags=re.MULTILINE)
    assert match is not None, f"README.md has no one-line bash block marked 'ci: {name} command'"
    return match.group(1)


def ci_extracts(name: str) -> str:
    """What ``.ci/run``'s own ``readme_command`` function reads from the README for ``name``."""
    script = CI_RUN.read_text()
    function = re.search(r"^readme_command\(\) \{.*?^\}$", script, flags=re.MULTILINE | re.DOTALL)
    assert function is not None, ".ci/run has no readme_command function"
    result = subprocess.run(
        ["bash", "-c", f"{function.group(0)}\nreadme_command {name}"],  # noqa: S607 -- bash from PATH, as CI runs it
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return result.stdout.rstrip("\n")


def test_the_readme_opens_with_the_demo_and_the_test_command():
    """The README's first section gives the demo command and the test command, each one line."""
    first_section = README.read_text().split("\n## ", 2)[1]
    assert first_section.startswith("From a fresh clone")
    assert marked_command("demo") in first_section
    assert marked_command("test") in first_section
    assert "poolkeeper demo" in marked_command("demo")
    assert "nox" in marked_command("test")


def test_ci_runs_exactly_the_commands_the_readme_gives():
    """.ci/run reads the same two lines from the README that a newcomer copies, and runs both."""
    assert ci_extracts("demo") == marked_command("demo")
    assert ci_extracts("test") == marked_command("test")
    script = CI_RUN.read_text()
    assert 'eval "$demo_command"' in script
    assert 'eval "$test_command"' in script


def test_the_running_the_tests_section_repeats_the_same_test_command():
    """The longer "Running the tests" section shows the very command CI runs, not a variant."""
    running = README.read_text().split("## Running the tests", 1)[1]
    assert f"```bash\n{marked_command('test')}\n```" in running
