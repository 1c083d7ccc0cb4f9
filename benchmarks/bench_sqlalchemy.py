"""SQLAlchemy: checkout+return overhead, memory over a million checkouts, and drain wake-up latency."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from benchmarks._measure import (
    BARE_GOAL,
    MEMORY,
    TRACKED_GOAL,
    WAKE_UP_GOAL_MS,
    Result,
    alternate,
    close_seconds,
    compare,
    compare_statement,
    latency_result,
    timed,
)
from poolkeeper import KeeperState, Registry

URL = sa.make_url(os.environ.get("POOLKEEPER_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
MYSQL_URL = sa.make_url(os.environ.get("POOLKEEPER_MYSQL_URL", "mysql://root@127.0.0.1:3306/test"))


def checkout_overhead() -> list[Result]:
    raw = sa.create_engine(URL.set(drivername="postgresql+psycopg"), pool_size=2)
    wrapped = sa.create_engine(URL.set(drivername="postgresql+psycopg"), pool_size=2)
    registry = Registry()
    registry.wrap(wrapped, name="db")
    tracked_registry = Registry(track_borrowers=True)
    tracked = sa.create_engine(URL.set(drivername="postgresql+psycopg"), pool_size=2)
    tracked_registry.wrap(tracked, name="db")

    def query(engine: sa.Engine) -> None:
        with engine.connect() as connection:
            connection.exec_driver_sql("select 1").scalar()

    # The bare checkout is timed as the statement itself (compare_statement): no call layer
    # around it dilutes the ratio. 41 rounds of 4,000: the median of the ratios moves by < 1%.
    bare = "engine.connect().close()"
    rows = [
        compare_statement(
            "sqlalchemy checkout+return", bare, {"engine": raw}, {"engine": wrapped}, count=4000, rounds=41
        ).result(BARE_GOAL),
        # Leak detection left on in production (issue 13, item 9).
        compare_statement(
            "sqlalchemy checkout+return, tracked", bare, {"engine": raw}, {"engine": tracked}, count=4000, rounds=41
        ).result(TRACKED_GOAL),
        compare(
            "sqlalchemy checkout + SELECT 1", lambda: query(raw), lambda: query(wrapped), count=300, rounds=21
        ).result(BARE_GOAL),
    ]
    registry.close()
    tracked_registry.close()
    raw.dispose()
    return rows


def mysql_query_overhead() -> Result:
    """Checkout + ``SELECT 1`` + return on MariaDB through PyMySQL, raw engine against a wrapped one."""
    raw = sa.create_engine(MYSQL_URL.set(drivername="mysql+pymysql"), pool_size=2)
    wrapped = sa.create_engine(MYSQL_URL.set(drivername="mysql+pymysql"), pool_size=2)
    registry = Registry()
    registry.wrap(wrapped, name="db")

    def query(engine: sa.Engine) -> None:
        with engine.connect() as connection:
            connection.exec_driver_sql("select 1").scalar()

    row = compare(
        "sqlalchemy + pymysql (MariaDB) checkout + SELECT 1",
        lambda: query(raw),
        lambda: query(wrapped),
        count=300,
        rounds=21,
    ).result(1.05)
    registry.close()
    raw.dispose()
    return row


async def async_checkout_overhead() -> list[Result]:
    """AsyncEngine (asyncpg) connect+close, no statement: raw, wrapped, and wrapped with tracking."""
    url = URL.set(drivername="postgresql+asyncpg")
    raw = create_async_engine(url, pool_size=2)
    wrapped = create_async_engine(url, pool_size=2)
    tracked = create_async_engine(url, pool_size=2)
    registry = Registry()
    registry.wrap(wrapped, name="db")
    tracked_registry = Registry(track_borrowers=True)
    tracked_registry.wrap(tracked, name="db")

    async def per_checkout(engine: AsyncEngine, count: int = 2000) -> float:
        with timed():
            started = time.perf_counter()
            for _ in range(count):
                async with engine.connect():
                    pass
            return (time.perf_counter() - started) / count

    rows = []
    for name, kept, goal in (
        ("sqlalchemy async checkout+return", wrapped, BARE_GOAL),
        ("sqlalchemy async checkout+return, tracked", tracked, TRACKED_GOAL),
    ):
        await per_checkout(raw, 200)  # connect once and warm up, outside the timing
        await per_checkout(kept, 200)
        rows.append((await alternate(name, per_checkout, raw, kept, rounds=31)).result(goal))
    await registry.aclose()
    await tracked_registry.aclose()
    await raw.dispose()
    return rows


def _resident_bytes() -> int:
    """The process's resident set size (Linux ``/proc``; elsewhere the peak, from ``getrusage``)."""
    try:
        statm = Path("/proc/self/statm").read_text(encoding="ascii")
        return int(statm.split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource  # noqa: PLC0415 -- POSIX only, and only where /proc is missing

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_over_checkouts(total: int = 1_000_000, warm: int = 100_000) -> Result:
    """Memory growth over a million tracked checkouts with a one-hour leak threshold: it must stay flat."""
    registry = Registry()
    engine = registry.wrap(
        sa.create_engine(URL.set(drivername="postgresql+psycopg"), pool_size=1), name="db", leak_threshold=3600
    )
    for _ in range(warm):  # allocator and driver caches reach their steady size first
        engine.connect().close()
    gc.collect()
    before = _resident_bytes()
    for _ in range(total - warm):
        engine.connect().close()
    gc.collect()
    grown = _resident_bytes() - before
    registry.close()
    return Result(
        section=MEMORY,
        name=f"sqlalchemy, {total:,} checkouts returned, leak_threshold=3600 (tracked)",
        unit="B",
        wrapped=max(grown, 0) / (total - warm),
        goal="flat",
        met=grown < 1024 * 1024,
        detail=(
            f"resident memory grew {grown / 1024:,.0f} KiB from checkout {warm:,} to {total:,} "
            "(one record per checkout would be about 100 MiB)"
        ),
    )


def sync_drain_latency(samples: int = 30) -> Result:
    """Time from the last connection's return to close() returning, on a sync engine."""
    latencies = []
    closes: list[float] = []
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
        closes.append(close_seconds(registry))
    return latency_result("sqlalchemy sync drain wake-up", latencies, WAKE_UP_GOAL_MS, closes)


async def async_drain_latency(samples: int = 30) -> Result:
    """Time from the last connection's return to aclose() returning, on an AsyncEngine (asyncpg)."""
    latencies = []
    closes: list[float] = []
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
        closes.append(close_seconds(registry))
    return latency_result("sqlalchemy async (asyncpg) drain wake-up", latencies, WAKE_UP_GOAL_MS, closes)


def run() -> list[Result]:
    rows = checkout_overhead()
    rows.append(mysql_query_overhead())
    rows += asyncio.run(async_checkout_overhead())
    rows.append(memory_over_checkouts())
    rows.append(sync_drain_latency())
    rows.append(asyncio.run(async_drain_latency()))
    return rows
