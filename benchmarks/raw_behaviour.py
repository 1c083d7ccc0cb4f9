"""What each pool library does when it is closed while a connection is borrowed, measured.

Every scenario borrows one connection, starts a long operation on it (``pg_sleep``, a blocking
``BLPOP``, a slow HTTP request), closes the pool the way the library offers, and records what
happened: when the close returned, whether a new checkout was accepted during and after it, what
became of the borrowed operation, and what the server was left doing (looked up by
``application_name`` in ``pg_stat_activity``, by client name in ``CLIENT LIST``, by the handler's
own record on the HTTP server). Then the same with poolkeeper-wrapped objects.

Run it against the loopback servers; ``--write`` regenerates the documentation page::

    python -m benchmarks.raw_behaviour --write docs/comparison.md

psycopg_pool is not a poolkeeper dependency: its row is measured when it can be imported and
marked as skipped otherwise. Nothing here writes to Redis database 0 or flushes anything.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import importlib
import importlib.metadata
import logging
import os
import platform
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import asyncpg
import psycopg
import redis
import sqlalchemy as sa
from aiohttp import web

import poolkeeper

if TYPE_CHECKING:
    from collections.abc import Callable

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/9"

#: How long the borrowed operation runs: the query's pg_sleep, BLPOP's timeout, the handler's sleep.
BORROW_SECONDS = 1.5
#: How long a close that waits with no deadline of its own is watched before it is called a hang.
HANG_WATCH_SECONDS = 2.5
#: The bounded wait given to asyncpg's close in the wait_for + terminate recipe.
WAIT_FOR_SECONDS = 0.5
#: poolkeeper's drain_timeout in the wrapped rows: shorter than the borrowed operation.
DRAIN_SECONDS = 0.5


@dataclass(frozen=True)
class Row:
    """One measured line of the table."""

    client: str
    close_returned: str
    waits: str
    checkout: str
    operation: str
    server: str


@dataclass(frozen=True)
class Skipped:
    """A scenario that could not be measured here, and why."""

    client: str
    reason: str


class Servers:
    """The servers the scenarios run against, and a side connection that watches PostgreSQL."""

    def __init__(self, postgres_url: str, redis_url: str) -> None:
        self.postgres_url = postgres_url
        self.redis_url = redis_url
        self.side = psycopg.connect(postgres_url, autocommit=True)
        self.redis_side = redis.Redis.from_url(redis_url)
        self.asyncpg_dsn = postgres_url

    def close(self) -> None:
        """Close the side connections."""
        self.side.close()
        self.redis_side.close()

    # -- PostgreSQL ----------------------------------------------------------------------

    def running(self, application_name: str) -> int:
        """How many backends of ``application_name`` are executing ``pg_sleep`` right now."""
        row = self.side.execute(
            "select count(*) from pg_stat_activity "
            "where application_name = %s and state = 'active' and query like '%%pg_sleep%%'",
            (application_name,),
        ).fetchone()
        return int(row[0]) if row else 0

    def backends(self, application_name: str) -> int:
        """How many backends of ``application_name`` exist, whatever they are doing."""
        row = self.side.execute(
            "select count(*) from pg_stat_activity where application_name = %s", (application_name,)
        ).fetchone()
        return int(row[0]) if row else 0

    def terminate(self, application_name: str) -> None:
        """End whatever a scenario left behind on the server."""
        self.side.execute(
            "select pg_terminate_backend(pid) from pg_stat_activity where application_name = %s",
            (application_name,),
        )

    def server_version(self) -> str:
        """PostgreSQL's version number."""
        row = self.side.execute("show server_version").fetchone()
        return str(row[0]).split()[0] if row else "?"

    # -- Redis ---------------------------------------------------------------------------

    def redis_clients(self, client_name: str) -> list[dict[str, Any]]:
        """The ``CLIENT LIST`` entries named ``client_name``."""
        clients: list[dict[str, Any]] = self.redis_side.client_list()
        return [client for client in clients if client.get("name") == client_name]

    def redis_version(self) -> str:
        """Redis's version number."""
        info: dict[str, Any] = self.redis_side.info("server")
        return str(info.get("redis_version", "?"))


def until(predicate: Callable[[], bool], timeout: float) -> bool:
    """Re-check ``predicate`` (server state, mostly) until it holds or ``timeout`` passes."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            return False
        time.sleep(0.005)
    return True


async def until_async(predicate: Callable[[], bool], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            return False
        await asyncio.sleep(0.005)
    return True


def describe(error: BaseException) -> str:
    """``Type: first line of the message``, short enough for a table cell."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if len(text) > 60:
        text = text[:57] + "..."
    return f"`{type(error).__name__}: {text}`" if text else f"`{type(error).__name__}`"


def unique(prefix: str) -> str:
    return f"pk-raw-{prefix}-{uuid.uuid4().hex[:8]}"


@dataclass
class Outcome:
    """What became of the borrowed operation."""

    started: float = 0.0
    ended: float | None = None
    error: BaseException | None = None

    def text(self, close_started: float) -> str:
        """The outcome, timed from the moment close began."""
        if self.ended is None:
            return "still running"
        after = self.ended - close_started
        if self.error is None:
            return f"completed ({self.ended - self.started:.2f} s, {after:.2f} s after close began)"
        return f"failed {after:.2f} s after close began: {describe(self.error)}"


def attempt(checkout: Callable[[], object]) -> str:
    """Try a checkout; say whether it was accepted or refused, and how."""
    try:
        checkout()
    except Exception as error:  # noqa: BLE001 -- whatever the library raises is the measurement
        return f"refused ({describe(error)})"
    return "**accepted**"


async def attempt_async(checkout: Callable[[], Any]) -> str:
    try:
        await checkout()
    except Exception as error:  # noqa: BLE001 -- whatever the library raises is the measurement
        return f"refused ({describe(error)})"
    return "**accepted**"


def query_left_running(servers: Servers, name: str, close_returned: float, outcome: Outcome) -> str:
    """Whether the server went on running the borrowed query after close returned, and for how long.

    Called right after close returned. A query running on while its borrower still waits for it
    is the borrower's business; one running on after its borrower got an error is an orphan.
    """
    if not servers.running(name):
        return "nothing running: the query had ended"
    until(lambda: not servers.running(name), max(0.0, outcome.started + BORROW_SECONDS - time.monotonic()) + 2.0)
    ran_on = time.monotonic() - close_returned
    if outcome.error is not None:
        return f"**the backend kept running the orphaned query for {ran_on:.2f} s** after the client was gone"
    return f"the query ran on for {ran_on:.2f} s after close returned, for its borrower"


# -- SQLAlchemy ------------------------------------------------------------------------------


def sqlalchemy_engine(servers: Servers, name: str) -> sa.Engine:
    url = sa.make_url(servers.postgres_url).set(drivername="postgresql+psycopg")
    return sa.create_engine(url, connect_args={"application_name": name}, pool_size=2)


def borrow_in_thread(run: Callable[[], object]) -> tuple[threading.Thread, Outcome]:
    outcome = Outcome()

    def target() -> None:
        outcome.started = time.monotonic()
        try:
            run()
        except Exception as error:  # noqa: BLE001 -- recorded: what the borrower saw is the measurement
            outcome.error = error
        outcome.ended = time.monotonic()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def sleep_query(engine: sa.Engine) -> Callable[[], object]:
    def run() -> object:
        with engine.connect() as connection:
            return connection.execute(sa.text(f"select pg_sleep({BORROW_SECONDS})")).scalar()

    return run


def select_one(engine: sa.Engine) -> Callable[[], object]:
    def run() -> object:
        with engine.connect() as connection:
            return connection.execute(sa.text("select 1")).scalar()

    return run


def raw_sqlalchemy(servers: Servers) -> Row:
    name = unique("sa")
    engine = sqlalchemy_engine(servers, name)
    try:
        thread, outcome = borrow_in_thread(sleep_query(engine))
        until(lambda: servers.running(name) == 1, 5.0)
        started = time.monotonic()
        engine.dispose()
        returned = time.monotonic()
        still_running = outcome.ended is None
        after = attempt(select_one(engine))
        server = query_left_running(servers, name, returned, outcome)
        thread.join()
        return Row(
            client="SQLAlchemy `Engine.dispose()`",
            close_returned=f"at once ({returned - started:.3f} s)",
            waits="no" if still_running else "yes",
            checkout=f"after: {after} (a fresh pool is swapped in and connects)",
            operation=outcome.text(started),
            server=server,
        )
    finally:
        engine.dispose()
        servers.terminate(name)


def wrapped_sqlalchemy(servers: Servers) -> Row:
    name = unique("pk-sa")
    registry = poolkeeper.Registry(drain_timeout=DRAIN_SECONDS, close_timeout=2.0)
    engine = registry.wrap(sqlalchemy_engine(servers, name), name="db")
    try:
        thread, outcome = borrow_in_thread(sleep_query(engine))
        until(lambda: servers.running(name) == 1, 5.0)
        started = time.monotonic()
        closer = threading.Thread(target=registry.close, daemon=True)
        closer.start()
        until(lambda: registry["db"].state is not poolkeeper.KeeperState.OPEN, 2.0)
        during = attempt(select_one(engine))
        closer.join()
        returned = time.monotonic()
        after = attempt(select_one(engine))
        thread.join()
        report = registry.report
        assert report is not None
        server_clean = until(lambda: servers.backends(name) == 0, 2.0)
        return Row(
            client="poolkeeper-wrapped `Engine`, `registry.close()`",
            close_returned=f"after drain_timeout + force-close ({returned - started:.2f} s)",
            waits=f"yes, up to `drain_timeout` ({DRAIN_SECONDS} s), event-driven; then force-closes",
            checkout=f"during: {during}; after: {after}",
            operation=outcome.text(started),
            server=server_summary(server_clean, "backend"),
        )
    finally:
        registry.force_close()
        servers.terminate(name)


def wrapped_sqlalchemy_in_time(servers: Servers) -> Row:
    name = unique("pk-sa-in-time")
    drain = 4 * BORROW_SECONDS
    registry = poolkeeper.Registry(drain_timeout=drain, close_timeout=2.0)
    engine = registry.wrap(sqlalchemy_engine(servers, name), name="db")
    try:
        thread, outcome = borrow_in_thread(sleep_query(engine))
        until(lambda: servers.running(name) == 1, 5.0)
        started = time.monotonic()
        registry.close()
        returned = time.monotonic()
        thread.join()
        assert outcome.ended is not None
        server_clean = until(lambda: servers.backends(name) == 0, 2.0)
        return Row(
            client=f"the same, the borrower finishing within `drain_timeout` ({drain} s)",
            close_returned=f"{returned - outcome.ended:.3f} s after the borrower gave the connection back",
            waits="yes: returns as soon as the last borrowed connection is back",
            checkout="refused, as above",
            operation=outcome.text(started),
            server=server_summary(server_clean, "backend"),
        )
    finally:
        registry.force_close()
        servers.terminate(name)


def server_summary(clean: bool, what: str) -> str:
    return f"nothing: no {what} left, no query running" if clean else f"**a {what} is left on the server**"


# -- asyncpg ---------------------------------------------------------------------------------


async def asyncpg_pool(servers: Servers, name: str) -> Any:
    return await asyncpg.create_pool(
        servers.asyncpg_dsn, min_size=1, max_size=2, server_settings={"application_name": name}
    )


async def checkout_asyncpg(pool: Any) -> None:
    async with pool.acquire() as connection:
        await connection.fetchval("select 1")


async def raw_asyncpg_close(servers: Servers) -> Row:
    name = unique("apg")
    pool = await asyncpg_pool(servers, name)
    connection = await pool.acquire()  # never released: the leak close() waits for
    outcome = Outcome(started=time.monotonic())

    async def borrow() -> None:
        try:
            await connection.fetchval(f"select pg_sleep({BORROW_SECONDS})")
        except Exception as error:  # noqa: BLE001 -- recorded: what the borrower saw is the measurement
            outcome.error = error
        outcome.ended = time.monotonic()

    borrower = asyncio.create_task(borrow())
    await until_async(lambda: servers.running(name) == 1, 5.0)
    started = time.monotonic()
    closing = asyncio.create_task(pool.close())
    await until_async(pool.is_closing, 2.0)
    during = await attempt_async(lambda: checkout_asyncpg(pool))
    done, _ = await asyncio.wait({closing}, timeout=HANG_WATCH_SECONDS)
    hung = not done
    await borrower
    released = time.monotonic()
    await pool.release(connection)
    await closing
    returned = time.monotonic()
    after = await attempt_async(lambda: checkout_asyncpg(pool))
    servers.terminate(name)
    if hung:
        close_text = (
            f"**not after {HANG_WATCH_SECONDS} s** (the query had ended); "
            f"{returned - released:.3f} s after the connection was released"
        )
        waits = "yes, **with no deadline: hangs as long as the connection is not released**"
    else:
        close_text = f"after {returned - started:.2f} s"
        waits = "yes"
    return Row(
        client="asyncpg `Pool.close()`",
        close_returned=close_text,
        waits=waits,
        checkout=f"during: {during}; after: {after}",
        operation=outcome.text(started),
        server="the backend stays open, idle, until the release",
    )


async def raw_asyncpg_terminate(servers: Servers) -> Row:
    name = unique("apg-term")
    pool = await asyncpg_pool(servers, name)
    outcome = Outcome()

    async def borrow() -> None:
        outcome.started = time.monotonic()
        try:
            async with pool.acquire() as connection:
                await connection.fetchval(f"select pg_sleep({BORROW_SECONDS})")
        except Exception as error:  # noqa: BLE001 -- recorded: what the borrower saw is the measurement
            outcome.error = error
        outcome.ended = time.monotonic()

    borrower = asyncio.create_task(borrow())
    await until_async(lambda: servers.running(name) == 1, 5.0)
    started = time.monotonic()

    async def close_then_terminate() -> None:
        try:
            await asyncio.wait_for(pool.close(), WAIT_FOR_SECONDS)
        except asyncio.TimeoutError:
            pool.terminate()

    closing = asyncio.create_task(close_then_terminate())
    await until_async(pool.is_closing, 2.0)
    during = await attempt_async(lambda: checkout_asyncpg(pool))
    await closing
    returned = time.monotonic()
    after = await attempt_async(lambda: checkout_asyncpg(pool))
    server = await asyncio.to_thread(query_left_running, servers, name, returned, outcome)
    await borrower
    servers.terminate(name)
    return Row(
        client=f"asyncpg `wait_for(pool.close(), {WAIT_FOR_SECONDS})` + `pool.terminate()`",
        close_returned=f"at the timeout ({returned - started:.2f} s)",
        waits=f"until the timeout ({WAIT_FOR_SECONDS} s)",
        checkout=f"during: {during}; after: {after}",
        operation=outcome.text(started),
        server=server,
    )


async def wrapped_asyncpg(servers: Servers) -> Row:
    name = unique("pk-apg")
    registry = poolkeeper.Registry(drain_timeout=DRAIN_SECONDS, close_timeout=2.0)
    pool = registry.wrap(await asyncpg_pool(servers, name), name="pg")
    connection = await pool.acquire()  # never released, like the raw row
    outcome = Outcome(started=time.monotonic())

    async def borrow() -> None:
        try:
            await connection.fetchval(f"select pg_sleep({BORROW_SECONDS})")
        except Exception as error:  # noqa: BLE001 -- recorded: what the borrower saw is the measurement
            outcome.error = error
        outcome.ended = time.monotonic()

    borrower = asyncio.create_task(borrow())
    await until_async(lambda: servers.running(name) == 1, 5.0)
    started = time.monotonic()
    closing = asyncio.create_task(registry.aclose())
    await until_async(lambda: registry["pg"].state is not poolkeeper.KeeperState.OPEN, 2.0)
    during = await attempt_async(lambda: checkout_asyncpg(pool))
    await closing
    returned = time.monotonic()
    after = await attempt_async(lambda: checkout_asyncpg(pool))
    await borrower
    clean = await asyncio.to_thread(until, lambda: servers.backends(name) == 0, 2.0)
    servers.terminate(name)
    return Row(
        client="poolkeeper-wrapped asyncpg `Pool` (connection never released), `await registry.aclose()`",
        close_returned=f"after drain_timeout + force-close ({returned - started:.2f} s)",
        waits=f"yes, up to `drain_timeout` ({DRAIN_SECONDS} s); then cancels on the server and terminates",
        checkout=f"during: {during}; after: {after}",
        operation=outcome.text(started),
        server=server_summary(clean, "backend"),
    )


# -- psycopg_pool ----------------------------------------------------------------------------


def raw_psycopg_pool(servers: Servers) -> Row | Skipped:
    client = "psycopg_pool `ConnectionPool.close(timeout=5)`"
    try:
        psycopg_pool: Any = importlib.import_module("psycopg_pool")
    except ImportError:
        return Skipped(client, "psycopg_pool is not installed (it is no poolkeeper dependency)")
    name = unique("ppool")
    pool = psycopg_pool.ConnectionPool(
        servers.postgres_url, min_size=1, max_size=2, kwargs={"application_name": name}, open=True
    )
    try:
        pool.wait()

        def run() -> object:
            with pool.connection() as connection:
                return connection.execute(f"select pg_sleep({BORROW_SECONDS})").fetchone()

        thread, outcome = borrow_in_thread(run)
        until(lambda: servers.running(name) == 1, 5.0)
        started = time.monotonic()
        pool.close(timeout=5)
        returned = time.monotonic()
        still_running = outcome.ended is None

        def checkout() -> None:
            with pool.connection() as connection:
                connection.execute("select 1")

        after = attempt(checkout)
        server = query_left_running(servers, name, returned, outcome)
        thread.join()
        closed_on_return = until(lambda: servers.backends(name) == 0, 2.0)
        return Row(
            client=client,
            close_returned=f"at once ({returned - started:.3f} s): its timeout is for the pool's worker threads",
            waits="no" if still_running else "yes",
            checkout=f"after: {after}",
            operation=outcome.text(started),
            server=server + ("; the connection is closed when returned" if closed_on_return else ""),
        )
    finally:
        pool.close()
        servers.terminate(name)


# -- redis-py --------------------------------------------------------------------------------


def redis_client(servers: Servers, name: str) -> redis.Redis:
    return redis.Redis.from_url(servers.redis_url, client_name=name)


def blocking_pop(client: redis.Redis, key: str) -> Callable[[], object]:
    def run() -> object:
        return client.blpop([key], timeout=BORROW_SECONDS)

    return run


def blocked(servers: Servers, name: str) -> bool:
    return any(c.get("cmd") == "blpop" for c in servers.redis_clients(name))


def raw_redis(servers: Servers) -> Row:
    name = unique("redis")
    key = f"poolkeeper:raw-behaviour:{name}"  # BLPOP on a key nobody pushes to: never created
    client = redis_client(servers, name)
    try:
        thread, outcome = borrow_in_thread(blocking_pop(client, key))
        until(lambda: blocked(servers, name), 5.0)
        started = time.monotonic()
        client.connection_pool.disconnect(inuse_connections=True)
        returned = time.monotonic()
        still_running = outcome.ended is None
        after = attempt(client.ping)
        thread.join()
        connected = len(servers.redis_clients(name))
        return Row(
            client="redis-py `ConnectionPool.disconnect(inuse_connections=True)`",
            close_returned=f"at once ({returned - started:.3f} s)",
            waits="no" if still_running else "yes",
            checkout=f"after: {after} (the pool silently reconnects)",
            operation=outcome.text(started),
            server=f"{connected} connection(s) of the client in `CLIENT LIST` afterwards (reconnected)",
        )
    finally:
        client.close()
        servers.redis_side.delete(key)


def wrapped_redis(servers: Servers) -> Row:
    name = unique("pk-redis")
    key = f"poolkeeper:raw-behaviour:{name}"
    registry = poolkeeper.Registry(drain_timeout=DRAIN_SECONDS, close_timeout=2.0)
    client = registry.wrap(redis_client(servers, name), name="cache")
    try:
        thread, outcome = borrow_in_thread(blocking_pop(client, key))
        until(lambda: blocked(servers, name), 5.0)
        started = time.monotonic()
        closer = threading.Thread(target=registry.close, daemon=True)
        closer.start()
        until(lambda: registry["cache"].state is not poolkeeper.KeeperState.OPEN, 2.0)
        during = attempt(client.ping)
        closer.join()
        returned = time.monotonic()
        after = attempt(client.ping)
        thread.join()
        clean = until(lambda: not servers.redis_clients(name), 2.0)
        return Row(
            client="poolkeeper-wrapped `redis.Redis`, `registry.close()`",
            close_returned=f"after drain_timeout + force-close ({returned - started:.2f} s)",
            waits=f"yes, up to `drain_timeout` ({DRAIN_SECONDS} s); then shuts the socket down",
            checkout=f"during: {during}; after: {after}",
            operation=outcome.text(started),
            server="nothing: the client is gone from `CLIENT LIST`" if clean else "**the client is still connected**",
        )
    finally:
        registry.force_close()
        servers.redis_side.delete(key)


# -- aiohttp ---------------------------------------------------------------------------------


class SlowServer:
    """A real aiohttp.web server whose ``/slow`` handler takes ``BORROW_SECONDS`` to answer."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.finished = 0
        self.cancelled = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def slow(self, request: web.Request) -> web.Response:  # noqa: ARG002 -- aiohttp passes the request
        """Take ``BORROW_SECONDS`` to answer, recording whether the handler ran to its end."""
        self.started.set()
        try:
            await asyncio.sleep(BORROW_SECONDS)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        self.finished += 1
        return web.Response(text="done")

    async def fast(self, request: web.Request) -> web.Response:  # noqa: ARG002 -- aiohttp passes the request
        """Answer at once: the checkout attempted during and after close."""
        return web.Response(text="ok")

    async def start(self) -> None:
        """Listen on an ephemeral loopback port."""
        app = web.Application()
        app.router.add_get("/slow", self.slow)
        app.router.add_get("/fast", self.fast)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        """Stop listening."""
        if self.runner is not None:
            await self.runner.cleanup()

    def fate(self) -> str:
        """What became of the slow request on the server side."""
        if self.cancelled:
            return "the server's handler was cancelled"
        if self.finished:
            return "the server's handler ran to its end, answering nobody"
        return "the server's handler was still running"


async def http_borrow(session: aiohttp.ClientSession, url: str, outcome: Outcome) -> None:
    outcome.started = time.monotonic()
    try:
        async with session.get(f"{url}/slow") as response:
            await response.read()
    except Exception as error:  # noqa: BLE001 -- recorded: what the borrower saw is the measurement
        outcome.error = error
    outcome.ended = time.monotonic()


async def http_checkout(session: aiohttp.ClientSession, url: str) -> None:
    async with session.get(f"{url}/fast") as response:
        await response.read()


async def raw_aiohttp(server: SlowServer) -> Row:
    session = aiohttp.ClientSession()
    outcome = Outcome()
    server.started.clear()
    borrower = asyncio.create_task(http_borrow(session, server.url, outcome))
    await server.started.wait()
    started = time.monotonic()
    await session.close()
    returned = time.monotonic()
    still_running = not borrower.done()
    after = await attempt_async(lambda: http_checkout(session, server.url))
    await borrower
    await asyncio.sleep(BORROW_SECONDS)  # the handler's own duration: see whether it ran to its end
    return Row(
        client="aiohttp `ClientSession.close()`",
        close_returned=f"at once ({returned - started:.3f} s)",
        waits="no" if outcome.error is not None or still_running else "yes",
        checkout=f"after: {after}",
        operation=outcome.text(started),
        server=server.fate(),
    )


async def wrapped_aiohttp(server: SlowServer) -> Row:
    registry = poolkeeper.Registry(drain_timeout=DRAIN_SECONDS, close_timeout=2.0)
    session = registry.wrap(aiohttp.ClientSession(), name="upstream")
    outcome = Outcome()
    server.started.clear()
    server.finished = server.cancelled = 0
    borrower = asyncio.create_task(http_borrow(session, server.url, outcome))
    await server.started.wait()
    started = time.monotonic()
    closing = asyncio.create_task(registry.aclose())
    await until_async(lambda: registry["upstream"].state is not poolkeeper.KeeperState.OPEN, 2.0)
    during = await attempt_async(lambda: http_checkout(session, server.url))
    await closing
    returned = time.monotonic()
    after = await attempt_async(lambda: http_checkout(session, server.url))
    await borrower
    await asyncio.sleep(BORROW_SECONDS)
    return Row(
        client="poolkeeper-wrapped `ClientSession`, `await registry.aclose()`",
        close_returned=f"after drain_timeout + force-close ({returned - started:.2f} s)",
        waits=f"yes, up to `drain_timeout` ({DRAIN_SECONDS} s); then aborts the request",
        checkout=f"during: {during}; after: {after}",
        operation=outcome.text(started),
        server=server.fate() + " (HTTP has no cancel request)",
    )


# -- running and rendering -------------------------------------------------------------------


async def async_rows(servers: Servers) -> tuple[list[Row], list[Row]]:
    raw = [await raw_asyncpg_close(servers), await raw_asyncpg_terminate(servers)]
    wrapped = [await wrapped_asyncpg(servers)]
    server = SlowServer()
    await server.start()
    try:
        raw.append(await raw_aiohttp(server))
        wrapped.append(await wrapped_aiohttp(server))
    finally:
        await server.stop()
    return raw, wrapped


def measure(servers: Servers) -> tuple[list[Row | Skipped], list[Row]]:
    """Run every scenario; return the raw libraries' rows and poolkeeper's, in table order."""
    sqlalchemy_row = raw_sqlalchemy(servers)
    psycopg_pool_row = raw_psycopg_pool(servers)
    redis_row = raw_redis(servers)
    async_raw, async_wrapped = asyncio.run(async_rows(servers))
    asyncpg_close, asyncpg_terminate, aiohttp_row = async_raw
    raw: list[Row | Skipped] = [
        sqlalchemy_row,
        asyncpg_close,
        asyncpg_terminate,
        psycopg_pool_row,
        redis_row,
        aiohttp_row,
    ]
    wrapped = [
        wrapped_sqlalchemy(servers),
        wrapped_sqlalchemy_in_time(servers),
        async_wrapped[0],
        wrapped_redis(servers),
        async_wrapped[1],
    ]
    return raw, wrapped


def version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


HEADERS = (
    "closed while one connection is borrowed",
    "close returned",
    "waits for the borrower",
    "new checkout during / after close",
    "the borrowed operation",
    "left on the server",
)


def table(rows: list[Row | Skipped]) -> list[str]:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for row in rows:
        if isinstance(row, Skipped):
            lines.append(f"| {row.client} | skipped: {row.reason} |" + " |" * (len(HEADERS) - 2))
            continue
        cells = (row.client, row.close_returned, row.waits, row.checkout, row.operation, row.server)
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return lines


PAGE = """\
<!-- Generated by `python -m benchmarks.raw_behaviour --write docs/comparison.md`; do not edit. -->

# Comparison with the raw libraries

What each library does on its own when its pool is closed while one connection is borrowed, and
what the same object does once wrapped by poolkeeper. Every cell below was **measured** by
`benchmarks/raw_behaviour.py` (in the repository) against real servers, not written by hand.

Each scenario borrows one connection and starts a long operation on it: a `pg_sleep({borrow})`
query, a `BLPOP` with a {borrow} s timeout, an HTTP request whose handler takes {borrow} s. Then
it closes the pool the way the library offers, tries a new checkout, and looks at the server:
`pg_stat_activity` by `application_name`, `CLIENT LIST` by client name, the HTTP handler's own
record. poolkeeper's rows use `drain_timeout={drain}`, shorter than the borrowed operation, so
they show the force-close (and one row a borrower that finishes in time).

Measured on {today}: Python {python} ({platform}), PostgreSQL {postgres}, Redis {redis} on
loopback; {versions}. The run took {seconds:.1f} s.

## The raw libraries

{raw}

## The same objects, wrapped by poolkeeper

{wrapped}

No raw library combines refusing new checkouts, waiting for the borrowed ones within a deadline,
force-closing the rest on the client *and* the server, in dependency order, with a report of what
happened. What each wrapped library counts as a borrow and what its force-close does:
[SQLAlchemy](sqlalchemy.md), [asyncpg](asyncpg.md), [redis-py](redis.md), [aiohttp](aiohttp.md).

## Reproducing it

```bash
export POOLKEEPER_POSTGRES_URL=postgresql://postgres@127.0.0.1:5432/postgres
export POOLKEEPER_REDIS_URL=redis://127.0.0.1:6379/9   # never database 0
python -m benchmarks.raw_behaviour --write docs/comparison.md
```

The psycopg_pool row needs `pip install psycopg-pool` (poolkeeper does not depend on it); without
it, that row says it was skipped.
"""


def render(raw: list[Row | Skipped], wrapped: list[Row], servers: Servers, seconds: float) -> str:
    """The documentation page: the two tables, with the date and the versions they were measured on."""
    versions = ", ".join(
        f"{name} {version(name)}"
        for name in ("poolkeeper", "SQLAlchemy", "psycopg", "asyncpg", "psycopg-pool", "redis", "aiohttp")
    )
    return PAGE.format(
        borrow=BORROW_SECONDS,
        drain=DRAIN_SECONDS,
        today=dt.datetime.now(dt.timezone.utc).date().isoformat(),
        python=platform.python_version(),
        platform=sys.platform,
        postgres=servers.server_version(),
        redis=servers.redis_version(),
        versions=versions,
        seconds=seconds,
        raw="\n".join(table(raw)),
        wrapped="\n".join(table(list(wrapped))),
    )


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.raw_behaviour",
        description="Measure what each pool library does when closed while a connection is borrowed.",
    )
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("POOLKEEPER_POSTGRES_URL", DEFAULT_POSTGRES_URL),
        help="libpq URL of the PostgreSQL server (default: $POOLKEEPER_POSTGRES_URL or the loopback server)",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("POOLKEEPER_REDIS_URL", DEFAULT_REDIS_URL),
        help="Redis URL naming a database other than 0 (default: $POOLKEEPER_REDIS_URL or database 9)",
    )
    parser.add_argument("--write", type=Path, metavar="PAGE", help="write the Markdown page there")
    arguments = parser.parse_args(argv)
    database = redis.Redis.from_url(arguments.redis_url).connection_pool.connection_kwargs.get("db", 0)
    if int(database) == 0:
        parser.error("--redis-url must name a Redis database other than 0 (e.g. redis://127.0.0.1:6379/9)")
    return arguments


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    # The forced shutdowns are the point of the wrapped rows: their reports (logged as warnings on
    # the poolkeeper logger) would only repeat the table on stderr.
    logging.getLogger("poolkeeper").addHandler(logging.NullHandler())
    servers = Servers(arguments.postgres_url, arguments.redis_url)
    try:
        began = time.monotonic()
        raw, wrapped = measure(servers)
        page = render(raw, wrapped, servers, time.monotonic() - began)
    finally:
        with contextlib.suppress(Exception):
            servers.close()
    if arguments.write is not None:
        arguments.write.write_text(page)
        print(f"wrote {arguments.write}")
    else:
        print(page)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
