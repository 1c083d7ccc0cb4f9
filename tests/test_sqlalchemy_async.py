"""The SQLAlchemy keeper on an AsyncEngine (asyncpg and psycopg drivers), against the real PostgreSQL server."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import pytest
import pytest_asyncio
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from poolkeeper import KeeperState, PoolClosedError, Registry
from tests.conftest import Server, sqlalchemy_url
from tests.waiting import auntil

pytestmark = pytest.mark.asyncio

DRIVERS = ["asyncpg", "psycopg"]


@pytest_asyncio.fixture(params=DRIVERS)
async def make_async_engine(request, pg_url: str, application_name: str) -> AsyncIterator[Callable[..., AsyncEngine]]:
    engines: list[AsyncEngine] = []
    driver = request.param
    connect_args = (
        {"server_settings": {"application_name": application_name}}
        if driver == "asyncpg"
        else {"application_name": application_name}
    )

    def make(**options: object) -> AsyncEngine:
        engine = create_async_engine(sqlalchemy_url(pg_url, driver), connect_args=connect_args, **options)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        with contextlib.suppress(PoolClosedError):
            await engine.dispose()


async def hold_connection(engine: AsyncEngine, checked_out: asyncio.Event, release: asyncio.Event) -> None:
    async with engine.connect() as connection:
        await connection.execute(sa.text("select 1"))
        checked_out.set()
        await release.wait()


async def test_async_engine_is_returned_and_refuses_while_draining(make_async_engine):
    """wrap() returns the same AsyncEngine; once closing starts connect() raises PoolClosedError."""
    engine = make_async_engine()
    registry = Registry(drain_timeout=10)
    assert registry.wrap(engine, name="db") is engine
    checked_out, release = asyncio.Event(), asyncio.Event()
    holder = asyncio.ensure_future(hold_connection(engine, checked_out, release))
    await checked_out.wait()
    closing = asyncio.ensure_future(registry.aclose())
    await auntil(lambda: registry["db"].state is KeeperState.DRAINING)

    with pytest.raises(PoolClosedError, match="'db' is draining"):
        async with engine.connect():
            pass

    release.set()
    await holder
    report = await closing
    assert report["db"].outcome == "clean"


async def test_async_waiter_is_woken_at_once(make_async_engine):
    """A task waiting for a free connection fails with PoolClosedError as soon as closing starts."""
    engine = make_async_engine(pool_size=1, max_overflow=0, pool_timeout=30)
    registry = Registry(drain_timeout=10)
    registry.wrap(engine, name="db")
    checked_out, release = asyncio.Event(), asyncio.Event()
    holder = asyncio.ensure_future(hold_connection(engine, checked_out, release))
    await checked_out.wait()

    async def wait_for_connection() -> float:
        try:
            async with engine.connect():
                pass
        except PoolClosedError:
            return time.monotonic()
        raise AssertionError("the waiter got a connection")

    waiter = asyncio.ensure_future(wait_for_connection())
    await auntil(lambda: len(engine.sync_engine.pool._pool._pk_waiters) == 1)
    started = time.monotonic()
    closing = asyncio.ensure_future(registry.aclose())
    woken_at = await asyncio.wait_for(waiter, 5)
    assert woken_at - started < 0.5

    release.set()
    await holder
    assert (await closing)["db"].outcome == "clean"


async def test_async_clean_drain_wakes_on_the_last_return(make_async_engine):
    """aclose() returns right after the last connection comes back."""
    engine = make_async_engine()
    registry = Registry(drain_timeout=20)
    registry.wrap(engine, name="db")
    checked_out, release = asyncio.Event(), asyncio.Event()
    holder = asyncio.ensure_future(hold_connection(engine, checked_out, release))
    await checked_out.wait()
    closing = asyncio.ensure_future(registry.aclose())
    await asyncio.sleep(0.2)
    assert not closing.done()

    released = time.monotonic()
    release.set()
    report = await asyncio.wait_for(closing, 10)
    assert time.monotonic() - released < 0.3
    await holder
    item = report["db"]
    assert (item.outcome, item.borrowed_at_start, item.returned, item.forced) == ("clean", 1, 1, 0)


async def test_async_force_close_cancels_on_the_server(make_async_engine, server: Server):
    """A task stuck in a query errors promptly at the deadline and no backend keeps running the query."""
    engine = make_async_engine()
    registry = Registry(drain_timeout=0.3, close_timeout=5, track_borrowers=True)
    registry.wrap(engine, name="db")

    async def sleeper() -> float:
        try:
            async with engine.connect() as connection:
                await connection.execute(sa.text("select pg_sleep(60)"))
        except Exception:
            return time.monotonic()
        raise AssertionError("the query was not interrupted")

    task = asyncio.ensure_future(sleeper())
    await auntil(lambda: len(server.running("pg_sleep")) == 1)
    started = time.monotonic()
    report = await registry.aclose()
    failed_at = await asyncio.wait_for(task, 5)

    assert failed_at - started < 1.5
    item = report["db"]
    assert (item.outcome, item.forced) == ("forced", 1)
    assert item.leaks[0].task is not None
    assert server.settle(lambda: server.running("pg_sleep") == []), "the cancel (a signal) never ended the query"
    assert server.settle(lambda: server.backends() == []), server.backends()
    with pytest.raises(PoolClosedError, match="'db' is closed"):
        async with engine.connect():
            pass


async def test_a_tracked_async_checkout_names_the_users_line_past_sqlalchemys_greenlet(make_async_engine):
    """The checkout runs in a greenlet whose stack ends inside SQLAlchemy: the borrow site is found in the task's."""
    engine = make_async_engine()
    registry = Registry(track_borrowers=True)
    registry.wrap(engine, name="db")

    async def borrow() -> AsyncConnection:
        connection: AsyncConnection = await engine.connect()  # the borrow site
        return connection

    connection = await borrow()
    try:
        (borrower,) = registry["db"].borrowers()
        site_line = borrow.__code__.co_firstlineno + 1
        assert borrower.site == f"{__file__}:{site_line}"
        assert [frame.function for frame in borrower.stack or ()][-2:] == [
            "test_a_tracked_async_checkout_names_the_users_line_past_sqlalchemys_greenlet",
            "borrow",
        ]
        assert borrower.task == asyncio.current_task().get_name()  # type: ignore[union-attr]
    finally:
        await connection.close()
        await registry.aclose()


async def test_async_engine_dispose_after_close_does_not_reopen(make_async_engine, server: Server):
    """After close, AsyncEngine.dispose() keeps the engine refusing and opens nothing."""
    engine = make_async_engine()
    registry = Registry()
    registry.wrap(engine, name="db")
    async with engine.connect() as connection:
        await connection.execute(sa.text("select 1"))
    await registry.aclose()
    assert server.settle(lambda: server.backends() == []), server.backends()
    await engine.dispose()
    with pytest.raises(PoolClosedError):
        async with engine.connect():
            pass
    assert server.backends() == []


async def test_sync_close_from_the_engines_own_loop_says_to_use_aclose(make_async_engine):
    """registry.close() inside the loop an AsyncEngine lives on raises instead of deadlocking."""
    engine = make_async_engine()
    registry = Registry()
    registry.wrap(engine, name="db")
    async with engine.connect() as connection:
        await connection.execute(sa.text("select 1"))
    with pytest.raises(RuntimeError, match="aclose"):
        registry.close()
    assert not registry.draining
    assert (await registry.aclose())["db"].outcome == "clean"


async def test_sync_close_from_another_thread_closes_on_the_engines_loop(make_async_engine, server: Server):
    """registry.close() from a worker thread closes an AsyncEngine on the loop that owns it."""
    engine = make_async_engine()
    registry = Registry()
    registry.wrap(engine, name="db")
    async with engine.connect() as connection:
        await connection.execute(sa.text("select 1"))
    report = await asyncio.to_thread(registry.close)
    assert report["db"].outcome == "clean"
    assert server.settle(lambda: server.backends() == []), server.backends()


async def test_an_async_engine_and_its_sync_engine_share_one_keeper(make_async_engine):
    """Wrapping an AsyncEngine's sync_engine after the AsyncEngine registers nothing new."""
    engine = make_async_engine()
    registry = Registry()
    registry.wrap(engine, name="db")
    assert registry.wrap(engine.sync_engine) is engine.sync_engine
    assert len(registry) == 1
    await registry.aclose()
