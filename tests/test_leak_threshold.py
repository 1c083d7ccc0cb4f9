"""leak_threshold: a warning with the borrow site when a connection is held too long."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from typing import TYPE_CHECKING

import pytest
import redis
import redis.asyncio
import sqlalchemy as sa

from poolkeeper import Registry
from tests.conftest import callers_at_checkout
from tests.test_redis_keeper import CHECKOUT_ARGS

if TYPE_CHECKING:
    from collections.abc import Iterator


@pytest.fixture(autouse=True, params=[True, False], ids=["callers-recorded", "callers-read-later"])
def both_ways(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test both ways a tracked checkout runs: under the pytest plugin, and in production."""
    with callers_at_checkout(on=request.param):
        yield


class WarningSeen(logging.Handler):
    """Sets an event when the leak watch logs its warning."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen = threading.Event()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.seen.set()


def test_holding_a_connection_past_the_threshold_warns_with_the_borrow_site(make_engine):
    """A connection held longer than leak_threshold is reported once, with the line that borrowed it."""
    handler = WarningSeen()
    logger = logging.getLogger("poolkeeper.leaks")
    logger.addHandler(handler)
    try:
        registry = Registry()
        engine = registry.wrap(make_engine(), name="db", leak_threshold=0.1)
        connection = engine.connect()
        connection.execute(sa.text("select 1"))
        assert handler.seen.wait(5)
        connection.close()
    finally:
        logger.removeHandler(handler)
    record = handler.records[0]
    assert record.poolkeeper_keeper == "db"  # type: ignore[attr-defined]
    assert record.poolkeeper_borrow_site.startswith(__file__)  # type: ignore[attr-defined]
    assert record.poolkeeper_held_seconds >= 0.1  # type: ignore[attr-defined]
    assert "test_leak_threshold.py" in record.getMessage()
    assert len(handler.records) == 1
    registry.close()


def test_connections_returned_in_time_are_not_reported(make_engine):
    """Quick checkouts under a threshold produce no warning."""
    handler = WarningSeen()
    logger = logging.getLogger("poolkeeper.leaks")
    logger.addHandler(handler)
    try:
        registry = Registry()
        engine = registry.wrap(make_engine(), name="db", leak_threshold=0.2)
        for _ in range(5):
            with engine.connect() as connection:
                connection.execute(sa.text("select 1"))
        # A later, deliberately held connection proves the watch is running and past the quick ones.
        held = engine.connect()
        assert handler.seen.wait(5)
        held.close()
    finally:
        logger.removeHandler(handler)
    assert len(handler.records) == 1
    registry.close()


def test_every_held_connection_is_reported_once_whenever_it_was_borrowed(make_engine):
    """Borrows made while the watch's timer is pending, or after it went idle, are each reported exactly once."""
    handler = WarningSeen()
    logger = logging.getLogger("poolkeeper.leaks")
    logger.addHandler(handler)
    try:
        registry = Registry()
        engine = registry.wrap(make_engine(pool_size=3), name="db", leak_threshold=0.1)
        first = engine.connect()
        second = engine.connect()  # the timer armed for the first one is still pending
        assert until_records(handler, 2)
        handler.seen.clear()
        third = engine.connect()  # borrowed after both were reported: a timer of its own
        assert until_records(handler, 3)
        for connection in (first, second, third):
            connection.close()
    finally:
        logger.removeHandler(handler)
    assert len(handler.records) == 3
    registry.close()


def until_records(handler: WarningSeen, count: int) -> bool:
    """Wait for the handler to have seen ``count`` warnings (each one sets its event)."""
    while len(handler.records) < count:
        if not handler.seen.wait(5):
            return False
        handler.seen.clear()
    return True


def test_a_redis_connection_held_past_the_threshold_names_the_line_that_borrowed_it(redis_url):
    """The sync redis checkout path (lend_checkout) reports the exact borrowing line, as SQLAlchemy's does."""
    handler = WarningSeen()
    logger = logging.getLogger("poolkeeper.leaks")
    logger.addHandler(handler)
    try:
        registry = Registry()
        client = registry.wrap(redis.Redis.from_url(redis_url), name="cache", leak_threshold=0.1)
        line = sys._getframe().f_lineno + 1  # the next line is the borrow site
        connection = client.connection_pool.get_connection(*CHECKOUT_ARGS)
        assert handler.seen.wait(5)
        client.connection_pool.release(connection)
    finally:
        logger.removeHandler(handler)
    assert [record.poolkeeper_borrow_site for record in handler.records] == [f"{__file__}:{line}"]  # type: ignore[attr-defined]
    registry.close()
    client.close()


def test_a_redis_asyncio_connection_held_past_the_threshold_names_the_line_that_borrowed_it(redis_url):
    """The asyncio redis checkout path reports the exact borrowing line, inside a task."""
    handler = WarningSeen()
    logger = logging.getLogger("poolkeeper.leaks")
    logger.addHandler(handler)

    async def borrow_and_hold() -> int:
        registry = Registry()
        client = registry.wrap(redis.asyncio.Redis.from_url(redis_url), name="cache", leak_threshold=0.1)
        line = sys._getframe().f_lineno + 1  # the next line is the borrow site
        connection = await client.connection_pool.get_connection(*CHECKOUT_ARGS)  # type: ignore[no-untyped-call]  # unannotated
        assert await asyncio.to_thread(handler.seen.wait, 5)
        await client.connection_pool.release(connection)
        await registry.aclose()
        await client.aclose()
        return line

    try:
        line = asyncio.run(borrow_and_hold())
    finally:
        logger.removeHandler(handler)
    assert [record.poolkeeper_borrow_site for record in handler.records] == [f"{__file__}:{line}"]  # type: ignore[attr-defined]


def test_a_borrow_from_code_without_a_module_name_still_names_its_line(make_engine):
    """Code run with globals of its own (no ``__name__``) is the user's: its line is the borrow site."""
    handler = WarningSeen()
    logger = logging.getLogger("poolkeeper.leaks")
    logger.addHandler(handler)
    try:
        registry = Registry()
        engine = registry.wrap(make_engine(), name="db", leak_threshold=0.1)
        namespace: dict[str, object] = {"engine": engine}
        exec(compile("\n\nheld = engine.connect()\n", "<generated borrower>", "exec"), namespace)  # noqa: S102 -- the point
        assert handler.seen.wait(5)
        namespace["held"].close()  # type: ignore[attr-defined]
    finally:
        logger.removeHandler(handler)
    assert [record.poolkeeper_borrow_site for record in handler.records] == ["<generated borrower>:3"]  # type: ignore[attr-defined]
    registry.close()
