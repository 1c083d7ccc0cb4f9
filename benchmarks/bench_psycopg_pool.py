"""psycopg_pool: checkout+return and ``SELECT 1`` overhead against a raw pool (sync, async); drain wake-up."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from psycopg_pool import AsyncConnectionPool, ConnectionPool

from benchmarks._measure import Comparison, Result, close_seconds, latency_result
from benchmarks._measure import per_op as sync_per_op
from poolkeeper import Registry

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

URL = os.environ.get("POOLKEEPER_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def same_pool(
    name: str, pool: ConnectionPool[Any], operation: Callable[[ConnectionPool[Any]], object], *, count: int, rounds: int
) -> Comparison:
    """The same pool, unwrapped and wrapped in alternating rounds.

    Two pools differ by more than any overhead on a loaded machine (each has its own server
    backends, scheduled as the server likes): comparing one pool with itself leaves only the keeper.
    """
    result = Comparison(name, [], [])
    for index in range(rounds + 1):
        # Which one runs first alternates, so that a trend over time hits both alike.
        raw = sync_per_op(lambda: operation(pool), count) if index % 2 else 0.0
        registry = Registry()
        registry.wrap(pool, name="pg")
        wrapped = sync_per_op(lambda: operation(pool), count)
        registry.unwrap("pg")
        raw = raw or sync_per_op(lambda: operation(pool), count)
        if index:  # the first round warms both paths up
            result.raw.append(raw)
            result.wrapped.append(wrapped)
    return result


def sync_overhead() -> list[Result]:
    pool = ConnectionPool(URL, min_size=2, max_size=2, open=True)
    pool.wait(10)

    def checkout_return(pool: ConnectionPool[Any]) -> None:
        pool.putconn(pool.getconn())

    def select_one(pool: ConnectionPool[Any]) -> None:
        with pool.connection() as connection:
            connection.execute("select 1").fetchone()

    rows = [
        # The goal is on a round trip; this row shows the keeper's own cost per borrow.
        same_pool("psycopg_pool getconn+putconn (no I/O)", pool, checkout_return, count=2000, rounds=31).result(None),
        same_pool("psycopg_pool connection() + execute('select 1')", pool, select_one, count=300, rounds=21).result(
            1.05
        ),
    ]
    pool.close()
    return rows


async def per_op(operation: Callable[[], Awaitable[object]], count: int) -> float:
    """Seconds per awaited call of ``operation`` over ``count`` calls."""
    started = time.perf_counter()
    for _ in range(count):
        await operation()
    return (time.perf_counter() - started) / count


async def asame_pool(
    name: str,
    pool: AsyncConnectionPool[Any],
    operation: Callable[[AsyncConnectionPool[Any]], Awaitable[object]],
    *,
    count: int,
    rounds: int,
) -> Comparison:
    """:func:`same_pool` for an async pool."""
    result = Comparison(name, [], [])
    for index in range(rounds + 1):
        raw = await per_op(lambda: operation(pool), count) if index % 2 else 0.0
        registry = Registry()
        registry.wrap(pool, name="pg")
        wrapped = await per_op(lambda: operation(pool), count)
        registry.unwrap("pg")
        raw = raw or await per_op(lambda: operation(pool), count)
        if index:
            result.raw.append(raw)
            result.wrapped.append(wrapped)
    return result


async def async_overhead() -> list[Result]:
    pool = AsyncConnectionPool(URL, min_size=2, max_size=2, open=False)
    await pool.open(wait=True)

    async def checkout_return(pool: AsyncConnectionPool[Any]) -> None:
        await pool.putconn(await pool.getconn())

    async def select_one(pool: AsyncConnectionPool[Any]) -> None:
        async with pool.connection() as connection:
            await (await connection.execute("select 1")).fetchone()

    rows = [
        (
            await asame_pool(
                "psycopg_pool async getconn+putconn (no I/O)", pool, checkout_return, count=1000, rounds=31
            )
        ).result(None),
        (
            await asame_pool(
                "psycopg_pool async connection() + execute('select 1')", pool, select_one, count=300, rounds=21
            )
        ).result(1.05),
    ]
    await pool.close()
    return rows


def drain_latency(samples: int = 20) -> Result:
    """Time from the last connection's return to close() returning."""
    latencies = []
    closes: list[float] = []
    for _ in range(samples):
        registry = Registry(drain_timeout=10)
        pool = ConnectionPool(URL, min_size=1, max_size=1, open=True)
        registry.wrap(pool, name="pg")
        connection = pool.getconn()
        closing = threading.Thread(target=registry.close)
        closing.start()
        while registry["pg"].lending:
            time.sleep(0.001)
        time.sleep(0.01)
        returned_at = time.perf_counter()
        pool.putconn(connection)
        closing.join()
        latencies.append(time.perf_counter() - returned_at)
        closes.append(close_seconds(registry))
    return latency_result("psycopg_pool drain wake-up (incl. pool close)", latencies, 20.0, closes)


def run() -> list[Result]:
    rows = sync_overhead()
    rows += asyncio.run(async_overhead())
    rows.append(drain_latency())
    return rows
