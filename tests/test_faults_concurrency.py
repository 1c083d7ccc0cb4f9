"""Faults of concurrency: fifty closers at once, checkouts racing the close, cancellation at every stage.

Fifty callers of ``close()`` / ``aclose()`` / ``force_close()`` across threads and tasks share
one shutdown and one report. Cancelling the task that runs ``aclose()`` before the drain,
during it, during the force-close or during the close still force-closes everything before the
cancellation propagates, within a bounded grace.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
import redis
import sqlalchemy as sa

from poolkeeper import KeeperState, PoolClosedError, Registry, ShutdownReport
from tests.conftest import Server
from tests.faults import BlackholeProxy, auntil, local_ports_to, until
from tests.faults.fake_driver import FakeDriver, FakePool, fake_adapter

CLOSERS = 50
# How long a cancelled aclose() may take to propagate: poolkeeper's grace for the force-close
# (2 s, poolkeeper._shutdown._CANCEL_GRACE) plus slack for a loaded machine.
CANCEL_BOUND = 2.8


def start_borrower(engine: sa.Engine, sql: str) -> tuple[threading.Thread, list[BaseException]]:
    """A thread that runs ``sql`` on a borrowed connection; returns once the connection is borrowed."""
    errors: list[BaseException] = []
    borrowed = threading.Event()

    def borrow() -> None:
        try:
            with engine.connect() as connection:
                borrowed.set()
                connection.execute(sa.text(sql))
        except Exception as error:
            errors.append(error)

    thread = threading.Thread(target=borrow, daemon=True)
    thread.start()
    assert borrowed.wait(10)
    return thread, errors


async def fifty_closers(
    registry: Registry, *, forcers: int = 0
) -> tuple[list[ShutdownReport | None], list[ShutdownReport | None], float]:
    """Half the closers in threads (close(), then ``forcers`` of them force_close()), half as tasks (aclose()).

    Returns what the threads got, what the tasks got, and when the last caller returned.
    """
    in_threads = CLOSERS // 2
    go = threading.Event()
    thread_results: list[ShutdownReport | None] = []
    results_lock = threading.Lock()

    def call(index: int) -> None:
        go.wait(10)
        result = registry.force_close() if index < forcers else registry.close()
        with results_lock:
            thread_results.append(result)

    threads = [threading.Thread(target=call, args=(index,), daemon=True) for index in range(in_threads)]
    for thread in threads:
        thread.start()
    go_async = asyncio.Event()

    async def acall() -> ShutdownReport:
        await go_async.wait()
        return await registry.aclose()

    tasks = [asyncio.ensure_future(acall()) for _ in range(CLOSERS - in_threads)]
    await asyncio.sleep(0)  # every task is now waiting on go_async
    go.set()
    go_async.set()
    task_results: list[ShutdownReport | None] = list(await asyncio.gather(*tasks))
    for thread in threads:
        await asyncio.to_thread(thread.join, 10)
    return thread_results, task_results, time.monotonic()


@pytest.mark.asyncio
async def test_fifty_concurrent_closers_share_one_shutdown_and_one_report(make_engine, redis_url, caplog):
    """25 threads in close() and 25 tasks in aclose() at once: one shutdown ran, every caller got its report."""
    caplog.set_level(logging.INFO, logger="poolkeeper.keeper")
    registry = Registry(drain_timeout=10)
    engine = registry.wrap(make_engine(), name="db")
    cache = registry.wrap(redis.Redis.from_url(redis_url), name="cache")
    cache.ping()
    hook_runs: list[float] = []
    registry.on_shutdown(lambda: hook_runs.append(time.monotonic()), name="flush", depends_on=["db", "cache"])
    with engine.connect() as connection:
        connection.execute(sa.text("select 1"))

    started = time.monotonic()
    thread_results, task_results, finished = await fifty_closers(registry)

    reports = {id(result) for result in [*thread_results, *task_results]}
    assert (len(thread_results), len(task_results)) == (25, 25)
    assert reports == {id(registry.report)}
    assert registry.report is not None
    assert registry.report.ok
    assert len(hook_runs) == 1
    for name in ("db", "cache"):
        transitions = [r.getMessage() for r in caplog.records if f"'{name}':" in r.getMessage()]
        assert len(transitions) == 2, transitions  # open -> draining -> closed, once
    assert finished - started < 1.5


@pytest.mark.asyncio
async def test_fifty_closers_with_force_close_callers_all_return_promptly(make_engine, server: Server):
    """pg_sleep borrowed, a 30 s drain: closers mixed with force_close() callers all return forced within 1.5 s."""
    registry = Registry(drain_timeout=30)
    engine = registry.wrap(make_engine(), name="db")
    borrower, errors = start_borrower(engine, "select pg_sleep(60)")
    assert await asyncio.to_thread(server.settle, lambda: bool(server.running("pg_sleep")))

    started = time.monotonic()
    thread_results, task_results, finished = await fifty_closers(registry, forcers=5)
    await asyncio.to_thread(borrower.join, 5)

    report = registry.report
    assert report is not None
    assert {id(result) for result in [*thread_results, *task_results]} == {id(report)}
    assert (report["db"].outcome, report["db"].forced) == ("forced", 1)
    assert finished - started < 1.5
    assert errors
    assert await asyncio.to_thread(server.settle, lambda: not server.backends())


def test_checkouts_racing_the_close_are_each_lent_or_refused_and_all_accounted(make_engine, server: Server):
    """Twenty threads checking out in a loop as close() starts: each is lent or refused, and every lent one drained."""
    registry = Registry(drain_timeout=10)
    engine = registry.wrap(make_engine(pool_size=5, max_overflow=5, pool_timeout=10), name="db")
    go = threading.Event()
    outcomes: list[tuple[int, BaseException | None]] = []
    lock = threading.Lock()

    def worker() -> None:
        served, error = 0, None
        go.wait(10)
        try:
            while True:
                with engine.connect() as connection:
                    connection.execute(sa.text("select 1"))
                served += 1
        except BaseException as caught:
            error = caught
        with lock:
            outcomes.append((served, error))

    workers = [threading.Thread(target=worker, daemon=True) for _ in range(20)]
    for thread in workers:
        thread.start()
    go.set()
    until(lambda: registry["db"].borrowed >= 5)  # the race is on: connections are going in and out
    report = registry.close()
    for thread in workers:
        thread.join(10)

    assert len(outcomes) == 20
    assert all(isinstance(error, PoolClosedError) for _, error in outcomes), outcomes
    item = report["db"]
    assert (item.outcome, item.forced, item.borrowed_at_start) == ("clean", 0, item.returned)
    # Every connection lent when the close began was drained: its borrower finished and was served.
    assert sum(served for served, _ in outcomes) >= item.borrowed_at_start >= 5
    assert (registry["db"].borrowed, engine.pool.checkedout()) == (0, 0)
    assert server.settle(lambda: not server.backends())


# -- cancellation at every stage, against the real server -------------------------------------------


@pytest.mark.asyncio
async def test_cancelled_before_the_drain_the_database_is_force_closed(make_engine, server: Server):
    """Cancelled while a hook that uses the database runs (the database still lends): it is force-closed anyway."""
    registry = Registry(drain_timeout=30)
    engine = registry.wrap(make_engine(), name="db")
    hook_running = asyncio.Event()

    @registry.on_shutdown(name="uses-db", depends_on=["db"])
    async def uses_db() -> None:
        hook_running.set()
        await asyncio.Event().wait()

    borrower, errors = start_borrower(engine, "select pg_sleep(60)")
    assert await asyncio.to_thread(server.settle, lambda: bool(server.running("pg_sleep")))
    closing = asyncio.ensure_future(registry.aclose())
    await hook_running.wait()
    assert registry["db"].lending  # still open: the hook that uses it runs first

    cancelled = time.monotonic()
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    assert time.monotonic() - cancelled < CANCEL_BOUND
    await asyncio.to_thread(borrower.join, 5)

    assert registry.report is not None
    assert registry.report["db"].outcome == "forced"
    assert registry["db"].state is KeeperState.CLOSED
    assert errors
    assert await asyncio.to_thread(server.settle, lambda: not server.backends())


@pytest.mark.asyncio
async def test_cancelled_during_the_drain_the_database_is_force_closed(make_engine, server: Server):
    """Cancelled while a sync engine drains a pg_sleep: the query is cancelled on the server before it propagates."""
    registry = Registry(drain_timeout=30)
    engine = registry.wrap(make_engine(), name="db")
    borrower, errors = start_borrower(engine, "select pg_sleep(60)")
    assert await asyncio.to_thread(server.settle, lambda: bool(server.running("pg_sleep")))
    closing = asyncio.ensure_future(registry.aclose())
    await auntil(lambda: registry["db"].state is KeeperState.DRAINING)

    cancelled = time.monotonic()
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    assert time.monotonic() - cancelled < 1.0
    await asyncio.to_thread(borrower.join, 5)

    assert registry.report is not None
    assert registry.report["db"].outcome == "forced"
    assert errors
    # Cancelled on the server, which ends the statement moments later: settle, never assert at once.
    assert await asyncio.to_thread(server.settle, lambda: server.running("pg_sleep") == [])
    assert await asyncio.to_thread(server.settle, lambda: not server.backends())


@pytest.fixture
def pg_proxy(pg_url: str) -> Iterator[BlackholeProxy]:
    with BlackholeProxy("127.0.0.1", sa.make_url(pg_url).port or 5432) as proxy:
        yield proxy


@pytest_asyncio.fixture
async def stuck_in_force(
    pg_proxy: BlackholeProxy, pg_url: str, application_name: str, server: Server
) -> AsyncIterator[Callable[[str], Any]]:
    """A PostgreSQL resource whose server went silent under a borrower: its force-close waits on a cancel request."""
    pools: list[asyncpg.Pool] = []
    borrowers: list[asyncio.Task[None]] = []
    url = sa.make_url(pg_url).set(host=pg_proxy.host, port=pg_proxy.port)

    async def make(library: str) -> tuple[Registry, list[BaseException]]:
        # close_timeout 8: the cancel request gets half of it, far beyond the 2 s cancellation grace.
        registry = Registry(drain_timeout=0.2, close_timeout=8)
        errors: list[BaseException] = []
        if library == "sqlalchemy":
            engine = registry.wrap(
                sa.create_engine(
                    url.set(drivername="postgresql+psycopg"), connect_args={"application_name": application_name}
                ),
                name="db",
            )
            _, errors = start_borrower(engine, "select pg_sleep(60)")
        else:
            pool = registry.wrap(
                await asyncpg.create_pool(
                    url.render_as_string(hide_password=False),
                    min_size=1,
                    max_size=1,
                    server_settings={"application_name": application_name},
                ),
                name="db",
            )
            pools.append(pool)

            async def sleep_on_pool() -> None:
                try:
                    async with pool.acquire() as connection:
                        await connection.fetchval("select pg_sleep(60)")
                except Exception as error:
                    errors.append(error)

            borrowers.append(asyncio.ensure_future(sleep_on_pool()))
        assert await asyncio.to_thread(server.settle, lambda: bool(server.running("pg_sleep")))
        pg_proxy.blackhole()
        return registry, errors

    yield make
    for pool in pools:
        pool.terminate()


@pytest.mark.asyncio
@pytest.mark.parametrize("library", ["sqlalchemy", "asyncpg"])
async def test_cancelled_during_the_force_close_the_borrower_is_still_cut_off(library, stuck_in_force, pg_proxy):
    """Cancelled while the force-close waits on a silent server: the borrower still errors, its socket is closed."""
    registry, errors = await stuck_in_force(library)
    borrowed_sockets = local_ports_to(pg_proxy.port)  # before the force-close opens its cancel request
    closing = asyncio.ensure_future(registry.aclose())
    await auntil(lambda: registry["db"].state is KeeperState.FORCING)
    await asyncio.sleep(0.1)  # the cancel request is on its way to the silent server; no event marks it

    cancelled = time.monotonic()
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    assert time.monotonic() - cancelled < CANCEL_BOUND
    await auntil(lambda: bool(errors), timeout=1.0)
    assert len(borrowed_sockets) == 1
    assert local_ports_to(pg_proxy.port) & borrowed_sockets == set()
    assert registry["db"].state is KeeperState.CLOSED


# -- cancellation at every stage of the keeper, step by step (in-memory pool, the core alone) ------------


@pytest.fixture
def fake_pool() -> Iterator[Callable[..., tuple[Registry, FakePool]]]:
    """A registry with one in-memory FakePool wrapped as "fake"."""
    with fake_adapter():

        def make(**options: Any) -> tuple[Registry, FakePool]:
            registry = Registry(**options)
            pool = registry.wrap(FakePool(), name="fake")
            return registry, pool

        yield make


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "stage",
    ["draining", "forcing", "closing"],
)
async def test_a_cancelled_shutdown_still_closes_every_connection_whatever_stage_it_was_in(stage, fake_pool):
    """Cancelled while draining, force-closing or closing: every connection ends closed, checkouts stay refused."""
    registry, pool = fake_pool(drain_timeout=30, close_timeout=30)
    driver = registry["fake"].driver
    assert isinstance(driver, FakeDriver)
    driver.hang_force = stage == "forcing"
    driver.hang_close = stage == "closing"
    borrowed = pool.checkout()
    idle = pool.checkout()
    idle.give_back()
    if stage == "closing":
        borrowed.give_back()  # nothing to force: the close is the stage that hangs
    closing = asyncio.ensure_future(registry.aclose())
    if stage == "forcing":
        await auntil(lambda: registry["fake"].state is KeeperState.DRAINING)
        assert registry.force_close() is None  # on the closing loop: ends the drain now
    reached = {"draining": driver.refused, "forcing": driver.force_started, "closing": driver.close_started}[stage]
    await auntil(reached.is_set)

    cancelled = time.monotonic()
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    elapsed = time.monotonic() - cancelled

    assert elapsed < (0.5 if stage == "draining" else CANCEL_BOUND)
    assert pool.open_connections() == []
    assert registry.report is not None
    with pytest.raises(PoolClosedError):
        pool.checkout()
    if stage == "draining":
        assert registry.report["fake"].forced == 1
        assert registry["fake"].state is KeeperState.CLOSED
    else:  # the step that hung was abandoned at the grace: reported as such
        assert registry.report["fake"].outcome == "failed"
        assert "cancelled" in (registry.report["fake"].error or "")


@pytest.mark.asyncio
async def test_cancelling_one_waiting_caller_does_not_cancel_the_shutdown(fake_pool):
    """A second aclose() caller cancelled while it waits stops waiting; the shutdown and its other callers go on."""
    registry, pool = fake_pool(drain_timeout=30)
    handle = pool.checkout()
    owner = asyncio.ensure_future(registry.aclose())
    await auntil(lambda: registry["fake"].state is KeeperState.DRAINING)
    waiter = asyncio.ensure_future(registry.aclose())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert not owner.done()
    handle.give_back()
    report = await owner
    assert (report["fake"].outcome, report["fake"].returned) == ("clean", 1)


# -- a library without an event loop: the drain's end closes the idle connections at once --------


def sync_fake_pool(
    make: Callable[..., tuple[Registry, FakePool]], **options: Any
) -> tuple[Registry, FakePool, FakeDriver]:
    registry, pool = make(**options)
    driver = registry["fake"].driver
    assert isinstance(driver, FakeDriver)
    driver.blocking = True  # offers blocking_close(), as the sync SQLAlchemy and redis drivers do
    return registry, pool, driver


def test_a_sync_library_closes_its_idle_connections_in_the_thread_the_last_return_wakes(fake_pool):
    """The last return wakes the thread waiting for the drain, which closes the idle connections itself."""
    registry, pool, driver = sync_fake_pool(fake_pool, drain_timeout=30, close_timeout=5)
    borrowed = pool.checkout()
    pool.checkout().give_back()  # one idle connection besides
    reports: list[ShutdownReport] = []
    closer = threading.Thread(target=lambda: reports.append(registry.close()))
    closer.start()
    until(lambda: registry["fake"].state is KeeperState.DRAINING)
    assert not driver.close_started.is_set()  # nothing is closed while a connection is out
    borrowed.give_back()
    closer.join(timeout=30)
    report = reports[0]["fake"]
    assert (report.outcome, report.returned, report.forced, report.error) == ("clean", 1, 0, None)
    assert pool.open_connections() == []
    assert driver.closed_by == ["poolkeeper-drain-close"]


def test_a_sync_librarys_close_that_hangs_is_cut_at_close_timeout():
    """A blocking close that never returns holds close() no longer than close_timeout, and is reported."""
    with fake_adapter():
        registry = Registry(drain_timeout=30, close_timeout=0.5)
        pool = registry.wrap(FakePool(), name="fake")
        driver = registry["fake"].driver
        assert isinstance(driver, FakeDriver)
        driver.blocking = driver.hang_close = True
        pool.checkout().give_back()
        started = time.monotonic()
        report = registry.close()["fake"]
        elapsed = time.monotonic() - started
        try:
            assert 0.5 <= elapsed < 2.5
            assert report.outcome == "failed"
            assert (report.error or "").startswith("close: ")
            with pytest.raises(PoolClosedError):
                pool.checkout()
        finally:
            driver.unblock.set()
        until(lambda: pool.open_connections() == [])  # the close goes on once unblocked


def test_a_sync_librarys_drain_cut_short_forces_then_closes_as_usual(fake_pool):
    """A borrow still out at drain_timeout is forced; the idle connections then close through close_connections()."""
    registry, pool, driver = sync_fake_pool(fake_pool, drain_timeout=0.2, close_timeout=5)
    borrowed = pool.checkout()
    pool.checkout().give_back()
    report = registry.close()["fake"]
    assert (report.outcome, report.forced, report.forced_by) == ("forced", 1, "drain_timeout")
    assert pool.open_connections() == []
    assert "poolkeeper-drain-close" not in driver.closed_by
    borrowed.give_back()
