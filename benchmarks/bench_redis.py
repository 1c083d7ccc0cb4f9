"""redis-py: PING round trip through a kept pool versus a raw one, and drain wake-up latency."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import redis
import redis.asyncio

from benchmarks._measure import Comparison, Result, compare, latency_result, per_op
from poolkeeper import KeeperState, Registry

URL = os.environ.get("POOLKEEPER_REDIS_URL", "redis://127.0.0.1:6379/9")


def sync_ping_overhead() -> list[Result]:
    raw = redis.Redis.from_url(URL)
    wrapped = redis.Redis.from_url(URL)
    registry = Registry()
    registry.wrap(wrapped, name="cache")
    rows = [compare("redis PING round trip", raw.ping, wrapped.ping, count=2000, rounds=31).result(1.05)]
    tracked_registry = Registry(track_borrowers=True)
    tracked = redis.Redis.from_url(URL)
    tracked_registry.wrap(tracked, name="cache")
    rows.append(compare("redis PING round trip, tracked", raw.ping, tracked.ping, count=2000, rounds=11).result(None))
    registry.close()
    tracked_registry.close()
    raw.close()
    return rows


async def acompare(
    name: str, raw: redis.asyncio.Redis, wrapped: redis.asyncio.Redis, *, count: int, rounds: int
) -> Comparison:
    """:func:`benchmarks._measure.compare` for coroutines: alternating rounds of ``count`` PINGs."""

    async def per_ping(client: redis.asyncio.Redis) -> float:
        started = time.perf_counter()
        for _ in range(count):
            await client.ping()
        return (time.perf_counter() - started) / count

    result = Comparison(name, [], [])
    await per_ping(raw)  # warm up both paths
    await per_ping(wrapped)
    for round_number in range(rounds):
        # Which client goes first alternates: on a loaded machine the order alone moves PING by a few %.
        if round_number % 2:
            result.wrapped.append(await per_ping(wrapped))
            result.raw.append(await per_ping(raw))
        else:
            result.raw.append(await per_ping(raw))
            result.wrapped.append(await per_ping(wrapped))
    return result


async def async_ping_overhead() -> Result:
    raw = redis.asyncio.Redis.from_url(URL)
    wrapped = redis.asyncio.Redis.from_url(URL)
    registry = Registry()
    registry.wrap(wrapped, name="cache")
    comparison = await acompare("redis.asyncio PING round trip", raw, wrapped, count=2000, rounds=31)
    await registry.aclose()
    await raw.aclose()
    await wrapped.aclose()
    return comparison.result(1.05)


def checkout_overhead() -> Result:
    """get_connection + release alone, no round trip: what the guard adds to the pool's own work."""
    raw = redis.ConnectionPool.from_url(URL)
    wrapped_client = redis.Redis.from_url(URL)
    registry = Registry()
    registry.wrap(wrapped_client, name="cache")
    wrapped = wrapped_client.connection_pool
    raw.release(raw.get_connection())  # connect once, outside the timing
    wrapped.release(wrapped.get_connection())

    def checkout(pool: redis.ConnectionPool) -> None:
        pool.release(pool.get_connection())

    per_op(lambda: checkout(raw), 10)
    row = compare(
        "redis get_connection+release (no I/O)", lambda: checkout(raw), lambda: checkout(wrapped), count=2000, rounds=21
    ).result(None)
    registry.close()
    raw.disconnect()
    return row


async def async_checkout_overhead() -> Result:
    """The asyncio pool's get_connection + release alone, no round trip."""
    raw = redis.asyncio.ConnectionPool.from_url(URL)
    client = redis.asyncio.Redis.from_url(URL)
    registry = Registry()
    registry.wrap(client, name="cache")
    wrapped = client.connection_pool

    async def per_checkout(pool: redis.asyncio.ConnectionPool, count: int = 2000) -> float:
        started = time.perf_counter()
        for _ in range(count):
            await pool.release(await pool.get_connection())  # type: ignore[no-untyped-call]  # unannotated
        return (time.perf_counter() - started) / count

    result = Comparison("redis.asyncio get_connection+release (no I/O)", [], [])
    await per_checkout(raw, 100)  # connect once and warm up, outside the timing
    await per_checkout(wrapped, 100)
    for _ in range(21):
        result.raw.append(await per_checkout(raw))
        result.wrapped.append(await per_checkout(wrapped))
    await registry.aclose()
    await raw.disconnect()
    await client.aclose()
    return result.result(None)


def sync_drain_latency(samples: int = 30) -> Result:
    """Time from the last connection's return to close() returning, on a sync client."""
    latencies = []
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
        client.close()
    return latency_result("redis drain wake-up", latencies, 5.0)


async def async_drain_latency(samples: int = 30) -> Result:
    """Time from the last connection's return to aclose() returning, on an asyncio client."""
    latencies = []
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
        await client.aclose()
    return latency_result("redis.asyncio drain wake-up", latencies, 2.0)


def run() -> list[Result]:
    rows = sync_ping_overhead()
    rows.append(checkout_overhead())
    rows.append(sync_drain_latency())
    rows.append(asyncio.run(async_ping_overhead()))
    rows.append(asyncio.run(async_checkout_overhead()))
    rows.append(asyncio.run(async_drain_latency()))
    return rows


if __name__ == "__main__":
    for line in run():
        print(line, flush=True)
