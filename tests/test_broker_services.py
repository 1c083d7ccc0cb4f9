"""A broker that does not answer fails the run under --poolkeeper-require-services, and skips its tests otherwise."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.programs.child import ROOT

# Port 1 on loopback: nothing listens there, so the connection is refused at once.
CASES = [
    ("POOLKEEPER_AMQP_URL", "amqp://guest:guest@127.0.0.1:1/", "tests/test_aio_pika_keeper.py", "RabbitMQ"),
    ("POOLKEEPER_NATS_URL", "nats://127.0.0.1:1", "tests/test_nats_keeper.py", "NATS"),
]


def run_pytest(variable: str, url: str, path: str, *options: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, variable: url}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:randomly", "-q", "-rs", "-k", "wrap_returns", path, *options],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=environment,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(("variable", "url", "path", "service"), CASES)
def test_a_missing_broker_fails_the_run_when_services_are_required(variable, url, path, service):
    """With --poolkeeper-require-services the test needing the broker errors, naming it; the run fails."""
    result = run_pytest(variable, url, path, "--poolkeeper-require-services")
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{service} ({variable}) is not available" in result.stdout
    assert "1 error" in result.stdout


def test_a_missing_broker_skips_its_tests_otherwise():
    """Without the option the same test is skipped, with the reason."""
    variable, url, path, service = CASES[0]
    result = run_pytest(variable, url, path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{service} ({variable}) is not available" in result.stdout
    assert "1 skipped" in result.stdout
