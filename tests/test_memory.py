"""Bounded memory in long-lived processes: nothing grows per checkout, per dispose or per dropped object.

Each test runs a bounded loop and measures what stays alive (``tracemalloc``, or a count of live
objects after ``gc.collect()``), with bounds generous enough for a loaded machine yet far below
what keeping one record per iteration costs.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import subprocess
import sys
import threading
import time
import tracemalloc
import uuid
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis
import sqlalchemy as sa
from sqlalchemy.pool import Pool

from poolkeeper import Registry
from tests.conftest import sqlalchemy_url

MiB = 1024 * 1024


@pytest.fixture
def traced() -> Iterator[Callable[[], int]]:
    """Start tracemalloc; the fixture's value tells the bytes allocated and still alive since then."""
    tracemalloc.start()

    def allocated() -> int:
        gc.collect()
        return tracemalloc.get_traced_memory()[0]

    yield allocated
    tracemalloc.stop()


@pytest.fixture
def engine_url(pg_url: str, application_name: str) -> Callable[..., sa.Engine]:
    """Make an engine on the test server that no fixture keeps a reference to."""

    def make(**options: Any) -> sa.Engine:
        return sa.create_engine(
            sqlalchemy_url(pg_url, "psycopg"), connect_args={"application_name": application_name}, **options
        )

    return make


def live(cls: type[Any]) -> int:
    """How many instances of ``cls`` the garbage collector can still reach."""
    gc.collect()
    return sum(1 for obj in gc.get_objects() if isinstance(obj, cls))


def collect_after_close() -> None:
    """Wait for the worker threads of a finished close (their frames hold what they closed), then collect."""
    for thread in threading.enumerate():
        if thread.name.startswith("poolkeeper-") and thread.name != "poolkeeper-leak-watch":
            thread.join(5)
    gc.collect()


def test_engine_dispose_does_not_keep_the_replaced_pools_alive(make_engine, traced):
    """5,000 Engine.dispose() calls on a wrapped engine leave one live pool, not 5,001."""
    registry = Registry()
    engine = registry.wrap(make_engine(pool_size=1), name="db")
    with engine.connect():
        pass
    before, allocated = live(Pool), traced()
    for _ in range(5000):
        engine.dispose()
    assert live(Pool) == before
    assert traced() - allocated < 1 * MiB  # about 28 MiB when every replaced pool stays alive
    registry.close()


def test_leak_threshold_keeps_nothing_per_returned_checkout(make_engine, traced):
    """With a one-hour leak_threshold, 30,000 returned checkouts leave no record behind."""
    registry = Registry()
    engine = registry.wrap(make_engine(pool_size=1), name="db", leak_threshold=3600)
    with engine.connect():
        pass
    allocated = traced()
    for _ in range(30_000):
        engine.connect().close()
    # One record per checkout (a heap entry, its borrow and its borrow-site stack) is over 15 MiB here.
    assert traced() - allocated < 1 * MiB
    registry.close()


def test_nothing_of_a_leak_watched_keeper_survives_its_registry(engine_url):
    """After close, a keeper with a leak threshold and its engine are freed once the program drops them."""
    registry = Registry()
    engine = registry.wrap(engine_url(pool_size=1), name="db", leak_threshold=3600)
    for _ in range(100):
        engine.connect().close()
    keeper = weakref.ref(registry["db"])
    registry.close()
    del engine, registry
    collect_after_close()
    assert keeper() is None


def test_dropped_engines_are_freed_and_their_names_with_them(engine_url, caplog):
    """300 engines wrapped, used, disposed and dropped unclosed are all freed, each said to be collected open."""
    registry = Registry()
    caplog.set_level(logging.WARNING, logger="poolkeeper.registry")
    before = live(sa.Engine)
    for _ in range(300):
        engine = registry.wrap(engine_url(pool_size=1))
        with engine.connect():
            pass
        engine.dispose()
    del engine
    assert live(sa.Engine) == before
    assert list(registry) == []
    collected = [record for record in caplog.records if "garbage collected while still open" in record.getMessage()]
    assert len(collected) == 300
    assert registry.close().ok


def test_a_closed_keeper_does_not_keep_its_engine_alive(engine_url):
    """After the registry closed, dropping the engine frees it and its keeper, although the registry lives on."""
    registry = Registry()
    engine = registry.wrap(engine_url(pool_size=1), name="db")
    with engine.connect():
        pass
    keeper = weakref.ref(registry["db"])
    report = registry.close()
    del engine
    collect_after_close()
    assert keeper() is None
    assert report["db"].outcome == "clean"  # the report keeps what it said, not the keeper


def test_unwrap_gives_the_engine_back_to_sqlalchemy(engine_url):
    """After unwrap(), the engine is SQLAlchemy's own again: the registry's close neither refuses nor closes it."""
    registry = Registry()
    engine = engine_url(pool_size=1)
    library_class = type(engine.pool)
    registry.wrap(engine, name="db")
    assert registry.unwrap(engine) is engine
    assert type(engine.pool) is library_class
    assert "connect" not in vars(engine.pool)  # the class's own method again
    assert "db" not in registry
    registry.close()
    with engine.connect() as connection:
        assert connection.exec_driver_sql("select 1").scalar() == 1
    engine.dispose()


def test_unwrap_by_name_frees_the_name_and_lets_another_registry_wrap_it(engine_url):
    """unwrap("db") forgets the keeper: the name is free and the engine can be wrapped anew elsewhere."""
    registry, other = Registry(), Registry()
    engine = registry.wrap(engine_url(pool_size=1), name="db")
    registry.unwrap("db")
    registry.wrap(engine_url(pool_size=1), name="db")
    assert other.wrap(engine, name="db") is engine
    with pytest.raises(KeyError, match="no keeper named 'nope'"):
        registry.unwrap("nope")
    registry.close()
    other.close()


@pytest.mark.asyncio
async def test_wrap_time_does_not_grow_with_the_registry(pg_url):
    """Wrapping into a registry of 3,000 default-named asyncpg pools costs about what the first wraps cost."""
    registry = Registry()
    wrapped: list[asyncpg.Pool] = []
    batch_times = []
    for _ in range(30):
        pools = [await asyncpg.create_pool(pg_url, min_size=0, max_size=1) for _ in range(100)]
        started = time.perf_counter()
        wrapped.extend(registry.wrap(pool) for pool in pools)
        batch_times.append(time.perf_counter() - started)
    assert registry.keepers[-1].name == "asyncpg-3000"
    # Trying "asyncpg", "asyncpg-2", ... in turn and scanning every keeper for the pool made the
    # last batches over 10 times slower than the first.
    assert min(batch_times[-5:]) < 4 * min(batch_times[:5])
    await registry.aclose()


def test_a_dropped_unclosed_asyncpg_pool_still_gets_asyncpgs_own_warning(pg_url, application_name):
    """A wrapped asyncpg pool dropped unclosed is collected once its loop is gone, and asyncpg warns about it."""
    registry = Registry()

    async def use_and_drop() -> None:
        # While its loop runs, the loop's selector keeps the pool's open connections (and so
        # the pool) alive, wrapped or not; asyncio.run() closes the loop on the way out.
        pool = registry.wrap(
            await asyncpg.create_pool(
                pg_url, min_size=1, max_size=1, server_settings={"application_name": application_name}
            )
        )
        await pool.fetchval("select 1")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asyncio.run(use_and_drop())
        gc.collect()
    assert any("unclosed connection" in str(warning.message) for warning in caught)
    assert registry.keepers == ()
    registry.close()


@pytest.mark.asyncio
async def test_a_dropped_unclosed_aiohttp_session_still_gets_aiohttps_own_warning():
    """A wrapped aiohttp session dropped unclosed is collected, and aiohttp warns "Unclosed client session"."""
    registry = Registry()
    session = registry.wrap(aiohttp.ClientSession())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del session
        gc.collect()
    assert any("Unclosed client session" in str(warning.message) for warning in caught)
    assert registry.keepers == ()
    await registry.aclose()


def test_dropped_redis_clients_do_not_keep_their_sockets_open(redis_url):
    """50 wrapped redis clients, used and dropped unclosed, leave no connection open on the server."""
    name = f"pk-memory-{uuid.uuid4().hex[:12]}"
    observer = redis.Redis.from_url(redis_url)

    def open_connections() -> int:
        return sum(1 for client in observer.client_list() if client.get("name") == name)

    registry = Registry()
    for _ in range(50):
        client = registry.wrap(redis.Redis.from_url(redis_url, client_name=name))
        client.ping()
    gc.collect()
    assert open_connections() == 1  # the last client is still held
    del client
    gc.collect()
    deadline = time.monotonic() + 2.0
    while open_connections() and time.monotonic() < deadline:  # the server notices closed sockets shortly after
        time.sleep(0.01)
    assert open_connections() == 0
    observer.close()
    registry.close()


def test_the_exit_warning_summarises_thousands_of_keepers(tmp_path, redis_url):
    """A process leaving 300 keepers open at exit gets one short warning: ten names and a count."""
    script = tmp_path / "many.py"
    script.write_text(
        "import redis, poolkeeper\n"
        f"clients = [poolkeeper.wrap(redis.Redis.from_url({redis_url!r})) for _ in range(300)]\n",
        encoding="utf-8",
    )
    result = subprocess.run(
        [sys.executable, "-W", "default::ResourceWarning", str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    (line,) = [line for line in result.stderr.splitlines() if "keepers left open at exit" in line and "Warning" in line]
    assert "'redis-10'" in line
    assert "'redis-11'" not in line
    assert "and 290 more (300 in all)" in line


@pytest.mark.asyncio
async def test_unwrap_gives_the_asyncpg_pool_back_and_frees_its_keeper(pg_url):
    """After unwrap(pool), the pool is asyncpg's own class again, keeps working, and nothing holds its keeper."""
    registry = Registry()
    pool = await asyncpg.create_pool(pg_url, min_size=1, max_size=1)
    library_class = type(pool)
    registry.wrap(pool, name="pg")
    keeper = weakref.ref(registry["pg"])
    assert registry.unwrap(pool) is pool
    gc.collect()
    assert type(pool) is library_class
    assert keeper() is None
    await registry.aclose()
    assert await pool.fetchval("select 1") == 1
    await pool.close()


def test_unwrap_gives_the_redis_client_back(redis_url):
    """After unwrap(client), closing the registry leaves the client working: its pool is redis-py's own again."""
    registry = Registry()
    client = redis.Redis.from_url(redis_url)
    library_class = type(client.connection_pool)
    registry.wrap(client, name="cache")
    assert registry.unwrap("cache") is client
    assert type(client.connection_pool) is library_class
    assert "get_connection" not in vars(client.connection_pool)  # the class's own method again
    registry.close()
    assert client.ping() is True
    client.close()


@pytest.mark.asyncio
async def test_unwrap_gives_the_aiohttp_session_back():
    """After unwrap(session), closing the registry leaves the session open and its own _request in place."""
    registry = Registry()
    session = registry.wrap(aiohttp.ClientSession(), name="http")
    registry.unwrap(session)
    assert "_request" not in vars(session)
    await registry.aclose()
    assert not session.closed
    await session.close()
