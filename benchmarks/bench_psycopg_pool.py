"""psycopg_pool: checkout+return and ``SELECT 1`` overhead against a raw pool (sync, async); drain wake-up."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from psycopg_pool import AsyncConnectionPool, ConnectionPool

from benchmarks._measure import Comparison, Result, compare, latency_result
from poolkeeper import Registry

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

URL = os.environ.get("POOLKEEPER_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def sync_overhead() -> list[Result]:
    raw = ConnectionPool(URL, min_size=2, max_size=2, open=True)
    wrapped = ConnectionPool(URL, min_size=2, max_size=2, open=True)
    raw.wait(10)
    wrapped.wait(10)
    registry = Registry()
    registry.wrap(wrapped, name="pg")

    def checkout_return(pool: ConnectionPool[Any]) -> None:
        pool.putconn(pool.getconn())

    def select_one(pool: ConnectionPool[Any]) -> None:
        with pool.connection() as connection:
            connection.execute("select 1").fetchone()

    rows = [
        compare(
            "psycopg_pool getconn+putconn (no I/O)",
            lambda: checkout_return(raw),
            lambda: checkout_return(wrapped),
            count=2000,
            rounds=31,
        ).result(None),  # the goal is on a round trip; this row shows the keeper's own cost per borrow
        compare(
            "psycopg_pool connection() + execute('select 1')",
            lambda: select_one(raw),
            lambda: select_one(wrapped),
            count=300,
            rounds=21,
        ).result(1.05),
    ]
    registry.close()
    raw.close()
    return rows


async def per_op(operation: Callable[[], Awaitable[object]], count: int) -> float:
    """Seconds per awaited call of ``operation`` over ``count`` calls."""
    started = time.perf_counter()
    for _ in range(count):
        await operation()
    return (time.perf_counter() - started) / count


async def acompare(
    name: str,
    raw: Callable[[], Awaitable[object]],
    wrapped: Callable[[], Awaitable[object]],
    *,
    count: int,
    rounds: int,
) -> Comparison:
    """Alternate raw and wrapped rounds so that machine noise hits both alike."""
    result = Comparison(name, [], [])
    await per_op(raw, count // 10)  # warm up both paths
    await per_op(wrapped, count // 10)
    for _ in range(rounds):
        result.raw.append(await per_op(raw, count))
        result.wrapped.append(await per_op(wrapped, count))
    return result


async def async_overhead() -> list[Result]:
    raw = AsyncConnectionPool(URL, min_size=2, max_size=2, open=False)
    wrapped = AsyncConnectionPool(URL, min_size=2, max_size=2, open=False)
    await raw.open(wait=True)
    await wrapped.open(wait=True)
    registry = Registry()
    registry.wrap(wrapped, name="pg")

    async def checkout_return(pool: AsyncConnectionPool[Any]) -> None:
        await pool.putconn(await pool.getconn())

    async def select_one(pool: AsyncConnectionPool[Any]) -> None:
        async with pool.connection() as connection:
            await (await connection.execute("select 1")).fetchone()

    rows = [
        (
            await acompare(
                "psycopg_pool async getconn+putconn (no I/O)",
                lambda: checkout_return(raw),
                lambda: checkout_return(wrapped),
                count=1000,
                rounds=31,
            )
        ).result(None),
        (
            await acompare(
                "psycopg_pool async connection() + execute('select 1')",
                lambda: select_one(raw),
                lambda: select_one(wrapped),
                count=300,
                rounds=21,
            )
        ).result(1.05),
    ]
    await registry.aclose()
    await raw.close()
    return rows


def drain_latency(samples: int = 20) -> Result:
    """Time from the last connection's return to close() returning."""
    latencies = []
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
    return latency_result("psycopg_pool drain wake-up (incl. pool close)", latencies, 20.0)


def run() -> list[Result]:
    rows = sync_overhead()
    rows += asyncio.run(async_overhead())
    rows.append(drain_latency())
    return rows
