"""Shutdown order, concurrency, hooks and the overall deadline."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import sqlalchemy as sa

from poolkeeper import KeeperState, Registry


def test_independent_hooks_run_concurrently():
    """Five independent 0.4 s hooks finish in well under the 2 s their sum would take."""
    registry = Registry()
    for index in range(5):
        registry.on_shutdown(lambda: time.sleep(0.4), name=f"sleep-{index}")
    started = time.monotonic()
    report = registry.close()
    assert time.monotonic() - started < 1.2
    assert report.ok
    assert [item.name for item in report] == [f"sleep-{index}" for index in range(5)]


def test_a_hook_that_uses_the_database_runs_before_it_closes(make_engine):
    """A hook that depends_on the engine can still query it; the engine closes after the hook."""
    registry = Registry()
    engine = registry.wrap(make_engine(), name="db")
    seen: list[object] = []

    @registry.on_shutdown(name="flush", depends_on=["db"])
    def flush() -> None:
        seen.append(registry["db"].state)
        with engine.connect() as connection:
            seen.append(connection.execute(sa.text("select 7")).scalar())

    report = registry.close()
    assert seen == [KeeperState.OPEN, 7]
    assert report.ok


@pytest.mark.asyncio
async def test_async_hooks_and_the_chain_order():
    """Items close dependents-first: a chain a -> b -> c runs a, then b, then c."""
    registry = Registry()
    order: list[str] = []

    def record(name: str):
        async def hook() -> None:
            order.append(name)

        return hook

    registry.on_shutdown(record("c"), name="c")
    registry.on_shutdown(record("b"), name="b", depends_on=["c"])
    registry.on_shutdown(record("a"), name="a", depends_on=["b"])
    report = await registry.aclose()
    assert order == ["a", "b", "c"]
    assert report.ok


def test_a_failing_or_hanging_hook_is_reported_and_never_stops_the_others():
    """A hook that raises and one that overruns its timeout are reported; the rest still run."""
    registry = Registry()
    ran = threading.Event()

    def boom() -> None:
        raise RuntimeError("metrics backend down")

    registry.on_shutdown(boom, name="boom")
    registry.on_shutdown(lambda: time.sleep(5), name="hang", timeout=0.2)
    registry.on_shutdown(ran.set, name="fine", depends_on=["boom", "hang"])
    started = time.monotonic()
    report = registry.close()
    assert time.monotonic() - started < 2
    assert ran.is_set()
    assert report["boom"].outcome == "failed"
    assert report["boom"].error == "RuntimeError: metrics backend down"
    assert report["hang"].outcome == "failed"
    assert "TimeoutError" in (report["hang"].error or "")
    assert report["fine"].outcome == "clean"
    assert not report.ok


def test_the_deadline_bounds_the_whole_shutdown(make_engine):
    """close(deadline=D) returns within D plus a small constant although drains and hooks would take longer."""
    registry = Registry(drain_timeout=30)
    engine = registry.wrap(make_engine(), name="db")
    registry.on_shutdown(lambda: time.sleep(10), name="slow", depends_on=["db"])
    connection = engine.connect()
    started = time.monotonic()
    report = registry.close(deadline=1.0)
    elapsed = time.monotonic() - started
    connection.close()
    assert elapsed < 1.5
    assert report["slow"].outcome == "failed"
    assert report["db"].outcome == "forced"
    assert report.deadline == 1.0


def test_unknown_dependency_is_ignored_at_shutdown(caplog):
    """At shutdown an unknown depends_on name is logged and never blocks closing."""
    registry = Registry()
    registry.on_shutdown(lambda: None, name="flush", depends_on=["nowhere"])
    assert registry.close().ok
    assert "unknown 'nowhere'" in caplog.text


@pytest.mark.asyncio
async def test_concurrent_aclose_calls_share_one_report(make_engine):
    """Many tasks calling aclose() at once get the very same report."""
    registry = Registry()
    registry.wrap(make_engine(), name="db")
    reports = await asyncio.gather(*(registry.aclose() for _ in range(10)))
    assert all(report is reports[0] for report in reports)
    assert registry.closed


def test_context_manager_closes_the_registry(make_engine):
    """Leaving a `with registry:` block closes every keeper."""
    with Registry() as registry:
        engine = registry.wrap(make_engine(), name="db")
        with engine.connect() as connection:
            connection.execute(sa.text("select 1"))
    assert registry.closed
    assert registry["db"].state is KeeperState.CLOSED


def test_start_draining_sets_draining_but_keepers_still_lend(make_engine):
    """start_draining() flips `draining` while checkouts still succeed; closing refuses them."""
    registry = Registry()
    engine = registry.wrap(make_engine(), name="db")
    before = registry.draining
    registry.start_draining()
    registry.start_draining()
    assert (before, registry.draining, registry.closed) == (False, True, False)
    with engine.connect() as connection:
        assert connection.execute(sa.text("select 1")).scalar() == 1
    registry.close()
    assert registry.closed
    assert registry.report is not None


def test_force_close_skips_the_drain(make_engine):
    """force_close() closes at once, force-closing what is borrowed."""
    registry = Registry(drain_timeout=30)
    engine = registry.wrap(make_engine(), name="db")
    connection = engine.connect()
    started = time.monotonic()
    report = registry.force_close()
    assert time.monotonic() - started < 1.0
    assert report is not None  # None only when called from a thread running an event loop
    assert report["db"].outcome == "forced"
    connection.close()
