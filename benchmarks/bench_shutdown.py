"""Shutdown itself: concurrency, force-close at scale, memory per borrow, raw shutdown side by side.

Twenty keepers closing together against the longest of them alone; force-closing thousands of
borrowed connections (five hundred PostgreSQL ones, with room made for them: _max_connections);
what a borrow costs in memory; and the raw libraries' own shutdown next to poolkeeper's, on the
same work in flight.

Everything runs against the real servers: PostgreSQL, Redis (database 9, only keys nobody
creates), and an aiohttp.web server in this process (in a process of its own for the HTTP
force-close at scale, whose server side would otherwise be timed with it). Every client is tagged with a name unique
to its measurement (``application_name``, ``CLIENT SETNAME``), so that what a server still holds
afterwards is counted, and then cleaned up.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import statistics
import threading
import time
import tracemalloc
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
import asyncpg
import psycopg
import redis
import redis.asyncio
import sqlalchemy as sa
from aiohttp import web

import poolkeeper
from benchmarks._endless_server import EndlessServer, endless_server, open_connections
from benchmarks._max_connections import max_connections_at_least
from benchmarks._measure import (
    MEMORY,
    SCALE,
    TRACKED_BYTES_GOAL,
    UNTRACKED_BYTES_GOAL,
    CloseOutcome,
    Result,
    Row,
    spread,
)
from poolkeeper import KeeperState, Registry

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

T = TypeVar("T")

PG_URL = os.environ.get("POOLKEEPER_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("POOLKEEPER_REDIS_URL", "redis://127.0.0.1:6379/9")

# Twenty independent keepers: the borrower of keeper i still works LONGEST_HOLD * (i + 1) / KEEPERS
# seconds once shutdown starts; closing them one after another would take the sum.
KEEPERS = 20
LONGEST_HOLD = 0.3
CONCURRENCY_GOAL = 1.25
CONCURRENCY_ROUNDS = 3

# Force-closing many borrowed connections at once.
REDIS_FORCED = 5000
HTTP_FORCED = 5000
PG_FORCED = 500
PG_HEADROOM = 25  # connections left free for everything else on the server (other test runs)
# Asked of max_connections (raised for the measurement where it can be, see _max_connections):
# the borrowers, the headroom, and the clients already there.
PG_ROOM = PG_FORCED + PG_HEADROOM + 75
FORCE_GOAL_MS = 250.0
FORCE_ROUNDS = 3

# Memory: borrows held at once, and how deep in the caller's stack they are made (tracked
# borrows record that stack, so its depth is what their size depends on).
MEMORY_BORROWS = 1000
MEMORY_DEPTH = 20

# Side by side: FINISHING requests in flight that end WORK seconds after they started, and one
# that never ends by itself; poolkeeper waits DEADLINE for them, the raw asyncpg close too.
FINISHING = 10
WORK = 0.3
DEADLINE = 1.0
STUCK_SECONDS = 30  # the "never ending" PostgreSQL query; terminated at cleanup

_PACKAGE_DIR = str(Path(poolkeeper.__file__).parent) + os.sep


def unique_name(what: str) -> str:
    """A client name (application_name, CLIENT SETNAME) unique to one measurement."""
    return f"pk-bench-{what}-{uuid.uuid4().hex[:8]}"


def sa_url(application_name: str) -> sa.URL:
    """The PostgreSQL URL for SQLAlchemy with psycopg 3, tagged with ``application_name``."""
    url = sa.make_url(PG_URL).set(drivername="postgresql+psycopg")
    return url.update_query_dict({"application_name": application_name})


def in_thread(function: Callable[[], T]) -> asyncio.Future[T]:
    """Run ``function`` in a daemon thread: a borrower stuck in a query never holds up exit."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)

    def target() -> None:
        try:
            outcome: tuple[Any, BaseException | None] = (function(), None)
        except BaseException as error:  # noqa: BLE001 -- handed over to the awaiting task
            outcome = (None, error)
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=target, daemon=True).start()
    return future


async def settle(predicate: Callable[[], Awaitable[bool]], timeout: float) -> bool:
    """Re-check SERVER state until ``predicate`` holds or ``timeout`` passes (servers offer no event)."""
    end = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > end:
            return False
        await asyncio.sleep(0.01)
    return True


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for in-process state that has no event (a keeper's state, a counter)."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise TimeoutError("the benchmark's setup did not reach the expected state")
        await asyncio.sleep(0.001)


# -- the servers, seen from the side --------------------------------------------------------------


class Postgres:
    """A side connection that counts one measurement's backends on the PostgreSQL server."""

    def __init__(self, connection: psycopg.AsyncConnection[Any]) -> None:
        self._connection = connection

    @classmethod
    async def connect(cls) -> Postgres:
        """Open the side connection."""
        return cls(await psycopg.AsyncConnection.connect(PG_URL, autocommit=True))

    async def backends(self, application_name: str) -> tuple[int, int]:
        """(all, active) backends of ``application_name``."""
        cursor = await self._connection.execute(
            "select count(*), count(*) filter (where state = 'active') from pg_stat_activity"
            " where application_name = %s",
            (application_name,),
        )
        row = await cursor.fetchone()
        assert row is not None
        return int(row[0]), int(row[1])

    async def setting(self, name: str) -> str:
        """The server's current value of setting ``name``."""
        cursor = await self._connection.execute("select current_setting(%s)", (name,))
        row = await cursor.fetchone()
        assert row is not None
        return str(row[0])

    async def client_backends(self) -> int:
        """Client backends on the whole server, whoever opened them."""
        cursor = await self._connection.execute(
            "select count(*) from pg_stat_activity where backend_type = 'client backend'"
        )
        row = await cursor.fetchone()
        assert row is not None
        return int(row[0])

    async def terminate(self, application_name: str) -> None:
        """Terminate every backend of ``application_name`` and wait until they are gone."""
        await self._connection.execute(
            "select pg_terminate_backend(pid) from pg_stat_activity where application_name = %s",
            (application_name,),
        )
        await settle(lambda: self._gone(application_name), 5.0)

    async def _gone(self, application_name: str) -> bool:
        return (await self.backends(application_name))[0] == 0

    async def close(self) -> None:
        """Close the side connection."""
        await self._connection.close()


class RedisSide:
    """A side client that counts one measurement's clients in ``CLIENT LIST``."""

    def __init__(self) -> None:
        # Generous: it may (re)connect while thousands of borrowers keep the server and this
        # process's loop busy connecting.
        self._client = redis.asyncio.Redis.from_url(REDIS_URL, socket_connect_timeout=60, socket_timeout=60)

    async def clients(self, name: str) -> tuple[int, int]:
        """(all, blocked) clients named ``name``."""
        listed = [client for client in await self._client.client_list() if client.get("name") == name]
        return len(listed), sum(1 for client in listed if "b" in client.get("flags", ""))

    async def kill(self, name: str) -> None:
        """``CLIENT KILL`` every client named ``name`` (cleanup after a raw close)."""
        for client in await self._client.client_list():
            if client.get("name") == name:
                with contextlib.suppress(redis.ResponseError):  # gone meanwhile
                    await self._client.client_kill_filter(_id=client["id"])

    async def version(self) -> str:
        """The server's ``redis_version``."""
        return str((await self._client.info("server"))["redis_version"])

    async def close(self) -> None:
        """Close the side client."""
        await self._client.aclose()


class HttpServer:
    """An aiohttp.web server on 127.0.0.1 with the endpoints these measurements need."""

    def __init__(self) -> None:
        self.runner: web.AppRunner | None = None
        self.url = ""
        self.gate = asyncio.Event()  # /gated finishes HOLD seconds after this opens; set per run
        self.finish = asyncio.Event()  # /endless never finishes before this
        self.arrived = 0  # requests that reached a handler

    def open_connections(self) -> int:
        """Connections whose socket the server still has open (a stuck handler keeps its entry)."""
        assert self.runner is not None
        return open_connections(self.runner)

    async def gated(self, request: web.Request) -> web.StreamResponse:
        """Headers at once; the body ends ``s`` seconds after the gate opens."""
        self.arrived += 1
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"first")
        await self.gate.wait()
        await asyncio.sleep(float(request.query["s"]))
        await response.write(b"last")
        return response

    async def work(self, request: web.Request) -> web.Response:
        """A response after ``s`` seconds of work."""
        self.arrived += 1
        await asyncio.sleep(float(request.query["s"]))
        return web.Response(text="done")

    async def endless(self, request: web.Request) -> web.StreamResponse:
        """Headers at once; a body that never ends."""
        self.arrived += 1
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"first")
        await self.finish.wait()
        return response

    async def small(self, _request: web.Request) -> web.Response:
        """A tiny response."""
        return web.Response(text="ok")


@contextlib.asynccontextmanager
async def http_server() -> AsyncIterator[HttpServer]:
    """Start an :class:`HttpServer` on an ephemeral port; stop it afterwards."""
    server = HttpServer()
    app = web.Application()
    app.router.add_get("/gated", server.gated)
    app.router.add_get("/work", server.work)
    app.router.add_get("/endless", server.endless)
    app.router.add_get("/small", server.small)
    server.runner = runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
    await site.start()
    server.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield server
    finally:
        server.finish.set()
        server.gate.set()
        await runner.cleanup()


# -- twenty independent keepers: is shutdown the longest drain, or the sum? ------------------------


class Gate:
    """Opened as shutdown starts: every borrower then does its last piece of work and returns."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.thread_event = threading.Event()

    def open(self) -> None:
        """Let every borrower go on (async tasks and threads alike)."""
        self.event.set()
        self.thread_event.set()


class Arrivals:
    """Counts the borrowers that hold their connection; ``arrive_threadsafe`` for threads."""

    def __init__(self, expected: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._left = expected
        self._all = asyncio.Event()

    def arrive(self) -> None:
        """One more borrower holds its connection (on the loop)."""
        self._left -= 1
        if self._left == 0:
            self._all.set()

    def arrive_threadsafe(self) -> None:
        """One more borrower holds its connection (from a thread)."""
        self._loop.call_soon_threadsafe(self.arrive)

    async def wait(self) -> None:
        """Until every borrower holds its connection."""
        await asyncio.wait_for(self._all.wait(), 30)


class Holding:
    """Where one keeper's borrower runs: the task (or thread) and what to close afterwards."""

    def __init__(self, borrower: Awaitable[None], cleanup: Callable[[], Awaitable[None]] | None = None) -> None:
        self.borrower = borrower
        self.cleanup = cleanup


async def hold_sqlalchemy(
    registry: Registry, name: str, hold: float, gate: Gate, arrivals: Arrivals, _server: HttpServer
) -> Holding:
    """A sync Engine (psycopg 3); its borrower, a thread, runs ``pg_sleep(hold)`` once shutdown starts."""
    engine = registry.wrap(sa.create_engine(sa_url(name), pool_size=1, max_overflow=0), name=name)

    def work() -> None:
        with engine.connect() as connection:
            connection.exec_driver_sql("select 1")
            arrivals.arrive_threadsafe()
            gate.thread_event.wait()
            connection.exec_driver_sql(f"select pg_sleep({hold})")

    return Holding(in_thread(work))


async def hold_asyncpg(
    registry: Registry, name: str, hold: float, gate: Gate, arrivals: Arrivals, _server: HttpServer
) -> Holding:
    """An asyncpg Pool; its borrower runs ``pg_sleep(hold)`` once shutdown starts."""
    pool = await asyncpg.create_pool(PG_URL, min_size=1, max_size=1, server_settings={"application_name": name})
    registry.wrap(pool, name=name)

    async def work() -> None:
        async with pool.acquire() as connection:
            await connection.fetchval("select 1")
            arrivals.arrive()
            await gate.event.wait()
            await connection.execute(f"select pg_sleep({hold})")

    return Holding(asyncio.ensure_future(work()))


async def hold_redis(
    registry: Registry, name: str, hold: float, gate: Gate, arrivals: Arrivals, _server: HttpServer
) -> Holding:
    """A redis.asyncio client; its borrower holds a WATCH transaction for ``hold`` once shutdown starts."""
    client = redis.asyncio.Redis.from_url(REDIS_URL, client_name=name)
    registry.wrap(client, name=name)
    key = f"{name}:watched"  # never created

    async def work() -> None:
        async with client.pipeline() as pipe:
            await pipe.watch(key)  # from here the pipeline holds its connection
            arrivals.arrive()
            await gate.event.wait()
            await asyncio.sleep(hold)  # the borrower's own work between WATCH and EXEC
            pipe.multi()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
            pipe.get(key)
            await pipe.execute()

    return Holding(asyncio.ensure_future(work()), client.aclose)


async def hold_aiohttp(
    registry: Registry, name: str, hold: float, _gate: Gate, arrivals: Arrivals, server: HttpServer
) -> Holding:
    """An aiohttp ClientSession; its borrower reads a response the server ends ``hold`` after shutdown starts."""
    session = registry.wrap(aiohttp.ClientSession(), name=name)

    async def work() -> None:
        async with session.get(f"{server.url}/gated", params={"s": str(hold)}) as response:
            arrivals.arrive()
            await response.read()

    return Holding(asyncio.ensure_future(work()))


KINDS = (hold_sqlalchemy, hold_asyncpg, hold_redis, hold_aiohttp)
KIND_NAMES = "SQLAlchemy (psycopg), asyncpg, redis.asyncio and aiohttp"


async def timed_shutdown(server: HttpServer, specs: Sequence[tuple[Any, float]]) -> float:
    """Seconds ``aclose()`` takes for keepers whose borrowers each still work ``hold`` seconds."""
    registry = Registry(drain_timeout=10.0)
    gate = Gate()
    server.gate = gate.event
    arrivals = Arrivals(len(specs))
    holdings = [
        await kind(registry, unique_name(f"k{index}"), hold, gate, arrivals, server)
        for index, (kind, hold) in enumerate(specs)
    ]
    await arrivals.wait()
    started = time.perf_counter()
    gate.open()
    report = await registry.aclose()
    elapsed = time.perf_counter() - started
    await asyncio.gather(*(holding.borrower for holding in holdings))
    for holding in holdings:
        if holding.cleanup is not None:
            await holding.cleanup()
    if not report.ok or any(item.forced for item in report.items):
        raise RuntimeError(f"every borrower should have come back in time:\n{report}")
    return elapsed


async def twenty_keepers(server: HttpServer) -> Result:
    """Total shutdown of twenty independent keepers against the longest of their drains alone."""
    specs = [(KINDS[index % len(KINDS)], LONGEST_HOLD * (index + 1) / KEEPERS) for index in range(KEEPERS)]
    longest, together, sums, ratios = [], [], [], []
    for _ in range(CONCURRENCY_ROUNDS):
        alone = [await timed_shutdown(server, [spec]) for spec in specs]
        all_at_once = await timed_shutdown(server, specs)
        longest.append(max(alone))
        sums.append(sum(alone))
        together.append(all_at_once)
        ratios.append(all_at_once / max(alone))
    ratio = statistics.median(ratios)
    shortest_hold = LONGEST_HOLD / KEEPERS
    return Result(
        section=SCALE,
        name=f"{KEEPERS} independent keepers closing together",
        unit="ms",
        raw=statistics.median(longest) * 1e3,
        wrapped=statistics.median(together) * 1e3,
        ratio=ratio,
        goal=f"<= {CONCURRENCY_GOAL:.2f}x the longest single",
        met=ratio <= CONCURRENCY_GOAL,
        detail=(
            f"{KEEPERS // len(KINDS)} each of {KIND_NAMES}, each with one connection whose borrower works "
            f"{shortest_hold:.3f}-{LONGEST_HOLD:.3f} s more once shutdown starts; reference = the longest of "
            f"the {KEEPERS} closed alone; closing them one after another would take "
            f"{statistics.median(sums) * 1e3:.0f} ms; ratios {min(ratios):.3f}-{max(ratios):.3f} over "
            f"{CONCURRENCY_ROUNDS} rounds"
        ),
        chart=(
            (f"the {KEEPERS} closed one after another (sum of singles)", statistics.median(sums) * 1e3),
            ("the longest keeper closed alone", statistics.median(longest) * 1e3),
            (f"all {KEEPERS} closed together by one aclose()", statistics.median(together) * 1e3),
        ),
    )


# -- force-closing many borrowed connections --------------------------------------------------------


class Failures:
    """When each borrower failed, measured from ``started``."""

    def __init__(self) -> None:
        self.at: list[float] = []
        self.started = 0.0

    async def watch(self, work: Awaitable[object]) -> None:
        """Await ``work``, noting when it fails."""
        try:
            await work
        except Exception:  # noqa: BLE001 -- every borrower is expected to fail: when is the measure
            self.at.append(time.perf_counter())

    def last_ms(self) -> float:
        """Milliseconds from ``started`` to the last failure."""
        return (max(self.at) - self.started) * 1e3 if self.at else float("nan")


def collected_then_now() -> float:
    """``time.perf_counter()`` once the garbage collector has run.

    What the earlier measurements left (thousands of finished borrowers, their connections and
    tasks) is collected now, not by a full collection in the middle of the next timed close: one
    took 450 ms with the 300,000 objects three rounds of 5,000 redis.asyncio borrowers leave.
    """
    gc.collect()
    return time.perf_counter()


async def force_redis(side: RedisSide) -> tuple[float, float, int, int]:
    """(aclose seconds, last borrower error ms, forced, leftover clients) for REDIS_FORCED blocked BLPOPs."""
    name = unique_name("redis-forced")
    # Blocked until cut, however long connecting them all takes: redis-py 8.1 times sockets out
    # after 5 s by default, which would end the BLPOPs (and slow connects) before the measure.
    client = redis.asyncio.Redis.from_url(
        REDIS_URL,
        client_name=name,
        max_connections=REDIS_FORCED + 10,
        socket_timeout=None,
        socket_connect_timeout=60,
    )
    registry = Registry(drain_timeout=0.0)
    registry.wrap(client, name="cache")
    failures = Failures()
    key = f"{name}:never"  # never created: BLPOP blocks until its connection is cut
    await side.clients(name)  # the side client connected before the borrowers crowd the loop
    tasks = [asyncio.ensure_future(failures.watch(client.blpop([key], timeout=0))) for _ in range(REDIS_FORCED)]

    async def all_blocked() -> bool:
        return (await side.clients(name))[1] == REDIS_FORCED

    if not await settle(all_blocked, 60.0):
        raise RuntimeError(f"not every BLPOP reached the server: {await side.clients(name)}")
    failures.started = started = collected_then_now()
    report = await registry.aclose()
    elapsed = time.perf_counter() - started
    await asyncio.wait(tasks, timeout=5)

    async def gone() -> bool:
        return (await side.clients(name))[0] == 0

    await settle(gone, 2.0)
    leftovers = (await side.clients(name))[0]
    await side.kill(name)
    await client.aclose()
    return elapsed, failures.last_ms(), report.items[0].forced, leftovers


async def force_http(server: EndlessServer) -> tuple[float, float, int, int]:
    """(aclose seconds, last borrower error ms, forced, leftover connections) for HTTP_FORCED endless responses."""
    registry = Registry(drain_timeout=0.0)
    session = registry.wrap(aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=HTTP_FORCED)), name="http")
    failures = Failures()
    reading = 0
    url = f"{server.url}/endless"

    async def borrow() -> None:
        nonlocal reading
        async with session.get(url) as response:
            reading += 1
            await response.read()  # the body never ends: fails once force-closed

    before = await server.open_connections()
    tasks = [asyncio.ensure_future(failures.watch(borrow())) for _ in range(HTTP_FORCED)]
    await until(lambda: reading == HTTP_FORCED, 60.0)
    failures.started = started = collected_then_now()
    report = await registry.aclose()
    elapsed = time.perf_counter() - started
    await asyncio.wait(tasks, timeout=5)

    async def gone() -> bool:
        return await server.open_connections() <= before

    await settle(gone, 5.0)
    leftovers = await server.open_connections() - before
    return elapsed, failures.last_ms(), report.items[0].forced, leftovers


async def pg_capacity(side: Postgres) -> tuple[int, str]:
    """How many extra PostgreSQL connections fit (up to PG_FORCED), and why that many."""
    max_connections = int(await side.setting("max_connections"))
    reserved = int(await side.setting("superuser_reserved_connections"))
    in_use = await side.client_backends()
    fits = max_connections - reserved - in_use - PG_HEADROOM
    count = min(PG_FORCED, fits // 10 * 10)
    if count == PG_FORCED:
        return count, f"max_connections {max_connections}"
    return count, (
        f"{PG_FORCED} requested; the server has max_connections {max_connections} ({reserved} reserved, "
        f"{in_use} in use at the time, {PG_HEADROOM} left free for others), so {count}"
    )


async def force_pg(side: Postgres, count: int) -> tuple[float, float, int, int, float]:
    """(aclose seconds, last borrower error ms, forced, leftover backends, server clear ms) for ``count`` queries."""
    name = unique_name("pg-forced")
    pool = await asyncpg.create_pool(PG_URL, min_size=count, max_size=count, server_settings={"application_name": name})
    registry = Registry(drain_timeout=0.0)
    registry.wrap(pool, name="pg")
    failures = Failures()
    borrowers = [
        asyncio.ensure_future(failures.watch(pool.fetchval(f"select pg_sleep({STUCK_SECONDS * 2})")))
        for _ in range(count)
    ]
    return await _timed_pg_force(side, name, count, borrowers=borrowers, failures=failures, close=registry.aclose)


async def force_sqlalchemy(side: Postgres, count: int) -> tuple[float, float, int, int, float]:
    """As :func:`force_pg`, through a SQLAlchemy engine on psycopg: ``count`` threads in ``pg_sleep``, ``close()``."""
    name = unique_name("sa-forced")
    engine = sa.create_engine(sa_url(name), pool_size=count, max_overflow=0)
    registry = Registry(drain_timeout=0.0)
    registry.wrap(engine, name="db")
    failures = Failures()

    def borrow() -> None:
        with engine.connect() as connection:
            connection.exec_driver_sql(f"select pg_sleep({STUCK_SECONDS * 2})")

    borrowers = [asyncio.ensure_future(failures.watch(in_thread(borrow))) for _ in range(count)]
    try:
        # close() as a sync service calls it, from its own thread.
        return await _timed_pg_force(
            side, name, count, borrowers=borrowers, failures=failures, close=lambda: in_thread(registry.close)
        )
    finally:
        engine.dispose()


async def _timed_pg_force(
    side: Postgres,
    name: str,
    count: int,
    *,
    borrowers: Sequence[asyncio.Future[None]],
    failures: Failures,
    close: Callable[[], Awaitable[poolkeeper.ShutdownReport]],
) -> tuple[float, float, int, int, float]:
    """Once the ``count`` statements of ``name`` all run on the server, time ``close()`` and what it left there."""

    async def all_running() -> bool:
        return (await side.backends(name))[1] == count

    if not await settle(all_running, 60.0):
        raise RuntimeError(f"not every query reached the server: {await side.backends(name)}")
    failures.started = started = collected_then_now()
    report = await close()
    elapsed = time.perf_counter() - started
    await asyncio.wait(borrowers, timeout=5)

    async def gone() -> bool:
        return (await side.backends(name))[0] == 0

    await settle(gone, 5.0)
    clear_ms = (time.perf_counter() - started) * 1e3
    leftovers = (await side.backends(name))[0]
    await side.terminate(name)
    return elapsed, failures.last_ms(), report.items[0].forced, leftovers, clear_ms


def force_result(name: str, runs: Sequence[Sequence[float]], extra: str, call: str = "aclose()") -> Result:
    """The figure of a force-close at scale from its runs: (seconds, last error ms, forced, leftovers).

    ``call`` is what was timed, ``drain_timeout=0`` given: ``aclose()``, or a sync service's ``close()``.
    """
    seconds = [run[0] for run in runs]
    last_error_ms = [run[1] for run in runs]
    forced = [int(run[2]) for run in runs]
    leftovers = [int(run[3]) for run in runs]
    median_ms = statistics.median(seconds) * 1e3
    return Result(
        section=SCALE,
        name=name,
        unit="ms",
        wrapped=median_ms,
        goal=f"< {FORCE_GOAL_MS:g} ms",
        met=median_ms < FORCE_GOAL_MS,
        detail=(
            f"{call} with drain_timeout=0, {spread(seconds, 'ms', 1e3)}; last borrower got its error "
            f"{statistics.median(last_error_ms):.0f} ms after {call} began; "
            f"forced {'-'.join(str(n) for n in sorted({min(forced), max(forced)}))} per run; "
            f"left on the server: {max(leftovers)}{extra}"
        ),
    )


async def force_close_at_scale(side: RedisSide) -> list[Result]:
    """Force-close REDIS_FORCED Redis and HTTP_FORCED HTTP borrows."""
    results = []
    runs = [await force_redis(side) for _ in range(FORCE_ROUNDS)]
    results.append(
        force_result(
            f"force-close {REDIS_FORCED:,} borrowed redis.asyncio connections (each blocked in BLPOP)",
            runs,
            " clients in CLIENT LIST",
        )
    )
    async with endless_server() as server:  # in a process of its own: its side of the cut is not timed
        runs = [await force_http(server) for _ in range(FORCE_ROUNDS)]
    results.append(
        force_result(
            f"force-close {HTTP_FORCED:,} borrowed aiohttp connections (each reading an endless body)",
            runs,
            " open server connections (the server runs in a process of its own)",
        )
    )
    return results


async def force_postgres_at_scale() -> list[Result]:
    """Force-close up to PG_FORCED borrowed PostgreSQL connections, through asyncpg and through SQLAlchemy.

    ``max_connections`` is raised for the measurement where this process can restart the server
    (see :mod:`benchmarks._max_connections`); elsewhere the count is scaled down to what fits.
    """
    with max_connections_at_least(PG_URL, PG_ROOM) as room:
        pg = await Postgres.connect()  # after the restart, if there was one
        try:
            return await _force_postgres(pg, room)
        finally:
            await pg.close()


async def _force_postgres(pg: Postgres, room: str) -> list[Result]:
    count, why = await pg_capacity(pg)
    # The room made says what max_connections is; the capacity adds only why fewer ran, if they did.
    why = room if count == PG_FORCED else f"{why}; {room}"
    if count < 10:  # fewer than ten says nothing about scale
        return [
            Result(
                section=SCALE,
                name=f"force-close {PG_FORCED} borrowed {library} connections",
                unit="ms",
                wrapped=float("nan"),
                detail=f"not run: {why}",
            )
            for library in ("asyncpg", "SQLAlchemy + psycopg")
        ]
    results = []
    measures = (("asyncpg", force_pg, "aclose()"), ("SQLAlchemy + psycopg", force_sqlalchemy, "close()"))
    for library, force, call in measures:
        runs = [await force(pg, count) for _ in range(FORCE_ROUNDS)]
        scaled = trend = ""
        if count < PG_FORCED:
            scaled = f" (scaled down from {PG_FORCED})"
            half = count // 2
            half_runs = [await force(pg, half) for _ in range(FORCE_ROUNDS)]
            trend = f"; with {half} connections: {statistics.median(run[0] for run in half_runs) * 1e3:.0f} ms"
        results.append(
            force_result(
                f"force-close {count} borrowed {library} connections{scaled} (each running pg_sleep)",
                runs,
                f" backends in pg_stat_activity, the last gone {statistics.median(run[4] for run in runs):.0f} ms"
                f" after {call} began (statements cancelled, connections closed); {why}{trend}",
                call,
            )
        )
    return results


# -- memory per borrow ------------------------------------------------------------------------------


def at_depth(depth: int, function: Callable[[], T]) -> T:
    """Call ``function`` ``depth`` frames deep, like a borrow made deep inside an application."""
    if depth <= 1:
        return function()
    return at_depth(depth - 1, function)


async def at_depth_async(depth: int, function: Callable[[], Awaitable[T]]) -> T:
    """Await ``function()`` ``depth`` coroutine frames deep (a request sent deep inside an application)."""
    if depth <= 1:
        return await function()
    return await at_depth_async(depth - 1, function)


def _bytes_by_origin(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot) -> tuple[int, int]:
    """(bytes allocated by poolkeeper's files, by everything else but the measurement) between snapshots."""
    own = other = 0
    for stat in after.compare_to(before, "filename"):
        filename = stat.traceback[0].filename
        if filename.startswith(_PACKAGE_DIR):
            own += stat.size_diff
        elif filename not in (tracemalloc.__file__, __file__):
            other += stat.size_diff
    return own, other


def redis_memory(track: bool) -> tuple[float, float, int]:
    """(poolkeeper bytes, library bytes, stack frames) per borrowed sync redis connection."""
    client = redis.Redis.from_url(REDIS_URL, max_connections=MEMORY_BORROWS)
    registry = Registry(track_borrowers=track)
    registry.wrap(client, name="cache")
    pool = client.connection_pool
    warm = [pool.get_connection() for _ in range(MEMORY_BORROWS)]  # connect them all before measuring
    for connection in warm:
        pool.release(connection)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    held = at_depth(MEMORY_DEPTH, lambda: [pool.get_connection() for _ in range(MEMORY_BORROWS)])
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    borrower = registry["cache"].borrowers()[0]
    for connection in held:
        pool.release(connection)
    registry.close()
    client.close()
    own, other = _bytes_by_origin(before, after)
    return own / MEMORY_BORROWS, other / MEMORY_BORROWS, len(borrower.stack or ())


async def http_memory(server: HttpServer, track: bool) -> tuple[float, int]:
    """(poolkeeper bytes, stack frames) per aiohttp request in flight (its response not released)."""
    registry = Registry(track_borrowers=track)
    session = registry.wrap(aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=MEMORY_BORROWS)), name="http")
    url = f"{server.url}/endless"
    server.finish = asyncio.Event()
    await asyncio.gather(*(_read_small(session, server.url) for _ in range(MEMORY_BORROWS)))  # connect first
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    responses = await asyncio.gather(
        *(at_depth_async(MEMORY_DEPTH, lambda: session.get(url)) for _ in range(MEMORY_BORROWS))
    )
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    borrower = registry["http"].borrowers()[0]
    for response in responses:
        response.close()
    server.finish.set()
    await registry.aclose()
    own, _ = _bytes_by_origin(before, after)
    return own / MEMORY_BORROWS, len(borrower.stack or ())


async def _read_small(session: aiohttp.ClientSession, base: str) -> None:
    async with session.get(f"{base}/small") as response:
        await response.read()


async def memory_per_borrow(server: HttpServer) -> list[Result]:
    """Bytes poolkeeper allocates per borrow, with and without borrow-site tracking (tracemalloc)."""
    results = []
    for track in (False, True):
        own, library, frames = redis_memory(track)
        how = f"tracked ({frames}-frame borrow-site stack)" if track else "untracked"
        goal = TRACKED_BYTES_GOAL if track else UNTRACKED_BYTES_GOAL
        results.append(
            Result(
                section=MEMORY,
                name=f"redis connection borrowed, {how}",
                unit="B",
                wrapped=own,
                goal=f"<= {goal:,} B",
                met=own <= goal,
                detail=(
                    f"{MEMORY_BORROWS:,} borrows held at once, made {MEMORY_DEPTH} calls deep; "
                    f"redis-py's own checkout allocates {library:.0f} B each"
                ),
            )
        )
    for track in (False, True):
        own, frames = await http_memory(server, track)
        how = f"tracked ({frames}-frame borrow-site stack)" if track else "untracked"
        goal = TRACKED_BYTES_GOAL if track else UNTRACKED_BYTES_GOAL
        results.append(
            Result(
                section=MEMORY,
                name=f"aiohttp request in flight, {how}",
                unit="B",
                wrapped=own,
                goal=f"<= {goal:,} B",
                met=own <= goal,
                detail=(
                    f"{MEMORY_BORROWS:,} responses held unreleased at once, sent {MEMORY_DEPTH} calls deep; "
                    "includes the adapter's per-request record"
                ),
            )
        )
    return results


# -- side by side with the raw libraries' own shutdown --------------------------------------------


class Outcomes:
    """What happened to the work in flight: the finishing requests and the stuck one."""

    def __init__(self) -> None:
        self.finishing_errors: list[str] = []
        self.finishing_done = 0
        self.stuck_error: str | None = None
        self.stuck_at: float | None = None
        self.started = 0.0

    async def finishing(self, work: Awaitable[object]) -> None:
        """Await a request that would finish by itself, noting how it failed."""
        try:
            await work
        except Exception as error:  # noqa: BLE001 -- a lost request: which error is the measure
            self.finishing_errors.append(type(error).__name__)
        finally:
            self.finishing_done += 1

    async def stuck(self, work: Awaitable[object]) -> None:
        """Await the request that never finishes by itself, noting when and how it ended."""
        try:
            await work
        except Exception as error:  # noqa: BLE001 -- the stuck request ended: how and when is the measure
            self.stuck_error = type(error).__name__
        self.stuck_at = time.perf_counter()

    def record_stuck_thread(self, error: BaseException | None) -> None:
        """The stuck request, run in a thread, ended (with ``error``, or not)."""
        self.stuck_error = None if error is None else type(error).__name__
        self.stuck_at = time.perf_counter()

    def stuck_text(self) -> str:
        """What became of the stuck request, for the table."""
        if self.stuck_at is None:
            return "no error: still waiting"
        how = "finished" if self.stuck_error is None else f"failed ({self.stuck_error})"
        return f"{how} at {self.stuck_at - self.started:.2f} s"

    def errors_text(self) -> str:
        """The error types the finishing requests failed with, for the table."""
        return ", ".join(sorted(set(self.finishing_errors))) or "-"


async def new_request(request: Callable[[], Awaitable[object]]) -> str:
    """What a new request gets while (or just after) the pool closes."""
    try:
        await asyncio.wait_for(request(), 5.0)
    except Exception as error:  # noqa: BLE001 -- refused or failed: its type is the answer
        return f"refused ({type(error).__name__})"
    return "accepted"


def leftover_text(total: int, busy: int, what: tuple[str, str], busy_what: str) -> str:
    """``"none"``, or ``"3 backends in pg_stat_activity (1 still running the query)"``."""
    if total == 0:
        return "none"
    return f"{total} {what[total != 1]}" + (f" ({busy} {busy_what})" if busy else "")


class SideBySide:
    """The same work in flight, closed by the raw library's own call and by poolkeeper."""

    def __init__(self, server: HttpServer, pg: Postgres, side: RedisSide) -> None:
        self.server = server
        self.pg = pg
        self.side = side

    async def _finish(self, outcomes: Outcomes, closed_at: float) -> str:
        """Wait for the finishing requests; the stuck one's fate, half a second after the close returned."""
        await until(lambda: outcomes.finishing_done == FINISHING, DEADLINE + WORK + 10)
        with contextlib.suppress(TimeoutError):
            await until(lambda: outcomes.stuck_at is not None, max(0.0, closed_at + 0.5 - time.perf_counter()))
        return outcomes.stuck_text()

    async def sqlalchemy(self, use_poolkeeper: bool) -> CloseOutcome:
        """A sync Engine: ``Engine.dispose()`` against ``registry.close()``."""
        name = unique_name("sbs-sqlalchemy")
        engine = sa.create_engine(sa_url(name), pool_size=FINISHING + 1, max_overflow=0)
        registry = Registry(drain_timeout=DEADLINE)
        if use_poolkeeper:
            registry.wrap(engine, name="db")
        outcomes = Outcomes()

        def query(seconds: float) -> None:
            with engine.connect() as connection:
                connection.exec_driver_sql(f"select pg_sleep({seconds})")

        def query_forever() -> None:
            try:
                query(STUCK_SECONDS)
            except Exception as error:  # noqa: BLE001 -- recorded, the thread ends
                outcomes.record_stuck_thread(error)
            else:
                outcomes.record_stuck_thread(None)

        tasks = [asyncio.ensure_future(outcomes.finishing(in_thread(lambda: query(WORK)))) for _ in range(FINISHING)]
        stuck_thread = in_thread(query_forever)
        await self._all_on_server(name)

        took: list[float] = []

        def close() -> None:
            started = time.perf_counter()
            if use_poolkeeper:
                registry.close()
            else:
                engine.dispose()
            took.append(time.perf_counter() - started)

        outcomes.started = time.perf_counter()
        closing = in_thread(close)
        if use_poolkeeper:
            await until(lambda: registry["db"].state is not KeeperState.OPEN)
        else:
            await closing

        def select_one() -> None:
            with engine.connect() as connection:
                connection.exec_driver_sql("select 1")

        fresh = await new_request(lambda: in_thread(select_one))
        await closing
        stuck = await self._finish(outcomes, time.perf_counter())
        leftovers = await self._pg_leftovers(name)
        await self.pg.terminate(name)
        await asyncio.gather(*tasks, stuck_thread)
        engine.dispose()
        return CloseOutcome(
            library="SQLAlchemy Engine (psycopg 3)",
            closer="registry.close()" if use_poolkeeper else "Engine.dispose()",
            poolkeeper=use_poolkeeper,
            seconds=took[0],
            finishing=FINISHING,
            finishing_failed=len(outcomes.finishing_errors),
            finishing_errors=outcomes.errors_text(),
            stuck=stuck,
            leftovers=leftovers,
            new_request=fresh,
        )

    async def asyncpg(self, use_poolkeeper: bool) -> CloseOutcome:
        """An asyncpg Pool: ``wait_for(Pool.close())`` + ``terminate()`` against ``aclose()``."""
        name = unique_name("sbs-asyncpg")
        pool = await asyncpg.create_pool(
            PG_URL, min_size=FINISHING + 1, max_size=FINISHING + 1, server_settings={"application_name": name}
        )
        registry = Registry(drain_timeout=DEADLINE)
        if use_poolkeeper:
            registry.wrap(pool, name="pg")
        outcomes = Outcomes()
        tasks = [
            asyncio.ensure_future(outcomes.finishing(pool.execute(f"select pg_sleep({WORK})")))
            for _ in range(FINISHING)
        ]
        tasks.append(asyncio.ensure_future(outcomes.stuck(pool.execute(f"select pg_sleep({STUCK_SECONDS})"))))
        await self._all_on_server(name)

        async def close() -> float:
            started = time.perf_counter()
            if use_poolkeeper:
                await registry.aclose()
            else:
                try:
                    await asyncio.wait_for(pool.close(), DEADLINE)
                except asyncio.TimeoutError:
                    pool.terminate()
            return time.perf_counter() - started

        outcomes.started = time.perf_counter()
        closing = asyncio.ensure_future(close())
        await asyncio.sleep(0)  # let the close begin
        fresh = await new_request(lambda: pool.fetchval("select 1"))
        seconds = await closing
        stuck = await self._finish(outcomes, time.perf_counter())
        leftovers = await self._pg_leftovers(name)
        await self.pg.terminate(name)
        await asyncio.gather(*tasks)  # the stuck query ends with its backend
        return CloseOutcome(
            library="asyncpg Pool",
            closer="await registry.aclose()"
            if use_poolkeeper
            else f"wait_for(Pool.close(), {DEADLINE:g}) + terminate()",
            poolkeeper=use_poolkeeper,
            seconds=seconds,
            finishing=FINISHING,
            finishing_failed=len(outcomes.finishing_errors),
            finishing_errors=outcomes.errors_text(),
            stuck=stuck,
            leftovers=leftovers,
            new_request=fresh,
        )

    async def redis(self, use_poolkeeper: bool) -> CloseOutcome:
        """A redis.asyncio client: ``ConnectionPool.disconnect()`` against ``aclose()``."""
        name = unique_name("sbs-redis")
        client = redis.asyncio.Redis.from_url(REDIS_URL, client_name=name)
        registry = Registry(drain_timeout=DEADLINE)
        if use_poolkeeper:
            registry.wrap(client, name="cache")
        outcomes = Outcomes()
        finishing_key, stuck_key = f"{name}:finishing", f"{name}:stuck"  # never created
        tasks = [
            asyncio.ensure_future(outcomes.finishing(client.blpop([finishing_key], timeout=WORK)))
            for _ in range(FINISHING)
        ]
        tasks.append(asyncio.ensure_future(outcomes.stuck(client.blpop([stuck_key], timeout=0))))

        async def all_blocked() -> bool:
            return (await self.side.clients(name))[1] == FINISHING + 1

        if not await settle(all_blocked, 10.0):
            raise RuntimeError("the BLPOPs did not all reach the server")

        async def close() -> float:
            started = time.perf_counter()
            if use_poolkeeper:
                await registry.aclose()
            else:
                await client.connection_pool.disconnect()
            return time.perf_counter() - started

        outcomes.started = time.perf_counter()
        closing = asyncio.ensure_future(close())
        await asyncio.sleep(0)
        fresh = await new_request(client.ping)
        seconds = await closing
        stuck = await self._finish(outcomes, time.perf_counter())

        async def gone() -> bool:
            return (await self.side.clients(name))[0] == 0

        await settle(gone, 1.0)
        total, blocked = await self.side.clients(name)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.side.kill(name)
        with contextlib.suppress(Exception):  # a keeper-closed client may refuse; nothing is left open
            await client.aclose()
        return CloseOutcome(
            library="redis.asyncio Redis",
            closer="await registry.aclose()" if use_poolkeeper else "await ConnectionPool.disconnect()",
            poolkeeper=use_poolkeeper,
            seconds=seconds,
            finishing=FINISHING,
            finishing_failed=len(outcomes.finishing_errors),
            finishing_errors=outcomes.errors_text(),
            stuck=stuck,
            leftovers=leftover_text(
                total, blocked, ("client in CLIENT LIST", "clients in CLIENT LIST"), "still blocked in BLPOP"
            ),
            new_request=fresh,
        )

    async def aiohttp(self, use_poolkeeper: bool) -> CloseOutcome:
        """An aiohttp ClientSession: ``ClientSession.close()`` against ``aclose()``."""
        server = self.server
        server.finish = asyncio.Event()
        before = server.open_connections()
        session = aiohttp.ClientSession()
        registry = Registry(drain_timeout=DEADLINE)
        if use_poolkeeper:
            registry.wrap(session, name="http")
        outcomes = Outcomes()

        responded = 0

        async def get(path: str) -> None:
            nonlocal responded
            async with session.get(f"{server.url}{path}") as response:
                responded += 1
                await response.read()

        arrived = server.arrived
        tasks = [asyncio.ensure_future(outcomes.finishing(get(f"/work?s={WORK}"))) for _ in range(FINISHING)]
        tasks.append(asyncio.ensure_future(outcomes.stuck(get("/endless"))))
        # Every request reached the server, and the stuck one is reading its endless body.
        await until(lambda: server.arrived - arrived == FINISHING + 1 and responded == 1)

        async def close() -> float:
            started = time.perf_counter()
            if use_poolkeeper:
                await registry.aclose()
            else:
                await session.close()
            return time.perf_counter() - started

        outcomes.started = time.perf_counter()
        closing = asyncio.ensure_future(close())
        await asyncio.sleep(0)
        fresh = await new_request(lambda: get("/small"))
        seconds = await closing
        stuck = await self._finish(outcomes, time.perf_counter())

        async def gone() -> bool:
            return server.open_connections() <= before

        await settle(gone, 1.0)
        leftovers = server.open_connections() - before
        server.finish.set()
        for task in tasks:  # a read whose connection the raw close() dropped would wait forever
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await session.close()
        return CloseOutcome(
            library="aiohttp ClientSession",
            closer="await registry.aclose()" if use_poolkeeper else "await ClientSession.close()",
            poolkeeper=use_poolkeeper,
            seconds=seconds,
            finishing=FINISHING,
            finishing_failed=len(outcomes.finishing_errors),
            finishing_errors=outcomes.errors_text(),
            stuck=stuck,
            leftovers=leftover_text(leftovers, 0, ("open server connection", "open server connections"), ""),
            new_request=fresh,
        )

    async def _all_on_server(self, name: str) -> None:
        async def all_running() -> bool:
            return (await self.pg.backends(name))[1] == FINISHING + 1

        if not await settle(all_running, 10.0):
            raise RuntimeError(f"the queries did not all reach the server: {await self.pg.backends(name)}")

    async def _pg_leftovers(self, name: str) -> str:
        async def gone() -> bool:
            return (await self.pg.backends(name))[0] == 0

        await settle(gone, 1.0)
        total, active = await self.pg.backends(name)
        return leftover_text(
            total, active, ("backend in pg_stat_activity", "backends in pg_stat_activity"), "still running the query"
        )

    async def run(self) -> list[CloseOutcome]:
        """Every library, closed both ways."""
        return [
            await scenario(use_poolkeeper)
            for scenario in (self.sqlalchemy, self.asyncpg, self.redis, self.aiohttp)
            for use_poolkeeper in (False, True)
        ]


# -- the suite ---------------------------------------------------------------------------------------


async def run_all() -> list[Row]:
    rows: list[Row] = []
    side = RedisSide()
    try:
        async with http_server() as server:
            rows.append(await twenty_keepers(server))
            rows.extend(await force_close_at_scale(side))
            rows.extend(await force_postgres_at_scale())  # may restart PostgreSQL: before any side connection
            pg = await Postgres.connect()
            try:
                rows.extend(await memory_per_borrow(server))
                rows.extend(await SideBySide(server, pg, side).run())
            finally:
                await pg.close()
    finally:
        await side.close()
    return rows


def run() -> list[Row]:
    return asyncio.run(run_all())
