"""poolkeeper.gunicorn's worker_exit, called as gunicorn calls it, with a registry that cannot drain in time."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import sqlalchemy as sa

import poolkeeper
import poolkeeper.gunicorn


@pytest.fixture
def registry() -> Iterator[poolkeeper.Registry]:
    """A registry the hooks use for this test only."""
    chosen = poolkeeper.Registry(drain_timeout=30.0)
    poolkeeper.gunicorn.configure(chosen)
    yield chosen
    poolkeeper.gunicorn.configure()
    chosen.force_close()


def test_worker_exit_is_bounded_by_graceful_timeout(
    registry: poolkeeper.Registry, caplog: pytest.LogCaptureFixture
) -> None:
    """A connection held past the worker's graceful_timeout is force-closed in time, and the report is logged once."""
    engine = registry.wrap(sa.create_engine("sqlite://"), name="db")
    held = engine.connect()
    worker = SimpleNamespace(cfg=SimpleNamespace(graceful_timeout=2.5), log=logging.getLogger("test.gunicorn.worker"))

    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="test.gunicorn.worker"):
        poolkeeper.gunicorn.worker_exit(None, worker)
    elapsed = time.monotonic() - started

    assert elapsed < 2.5 - poolkeeper.gunicorn.EXIT_MARGIN + 0.5
    assert registry.report is not None
    assert registry.report["db"].outcome == "forced"
    [record] = [r for r in caplog.records if r.name == "test.gunicorn.worker"]
    assert "closed within 1.5s" in record.getMessage()
    held.close()


@pytest.mark.parametrize(
    ("configured", "environment", "graceful_timeout", "expected"),
    [
        (None, None, 25.0, 25.0),  # nothing configured: gunicorn's graceful_timeout, when it kills the worker
        (20.0, None, 25.0, 20.0),  # the pod's grace period is shorter: it counts
        (None, "15", 25.0, 15.0),  # the same from $POOLKEEPER_GRACE_PERIOD
        (40.0, None, 25.0, 25.0),  # longer than graceful_timeout: gunicorn's kill comes first
    ],
)
def test_a_workers_grace_period_is_the_configured_one_at_most_graceful_timeout(
    monkeypatch: pytest.MonkeyPatch,
    configured: float | None,
    environment: str | None,
    graceful_timeout: float,
    expected: float,
) -> None:
    """configure(grace_period=...) else $POOLKEEPER_GRACE_PERIOD, capped by graceful_timeout, else graceful_timeout."""
    if environment is None:
        monkeypatch.delenv("POOLKEEPER_GRACE_PERIOD", raising=False)
    else:
        monkeypatch.setenv("POOLKEEPER_GRACE_PERIOD", environment)
    poolkeeper.gunicorn.configure(grace_period=configured)
    try:
        assert poolkeeper.gunicorn.worker_grace_period(graceful_timeout) == expected
    finally:
        poolkeeper.gunicorn.configure()


@pytest.mark.parametrize("value", [0, -1.0, float("inf"), float("nan")])
def test_configure_refuses_a_grace_period_that_is_no_positive_number_by_name(value: float) -> None:
    """A bad grace_period is refused at configure time, naming the argument; nothing of it is kept."""
    with pytest.raises(ValueError, match="grace_period"):
        poolkeeper.gunicorn.configure(shutdown_delay=3.0, grace_period=value)
    assert poolkeeper.gunicorn._settings["shutdown_delay"] == 0.0


FINALIZED_SIGTERM = """
import logging, os, signal, sys, time
from types import SimpleNamespace
import poolkeeper.gunicorn

signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as gunicorn's uvicorn worker leaves it before serving
worker = SimpleNamespace(cfg=SimpleNamespace(graceful_timeout=5.0), log=logging.getLogger("worker"))
poolkeeper.gunicorn.post_worker_init(worker)


class Finalized:
    def __del__(self):
        signal.raise_signal(signal.SIGTERM)  # the SIGTERM lands in a finalizer, which swallows what it raises


try:
    Finalized()
    time.sleep(30)  # a worker that went on: waiting in accept() for requests
    print("still serving", flush=True)
except SystemExit as leaving:
    print(f"left with {leaving.code}", flush=True)
    signal.raise_signal(signal.SIGTERM)  # a second one, while worker_exit closes the registry
    print("worker_exit went on", flush=True)
"""


def test_a_uvicorn_workers_sigterm_swallowed_by_a_finalizer_still_ends_the_worker() -> None:
    """A SIGTERM before uvicorn serves that lands in a ``__del__`` still leaves through gunicorn's exit path, at once.

    A second SIGTERM on the way out does not cut that path short.
    """
    started = time.monotonic()
    finished = subprocess.run(
        [sys.executable, "-c", FINALIZED_SIGTERM], capture_output=True, text=True, timeout=60, check=False
    )
    elapsed = time.monotonic() - started

    assert (finished.returncode, finished.stdout) == (0, "left with 0\nworker_exit went on\n"), finished.stderr
    assert "Exception ignored" not in finished.stderr
    assert elapsed < 10  # the 30 s wait was cut short, not waited out
