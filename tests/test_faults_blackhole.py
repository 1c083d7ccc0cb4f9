"""Fault: a blackholed peer. Force-close keeps the deadline and leaves nothing open, whatever the library.

Every client talks to its real server (PostgreSQL, Redis, an aiohttp.web server) through
``tests.faults.BlackholeProxy``. A borrower is blocked in a call (``pg_sleep``, ``BLPOP 0``, a
request whose answer is held back), then the proxy goes silent: nothing forwarded, nothing
read, every socket left open, new connections (the PostgreSQL cancel request's) accepted and
ignored. The shutdown must still end inside its deadline, the borrower must get an error, and
no socket, thread or task of the client may stay behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg
import pytest
import pytest_asyncio
import redis
import redis.asyncio
import sqlalchemy as sa
from aiohttp import web
from sqlalchemy.ext.asyncio import create_async_engine

from poolkeeper import KeeperState, PoolClosedError, Registry, ShutdownReport
from tests.conftest import Server, sqlalchemy_url
from tests.faults import BlackholeProxy, ThreadWatch, auntil, redis_default_backoff, sockets_to
from tests.test_redis_keeper import RedisServer, client_name, redis_server

__all__ = ["client_name", "redis_server"]  # fixtures shared with the Redis keeper tests

pytestmark = pytest.mark.asyncio

# The whole shutdown's deadline; drain_timeout (30 s) and close_timeout (10 s) are far longer,
# so the deadline alone decides when the borrowed connection is force-closed.
DEADLINE = 1.0
# What aclose(deadline=D) may overrun D by on a loaded two-core machine.
SLACK = 0.6
# Borrowers enough for the one-query cancel (BATCH_CANCEL_FROM is 8), within every pool's size.
MANY = 12


def not_ours(thread: threading.Thread) -> bool:
    """Threads that are not the client's: asyncio's default executor (asyncio.to_thread) keeps its workers."""
    return thread.name.startswith("asyncio_")


@dataclass
class Borrower:
    """Whoever holds the connection through the proxy: a thread or a task, and what it got."""

    holding: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    failed_at: float | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def run_sync(self, call: Callable[[], Any]) -> threading.Thread:
        def target() -> None:
            try:
                call()
            except BaseException as error:
                self.error, self.failed_at = error, time.monotonic()
            finally:
                self.done.set()

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        return thread

    def run_async(self, call: Awaitable[Any]) -> asyncio.Task[None]:
        async def target() -> None:
            try:
                await call
            except BaseException as error:
                self.error, self.failed_at = error, time.monotonic()
            finally:
                self.done.set()

        return asyncio.ensure_future(target())


class HeldServer:
    """A real aiohttp.web server whose ``/held`` handler never answers; ``/fast`` answers at once."""

    def __init__(self) -> None:
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def held(self, _request: web.Request) -> web.Response:
        self.arrived.set()
        await self.release.wait()
        return web.Response(text="late")

    async def fast(self, _request: web.Request) -> web.Response:
        return web.Response(text="fast")

    async def sink(self, request: web.Request) -> web.Response:
        self.arrived.set()
        return web.Response(text=str(len(await request.read())))


@pytest_asyncio.fixture
async def http_server() -> AsyncIterator[HeldServer]:
    """A real aiohttp.web server on an ephemeral port of 127.0.0.1."""
    server = HeldServer()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_get("/held", server.held)
    app.router.add_get("/fast", server.fast)
    app.router.add_post("/sink", server.sink)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server.runner = runner
    server.port = runner.addresses[0][1]
    yield server
    server.release.set()
    await runner.cleanup()


@pytest.fixture
def proxies() -> Iterator[Callable[[int], BlackholeProxy]]:
    """Start blackhole proxies in front of a port; every one is stopped at teardown."""
    started: list[BlackholeProxy] = []

    def start(upstream_port: int) -> BlackholeProxy:
        proxy = BlackholeProxy("127.0.0.1", upstream_port).start()
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


@dataclass
class Setup:
    """One library's resource, wrapped, behind a proxy, and how to block a borrower in a call on it."""

    proxy: BlackholeProxy
    block: Callable[[Borrower], Any]  # starts the borrower; returns its thread or task
    in_call: Callable[[], bool]  # the server's view: the borrower's call is running
    warm: Callable[[], Coroutine[Any, Any, None]]  # open (and return) one connection before the fault


@dataclass
class Servers:
    """Where the real servers are, how to look at them, and what to clean up after the test."""

    proxies: Callable[[int], BlackholeProxy]
    pg_url: str
    application_name: str
    pg: Server
    redis_port: int
    client_name: str
    redis: RedisServer
    http: HeldServer
    cleanups: list[Callable[[], Coroutine[Any, Any, None]]] = field(default_factory=list)
    blpop_key: str = field(default_factory=lambda: f"pk-test:never-pushed:{uuid.uuid4().hex}")  # never created

    def pg_running(self) -> bool:
        return bool(self.pg.sleeping())

    def redis_blocked(self) -> bool:
        return "blpop" in self.redis.commands()

    def pg_behind(self, proxy: BlackholeProxy, driver: str) -> sa.URL:
        return sqlalchemy_url(self.pg_url, driver).set(host=proxy.host, port=proxy.port)


async def sqlalchemy_setup(servers: Servers, registry: Registry) -> Setup:
    proxy = servers.proxies(sa.make_url(servers.pg_url).port or 5432)
    engine = registry.wrap(
        sa.create_engine(
            servers.pg_behind(proxy, "psycopg"), connect_args={"application_name": servers.application_name}
        ),
        name="target",
    )

    def sleep() -> None:
        with engine.connect() as connection:
            connection.execute(sa.text("select pg_sleep(60)"))

    async def warm() -> None:
        await asyncio.to_thread(lambda: engine.connect().close())

    return Setup(proxy, lambda borrower: borrower.run_sync(sleep), servers.pg_running, warm)


async def sqlalchemy_async_setup(servers: Servers, registry: Registry) -> Setup:
    proxy = servers.proxies(sa.make_url(servers.pg_url).port or 5432)
    engine = registry.wrap(
        create_async_engine(
            servers.pg_behind(proxy, "asyncpg"),
            connect_args={"server_settings": {"application_name": servers.application_name}},
        ),
        name="target",
    )

    async def sleep() -> None:
        async with engine.connect() as connection:
            await connection.execute(sa.text("select pg_sleep(60)"))

    async def warm() -> None:
        async with engine.connect() as connection:
            await connection.execute(sa.text("select 1"))

    return Setup(proxy, lambda borrower: borrower.run_async(sleep()), servers.pg_running, warm)


async def asyncpg_setup(servers: Servers, registry: Registry) -> Setup:
    proxy = servers.proxies(sa.make_url(servers.pg_url).port or 5432)
    pool = registry.wrap(
        await asyncpg.create_pool(
            sa.make_url(servers.pg_url).set(host=proxy.host, port=proxy.port).render_as_string(hide_password=False),
            min_size=1,
            max_size=MANY,
            server_settings={"application_name": servers.application_name},
        ),
        name="target",
    )

    async def terminate() -> None:
        pool.terminate()

    servers.cleanups.append(terminate)

    async def sleep() -> None:
        async with pool.acquire() as connection:
            await connection.fetchval("select pg_sleep(60)")

    async def warm() -> None:
        await pool.fetchval("select 1")

    return Setup(proxy, lambda borrower: borrower.run_async(sleep()), servers.pg_running, warm)


async def redis_setup(servers: Servers, registry: Registry) -> Setup:
    proxy = servers.proxies(servers.redis_port)
    client = registry.wrap(
        redis.Redis(host=proxy.host, port=proxy.port, db=9, client_name=servers.client_name, socket_timeout=30),
        name="target",
    )

    async def warm() -> None:
        await asyncio.to_thread(client.ping)

    return Setup(
        proxy,
        lambda borrower: borrower.run_sync(lambda: client.blpop([servers.blpop_key], 0)),
        servers.redis_blocked,
        warm,
    )


async def redis_asyncio_setup(servers: Servers, registry: Registry) -> Setup:
    proxy = servers.proxies(servers.redis_port)
    client = registry.wrap(
        redis.asyncio.Redis(host=proxy.host, port=proxy.port, db=9, client_name=servers.client_name, socket_timeout=30),
        name="target",
    )

    async def warm() -> None:
        await client.ping()

    return Setup(
        proxy, lambda borrower: borrower.run_async(client.blpop([servers.blpop_key], 0)), servers.redis_blocked, warm
    )


async def aiohttp_setup(servers: Servers, registry: Registry) -> Setup:
    proxy = servers.proxies(servers.http.port)
    session = registry.wrap(aiohttp.ClientSession(f"http://{proxy.host}:{proxy.port}"), name="target")
    servers.cleanups.append(session.close)

    async def wait_for_held() -> None:
        async with session.get("/held") as response:
            await response.read()

    async def warm() -> None:
        async with session.get("/fast") as response:
            await response.read()

    return Setup(proxy, lambda borrower: borrower.run_async(wait_for_held()), servers.http.arrived.is_set, warm)


SETUPS: dict[str, Callable[[Servers, Registry], Coroutine[Any, Any, Setup]]] = {
    "sqlalchemy": sqlalchemy_setup,
    "sqlalchemy-async": sqlalchemy_async_setup,
    "asyncpg": asyncpg_setup,
    "redis": redis_setup,
    "redis-asyncio": redis_asyncio_setup,
    "aiohttp": aiohttp_setup,
}
LIBRARIES = list(SETUPS)
POSTGRES_LIBRARIES = ["sqlalchemy", "sqlalchemy-async", "asyncpg"]


@pytest.fixture
def postgres(pg_url: str, application_name: str, server: Server) -> tuple[str, str, Server]:
    return pg_url, application_name, server


@pytest.fixture
def redis_side(redis_url: str, client_name: str, redis_server: RedisServer) -> tuple[int, str, RedisServer]:
    port = redis.connection.parse_url(redis_url).get("port", 6379)  # type: ignore[no-untyped-call]  # unannotated
    return int(port), client_name, redis_server


@pytest_asyncio.fixture
async def setups(
    proxies, postgres: tuple[str, str, Server], redis_side: tuple[int, str, RedisServer], http_server: HeldServer
) -> AsyncIterator[Callable[[str, Registry], Coroutine[Any, Any, Setup]]]:
    """Build, for a library name, its resource behind a proxy, wrapped into the given registry."""
    pg_url, application_name, pg = postgres
    redis_port, client_name, redis_view = redis_side
    servers = Servers(proxies, pg_url, application_name, pg, redis_port, client_name, redis_view, http_server)

    async def make(library: str, registry: Registry) -> Setup:
        return await SETUPS[library](servers, registry)

    yield make
    for cleanup in servers.cleanups:
        with contextlib.suppress(Exception):
            await cleanup()


async def wait_all_ended(watch: ThreadWatch, timeout: float) -> None:
    await asyncio.to_thread(watch.wait_all_ended, timeout, ignore=not_ours)


def pending_client_tasks(before: set[asyncio.Task[Any]]) -> list[asyncio.Task[Any]]:
    """Tasks started since ``before`` and still pending, but the test's own and the web server's handlers."""
    tasks = asyncio.all_tasks() - before - {asyncio.current_task()}
    return [task for task in tasks if not task.get_coro().__qualname__.startswith(("RequestHandler.", "BaseProtocol."))]  # type: ignore[union-attr]  # every task here has a coroutine


async def client_tasks_left(before: set[asyncio.Task[Any]], timeout: float) -> list[asyncio.Task[Any]]:
    """The client's tasks (see :func:`pending_client_tasks`) still pending after up to ``timeout`` seconds.

    Like the threads, the tasks get a bounded time to end: a connection the forced borrower gives
    back after the sweep is closed by a task of its own, which needs a few loop steps.
    """
    pending = pending_client_tasks(before)
    if pending:
        await asyncio.wait(pending, timeout=timeout)
    return pending_client_tasks(before)


@dataclass
class Blackholed:
    """What :func:`close_on_a_blackholed_peer` saw: the report, and what was there before the fault."""

    report: ShutdownReport
    started: float
    elapsed: float
    tasks_before: set[asyncio.Task[Any]]
    watch: ThreadWatch


async def close_on_a_blackholed_peer(
    registry: Registry, setup: Setup, borrowers: list[Borrower], in_call: Callable[[], bool]
) -> Blackholed:
    """Block ``borrowers`` in their call (until ``in_call``), blackhole the peer, then ``aclose(deadline=DEADLINE)``."""
    await setup.warm()
    for borrower in borrowers:
        setup.block(borrower)
    assert await asyncio.to_thread(_settle, in_call)
    tasks_before = set(asyncio.all_tasks())
    watch = ThreadWatch()
    setup.proxy.blackhole()
    started = time.monotonic()
    report = await registry.aclose(deadline=DEADLINE)
    return Blackholed(report, started, time.monotonic() - started, tasks_before, watch)


@pytest.mark.parametrize("library", LIBRARIES)
async def test_force_close_of_a_call_stuck_on_a_blackholed_peer_keeps_the_deadline(library, setups):
    """aclose(deadline) ends in time, the stuck borrower gets an error, and no socket, thread or task stays behind."""
    registry = Registry(drain_timeout=30, close_timeout=10)
    setup = await setups(library, registry)
    borrower = Borrower()
    closed = await close_on_a_blackholed_peer(registry, setup, [borrower], setup.in_call)
    report, started, elapsed, tasks_before, watch = (
        closed.report,
        closed.started,
        closed.elapsed,
        closed.tasks_before,
        closed.watch,
    )
    backoff = redis_default_backoff() if library.startswith("redis") else 0.0  # the library's own sleep
    await auntil(borrower.done.is_set, timeout=2.0 + backoff)

    item = report["target"]
    # PostgreSQL's server-side cancel never reached the server: not a clean force (see below).
    outcome = "failed" if library in POSTGRES_LIBRARIES else "forced"
    assert (item.outcome, item.borrowed_at_start, item.returned, item.forced) == (outcome, 1, 0, 1)
    assert not report.ok
    assert elapsed < DEADLINE + SLACK
    assert borrower.error is not None
    assert borrower.failed_at is not None
    assert borrower.failed_at - started < DEADLINE + SLACK + backoff
    assert registry["target"].state is KeeperState.CLOSED
    await wait_all_ended(watch, timeout=2.0)
    assert await client_tasks_left(tasks_before, timeout=2.0) == []
    # Collected first: a timed-out cancel request may wait for the collector to free its socket;
    # that is a bug of its own, pinned by the xfail test below, not what this matrix checks.
    gc.collect()
    assert sockets_to(setup.proxy.port) == 0


@pytest.mark.parametrize("library", ["sqlalchemy", "asyncpg"])
async def test_a_dozen_calls_stuck_on_a_blackholed_peer_are_forced_within_the_deadline(library, setups, server):
    """Eight or more: the one-query cancel's side connection hangs too; the deadline holds and nothing stays behind."""
    registry = Registry(drain_timeout=30, close_timeout=10)
    setup = await setups(library, registry)
    borrowers = [Borrower() for _ in range(MANY)]
    closed = await close_on_a_blackholed_peer(registry, setup, borrowers, lambda: len(server.sleeping()) == MANY)
    for borrower in borrowers:
        await auntil(borrower.done.is_set, timeout=2.0)

    item = closed.report["target"]
    assert (item.outcome, item.forced) == ("failed", MANY)
    assert f"the server did not confirm the cancel of {MANY} of {MANY} running statement(s)" in (item.error or "")
    assert closed.elapsed < DEADLINE + SLACK
    assert all(borrower.error is not None for borrower in borrowers)
    await wait_all_ended(closed.watch, timeout=2.0)
    assert await client_tasks_left(closed.tasks_before, timeout=2.0) == []
    gc.collect()
    assert sockets_to(setup.proxy.port) == 0


@pytest.mark.parametrize("blackholed", [True, False], ids=["blackholed", "reachable"])
@pytest.mark.parametrize("library", POSTGRES_LIBRARIES)
async def test_the_report_says_whether_the_server_confirmed_the_cancel(library, blackholed, setups):
    """An unanswered server-side cancel makes the keeper failed, saying so; an answered one is a plain force."""
    registry = Registry(drain_timeout=30, close_timeout=10)
    setup = await setups(library, registry)
    await setup.warm()
    borrower = Borrower()
    setup.block(borrower)
    assert await asyncio.to_thread(_settle, setup.in_call)
    if blackholed:
        setup.proxy.blackhole()

    report = await registry.aclose(deadline=DEADLINE)
    await auntil(borrower.done.is_set, timeout=2.0)

    item = report["target"]
    assert (item.forced, report.ok) == (1, False)
    if blackholed:
        assert item.outcome == "failed"
        assert "the server did not confirm the cancel of 1 of 1 running statement(s)" in (item.error or "")
        assert "may still be running on the server" in str(report)
        assert setup.in_call()  # the server's view: the statement indeed still runs
    else:
        assert (item.outcome, item.error) == ("forced", None)
        assert await asyncio.to_thread(_settle, lambda: not setup.in_call())


@pytest.mark.parametrize("library", LIBRARIES)
async def test_checkouts_are_refused_at_once_while_the_peer_is_blackholed(library, setups):
    """A checkout during the drain fails with PoolClosedError at once; it never waits on the silent peer."""
    registry = Registry(drain_timeout=30, close_timeout=10)
    setup = await setups(library, registry)
    await setup.warm()
    borrower = Borrower()
    setup.block(borrower)
    assert await asyncio.to_thread(_settle, setup.in_call)
    setup.proxy.blackhole()
    closing = asyncio.ensure_future(registry.aclose(deadline=DEADLINE))
    await auntil(lambda: registry["target"].state is KeeperState.DRAINING)

    started = time.monotonic()
    with pytest.raises(PoolClosedError):
        await setup.warm()
    assert time.monotonic() - started < 0.5
    assert registry.force_close() is None  # on the closing loop: forces, and returns at once
    assert (await closing)["target"].forced == 1


@pytest.mark.parametrize("library", LIBRARIES)
async def test_idle_connections_to_a_blackholed_peer_close_at_once(library, setups):
    """With nothing borrowed, closing idle connections to a silent peer is prompt and leaves no socket open."""
    registry = Registry(drain_timeout=30, close_timeout=10)
    setup = await setups(library, registry)
    await setup.warm()
    assert sockets_to(setup.proxy.port) >= 1
    watch = ThreadWatch()
    setup.proxy.blackhole()

    started = time.monotonic()
    report = await registry.aclose()
    elapsed = time.monotonic() - started

    assert report["target"].outcome == "clean"
    assert elapsed < 0.5
    await wait_all_ended(watch, timeout=2.0)
    assert sockets_to(setup.proxy.port) == 0


def _settle(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Re-check a server's view until ``predicate`` holds (no event exists for "the query started")."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


async def test_a_timed_out_cancel_request_frees_its_socket_without_the_garbage_collector(setups):
    """The cancel request sent to a blackholed PostgreSQL is closed once it times out, not at the next gc pass."""
    registry = Registry(drain_timeout=30, close_timeout=10)
    setup = await setups("sqlalchemy", registry)
    borrower = Borrower()
    setup.block(borrower)
    assert await asyncio.to_thread(_settle, setup.in_call)
    watch = ThreadWatch()
    setup.proxy.blackhole()
    # Earlier tests' garbage may hold sockets to a port number this proxy now reuses: collect it
    # first, then keep the collector off, since the point is that the code closes the socket.
    gc.collect()
    gc.disable()
    try:
        await registry.aclose(deadline=DEADLINE)
        await wait_all_ended(watch, timeout=2.0)
        left = sockets_to(setup.proxy.port)
    finally:
        gc.enable()
    assert borrower.error is not None
    assert left == 0


async def test_an_upload_cut_by_the_force_close_leaves_no_socket_open(setups):
    """A POST of 32 MiB stuck on a blackholed server is aborted and its socket closed within the deadline."""
    registry = Registry(drain_timeout=30, close_timeout=10)
    setup = await setups("aiohttp", registry)
    session = registry["target"].resource
    await setup.warm()
    setup.proxy.blackhole()

    async def upload() -> None:
        async with session.post("/sink", data=b"x" * (32 * 1024 * 1024)) as response:
            await response.read()

    borrower = Borrower()
    borrower.run_async(upload())
    await auntil(lambda: registry["target"].borrowed == 1)
    await asyncio.sleep(0.2)  # the client fills the socket buffers; nothing signals "buffers full"
    started = time.monotonic()
    report = await registry.aclose(deadline=DEADLINE)
    await auntil(borrower.done.is_set, timeout=2.0)

    assert report["target"].forced == 1
    assert time.monotonic() - started < DEADLINE + SLACK
    assert isinstance(borrower.error, aiohttp.ClientConnectionError)
    await asyncio.sleep(0)  # transports close on the next loop step
    assert sockets_to(setup.proxy.port) == 0


async def test_asyncpg_terminate_leaves_no_thread_waiting_on_a_blackholed_server(setups):
    """pool.terminate() with a borrowed connection: its cancel-request thread ends within close_timeout."""
    registry = Registry(drain_timeout=30, close_timeout=1.0)
    setup = await setups("asyncpg", registry)
    pool = registry["target"].resource
    borrower = Borrower()
    setup.block(borrower)
    assert await asyncio.to_thread(_settle, setup.in_call)
    watch = ThreadWatch()
    setup.proxy.blackhole()

    pool.terminate()
    await auntil(borrower.done.is_set, timeout=2.0)

    assert isinstance(borrower.error, asyncpg.exceptions.ConnectionDoesNotExistError)
    await wait_all_ended(watch, timeout=2.0)
    gc.collect()
    assert sockets_to(setup.proxy.port) == 0
