"""poolkeeper.gunicorn's worker_exit, called as gunicorn calls it, with a registry that cannot drain in time."""

from __future__ import annotations

import logging
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
