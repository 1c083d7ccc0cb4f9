"""Optional dependencies stay optional: importing poolkeeper imports no driver."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

DRIVERS = [
    "sqlalchemy",
    "asyncpg",
    "redis",
    "aiohttp",
    "fastapi",
    "starlette",
    "psycopg",
    "psycopg2",
    "testcontainers",
    "prometheus_client",
    "opentelemetry",
    "gunicorn",
    "flask",
    "django",
    "celery",
]


@pytest.mark.parametrize(
    "module",
    [
        "poolkeeper",
        "poolkeeper.errors",
        "poolkeeper.adapters",
        "poolkeeper.cli",
        "poolkeeper.pytest_plugin",
        "poolkeeper.gunicorn",
        "poolkeeper.health",
    ],
)
def test_importing_poolkeeper_imports_no_driver(module):
    """A fresh interpreter that imports poolkeeper has none of the wrapped libraries loaded."""
    code = (
        f"import json, sys; import {module}; "
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({DRIVERS!r}))))"
    )
    output = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert json.loads(output) == []


def test_the_console_script_prints_its_help():
    """`python -m poolkeeper` with no command prints help and exits 0."""
    result = subprocess.run([sys.executable, "-m", "poolkeeper"], capture_output=True, text=True, check=False)
    assert result.returncode == 0
    assert "usage: poolkeeper" in result.stdout
