"""The asyncpg keeper, against the real PostgreSQL server."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import psycopg
import pytest
import pytest_asyncio

from poolkeeper import KeeperState, PoolClosedError, RegistrationError, Registry
from tests.conftest import Server, descriptors_left, open_descriptors
from tests.waiting import auntil

pytestmark = pytest.mark.asyncio

PASSWORD = "pk-asyncpg-s3cret-pw"
SLEEP = "select pg_sleep(60)"


@pytest_asyncio.fixture
async def make_pool(pg_url: str, application_name: str) -> AsyncIterator[Callable[..., Awaitable[asyncpg.Pool]]]:
    pools: list[asyncpg.Pool] = []

    async def make(*, dsn: str | None = None, initialize: bool = True, **options: Any) -> asyncpg.Pool:
        options.setdefault("min_size", 1)
        options.setdefault("max_size", 2)
        pool = asyncpg.create_pool(dsn or pg_url, server_settings={"application_name": application_name}, **options)
        pools.append(pool)
        return await pool if initialize else pool

    yield make
    for pool in pools:
        pool.terminate()


def target_of(url: str) -> str:
    """What describe() shows for ``url``: host:port/database."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.hostname}:{parts.port or 5432}{parts.path}"


async def hold(pool: asyncpg.Pool, acquired: asyncio.Event, release: asyncio.Event) -> None:
    async with pool.acquire() as connection:
        await connection.fetchval("select 1")
        acquired.set()
        await release.wait()


async def run_until_interrupted(pool: asyncpg.Pool) -> tuple[float, BaseException]:
    """Run SLEEP on a pool connection; return when and how it failed."""
    try:
        async with pool.acquire() as connection:
            await connection.fetchval(SLEEP)
    except Exception as error:
        return time.monotonic(), error
    raise AssertionError("the query was not interrupted")


async def test_wrap_returns_the_same_pool_and_every_pool_method_still_works(make_pool):
    """wrap() returns the same asyncpg.Pool, still an asyncpg.Pool, and its whole API works and is counted."""
    pool = await make_pool()
    registry = Registry()
    assert registry.wrap(pool, name="pg") is pool
    assert isinstance(pool, asyncpg.Pool)
    keeper = registry["pg"]

    assert await pool.fetchval("select 41 + 1") == 42
    assert [tuple(row) for row in await pool.fetch("select 1, 2")] == [(1, 2)]
    assert tuple(await pool.fetchrow("select 3")) == (3,)
    assert await pool.execute("select 1") == "SELECT 1"
    await pool.executemany("select $1::int", [(1,), (2,)])
    async with pool.acquire() as connection:
        assert keeper.borrowed == 1
        assert await connection.fetchval("select 1") == 1
    connection = await pool.acquire(timeout=5)
    assert (keeper.borrowed, pool.get_idle_size()) == (1, 0)
    await pool.release(connection)
    assert (keeper.borrowed, pool.get_size(), pool.get_max_size()) == (0, pool.get_idle_size(), 2)
    await pool.expire_connections()
    assert await pool.fetchval("select 1") == 1
    assert not pool.is_closing()

    assert (await registry.aclose())["pg"].outcome == "clean"
    assert pool.is_closing()


async def test_wrapping_the_same_pool_twice_registers_once(make_pool):
    """A pool takes no weak reference, yet a second wrap() still returns it without a second keeper."""
    pool = await make_pool()
    registry = Registry()
    assert registry.wrap(pool, name="pg") is pool
    assert registry.wrap(pool, name="pg") is pool
    assert len(registry) == 1
    await registry.aclose()


async def test_acquire_is_refused_while_draining(make_pool):
    """Once closing starts, acquire() in every form and the pool shortcuts raise PoolClosedError."""
    pool = await make_pool()
    registry = Registry(drain_timeout=10)
    registry.wrap(pool, name="pg")
    acquired, release = asyncio.Event(), asyncio.Event()
    holder = asyncio.ensure_future(hold(pool, acquired, release))
    await acquired.wait()
    closing = asyncio.ensure_future(registry.aclose())
    await auntil(lambda: registry["pg"].state is KeeperState.DRAINING)

    with pytest.raises(PoolClosedError, match="'pg' is draining"):
        async with pool.acquire():
            pass
    with pytest.raises(PoolClosedError, match="'pg' is draining"):
        await pool.acquire(timeout=5)
    with pytest.raises(PoolClosedError):
        await pool.fetchval("select 1")
    with pytest.raises(PoolClosedError):
        await pool.execute("select 1")

    release.set()
    await holder
    assert (await closing)["pg"].outcome == "clean"


async def test_tasks_waiting_for_a_connection_are_woken_at_once(make_pool):
    """Tasks waiting in acquire() on an exhausted pool fail with PoolClosedError as soon as closing starts."""
    pool = await make_pool(max_size=1)
    registry = Registry(drain_timeout=10)
    registry.wrap(pool, name="pg")
    acquired, release = asyncio.Event(), asyncio.Event()
    holder = asyncio.ensure_future(hold(pool, acquired, release))
    await acquired.wait()

    async def wait_for_connection(**options: float) -> float:
        try:
            async with pool.acquire(**options):
                pass
        except PoolClosedError:
            return time.monotonic()
        raise AssertionError("the waiter got a connection")

    waiters = [asyncio.ensure_future(wait_for_connection()), asyncio.ensure_future(wait_for_connection(timeout=30))]
    await auntil(lambda: len(pool._queue._getters) == 2)
    started = time.monotonic()
    closing = asyncio.ensure_future(registry.aclose())
    woken_at = await asyncio.wait_for(asyncio.gather(*waiters), 5)
    assert max(woken_at) - started < 0.5
    assert not closing.done()

    release.set()
    await holder
    assert (await closing)["pg"].outcome == "clean"


async def test_clean_drain_wakes_the_closer_on_the_last_release(make_pool, server: Server, pg_url: str):
    """aclose() returns right after the last connection is released, and no backend is left."""
    pool = await make_pool()
    registry = Registry(drain_timeout=20)
    registry.wrap(pool, name="pg")
    acquired, release = asyncio.Event(), asyncio.Event()
    holder = asyncio.ensure_future(hold(pool, acquired, release))
    await acquired.wait()
    closing = asyncio.ensure_future(registry.aclose())
    await asyncio.sleep(0.2)
    assert not closing.done()

    released = time.monotonic()
    release.set()
    report = await asyncio.wait_for(closing, 10)
    assert time.monotonic() - released < 0.3
    await holder
    item = report["pg"]
    assert (item.outcome, item.borrowed_at_start, item.returned, item.forced) == ("clean", 1, 1, 0)
    assert item.target == target_of(pg_url)
    assert server.settle(lambda: server.backends() == []), server.backends()


async def test_a_connection_given_back_while_draining_ends_its_session_at_once(make_pool, pg_url: str, server: Server):
    """Released while another borrower keeps the drain going, a connection in a transaction frees its locks at once.

    It will not be lent again: instead of asyncpg's reset for reuse (a round trip), it is
    terminated, and the server rolls its transaction back then, not at the close.
    """
    pool = await make_pool(min_size=2, max_size=2)
    registry = Registry(drain_timeout=20)
    registry.wrap(pool, name="pg")
    acquired, release = asyncio.Event(), asyncio.Event()
    other = asyncio.ensure_future(hold(pool, acquired, release))  # keeps the drain going
    await acquired.wait()
    locking = await pool.acquire()
    await locking.execute("begin; select pg_advisory_xact_lock(4242)")
    pid = locking.get_server_pid()
    closing = asyncio.ensure_future(registry.aclose())
    await auntil(lambda: registry["pg"].state is KeeperState.DRAINING)

    await pool.release(locking)

    assert server.settle(lambda: pid not in [backend_pid for backend_pid, _, _ in server.backends()])
    assert not closing.done()  # still draining: the other borrower has its connection
    side = await asyncpg.connect(pg_url)
    try:
        assert await side.fetchval("select pg_try_advisory_lock(4242)")  # the transaction's lock is free
    finally:
        await side.close()
    release.set()
    report = await asyncio.wait_for(closing, 10)
    await other
    item = report["pg"]
    assert (item.outcome, item.borrowed_at_start, item.returned, item.forced) == ("clean", 2, 2, 0)
    assert server.settle(lambda: server.backends() == []), server.backends()


async def test_while_draining_release_still_refuses_a_connection_of_another_pool(make_pool):
    """A connection released to the wrong pool gets asyncpg's own error, closing or not."""
    pool, other_pool = await make_pool(), await make_pool()
    registry = Registry(drain_timeout=20)
    registry.wrap(pool, name="pg")
    foreign = await other_pool.acquire()
    acquired, release = asyncio.Event(), asyncio.Event()
    holder = asyncio.ensure_future(hold(pool, acquired, release))
    await acquired.wait()
    closing = asyncio.ensure_future(registry.aclose())
    await auntil(lambda: registry["pg"].state is KeeperState.DRAINING)

    with pytest.raises(asyncpg.InterfaceError, match="is not a member of this pool"):
        await pool.release(foreign)

    await other_pool.release(foreign)  # its own pool, not closing, takes it back for reuse
    async with other_pool.acquire() as again:
        assert await again.fetchval("select 1") == 1
    release.set()
    await asyncio.wait_for(closing, 10)
    await holder


async def test_force_close_cancels_the_query_on_the_server(make_pool, server: Server):
    """At the deadline the borrower errors promptly and no backend keeps running its query."""
    pool = await make_pool()
    registry = Registry(drain_timeout=0.3, close_timeout=5, track_borrowers=True)
    registry.wrap(pool, name="pg")
    borrower = asyncio.ensure_future(run_until_interrupted(pool))
    await auntil(lambda: len(server.running("pg_sleep")) == 1)
    started = time.monotonic()
    report = await registry.aclose()
    failed_at, error = await asyncio.wait_for(borrower, 5)

    assert failed_at - started < 1.5
    assert isinstance(error, (asyncpg.QueryCanceledError, asyncpg.ConnectionDoesNotExistError))
    item = report["pg"]
    assert (item.outcome, item.borrowed_at_start, item.forced) == ("forced", 1, 1)
    assert item.leaks[0].task is not None
    assert server.settle(lambda: server.running("pg_sleep") == []), server.backends()
    assert server.settle(lambda: server.backends() == []), server.backends()


async def test_raw_asyncpg_close_with_timeout_leaves_the_query_running(make_pool, server: Server):
    """The comparison point: raw wait_for(pool.close()) + terminate() leaves the server running the query."""
    pool = await make_pool()
    borrower = asyncio.ensure_future(run_until_interrupted(pool))
    await auntil(lambda: len(server.running("pg_sleep")) == 1)
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(pool.close(), 0.3)  # asyncpg terminates the pool on the timeout
    await asyncio.wait_for(borrower, 5)

    assert not server.settle(lambda: server.running("pg_sleep") == [], timeout=1.0)


async def test_a_connection_never_released_no_longer_hangs_shutdown(make_pool, server: Server):
    """A connection dropped without release stays borrowed (asyncpg never returns it) and is force-closed."""
    pool = await make_pool()
    registry = Registry(drain_timeout=0.2, close_timeout=5)
    registry.wrap(pool, name="pg")
    connection = await pool.acquire()
    await connection.fetchval("select 1")
    del connection
    gc.collect()
    assert registry["pg"].borrowed == 1

    report = await asyncio.wait_for(registry.aclose(), 5)
    item = report["pg"]
    assert (item.outcome, item.forced, item.returned) == ("forced", 1, 0)
    assert server.settle(lambda: server.backends() == []), server.backends()


async def test_pool_is_refused_and_closed_in_asyncpg_itself_after_close(make_pool, server: Server):
    """After close acquire() raises PoolClosedError, asyncpg's own check refuses, and no connection is open."""
    pool = await make_pool(min_size=2)
    registry = Registry()
    registry.wrap(pool, name="pg")
    await registry.aclose()

    with pytest.raises(PoolClosedError, match="'pg' is closed"):
        await pool.acquire()
    with pytest.raises(PoolClosedError, match="'pg' is closed"):
        await pool.fetchval("select 1")
    with pytest.raises(asyncpg.InterfaceError, match="pool is closed"):
        asyncpg.Pool._check_init(pool)
    assert pool.get_size() == 0
    assert server.settle(lambda: server.backends() == []), server.backends()


async def test_pool_close_runs_the_keepers_close_and_the_registry_reports_it(make_pool, server: Server):
    """Pool.close() refuses, drains, closes; the registry's later shutdown reports that close."""
    pool = await make_pool()
    registry = Registry(drain_timeout=10)
    registry.wrap(pool, name="pg")
    acquired, release = asyncio.Event(), asyncio.Event()
    holder = asyncio.ensure_future(hold(pool, acquired, release))
    await acquired.wait()
    closing = asyncio.ensure_future(pool.close())
    await auntil(lambda: registry["pg"].state is KeeperState.DRAINING)
    with pytest.raises(PoolClosedError, match="'pg' is draining"):
        await pool.acquire()

    release.set()
    await holder
    await asyncio.wait_for(closing, 5)
    assert registry["pg"].state is KeeperState.CLOSED
    assert server.settle(lambda: server.backends() == []), server.backends()
    await pool.close()  # again: nothing left to do
    report = await asyncio.wait_for(registry.aclose(), 5)
    assert (report["pg"].outcome, report["pg"].returned, report.ok) == ("clean", 1, True)


async def test_pool_close_forces_at_the_drain_timeout_instead_of_hanging(make_pool, server: Server, caplog):
    """Pool.close() with a query running forces it at drain_timeout, cancelling it on the server."""
    pool = await make_pool()
    registry = Registry(drain_timeout=0.3)
    registry.wrap(pool, name="pg")
    borrower = asyncio.ensure_future(run_until_interrupted(pool))
    await auntil(lambda: len(server.running("pg_sleep")) == 1)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="poolkeeper"):
        await asyncio.wait_for(pool.close(), 5)
    failed_at, _ = await asyncio.wait_for(borrower, 5)

    assert failed_at - started < 1.5
    assert "closed by Pool.close(): forced" in caplog.text
    assert server.settle(lambda: server.running("pg_sleep") == []), server.backends()


async def test_pool_close_cut_short_by_wait_for_still_cancels_the_query(make_pool, server: Server):
    """wait_for(pool.close(), t) on a wrapped pool force-closes at t, and the server stops the query."""
    pool = await make_pool()
    registry = Registry(drain_timeout=30)
    registry.wrap(pool, name="pg")
    borrower = asyncio.ensure_future(run_until_interrupted(pool))
    await auntil(lambda: len(server.running("pg_sleep")) == 1)
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(pool.close(), 0.3)
    await asyncio.wait_for(borrower, 5)

    assert registry["pg"].state is KeeperState.CLOSED
    assert server.settle(lambda: server.running("pg_sleep") == []), server.backends()
    assert (await asyncio.wait_for(registry.aclose(), 5))["pg"].outcome == "forced"


async def test_pool_terminate_force_closes_at_once(make_pool, server: Server):
    """pool.terminate() aborts the borrowed connection at once and the statement is cancelled on the server."""
    pool = await make_pool()
    registry = Registry(drain_timeout=30)
    registry.wrap(pool, name="pg")
    borrower = asyncio.ensure_future(run_until_interrupted(pool))
    await auntil(lambda: len(server.running("pg_sleep")) == 1)
    started = time.monotonic()
    pool.terminate()
    assert registry["pg"].state is KeeperState.CLOSED
    failed_at, error = await asyncio.wait_for(borrower, 5)

    assert failed_at - started < 0.5
    assert isinstance(error, asyncpg.ConnectionDoesNotExistError)
    assert server.settle(lambda: server.running("pg_sleep") == []), server.backends()
    with pytest.raises(PoolClosedError, match="'pg' is closed"):
        await pool.acquire()
    report = await asyncio.wait_for(registry.aclose(), 5)
    assert (report["pg"].outcome, report["pg"].forced, report.ok) == ("forced", 1, False)


async def test_pool_close_during_the_registrys_shutdown_closes_once(make_pool, server: Server):
    """pool.close() (an `async with pool` exit, say) while the registry drains waits for the same close."""
    pool = await make_pool()
    registry = Registry(drain_timeout=10)
    registry.wrap(pool, name="pg")
    acquired, release = asyncio.Event(), asyncio.Event()
    holder = asyncio.ensure_future(hold(pool, acquired, release))
    await acquired.wait()
    shutdown = asyncio.ensure_future(registry.aclose())
    await auntil(lambda: registry["pg"].state is KeeperState.DRAINING)
    own_close = asyncio.ensure_future(pool.__aexit__(None, None, None))
    await asyncio.sleep(0.05)
    assert not own_close.done()

    release.set()
    await holder
    report = await asyncio.wait_for(shutdown, 5)
    await asyncio.wait_for(own_close, 5)
    item = report["pg"]
    assert (item.outcome, item.returned, item.error) == ("clean", 1, None)
    assert server.settle(lambda: server.backends() == []), server.backends()


async def test_a_pool_wrapped_before_initialization_is_guarded_once_awaited(make_pool):
    """A pool wrapped before `await` is counted and refused like any other, and refuses to start once closed."""
    pool = await make_pool(initialize=False)
    registry = Registry()
    registry.wrap(pool, name="pg")
    await pool
    async with pool.acquire():
        assert registry["pg"].borrowed == 1
    assert (await registry.aclose())["pg"].outcome == "clean"
    with pytest.raises(PoolClosedError):
        await pool.fetchval("select 1")

    late = await make_pool(initialize=False)
    other = Registry()
    other.wrap(late, name="late")
    await other.aclose()
    with pytest.raises(PoolClosedError, match="'late' is closed"):
        await late


async def test_bad_wraps_are_refused_and_leave_the_pool_untouched(make_pool):
    """A closed pool, or one already managed by another registry, is refused with a clear error."""
    closed = await make_pool()
    await closed.close()
    with pytest.raises(ValueError, match=r"resource: .*closed"):
        Registry().wrap(closed)
    assert type(closed) is asyncpg.Pool

    pool = await make_pool()
    first, second = Registry(), Registry()
    first.wrap(pool, name="pg")
    with pytest.raises(RegistrationError, match=r"already managed .*'pg'"):
        second.wrap(pool, name="other")
    assert len(second) == 0
    assert await pool.fetchval("select 1") == 1
    await first.aclose()


async def test_password_is_described_nowhere(make_pool, pg_url: str, caplog):
    """A forced shutdown of a pool whose DSN has a password shows it in no report, log or repr."""
    parts = urllib.parse.urlsplit(pg_url)
    dsn = parts._replace(netloc=f"{parts.username}:{PASSWORD}@{parts.hostname}:{parts.port or 5432}").geturl()
    pool = await make_pool(dsn=dsn)
    registry = Registry(drain_timeout=0.1, track_borrowers=True)
    with caplog.at_level(logging.DEBUG, logger="poolkeeper"):
        registry.wrap(pool, name="pg")
        keeper = registry["pg"]
        assert keeper.driver.secrets() == (PASSWORD,)
        connection = await pool.acquire()
        report = await registry.aclose()
    del connection

    item = report["pg"]
    assert (item.outcome, item.target) == ("forced", target_of(pg_url))
    shown = [str(report), json.dumps(report.to_dict()), repr(keeper), keeper.driver.describe(), caplog.text]
    shown.extend(str(record.__dict__) for record in caplog.records)
    for text in shown:
        assert PASSWORD not in text


async def test_describe_without_a_live_connection_reads_the_connect_arguments(pg_url: str, application_name: str):
    """A pool with no connection open describes host:port/database from its keyword arguments, password apart."""
    parts = urllib.parse.urlsplit(pg_url)
    pool = await asyncpg.create_pool(
        host=parts.hostname,
        port=parts.port or 5432,
        user=parts.username,
        password=PASSWORD,
        database=parts.path.lstrip("/"),
        min_size=0,
        server_settings={"application_name": application_name},
    )
    registry = Registry()
    registry.wrap(pool, name="pg")
    driver = registry["pg"].driver
    assert pool.get_size() == 0
    assert (driver.describe(), driver.secrets()) == (target_of(pg_url), (PASSWORD,))
    await driver.ping()
    assert (await registry.aclose())["pg"].target == target_of(pg_url)
    with pytest.raises(PoolClosedError):
        await driver.ping()


async def test_a_connection_the_server_drops_counts_as_returned(make_pool, server: Server):
    """A borrowed connection whose backend the server terminates comes back by itself; close does not wait for it."""
    pool = await make_pool()
    registry = Registry(drain_timeout=10)
    registry.wrap(pool, name="pg")
    connection = await pool.acquire()
    await connection.fetchval("select 1")
    assert registry["pg"].borrowed == 1
    server.terminate_all()
    with pytest.raises((asyncpg.ConnectionDoesNotExistError, asyncpg.InterfaceError)):
        await connection.fetchval("select 1")
    assert registry["pg"].borrowed == 0

    report = await asyncio.wait_for(registry.aclose(), 5)
    assert (report["pg"].outcome, report["pg"].borrowed_at_start) == ("clean", 0)
    await pool.release(connection)


async def test_sync_close_from_another_thread_closes_on_the_pools_loop(make_pool, server: Server):
    """registry.close() in a worker thread wakes the pool's waiters, drains and closes on the pool's own loop."""
    pool = await make_pool(max_size=1)
    registry = Registry(drain_timeout=10)
    registry.wrap(pool, name="pg")
    with pytest.raises(RuntimeError, match="aclose"):
        registry.close()  # from the pool's own loop it would deadlock
    acquired, release = asyncio.Event(), asyncio.Event()
    holder = asyncio.ensure_future(hold(pool, acquired, release))
    await acquired.wait()
    waiter = asyncio.ensure_future(pool.acquire())
    await auntil(lambda: len(pool._queue._getters) == 1)

    closing = asyncio.ensure_future(asyncio.to_thread(registry.close))
    with pytest.raises(PoolClosedError):
        await asyncio.wait_for(waiter, 0.5)
    release.set()
    await holder
    report = await asyncio.wait_for(closing, 5)
    assert (report["pg"].outcome, report["pg"].returned) == ("clean", 1)
    assert server.settle(lambda: server.backends() == []), server.backends()


async def test_a_pool_whose_loop_is_not_running_is_still_force_closed_on_the_server(pg_url, application_name, server):
    """Closed from another loop while the pool's own loop is stopped, the query is still cancelled on the server."""
    loop = asyncio.new_event_loop()
    registry = Registry(drain_timeout=0.1, close_timeout=5)

    async def start_query() -> asyncio.Future[Any]:
        pool = await asyncpg.create_pool(
            pg_url, min_size=1, max_size=1, server_settings={"application_name": application_name}
        )
        registry.wrap(pool, name="pg")
        connection = await pool.acquire()
        query: asyncio.Future[Any] = asyncio.ensure_future(connection.fetchval(SLEEP))
        await asyncio.sleep(0.05)  # the query is sent
        return query

    query = await asyncio.to_thread(loop.run_until_complete, start_query())
    await auntil(lambda: len(server.running("pg_sleep")) == 1)

    report = await asyncio.wait_for(registry.aclose(), 5)  # on this test's loop, not the pool's
    assert (report["pg"].outcome, report["pg"].forced) == ("forced", 1)
    assert server.settle(lambda: server.running("pg_sleep") == []), server.backends()

    async def finish() -> BaseException | None:
        await asyncio.wait((query,))
        return query.exception()

    error = await asyncio.to_thread(loop.run_until_complete, finish())  # the pool's loop runs again
    loop.close()
    assert isinstance(error, (asyncpg.QueryCanceledError, asyncpg.ConnectionDoesNotExistError))


async def a_dozen_in_pg_sleep(pool: asyncpg.Pool, server: Server) -> tuple[Registry, list[asyncio.Task[None]]]:
    """``pool`` wrapped (drain_timeout 0.2 s) and twelve borrowers of it, each in ``pg_sleep`` on the server."""
    registry = Registry(drain_timeout=0.2)
    registry.wrap(pool, name="pg")

    async def sleeper() -> None:
        async with pool.acquire() as connection:
            await connection.execute("select pg_sleep(60)")

    borrowers = [asyncio.create_task(sleeper()) for _ in range(12)]
    await auntil(lambda: len(server.running("pg_sleep")) == 12)
    return registry, borrowers


async def test_many_borrowed_connections_are_cancelled_on_the_server_together(make_pool, server: Server):
    """Force-closing a dozen busy connections (one pg_cancel_backend query) leaves no backend running its query."""
    registry, borrowers = await a_dozen_in_pg_sleep(await make_pool(min_size=1, max_size=12), server)
    started = time.monotonic()
    report = await registry.aclose()
    results = await asyncio.wait_for(asyncio.gather(*borrowers, return_exceptions=True), 5)

    assert time.monotonic() - started < 1.5
    assert all(isinstance(result, Exception) for result in results)
    assert report["pg"].forced == 12
    assert server.settle(lambda: server.running("pg_sleep") == []), server.backends()
    assert server.settle(lambda: server.backends() == []), server.backends()


async def test_when_the_one_cancel_query_is_refused_a_cancel_request_each_still_stops_every_statement(
    make_pool, pg_url, application_name, server: Server
):
    """The connections are cut before the one pg_cancel_backend query; refused, cancel requests (backend keys) follow.

    Every connection of this pool, the side one too, runs as a role that may not signal the
    backends of the superuser who logged in: the query fails with "permission denied".
    """
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute("do $$ begin create role poolkeeper_no_signal; exception when duplicate_object then null; end $$")

    async def as_a_role_that_may_not_signal(connection: asyncpg.Connection) -> None:
        await connection.execute("set role poolkeeper_no_signal")

    pool = await make_pool(min_size=1, max_size=12, init=as_a_role_that_may_not_signal)
    side = await pool._get_new_connection()  # what the force-close does: the query is refused
    with pytest.raises(asyncpg.InsufficientPrivilegeError):  # this pool's own idle connection
        await side.fetch(
            "select pg_cancel_backend(pid) from pg_stat_activity where application_name = $1 "
            "and pid <> pg_backend_pid()",
            application_name,
        )
    await side.close()
    registry, borrowers = await a_dozen_in_pg_sleep(pool, server)
    report = await registry.aclose()
    results = await asyncio.wait_for(asyncio.gather(*borrowers, return_exceptions=True), 5)

    assert all(isinstance(result, asyncpg.ConnectionDoesNotExistError) for result in results), results
    assert (report["pg"].outcome, report["pg"].forced, report["pg"].error) == ("forced", 12, None)
    assert server.settle(lambda: server.running("pg_sleep") == []), server.backends()
    assert server.settle(lambda: server.backends() == []), server.backends()


async def test_a_batched_force_close_closes_every_socket_it_kept_open(make_pool, server: Server):
    """The borrowed sockets stay open to the server through the cancel query; once closed, none is left open."""
    before = open_descriptors()
    registry, borrowers = await a_dozen_in_pg_sleep(await make_pool(min_size=1, max_size=12), server)
    report = await registry.aclose()
    results = await asyncio.wait_for(asyncio.gather(*borrowers, return_exceptions=True), 5)

    assert all(isinstance(result, asyncpg.ConnectionDoesNotExistError) for result in results), results
    assert (report["pg"].outcome, report["pg"].forced, report["pg"].error) == ("forced", 12, None)
    assert server.settle(lambda: server.backends() == []), server.backends()
    # Closed from a thread of its own once the pool is closed: the server saw them go (above),
    # and the process holds nothing more than before the pool.
    await auntil(lambda: open_descriptors() <= before)


async def test_at_its_open_file_limit_a_process_still_force_closes_a_dozen(make_pool, server: Server):
    """With too few descriptors left to keep every socket open, the rest are terminated as usual: nothing is missed."""
    before = open_descriptors()
    registry, borrowers = await a_dozen_in_pg_sleep(await make_pool(min_size=1, max_size=12), server)
    with descriptors_left(6):  # the side connection, the socket pair and a few of the twelve
        report = await registry.aclose()
    results = await asyncio.wait_for(asyncio.gather(*borrowers, return_exceptions=True), 5)

    assert all(isinstance(result, asyncpg.ConnectionDoesNotExistError) for result in results), results
    assert (report["pg"].outcome, report["pg"].forced, report["pg"].error) == ("forced", 12, None)
    assert server.settle(lambda: server.running("pg_sleep") == []), server.backends()
    assert server.settle(lambda: server.backends() == []), server.backends()
    await auntil(lambda: open_descriptors() <= before)
