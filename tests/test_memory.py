"""Bounded memory in long-lived processes: nothing grows per checkout, per dispose or per dropped object.

Each test runs a bounded loop and measures what stays alive (``tracemalloc``, or a count of live
objects after ``gc.collect()``), with bounds generous enough for a loaded machine yet far below
what keeping one record per iteration costs.
"""

from __future__ import annotations

import gc
import tracemalloc
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest
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
    gc.collect()
    assert keeper() is None
