"""Fault: the server kills the connection in the middle of the drain.

PostgreSQL terminates the backends (``pg_terminate_backend``), Redis drops the clients
(``CLIENT KILL``), the HTTP server closes the connection. The keeper must finish (promptly when
the borrower gives its broken connection back), the report must say what happened, nothing may
hang, and nothing may reconnect behind the shutdown's back.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import asyncpg
import pytest
import pytest_asyncio
import redis
import redis.asyncio
import sqlalchemy as sa
from aiohttp import web
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy.ext.asyncio import create_async_engine

from poolkeeper import KeeperState, PoolClosedError, Registry
from tests.conftest import Server, sqlalchemy_url
from tests.faults import auntil, redis_default_backoff
from tests.test_redis_keeper import RedisServer, client_name, redis_server

__all__ = ["client_name", "redis_server"]  # fixtures shared with the Redis keeper tests

pytestmark = pytest.mark.asyncio

# Long: a keeper that finishes early did so because the connection came back, not by timing out.
DRAIN = 10.0


def _version(module: Any) -> tuple[int, ...]:
    return tuple(int(part) for part in module.__version__.split(".")[:2])


# What a borrower reads when the server terminates its backend: asyncpg 0.32+ reports the
# server's own message, 0.29 to 0.31 only that the connection went away.
SERVER_MESSAGE = "terminating connection due to administrator command"
ASYNCPG_TERMINATED = (
    SERVER_MESSAGE if _version(asyncpg) >= (0, 32) else "connection was closed in the middle of operation"
)


async def settle(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Re-check a server's view until ``predicate`` holds; no event exists for "the query started"."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            return False
        await asyncio.sleep(0.01)
    return True


class Outcome:
    """A borrower (a thread or a task) and what it got, and when."""

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.at: float | None = None
        self.task: asyncio.Task[None] | None = None

    def fail(self, error: BaseException) -> None:
        self.error, self.at = error, time.monotonic()

    def run_sync(self, call: Callable[[], Any]) -> None:
        def target() -> None:
            try:
                call()
            except Exception as error:
                self.fail(error)

        threading.Thread(target=target, daemon=True).start()

    def run_async(self, call: Awaitable[Any]) -> None:
        async def target() -> None:
            try:
                await call
            except Exception as error:
                self.fail(error)

        self.task = asyncio.ensure_future(target())


# -- PostgreSQL: pg_terminate_backend --------------------------------------------------------------


async def sqlalchemy_borrower(pg_url: str, application_name: str, registry: Registry, outcome: Outcome) -> None:
    engine = registry.wrap(
        sa.create_engine(sqlalchemy_url(pg_url, "psycopg"), connect_args={"application_name": application_name}),
        name="db",
    )
    idle, busy = engine.connect(), engine.connect()
    idle.close()

    def sleep() -> None:
        with busy:
            busy.execute(sa.text("select pg_sleep(60)"))

    outcome.run_sync(sleep)


async def sqlalchemy_async_borrower(pg_url: str, application_name: str, registry: Registry, outcome: Outcome) -> None:
    engine = registry.wrap(
        create_async_engine(
            sqlalchemy_url(pg_url, "asyncpg"), connect_args={"server_settings": {"application_name": application_name}}
        ),
        name="db",
    )
    idle, busy = await engine.connect(), await engine.connect()
    await idle.close()

    async def sleep() -> None:
        try:
            await busy.execute(sa.text("select pg_sleep(60)"))
        finally:
            await busy.close()

    outcome.run_async(sleep())


async def asyncpg_borrower(pg_url: str, application_name: str, registry: Registry, outcome: Outcome) -> None:
    pool = registry.wrap(
        await asyncpg.create_pool(
            pg_url, min_size=2, max_size=2, server_settings={"application_name": application_name}
        ),
        name="db",
    )

    async def sleep() -> None:
        async with pool.acquire() as connection:
            await connection.fetchval("select pg_sleep(60)")

    outcome.run_async(sleep())


PG_BORROWERS = {
    "sqlalchemy": sqlalchemy_borrower,
    "sqlalchemy-async": sqlalchemy_async_borrower,
    "asyncpg": asyncpg_borrower,
}


@pytest.mark.parametrize("library", list(PG_BORROWERS))
async def test_backends_terminated_mid_drain_end_the_drain_cleanly_and_nothing_reconnects(
    library, pg_url, application_name, server: Server
):
    """Every backend terminated mid-drain: the borrower errors, the drain ends clean at once, nothing reconnects."""
    registry = Registry(drain_timeout=DRAIN)
    outcome = Outcome()
    await PG_BORROWERS[library](pg_url, application_name, registry, outcome)
    assert await settle(lambda: len(server.running("pg_sleep")) == 1)
    assert await settle(lambda: len(server.backends()) == 2)  # the borrowed one and an idle one
    closing = asyncio.ensure_future(registry.aclose())
    await auntil(lambda: registry["db"].state is KeeperState.DRAINING)

    killed = time.monotonic()
    await asyncio.to_thread(server.terminate_all)
    report = await closing
    closed_after = time.monotonic() - killed

    item = report["db"]
    assert (item.outcome, item.borrowed_at_start, item.returned, item.forced, item.error) == ("clean", 1, 1, 0, None)
    assert closed_after < 1.0
    assert outcome.error is not None
    assert (SERVER_MESSAGE if library == "sqlalchemy" else ASYNCPG_TERMINATED) in str(outcome.error)
    assert registry["db"].state is KeeperState.CLOSED
    # Nothing reconnected behind the shutdown (asyncpg's min_size upkeep, SQLAlchemy's pre-ping...).
    await asyncio.sleep(0.3)  # a reconnect would show within this window; there is no event for "none came"
    assert server.backends() == []


# -- Redis: CLIENT KILL ------------------------------------------------------------------------------


def kill_clients(redis_server: RedisServer) -> None:
    """``CLIENT KILL`` every connection of this test's clients, from the side connection."""
    for client in redis_server.clients():
        redis_server._side.client_kill_filter(_id=client["id"])


def blpop_key() -> str:
    return f"pk-test:never-pushed:{uuid.uuid4().hex}"  # BLPOP on a missing key creates nothing


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
async def test_a_killed_client_without_retries_is_returned_and_the_drain_ends_clean(
    flavour, redis_url, client_name, redis_server: RedisServer
):
    """CLIENT KILL of a BLPOP with retries off: ConnectionError, the connection is back, the drain ends clean."""
    registry = Registry(drain_timeout=DRAIN)
    outcome = Outcome()
    no_retry = {"retry": Retry(NoBackoff(), 0), "socket_timeout": 30, "client_name": client_name}
    if flavour == "sync":
        client = registry.wrap(redis.Redis.from_url(redis_url, **no_retry), name="cache")
        outcome.run_sync(lambda: client.blpop([blpop_key()], 0))
    else:
        async_client = registry.wrap(redis.asyncio.Redis.from_url(redis_url, **no_retry), name="cache")
        outcome.run_async(async_client.blpop([blpop_key()], 0))
    assert await settle(lambda: redis_server.commands() == ["blpop"])
    closing = asyncio.ensure_future(registry.aclose())
    await auntil(lambda: registry["cache"].state is KeeperState.DRAINING)

    killed = time.monotonic()
    await asyncio.to_thread(kill_clients, redis_server)
    report = await closing

    item = report["cache"]
    assert (item.outcome, item.returned, item.forced) == ("clean", 1, 0)
    assert time.monotonic() - killed < 1.0
    assert isinstance(outcome.error, redis.ConnectionError)
    assert await settle(lambda: redis_server.clients() == [], timeout=1.0)


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
async def test_a_killed_client_with_the_default_retry_is_force_closed_at_the_deadline(
    flavour, redis_url, client_name, redis_server: RedisServer
):
    """CLIENT KILL of a BLPOP with redis-py's default Retry: one reconnect, blocked again, forced at the deadline."""
    # redis-py 6.0 to 7.x back off up to 2 s (base 1 s, jittered) before that first reconnect.
    drain = 1.0 + min(2.0, redis_default_backoff())
    registry = Registry(drain_timeout=drain)
    outcome = Outcome()
    # Built by the client itself, not from_url(): only then do its connections get redis-py's default Retry.
    where = redis.connection.parse_url(redis_url)  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
    options = {**where, "socket_timeout": 30, "client_name": client_name}
    if flavour == "sync":
        client = registry.wrap(redis.Redis(**options), name="cache")
        outcome.run_sync(lambda: client.blpop([blpop_key()], 0))
    else:
        async_client = registry.wrap(redis.asyncio.Redis(**options), name="cache")
        outcome.run_async(async_client.blpop([blpop_key()], 0))
    assert await settle(lambda: redis_server.commands() == ["blpop"])
    first = [client["id"] for client in redis_server.clients()]
    started = time.monotonic()
    closing = asyncio.ensure_future(registry.aclose())
    await auntil(lambda: registry["cache"].state is KeeperState.DRAINING)

    await asyncio.to_thread(kill_clients, redis_server)
    if _version(redis) < (6, 0):
        # redis-py before 6.0 has no default Retry: the killed BLPOP fails at once, the drain ends clean.
        item = (await closing)["cache"]
        assert (item.outcome, item.borrowed_at_start, item.returned, item.forced) == ("clean", 1, 1, 0)
        await auntil(lambda: outcome.at is not None, timeout=2.0)
        assert isinstance(outcome.error, redis.ConnectionError)
        assert await settle(lambda: redis_server.clients() == [], timeout=1.0)
        return
    # The retry reconnected and re-sent BLPOP on a connection of its own; there was one, and only one.
    assert await settle(lambda: len(redis_server.clients()) == 1 and redis_server.commands() == ["blpop"])
    assert [client["id"] for client in redis_server.clients()] != first
    report = await closing
    elapsed = time.monotonic() - started

    item = report["cache"]
    assert (item.outcome, item.borrowed_at_start, item.returned, item.forced) == ("forced", 1, 0, 1)
    assert drain - 0.1 < elapsed < drain + 0.6
    await auntil(lambda: outcome.at is not None, timeout=2.0 + redis_default_backoff())  # its Retry sleeps first
    assert isinstance(outcome.error, (PoolClosedError, redis.ConnectionError))
    assert await settle(lambda: redis_server.clients() == [], timeout=1.0)


# -- HTTP: the server closes the connection ------------------------------------------------------


class ClosingServer:
    """A real aiohttp.web server whose handlers close their connection when told to."""

    def __init__(self) -> None:
        self.arrived = asyncio.Event()
        self.cut = asyncio.Event()
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def before_headers(self, request: web.Request) -> web.Response:
        """Closes the connection without answering, once ``cut`` is set."""
        self.arrived.set()
        await self.cut.wait()
        assert request.transport is not None
        request.transport.close()
        await asyncio.sleep(30)  # the handler is cancelled when its connection is gone
        return web.Response(text="never")

    async def mid_body(self, request: web.Request) -> web.StreamResponse:
        """Sends the headers and a first chunk, then closes the connection once ``cut`` is set."""
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"first;")
        self.arrived.set()
        await self.cut.wait()
        assert request.transport is not None
        request.transport.close()
        return response


@pytest_asyncio.fixture
async def closing_server() -> AsyncIterator[ClosingServer]:
    server = ClosingServer()
    app = web.Application()
    app.router.add_get("/before-headers", server.before_headers)
    app.router.add_get("/mid-body", server.mid_body)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server.runner = runner
    server.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield server
    server.cut.set()
    await runner.cleanup()


@pytest.mark.parametrize("where", ["before-headers", "mid-body"])
async def test_the_http_server_closing_mid_drain_ends_the_drain_cleanly(where, closing_server):
    """The server drops a request in flight mid-drain: the caller gets an aiohttp error, the drain ends clean."""
    registry = Registry(drain_timeout=DRAIN)
    session = registry.wrap(aiohttp.ClientSession(closing_server.url), name="upstream")
    outcome = Outcome()

    async def fetch() -> None:
        async with session.get(f"/{where}") as response:
            await response.read()

    outcome.run_async(fetch())
    await asyncio.wait_for(closing_server.arrived.wait(), 5)
    closing = asyncio.ensure_future(registry.aclose())
    await auntil(lambda: registry["upstream"].state is KeeperState.DRAINING)

    cut = time.monotonic()
    closing_server.cut.set()
    report = await closing

    item = report["upstream"]
    assert (item.outcome, item.borrowed_at_start, item.returned, item.forced) == ("clean", 1, 1, 0)
    assert time.monotonic() - cut < 1.0
    assert isinstance(outcome.error, aiohttp.ClientError)
    assert session.closed
