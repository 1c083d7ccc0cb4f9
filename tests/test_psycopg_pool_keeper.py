"""The psycopg_pool keeper (ConnectionPool, NullConnectionPool, their async twins), against the real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import psycopg
import psycopg_pool
import pytest
import pytest_asyncio

import poolkeeper
from poolkeeper import KeeperState, PoolClosedError, RegistrationError, Registry
from poolkeeper.adapters.psycopg_pool import PsycopgPoolClosedError
from tests.conftest import Server
from tests.faults.proxy import BlackholeProxy
from tests.waiting import auntil, until

PASSWORD = "pk-psycopg-pool-s3cret-pw"
SLEEP = "select pg_sleep(60)"
SYNC_POOLS = {"pool": psycopg_pool.ConnectionPool, "null": psycopg_pool.NullConnectionPool}
ASYNC_POOLS = {"pool": psycopg_pool.AsyncConnectionPool, "null": psycopg_pool.AsyncNullConnectionPool}


def conninfo(pg_url: str, application_name: str, *, password: str | None = None, port: int | None = None) -> str:
    """``pg_url`` with this test's application name (and a password, or another port)."""
    parts = urllib.parse.urlsplit(pg_url)
    netloc = f"{parts.username or 'postgres'}{':' + password if password else ''}@{parts.hostname}:{port or parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, f"application_name={application_name}", ""))


@pytest.fixture
def make_pool(pg_url: str, application_name: str) -> Iterator[Callable[..., Any]]:
    """Build open sync pools tagged with this test's application name; closed at teardown."""
    pools: list[Any] = []

    def make(kind: str = "pool", *, password: str | None = None, port: int | None = None, **options: Any) -> Any:
        if kind == "pool":
            options.setdefault("min_size", 1)
        options.setdefault("max_size", 2)
        options.setdefault("open", True)
        pool = SYNC_POOLS[kind](conninfo(pg_url, application_name, password=password, port=port), **options)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        with contextlib.suppress(Exception):
            pool.close(timeout=1)


@pytest_asyncio.fixture
async def make_async_pool(pg_url: str, application_name: str) -> AsyncIterator[Callable[..., Any]]:
    """Build open async pools tagged with this test's application name; closed at teardown."""
    pools: list[Any] = []

    async def make(kind: str = "pool", **options: Any) -> Any:
        if kind == "pool":
            options.setdefault("min_size", 1)
        options.setdefault("max_size", 2)
        pool = ASYNC_POOLS[kind](conninfo(pg_url, application_name), open=False, **options)
        await pool.open()
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        with contextlib.suppress(Exception):
            await pool.close(timeout=1)


class Borrower(threading.Thread):
    """A thread holding a pool connection: runs ``query`` on it, or holds it until released."""

    def __init__(self, pool: Any, query: str | None = None) -> None:
        super().__init__(daemon=True)
        self.pool, self.query = pool, query
        self.holding, self.release = threading.Event(), threading.Event()
        self.error: BaseException | None = None
        self.failed_at: float | None = None

    def run(self) -> None:
        try:
            with self.pool.connection() as connection:
                connection.execute("select 1")
                self.holding.set()
                if self.query is None:
                    self.release.wait(30)
                else:
                    connection.execute(self.query)
        except BaseException as error:
            self.error, self.failed_at = error, time.monotonic()


def pool_threads(pool: Any) -> list[str]:
    """The pool's own background threads still alive (its scheduler and workers)."""
    return [thread.name for thread in threading.enumerate() if thread.name.startswith(f"{pool.name}-")]


def pool_tasks(pool: Any) -> list[str]:
    """The async pool's own background tasks still running (its scheduler and workers)."""
    return [task.get_name() for task in asyncio.all_tasks() if task.get_name().startswith(f"{pool.name}-")]


# -- the same pool, still working, counted ------------------------------------------------------


@pytest.mark.parametrize("kind", list(SYNC_POOLS))
def test_wrap_returns_the_same_pool_and_every_pool_method_still_works(kind, make_pool, server: Server):
    """wrap() returns the same pool, still of its class; connection(), getconn()/putconn() work and are counted."""
    pool = make_pool(kind)
    registry = Registry()
    assert registry.wrap(pool, name="pg") is pool
    assert isinstance(pool, SYNC_POOLS[kind])
    keeper = registry["pg"]
    with pool.connection() as connection:
        assert keeper.borrowed == 1
        assert connection.execute("select 41 + 1").fetchone() == (42,)
    assert keeper.borrowed == 0
    connection = pool.getconn()
    assert keeper.borrowed == 1
    pool.putconn(connection)
    assert keeper.borrowed == 0
    assert registry.wrap(pool, name="pg") is pool  # twice: one keeper
    assert len(registry) == 1

    report = registry.close()
    assert (report["pg"].outcome, report["pg"].kind) == ("clean", "psycopg_pool")
    assert pool.closed
    assert server.settle(lambda: server.backends() == []), server.backends()


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", list(ASYNC_POOLS))
async def test_async_pools_are_wrapped_in_place_and_counted(kind, make_async_pool, server: Server):
    """An async pool is returned as it is; its checkouts are counted and its close is clean."""
    pool = await make_async_pool(kind)
    registry = Registry()
    assert registry.wrap(pool, name="pg") is pool
    assert isinstance(pool, ASYNC_POOLS[kind])
    async with pool.connection() as connection:
        assert registry["pg"].borrowed == 1
        assert await (await connection.execute("select 1")).fetchone() == (1,)
    assert registry["pg"].borrowed == 0
    report = await registry.aclose()
    assert report["pg"].outcome == "clean"
    assert pool.closed
    assert pool_tasks(pool) == []
    assert server.settle(lambda: server.backends() == []), server.backends()


# -- refusal and waiting clients --------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(SYNC_POOLS))
def test_checkouts_are_refused_while_draining_with_psycopg_pools_own_error(kind, make_pool):
    """From closing on, connection() and getconn() raise PoolClosedError, which is also psycopg_pool.PoolClosed."""
    pool = make_pool(kind)
    registry = Registry(drain_timeout=10)
    registry.wrap(pool, name="pg")
    borrower = Borrower(pool)
    borrower.start()
    assert borrower.holding.wait(5)
    closing = threading.Thread(target=registry.close)
    closing.start()
    until(lambda: registry["pg"].state is KeeperState.DRAINING)

    with pytest.raises(PoolClosedError, match="'pg' is draining"), pool.connection():
        pass
    with pytest.raises(psycopg_pool.PoolClosed):
        pool.getconn(timeout=5)
    with pytest.raises(psycopg.OperationalError):
        pool.open()  # no worker is started again once closing started

    borrower.release.set()
    borrower.join(5)
    closing.join(5)
    assert registry.report is not None
    assert (registry.report["pg"].outcome, registry.report["pg"].returned) == ("clean", 1)
    with pytest.raises(PsycopgPoolClosedError, match="'pg' is closed"):
        pool.getconn()


def test_threads_waiting_in_the_pools_queue_are_woken_at_once(make_pool):
    """Threads queued for a connection fail with the refusal as closing starts, not after the pool's timeout."""
    pool = make_pool(min_size=1, max_size=1, timeout=30)
    registry = Registry(drain_timeout=10)
    registry.wrap(pool, name="pg")
    borrower = Borrower(pool)
    borrower.start()
    assert borrower.holding.wait(5)
    failures: list[tuple[float, BaseException]] = []

    def wait_for_a_connection() -> None:
        try:
            with pool.connection():
                pass
        except Exception as error:
            failures.append((time.monotonic(), error))

    waiters = [threading.Thread(target=wait_for_a_connection) for _ in range(3)]
    for waiter in waiters:
        waiter.start()
    until(lambda: len(pool._waiting) == 3)
    closing = threading.Thread(target=registry.close)
    started = time.monotonic()
    closing.start()
    for waiter in waiters:
        waiter.join(5)

    assert len(failures) == 3
    assert all(isinstance(error, PsycopgPoolClosedError) for _, error in failures)
    assert max(at for at, _ in failures) - started < 2.0  # the pool's own timeout is 30 s
    borrower.release.set()
    closing.join(5)
    assert registry.report is not None
    assert registry.report["pg"].outcome == "clean"


@pytest.mark.asyncio
async def test_tasks_waiting_in_the_async_pools_queue_are_woken_at_once(make_async_pool):
    """Tasks queued in an AsyncConnectionPool fail with the refusal as closing starts."""
    pool = await make_async_pool(min_size=1, max_size=1, timeout=30)
    registry = Registry(drain_timeout=10)
    registry.wrap(pool, name="pg")
    held, release = asyncio.Event(), asyncio.Event()

    async def hold() -> None:
        async with pool.connection():
            held.set()
            await release.wait()

    async def wait_for_a_connection() -> float:
        with pytest.raises(psycopg_pool.PoolClosed):
            async with pool.connection():
                pass
        return time.monotonic()

    holder = asyncio.ensure_future(hold())
    await held.wait()
    waiters = [asyncio.ensure_future(wait_for_a_connection()) for _ in range(3)]
    await auntil(lambda: len(pool._waiting) == 3)
    started = time.monotonic()
    closing = asyncio.ensure_future(registry.aclose())
    woken = await asyncio.wait_for(asyncio.gather(*waiters), 5)
    assert max(woken) - started < 2.0
    release.set()
    await holder
    assert (await closing)["pg"].outcome == "clean"


# -- drain, force, close ------------------------------------------------------------------------------


def test_clean_drain_wakes_the_closer_on_the_last_return(make_pool, server: Server):
    """The closer returns as soon as the last connection comes back, not at the drain timeout."""
    pool = make_pool()
    registry = Registry(drain_timeout=20)
    registry.wrap(pool, name="pg")
    borrower = Borrower(pool)
    borrower.start()
    assert borrower.holding.wait(5)
    closing = threading.Thread(target=registry.close)
    closing.start()
    until(lambda: registry["pg"].state is KeeperState.DRAINING)
    released = time.monotonic()
    borrower.release.set()
    closing.join(10)
    assert time.monotonic() - released < 3.0
    item = registry.report["pg"] if registry.report else None
    assert item is not None
    assert (item.outcome, item.borrowed_at_start, item.returned, item.forced) == ("clean", 1, 1, 0)
    assert borrower.error is None
    assert server.settle(lambda: server.backends() == []), server.backends()


@pytest.mark.parametrize("kind", list(SYNC_POOLS))
def test_force_close_cancels_the_query_on_the_server_and_leaves_no_backend(kind, make_pool, server: Server):
    """At the drain timeout the running statement is cancelled on the server and the borrower fails at once."""
    pool = make_pool(kind)
    registry = Registry(drain_timeout=0.3, close_timeout=5)
    registry.wrap(pool, name="pg")
    borrower = Borrower(pool, SLEEP)
    borrower.start()
    assert borrower.holding.wait(5)
    assert server.settle(lambda: server.sleeping() != [])

    started = time.monotonic()
    report = registry.close()
    borrower.join(5)
    assert time.monotonic() - started < 5
    item = report["pg"]
    assert (item.outcome, item.borrowed_at_start, item.forced, item.error) == ("forced", 1, 1, None)
    assert isinstance(borrower.error, psycopg.Error)
    assert server.settle(lambda: server.backends() == []), server.backends()
    assert pool_threads(pool) == []


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", list(ASYNC_POOLS))
async def test_async_force_close_cancels_the_query_and_stops_every_task(kind, make_async_pool, server: Server):
    """An async pool's borrower is cut at the deadline; no backend, no scheduler or worker task is left."""
    pool = await make_async_pool(kind)
    registry = Registry(drain_timeout=0.3, close_timeout=5)
    registry.wrap(pool, name="pg")

    async def run_query() -> BaseException:
        try:
            async with pool.connection() as connection:
                await connection.execute(SLEEP)
        except Exception as error:
            return error
        raise AssertionError("the query was not interrupted")

    running = asyncio.ensure_future(run_query())
    assert await asyncio.to_thread(server.settle, lambda: server.sleeping() != [])
    assert pool_tasks(pool) != [] or kind == "null"
    report = await registry.aclose()
    error = await asyncio.wait_for(running, 5)
    assert isinstance(error, psycopg.Error)
    assert (report["pg"].outcome, report["pg"].forced) == ("forced", 1)
    assert pool_tasks(pool) == []
    assert await asyncio.to_thread(server.settle, lambda: server.backends() == []), server.backends()


def test_many_borrowed_connections_are_cancelled_on_the_server_together(make_pool, server: Server):
    """Ten borrowers running a query are all cancelled (one pg_cancel_backend query) and cut."""
    pool = make_pool(min_size=10, max_size=10)
    registry = Registry(drain_timeout=0.2, close_timeout=5)
    registry.wrap(pool, name="pg")
    borrowers = [Borrower(pool, SLEEP) for _ in range(10)]
    for borrower in borrowers:
        borrower.start()
    assert server.settle(lambda: len(server.sleeping()) == 10, timeout=10)
    report = registry.close()
    for borrower in borrowers:
        borrower.join(5)
    assert (report["pg"].outcome, report["pg"].forced) == ("forced", 10)
    assert all(isinstance(borrower.error, psycopg.Error) for borrower in borrowers)
    assert server.settle(lambda: server.backends() == []), server.backends()


def test_workers_are_stopped_and_no_connection_is_opened_once_closing_started(make_pool, server: Server):
    """Closing stops the scheduler and every worker thread; a drained connection is not replaced by a new one."""
    pool = make_pool(min_size=2, max_size=2, num_workers=2)
    pool.wait(5)
    registry = Registry(drain_timeout=10)
    registry.wrap(pool, name="pg")
    assert len(pool_threads(pool)) == 3
    borrower = Borrower(pool)
    borrower.start()
    assert borrower.holding.wait(5)
    closing = threading.Thread(target=registry.close)
    closing.start()
    until(lambda: registry["pg"].state is KeeperState.DRAINING)
    server.terminate_all()  # the borrowed connection breaks: psycopg_pool would open a replacement
    borrower.release.set()
    closing.join(10)
    assert registry.report is not None
    assert pool_threads(pool) == []
    assert server.settle(lambda: server.backends() == []), server.backends()
    assert pool.get_stats().get("connections_num", 0) == 2


# -- the pool's own close ----------------------------------------------------------------------------


def test_pool_close_runs_the_keepers_close_and_the_registry_reports_it_once(make_pool, server: Server, caplog):
    """pool.close() (or leaving `with pool:`) drains, forces at the drain timeout; the registry reports that close."""
    pool = make_pool()
    registry = Registry(drain_timeout=0.3)
    registry.wrap(pool, name="pg")
    borrower = Borrower(pool, SLEEP)
    borrower.start()
    assert borrower.holding.wait(5)
    assert server.settle(lambda: server.sleeping() != [])
    with caplog.at_level(logging.INFO, logger="poolkeeper.psycopg_pool"):
        pool.close(timeout=2)
    borrower.join(5)
    assert isinstance(borrower.error, psycopg.Error)
    assert "closed by ConnectionPool.close(): forced" in caplog.text
    assert registry["pg"].state is KeeperState.CLOSED
    assert server.settle(lambda: server.backends() == []), server.backends()
    report = registry.close()
    assert (report["pg"].outcome, report["pg"].forced) == ("forced", 1)
    pool.close()  # once more: nothing happens


def test_pool_close_during_the_registrys_shutdown_waits_for_that_close(make_pool, server: Server):
    """`with pool:` ending while the registry drains waits for the registry's close; one close, one report."""
    pool = make_pool()
    registry = Registry(drain_timeout=10)
    registry.wrap(pool, name="pg")
    borrower = Borrower(pool)
    borrower.start()
    assert borrower.holding.wait(5)
    closing = threading.Thread(target=registry.close)
    closing.start()
    until(lambda: registry["pg"].state is KeeperState.DRAINING)
    own_close = threading.Thread(target=pool.__exit__, args=(None, None, None))
    own_close.start()
    own_close.join(0.2)
    assert own_close.is_alive()  # waiting for the drain, like the registry
    borrower.release.set()
    closing.join(5)
    own_close.join(5)
    assert not own_close.is_alive()
    assert registry.report is not None
    item = registry.report["pg"]
    assert (item.outcome, item.returned, item.error) == ("clean", 1, None)
    assert server.settle(lambda: server.backends() == []), server.backends()


@pytest.mark.asyncio
async def test_async_pool_close_runs_the_keepers_close(make_async_pool, server: Server):
    """`async with pool:` ending runs the keeper's close; the registry reports it afterwards."""
    pool = await make_async_pool()
    registry = Registry(drain_timeout=5)
    registry.wrap(pool, name="pg")
    async with pool.connection() as connection:
        await connection.execute("select 1")
    await pool.__aexit__(None, None, None)
    assert registry["pg"].state is KeeperState.CLOSED
    assert pool_tasks(pool) == []
    report = await registry.aclose()
    assert report["pg"].outcome == "clean"
    assert await asyncio.to_thread(server.settle, lambda: server.backends() == []), server.backends()


# -- a silent server ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(SYNC_POOLS))
def test_force_close_of_a_query_on_a_blackholed_server_keeps_the_deadline(kind, make_pool, pg_url: str, server: Server):
    """A borrower stuck on a silent server is cut within the deadline; the report says the cancel went unconfirmed."""
    proxy = BlackholeProxy("127.0.0.1", urllib.parse.urlsplit(pg_url).port or 5432).start()
    try:
        # One connection, made before the fault: no worker is connecting when the server goes
        # silent (a connect without connect_timeout waits for it forever; see the docs).
        pool = make_pool(kind, port=proxy.port, max_size=1)
        if kind == "pool":
            pool.wait(5)
        registry = Registry(drain_timeout=30, close_timeout=10)
        registry.wrap(pool, name="pg")
        borrower = Borrower(pool, SLEEP)
        borrower.start()
        assert borrower.holding.wait(5)
        assert server.settle(lambda: server.sleeping() != [])
        proxy.blackhole()
        started = time.monotonic()
        report = registry.close(deadline=1.0)
        elapsed = time.monotonic() - started
        borrower.join(3)
        assert elapsed < 1.0 + 1.5
        assert borrower.failed_at is not None
        assert borrower.failed_at - started < 1.0 + 1.5
        item = report["pg"]
        assert (item.outcome, item.forced) == ("failed", 1)
        assert item.error is not None
        assert "cancel" in item.error
        # The deadline may cut the close step short while psycopg_pool's close() still joins its
        # workers in a thread of its own: they have been told to stop, and stop at once.
        until(lambda: pool_threads(pool) == [], timeout=2.0)
    finally:
        proxy.stop()


# -- bad input and secrets --------------------------------------------------------------------------


def test_bad_wraps_are_refused_and_leave_the_pool_untouched(make_pool):
    """A closed pool, or one another registry manages, is refused with a clear error; nothing half registered."""
    closed = make_pool()
    closed.close()
    registry = Registry()
    with pytest.raises(ValueError, match="resource: this psycopg_pool ConnectionPool is already closed"):
        registry.wrap(closed, name="closed")
    assert len(registry) == 0

    pool = make_pool()
    Registry().wrap(pool, name="first")
    with pytest.raises(RegistrationError, match="already managed by another registry as 'first'"):
        registry.wrap(pool, name="second")
    assert len(registry) == 0
    with pool.connection() as connection:
        assert connection.execute("select 1").fetchone() == (1,)


def test_unwrap_gives_the_pool_its_own_behaviour_back(make_pool):
    """After unwrap() the pool has its own class again and lends after the registry closed."""
    pool = make_pool()
    registry = Registry()
    registry.wrap(pool, name="pg")
    registry.unwrap("pg")
    assert type(pool) is psycopg_pool.ConnectionPool
    assert type(pool._waiting).__module__ == "collections"
    registry.close()
    with pool.connection() as connection:
        assert connection.execute("select 1").fetchone() == (1,)


def test_the_password_reaches_no_report_and_no_log(make_pool, pg_url: str, caplog):
    """The conninfo's password is in no report, no describe(), no log line, also when the keeper is forced."""
    pool = make_pool(password=PASSWORD)
    registry = Registry(drain_timeout=0.2)
    registry.wrap(pool, name="pg")
    keeper = registry["pg"]
    parts = urllib.parse.urlsplit(pg_url)
    target = f"{parts.hostname}:{parts.port or 5432}{parts.path}"
    assert keeper.driver.describe() == target
    assert PASSWORD in keeper.driver.secrets()
    borrower = Borrower(pool, SLEEP)
    borrower.start()
    assert borrower.holding.wait(5)
    with caplog.at_level(logging.DEBUG):
        report = registry.close()
    borrower.join(5)
    shown = str(report) + json.dumps(report.to_dict()) + caplog.text + repr(keeper)
    assert report["pg"].target == target
    assert PASSWORD not in shown


def test_the_default_registry_wraps_it_by_class_name(make_pool):
    """poolkeeper.wrap() finds the adapter from the class (a NullConnectionPool too) and names it in errors."""
    pool = make_pool("null")
    registry = Registry()
    assert registry.wrap(pool, name="pg") is pool
    assert "psycopg_pool NullConnectionPool" in poolkeeper.adapters.SUPPORTED
    registry.close()


# -- fork ------------------------------------------------------------------------------------------

FORK_PROGRAM = """
import json, os, sys
import psycopg_pool
from poolkeeper import Registry

pool = psycopg_pool.ConnectionPool(sys.argv[1], min_size=2, max_size=2, open=True)
pool.wait(10)
registry = Registry(drain_timeout=1)
registry.wrap(pool, name="pg")
held = pool.getconn()
backend = held.info.backend_pid
child = os.fork()
if child == 0:
    item = registry.close()["pg"]
    os._exit(0 if (item.outcome, item.borrowed_at_start, item.forced) == ("clean", 0, 0) else 3)
_, status = os.waitpid(child, 0)
after = held.execute("select pg_backend_pid()").fetchone()[0]
pool.putconn(held)
with pool.connection() as connection:
    connection.execute("select 1")
item = registry.close()["pg"]
print(json.dumps({"child": os.waitstatus_to_exitcode(status), "backend": backend, "after": after,
                  "outcome": item.outcome}))
"""


def test_a_forked_childs_close_leaves_the_parents_connections_alone(pg_url: str, application_name: str):
    """A child closing its registry neither cuts nor closes the connections the parent's pool holds."""
    completed = subprocess.run(
        [sys.executable, "-c", FORK_PROGRAM, conninfo(pg_url, application_name)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout.splitlines()[-1])
    assert result["child"] == 0, completed.stderr
    assert result["after"] == result["backend"]  # the parent's borrowed connection still works
    assert result["outcome"] == "clean"


@pytest.mark.asyncio
async def test_a_cancelled_pool_close_still_cancels_the_query_on_the_server(make_async_pool, server: Server):
    """`wait_for(pool.close(), t)` cut short force-closes the pool: the borrower fails, no backend keeps running."""
    pool = await make_async_pool()
    registry = Registry(drain_timeout=30)
    registry.wrap(pool, name="pg")

    async def run_query() -> BaseException:
        try:
            async with pool.connection() as connection:
                await connection.execute(SLEEP)
        except Exception as error:
            return error
        raise AssertionError("the query was not interrupted")

    running = asyncio.ensure_future(run_query())
    assert await asyncio.to_thread(server.settle, lambda: server.sleeping() != [])
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(pool.close(), 0.3)
    assert isinstance(await asyncio.wait_for(running, 5), psycopg.Error)
    assert await asyncio.to_thread(server.settle, lambda: server.backends() == []), server.backends()
    report = await asyncio.wait_for(registry.aclose(), 5)
    assert (report["pg"].outcome, report["pg"].forced) == ("forced", 1)
    assert pool_tasks(pool) == []


def test_a_psycopg_pool_lacking_a_needed_name_is_refused_at_wrap_time(make_pool, monkeypatch):
    """A psycopg_pool release without a method the adapter overrides is refused by wrap(), naming version and range."""
    pool = make_pool()
    monkeypatch.delattr(psycopg_pool.ConnectionPool, "run_task")
    registry = Registry()
    with pytest.raises(poolkeeper.UnsupportedResourceError, match=r"lacks ConnectionPool\.run_task; .* >=3\.2\.0"):
        registry.wrap(pool, name="pg")
    assert len(registry) == 0


def test_an_async_pool_on_another_threads_loop_is_closed_there_by_a_sync_close(pg_url, application_name, server):
    """registry.close() from a thread without a loop wakes the pool's queued tasks and forces its borrower there."""
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, daemon=True)
    runner.start()

    def on_loop(coroutine: Any, timeout: float = 10) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout)

    async def open_pool() -> Any:
        pool = psycopg_pool.AsyncConnectionPool(conninfo(pg_url, application_name), min_size=1, max_size=1, open=False)
        await pool.open(wait=True)
        return pool

    async def run_query() -> BaseException | None:
        try:
            async with pool.connection() as connection:
                await connection.execute(SLEEP)
        except Exception as error:
            return error
        return None

    async def wait_for_a_connection() -> BaseException | None:
        try:
            async with pool.connection(timeout=30):
                pass
        except Exception as error:
            return error
        return None

    try:
        pool = on_loop(open_pool())
        registry = Registry(drain_timeout=0.3)
        registry.wrap(pool, name="pg")
        running = asyncio.run_coroutine_threadsafe(run_query(), loop)
        assert server.settle(lambda: server.sleeping() != [])
        waiting = asyncio.run_coroutine_threadsafe(wait_for_a_connection(), loop)
        until(lambda: len(pool._waiting) == 1)
        report = registry.close()
        assert (report["pg"].outcome, report["pg"].forced) == ("forced", 1)
        assert isinstance(waiting.result(5), PsycopgPoolClosedError)
        assert isinstance(running.result(5), psycopg.Error)
        assert on_loop(_pool_tasks_on_loop(pool)) == []
        assert server.settle(lambda: server.backends() == []), server.backends()
    finally:
        loop.call_soon_threadsafe(loop.stop)
        runner.join(5)
        loop.close()


async def _pool_tasks_on_loop(pool: Any) -> list[str]:
    return pool_tasks(pool)


def test_a_password_in_the_pools_kwargs_is_scrubbed_too(pg_url: str, application_name: str, caplog):
    """Django passes the password in kwargs: it is a secret of the keeper and shows in no report or log."""
    parts = urllib.parse.urlsplit(pg_url)
    pool = psycopg_pool.ConnectionPool(
        kwargs={
            "host": parts.hostname,
            "port": parts.port or 5432,
            "dbname": parts.path.lstrip("/"),
            "user": parts.username or "postgres",
            "password": PASSWORD,
            "application_name": application_name,
        },
        min_size=1,
        open=True,
    )
    registry = Registry(drain_timeout=0.1)
    registry.wrap(pool, name="pg")
    keeper = registry["pg"]
    assert PASSWORD in keeper.driver.secrets()
    assert keeper.driver.describe() == f"{parts.hostname}:{parts.port or 5432}{parts.path}"
    connection = pool.getconn()  # never returned: forced, named in the report
    with caplog.at_level(logging.DEBUG):
        report = registry.close()
    assert report["pg"].outcome == "forced"
    with pytest.raises(psycopg.OperationalError):  # its socket was cut
        connection.execute("select 1")
    assert PASSWORD not in str(report) + json.dumps(report.to_dict()) + caplog.text
