"""The documentation's Python samples run as written, against the real servers.

Every ```python block of ``docs/*.md`` is run in a fresh interpreter; ```py blocks are fragments
(top-level ``await``, a piece of a larger program) and are not run. A block that defines a
``test_`` function is a test module: it is run with ``python -m pytest`` (the poolkeeper plugin
loaded, as it is for users) and must pass, unless the line before its fence is
``<!-- expect: fail -->``: then it must fail, and every ``FILE:LINE`` line the page shows for it
(its title names the file) must be what pytest really printed. Any other block runs as a script
and must exit 0.

Samples read the servers from the environment, as real code does: ``DATABASE_URL`` (a libpq URL
of this session's throwaway PostgreSQL database), ``REDIS_URL`` (this session's Redis database,
never 0) and ``MYSQL_URL`` (a ``mysql://`` URL of this session's throwaway MariaDB database).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
EXPECT_FAIL = "<!-- expect: fail -->"
# A fence opening, possibly indented (inside a list item), with its info string.
FENCE = re.compile(r"^(?P<indent>[ ]*)```(?P<info>[^\n`]*)$")
TIMEOUT = 60


@dataclass(frozen=True)
class Sample:
    """One ```python block of a page."""

    page: str
    line: int
    code: str
    title: str | None
    expect_fail: bool

    @property
    def is_test_module(self) -> bool:
        return re.search(r"^\s*(async\s+)?def test_", self.code, flags=re.MULTILINE) is not None

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def samples_of(path: Path) -> list[Sample]:
    """The ```python blocks of one page, in order."""
    lines = path.read_text().splitlines()
    found: list[Sample] = []
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        indent = opening["indent"]
        end = index + 1
        while end < len(lines) and lines[end].rstrip() != f"{indent}```":
            end += 1
        info = opening["info"].strip()
        language = info.split(maxsplit=1)[0] if info else ""
        if language == "python":
            title = re.search(r'title="([^"]+)"', info)
            body = "\n".join(line.removeprefix(indent) for line in lines[index + 1 : end])
            found.append(
                Sample(
                    page=path.name,
                    line=index + 1,
                    code=textwrap.dedent(body) + "\n",
                    title=title[1] if title else None,
                    expect_fail=index > 0 and lines[index - 1].strip() == EXPECT_FAIL,
                )
            )
        index = end + 1
    return found


SAMPLES = [sample for page in sorted(DOCS.glob("*.md")) for sample in samples_of(page)]


def test_the_pages_have_samples_to_run():
    """The quickstart and the library pages show runnable Python samples."""
    pages = {sample.page for sample in SAMPLES}
    assert {"quickstart.md", "sqlalchemy.md", "asyncpg.md", "redis.md", "aiohttp.md", "pytest.md"} <= pages


def test_expected_failures_are_test_modules_with_a_file_name():
    """An ``expect: fail`` block is a test module whose title names the file its messages show."""
    failing = [sample for sample in SAMPLES if sample.expect_fail]
    assert failing, "pytest.md shows its failure messages with the test module that produces them"
    for sample in failing:
        assert sample.is_test_module, sample
        assert sample.title, f'{sample}: give the block a title="tests/test_x.py"'


@pytest.fixture
def sample_environment(pg_url, redis_url, mysql_url):
    """The environment a sample runs in: the caller's, plus the server URLs."""
    servers = {"DATABASE_URL": pg_url, "REDIS_URL": redis_url, "MYSQL_URL": mysql_url}
    return {**os.environ, **servers, "PYTHONDONTWRITEBYTECODE": "1"}


def run(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False)


def normalise(line: str) -> str:
    """A failure-message line without what changes from run to run: timings, task numbers, the temp dir."""
    line = re.sub(r"\d+\.\d+s\b", "<t>s", line.strip())
    line = re.sub(r"Task-\d+", "Task-<n>", line)
    return re.sub(r"\S*?/?(tests/test_\w+\.py)", r"\1", line)


def shown_lines(sample: Sample) -> list[str]:
    """The page's lines that name a line of the sample's file, and its leak headlines.

    That is ``borrowed at tests/test_orders.py:14 in export_orders``, the stack lines, and
    ``[1] keeper 'orders-db' (sqlalchemy, poolkeeper_registry): still borrowed when...``.
    """
    assert sample.title is not None
    text = (DOCS / sample.page).read_text()
    site = re.compile(re.escape(sample.title) + r":\d+")
    headline = re.compile(r"^\s*(\[\d+\] )?keeper '")
    return [
        line
        for line in text.splitlines()
        if (site.search(line) or headline.search(line)) and "```" not in line and "title=" not in line
    ]


@pytest.mark.parametrize("sample", [s for s in SAMPLES if not s.is_test_module], ids=str)
def test_script_sample_runs(sample, tmp_path, sample_environment):
    """The sample runs to completion in a fresh interpreter."""
    script = tmp_path / (sample.title or "sample.py")
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(sample.code)
    result = run([sys.executable, str(script)], tmp_path, sample_environment)
    assert result.returncode == 0, f"{sample} failed:\n{result.stdout}\n{result.stderr}"


@pytest.mark.parametrize("sample", [s for s in SAMPLES if s.is_test_module], ids=str)
def test_test_module_sample(sample, tmp_path, sample_environment):
    """The test module passes under pytest; an ``expect: fail`` one fails with the messages its page shows."""
    module = tmp_path / (sample.title or "test_sample.py")
    module.parent.mkdir(parents=True, exist_ok=True)
    module.write_text(sample.code)
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        f"--rootdir={tmp_path}",
        "--poolkeeper-require-services",  # a missing server fails the sample instead of skipping it
        "-rA",
        str(module.relative_to(tmp_path)),
    ]
    result = run(command, tmp_path, sample_environment)
    output = result.stdout + result.stderr
    if not sample.expect_fail:
        assert result.returncode == 0, f"{sample} failed:\n{output}"
        assert re.search(r"\b\d+ passed\b", output), output
        assert " skipped" not in output, output
        return
    assert result.returncode == 1, f"{sample} was expected to fail its tests (exit status 1):\n{output}"
    expected = shown_lines(sample)
    assert expected, f"{sample}: the page shows no {sample.title}:LINE line to check"
    printed = {normalise(line) for line in output.splitlines()}
    missing = [line for line in expected if normalise(line) not in printed]
    assert not missing, f"{sample}: the page shows lines pytest did not print:\n{missing}\n\n{output}"


def test_the_comparison_page_is_generated_by_its_script():
    """docs/comparison.md is the output of benchmarks/raw_behaviour.py, with the date it was measured."""
    page = (DOCS / "comparison.md").read_text()
    generator = (ROOT / "benchmarks" / "raw_behaviour.py").read_text()
    marker = page.splitlines()[0]
    assert marker.startswith("<!-- Generated by `python -m benchmarks.raw_behaviour")
    assert marker in generator
    assert re.search(r"Measured on \d{4}-\d{2}-\d{2}", page)
