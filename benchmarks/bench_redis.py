"""redis-py: PING round trip through a kept pool versus a raw one, and drain wake-up latency."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import redis
import redis.asyncio

from benchmarks._measure import (
    BARE_GOAL,
    TRACKED_GOAL,
    WAKE_UP_GOAL_MS,
    Comparison,
    Result,
    alternate,
    close_seconds,
    compare,
    compare_statement,
    latency_result,
    timed,
)
from poolkeeper import KeeperState, Registry

URL = os.environ.get("POOLKEEPER_REDIS_URL", "redis://127.0.0.1:6379/9")


def sync_ping_overhead() -> list[Result]:
    raw = redis.Redis.from_url(URL)
    wrapped = redis.Redis.from_url(URL)
    registry = Registry()
    registry.wrap(wrapped, name="cache")
    rows = [compare("redis PING round trip", raw.ping, wrapped.ping, count=2000, rounds=31).result(BARE_GOAL)]
    tracked_registry = Registry(track_borrowers=True)
    tracked = redis.Redis.from_url(URL)
    tracked_registry.wrap(tracked, name="cache")
    rows.append(
        compare("redis PING round trip, tracked", raw.ping, tracked.ping, count=2000, rounds=21).result(TRACKED_GOAL)
    )
    registry.close()
    tracked_registry.close()
    raw.close()
    return rows


async def acompare(
    name: str, raw: redis.asyncio.Redis, wrapped: redis.asyncio.Redis, *, count: int, rounds: int
) -> Comparison:
    """:func:`benchmarks._measure.compare` for coroutines: alternating rounds of ``count`` PINGs."""

    async def per_ping(client: redis.asyncio.Redis) -> float:
        with timed():
            started = time.perf_counter()
            for _ in range(count):
                await client.ping()
            return (time.perf_counter() - started) / count

    await per_ping(raw)  # warm up both paths
    await per_ping(wrapped)
    return await alternate(name, per_ping, raw, wrapped, rounds=rounds)


async def async_ping_overhead() -> Result:
    raw = redis.asyncio.Redis.from_url(URL)
    wrapped = redis.asyncio.Redis.from_url(URL)
    registry = Registry()
    registry.wrap(wrapped, name="cache")
    comparison = await acompare("redis.asyncio PING round trip", raw, wrapped, count=2000, rounds=31)
    await registry.aclose()
    await raw.aclose()
    await wrapped.aclose()
    return comparison.result(BARE_GOAL)


def checkout_overhead() -> list[Result]:
    """get_connection + release alone, no round trip: what the guard adds to the pool's own work."""
    raw = redis.ConnectionPool.from_url(URL)
    wrapped_client = redis.Redis.from_url(URL)
    tracked_client = redis.Redis.from_url(URL)
    registry = Registry()
    registry.wrap(wrapped_client, name="cache")
    tracked_registry = Registry(track_borrowers=True)
    tracked_registry.wrap(tracked_client, name="cache")
    bare = "pool.release(pool.get_connection())"
    rows = [
        compare_statement(
            f"redis get_connection+release (no I/O){suffix}",
            bare,
            {"pool": raw},
            {"pool": client.connection_pool},
            count=4000,
            rounds=31,
        ).result(goal)
        for suffix, client, goal in (("", wrapped_client, BARE_GOAL), (", tracked", tracked_client, TRACKED_GOAL))
    ]
    # The same code against itself: a second raw pool, in the same rounds. Its ratio is what this
    # run's noise alone moves a ratio by (the rows above are within it of their true value).
    other_raw = redis.ConnectionPool.from_url(URL)
    rows.append(
        compare_statement(
            "redis get_connection+release (no I/O), raw against raw: the noise floor",
            bare,
            {"pool": raw},
            {"pool": other_raw},
            count=4000,
            rounds=31,
        ).result(None)
    )
    registry.close()
    tracked_registry.close()
    raw.disconnect()
    other_raw.disconnect()
    return rows


async def async_checkout_overhead() -> list[Result]:
    """The asyncio pool's get_connection + release alone, no round trip; untracked and tracked."""
    raw = redis.asyncio.ConnectionPool.from_url(URL)
    client = redis.asyncio.Redis.from_url(URL)
    tracked_client = redis.asyncio.Redis.from_url(URL)
    registry = Registry()
    registry.wrap(client, name="cache")
    tracked_registry = Registry(track_borrowers=True)
    tracked_registry.wrap(tracked_client, name="cache")

    async def per_checkout(pool: redis.asyncio.ConnectionPool, count: int = 2000) -> float:
        with timed():
            started = time.perf_counter()
            for _ in range(count):
                await pool.release(await pool.get_connection())  # type: ignore[no-untyped-call]  # unannotated
            return (time.perf_counter() - started) / count

    rows = []
    for name, kept, goal in (
        ("redis.asyncio get_connection+release (no I/O)", client.connection_pool, BARE_GOAL),
        ("redis.asyncio get_connection+release (no I/O), tracked", tracked_client.connection_pool, TRACKED_GOAL),
    ):
        await per_checkout(raw, 100)  # connect once and warm up, outside the timing
        await per_checkout(kept, 100)
        rows.append((await alternate(name, per_checkout, raw, kept, rounds=31)).result(goal))
    await registry.aclose()
    await tracked_registry.aclose()
    await raw.disconnect()
    await client.aclose()
    await tracked_client.aclose()
    return rows


def sync_drain_latency(samples: int = 30) -> Result:
    """Time from the last connection's return to close() returning, on a sync client."""
    latencies = []
    closes: list[float] = []
    for _ in range(samples):
        registry = Registry(drain_timeout=10)
        client = redis.Redis.from_url(URL)
        registry.wrap(client, name="cache")
        pool = client.connection_pool
        connection = pool.get_connection()  # what a command borrows
        closed_at: list[float] = []

        def close(registry: Registry = registry, closed_at: list[float] = closed_at) -> None:
            registry.close()
            closed_at.append(time.perf_counter())

        closer = threading.Thread(target=close)
        closer.start()
        keeper = registry["cache"]
        while keeper.state is KeeperState.OPEN:  # wait until the closer is draining
            time.sleep(0.001)
        time.sleep(0.01)
        returned_at = time.perf_counter()
        pool.release(connection)
        closer.join()
        latencies.append(closed_at[0] - returned_at)
        closes.append(close_seconds(registry))
        client.close()
    return latency_result("redis drain wake-up", latencies, WAKE_UP_GOAL_MS, closes)


async def async_drain_latency(samples: int = 30) -> Result:
    """Time from the last connection's return to aclose() returning, on an asyncio client."""
    latencies = []
    closes: list[float] = []
    for _ in range(samples):
        registry = Registry(drain_timeout=10)
        client = redis.asyncio.Redis.from_url(URL)
        registry.wrap(client, name="cache")
        pool = client.connection_pool
        connection = await pool.get_connection()  # type: ignore[no-untyped-call]  # what a command borrows
        closing = asyncio.ensure_future(registry.aclose())
        await asyncio.sleep(0.01)
        returned_at = time.perf_counter()
        await pool.release(connection)
        await closing
        latencies.append(time.perf_counter() - returned_at)
        closes.append(close_seconds(registry))
        await client.aclose()
    return latency_result("redis.asyncio drain wake-up", latencies, WAKE_UP_GOAL_MS, closes)


def run() -> list[Result]:
    rows = sync_ping_overhead()
    rows += checkout_overhead()
    rows.append(sync_drain_latency())
    rows.append(asyncio.run(async_ping_overhead()))
    rows += asyncio.run(async_checkout_overhead())
    rows.append(asyncio.run(async_drain_latency()))
    return rows


if __name__ == "__main__":
    for line in run():
        print(line, flush=True)
