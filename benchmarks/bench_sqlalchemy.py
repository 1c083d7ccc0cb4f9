"""SQLAlchemy: checkout+return overhead, and drain wake-up latency, sync and async."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from benchmarks._measure import Result, compare, latency_result
from poolkeeper import KeeperState, Registry

URL = sa.make_url(os.environ.get("POOLKEEPER_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))


def checkout_overhead() -> list[Result]:
    raw = sa.create_engine(URL.set(drivername="postgresql+psycopg"), pool_size=2)
    wrapped = sa.create_engine(URL.set(drivername="postgresql+psycopg"), pool_size=2)
    registry = Registry()
    registry.wrap(wrapped, name="db")

    def checkout(engine: sa.Engine) -> None:
        engine.connect().close()

    def query(engine: sa.Engine) -> None:
        with engine.connect() as connection:
            connection.exec_driver_sql("select 1").scalar()

    rows = [
        compare(
            "sqlalchemy checkout+return", lambda: checkout(raw), lambda: checkout(wrapped), count=2000, rounds=31
        ).result(1.10),
        compare(
            "sqlalchemy checkout + SELECT 1", lambda: query(raw), lambda: query(wrapped), count=300, rounds=21
        ).result(1.10),
    ]
    tracked_registry = Registry(track_borrowers=True)
    tracked = sa.create_engine(URL.set(drivername="postgresql+psycopg"), pool_size=2)
    tracked_registry.wrap(tracked, name="db")
    rows.append(
        compare(
            "sqlalchemy checkout+return, tracked",
            lambda: checkout(raw),
            lambda: checkout(tracked),
            count=5000,
            rounds=5,
        ).result(None)
    )
    registry.close()
    tracked_registry.close()
    raw.dispose()
    return rows


def sync_drain_latency(samples: int = 30) -> Result:
    """Time from the last connection's return to close() returning, on a sync engine."""
    latencies = []
    for _ in range(samples):
        registry = Registry(drain_timeout=10)
        engine = sa.create_engine(URL.set(drivername="postgresql+psycopg"), pool_size=1)
        registry.wrap(engine, name="db")
        connection = engine.connect()
        connection.exec_driver_sql("select 1")
        closed_at: list[float] = []

        def close(registry: Registry = registry, closed_at: list[float] = closed_at) -> None:
            registry.close()
            closed_at.append(time.perf_counter())

        closer = threading.Thread(target=close)
        closer.start()
        keeper = registry["db"]
        while keeper.state is KeeperState.OPEN:  # wait until the closer is draining
            time.sleep(0.001)
        time.sleep(0.01)
        returned_at = time.perf_counter()
        connection.close()
        closer.join()
        latencies.append(closed_at[0] - returned_at)
    return latency_result("sqlalchemy sync drain wake-up", latencies, 5.0)


async def async_drain_latency(samples: int = 30) -> Result:
    """Time from the last connection's return to aclose() returning, on an AsyncEngine (asyncpg)."""
    latencies = []
    for _ in range(samples):
        registry = Registry(drain_timeout=10)
        engine = create_async_engine(URL.set(drivername="postgresql+asyncpg"), pool_size=1)
        registry.wrap(engine, name="db")
        connection = await engine.connect()
        await connection.exec_driver_sql("select 1")
        closing = asyncio.ensure_future(registry.aclose())
        await asyncio.sleep(0.01)
        returned_at = time.perf_counter()
        await connection.close()
        await closing
        latencies.append(time.perf_counter() - returned_at)
    return latency_result("sqlalchemy async (asyncpg) drain wake-up", latencies, 2.0)


def run() -> list[Result]:
    rows = checkout_overhead()
    rows.append(sync_drain_latency())
    rows.append(asyncio.run(async_drain_latency()))
    return rows
