"""asyncpg: acquire+release overhead against a raw pool, and drain wake-up latency."""

from __future__ import annotations

import asyncio
import os
import time
from typing import TYPE_CHECKING

import asyncpg

from benchmarks._measure import (
    BARE_GOAL,
    TRACKED_GOAL,
    WAKE_UP_GOAL_MS,
    Comparison,
    Result,
    alternate,
    close_seconds,
    latency_result,
    timed,
)
from poolkeeper import Registry

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

URL = os.environ.get("POOLKEEPER_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


async def per_op(operation: Callable[[], Awaitable[object]], count: int) -> float:
    """Seconds per awaited call of ``operation`` over ``count`` calls."""
    with timed():
        started = time.perf_counter()
        for _ in range(count):
            await operation()
        return (time.perf_counter() - started) / count


async def compare(
    name: str,
    raw: Callable[[], Awaitable[object]],
    wrapped: Callable[[], Awaitable[object]],
    *,
    count: int,
    rounds: int,
) -> Comparison:
    """Alternate raw and wrapped rounds so that machine noise hits both alike."""
    await per_op(raw, count // 10)  # warm up both paths
    await per_op(wrapped, count // 10)
    return await alternate(name, lambda operation: per_op(operation, count), raw, wrapped, rounds=rounds)


async def acquire_overhead() -> list[Result]:
    raw = await asyncpg.create_pool(URL, min_size=2, max_size=2)
    wrapped = await asyncpg.create_pool(URL, min_size=2, max_size=2)
    registry = Registry()
    registry.wrap(wrapped, name="pg")

    async def acquire_release(pool: asyncpg.Pool) -> None:
        async with pool.acquire():
            pass

    async def select_one(pool: asyncpg.Pool) -> None:
        async with pool.acquire() as connection:
            await connection.fetchval("select 1")

    rows = [
        (
            await compare(
                "asyncpg acquire+release",
                lambda: acquire_release(raw),
                lambda: acquire_release(wrapped),
                count=500,
                rounds=31,
            )
        ).result(BARE_GOAL),
        (
            await compare(
                "asyncpg acquire + fetchval('select 1')",
                lambda: select_one(raw),
                lambda: select_one(wrapped),
                count=300,
                rounds=21,
            )
        ).result(BARE_GOAL),
    ]
    tracked_registry = Registry(track_borrowers=True)
    tracked = await asyncpg.create_pool(URL, min_size=2, max_size=2)
    tracked_registry.wrap(tracked, name="pg")
    rows.append(
        (
            await compare(
                "asyncpg acquire+release, tracked",
                lambda: acquire_release(raw),
                lambda: acquire_release(tracked),
                count=500,
                rounds=21,
            )
        ).result(TRACKED_GOAL)
    )
    await registry.aclose()
    await tracked_registry.aclose()
    await raw.close()
    return rows


async def drain_latency(samples: int = 30) -> Result:
    """Time from the last connection's release to aclose() returning."""
    latencies = []
    closes: list[float] = []
    for _ in range(samples):
        registry = Registry(drain_timeout=10)
        pool = await asyncpg.create_pool(URL, min_size=1, max_size=1)
        registry.wrap(pool, name="pg")
        connection = await pool.acquire()
        await connection.fetchval("select 1")
        closing = asyncio.ensure_future(registry.aclose())
        await asyncio.sleep(0.01)
        released_at = time.perf_counter()
        await pool.release(connection)
        await closing
        latencies.append(time.perf_counter() - released_at)
        closes.append(close_seconds(registry))
    return latency_result("asyncpg drain wake-up", latencies, WAKE_UP_GOAL_MS, closes)


async def main() -> list[Result]:
    rows = await acquire_overhead()
    rows.append(await drain_latency())
    return rows


def run() -> list[Result]:
    return asyncio.run(main())
