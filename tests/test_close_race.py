"""Checkouts racing close(): every admitted checkout is drained or forced, and the report never lies.

Threads hammer ``engine.connect()`` while the registry closes. A checkout admitted just before
closing started may still be connecting or pre-pinging when the drain looks finished; it must
count as out until it lands, and one landing after forcing began must be cut, never lent.
Each thread that gets a connection once closing has started runs ``pg_sleep(2)``: longer than
the drain, so it may only end by being forced, and any such statement still running on the
server after ``close()`` returned is an escape.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from poolkeeper import KeeperState, PoolClosedError, Registry, ShutdownReport
from tests.conftest import Server
from tests.test_sqlalchemy_sync import Borrower, close_in_thread
from tests.waiting import until

# Trials per case; PK_RACE_TRIALS raises it to measure escape rates.
TRIALS = int(os.environ.get("PK_RACE_TRIALS", "10"))
THREADS = 6


class Hammer(threading.Thread):
    """Checks connections out in a loop; once closing has started, runs a statement longer than the drain."""

    def __init__(self, engine: sa.Engine, registry: Registry) -> None:
        super().__init__(daemon=True)
        self.engine, self.registry = engine, registry
        self.checkouts = 0
        self.slept = 0  # pg_sleep statements that ran to their end: never forced
        self.late = 0  # connections obtained once closing had started

    def run(self) -> None:
        keeper = self.registry["db"]
        while True:
            try:
                with self.engine.connect() as connection:
                    self.checkouts += 1
                    if keeper.state is KeeperState.OPEN:
                        connection.execute(sa.text("select 1"))
                        continue
                    self.late += 1
                    connection.execute(sa.text("select pg_sleep(2)"))
                    self.slept += 1
            except PoolClosedError:
                return
            except Exception:  # noqa: S112 -- a forced statement fails; the loop then meets the refusal
                continue


def slow_checkout(engine: sa.Engine) -> None:
    """Make each checkout a 20 ms round trip (a pre-ping on a slow network, a ``SET`` per checkout).

    SQLAlchemy runs "checkout" listeners inside ``Pool.connect()``, after its pre-ping: the
    window in which closing can overtake an admitted checkout, widened so that most trials hit it.
    """

    @sa.event.listens_for(engine, "checkout")
    def round_trip(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("select pg_sleep(0.02)")
        cursor.close()


def one_trial(make: Callable[[], sa.Engine], server: Server, *, slow: bool) -> tuple[bool, Any]:
    """Close while threads hammer the engine; True if something escaped the drain."""
    engine = make()
    if slow:
        slow_checkout(engine)
    registry = Registry(drain_timeout=0.3, close_timeout=2.0)
    registry.wrap(engine, name="db")
    hammers = [Hammer(engine, registry) for _ in range(THREADS)]
    for hammer in hammers:
        hammer.start()
    until(lambda: all(hammer.checkouts >= 3 for hammer in hammers))
    report = registry.close()
    out_after_close = registry["db"].borrowed
    # The force-close's cancels are delivered; the server takes a moment to end a cancelled
    # statement. An escaped pg_sleep(2) is still running well after that moment.
    settled = server.settle(lambda: server.running("pg_sleep") == [], timeout=1.0)
    for hammer in hammers:
        hammer.join(5)
    slept = sum(hammer.slept for hammer in hammers)
    late = sum(hammer.late for hammer in hammers)
    item = report["db"]
    escaped = not settled or slept > 0 or (report.ok and (late > 0 or out_after_close > 0))
    server.terminate_all()
    engine.dispose()
    return escaped, (item.outcome, item.forced, out_after_close, late, slept, settled)


@pytest.mark.parametrize("slow", [True, False], ids=["slow-checkout", "loopback"])
@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"pool_pre_ping": True}, id="QueuePool-pre_ping"),
        pytest.param({"poolclass": NullPool}, id="NullPool"),
    ],
)
def test_no_checkout_racing_close_escapes_the_drain(make_engine, server, options, slow):
    """Over many trials, nothing lent around the start of closing runs on after close(), and no report says ok then."""
    trials = (one_trial(lambda: make_engine(**options), server, slow=slow) for _ in range(TRIALS))
    escapes = [detail for escaped, detail in trials if escaped]
    legend = "(outcome, forced, out, late, slept, settled)"
    assert escapes == [], f"{len(escapes)}/{TRIALS} trials escaped {legend}: {escapes}"


def hold_first_checkout(engine: sa.Engine) -> tuple[threading.Event, threading.Event]:
    """Stop the engine's first checkout inside ``Pool.connect()`` (after pre-ping) until released."""
    in_flight, release = threading.Event(), threading.Event()

    @sa.event.listens_for(engine, "checkout")
    def hold(*_: Any) -> None:
        if not in_flight.is_set():
            in_flight.set()
            release.wait(10)

    return in_flight, release


def close_while_in_flight(registry: Registry, name: str, release: threading.Event) -> ShutdownReport:
    """Close ``registry``; check that it waits for the checkout in flight; then let that checkout land."""
    closing, result = close_in_thread(registry)
    until(lambda: registry[name].state is not KeeperState.OPEN)
    closing.join(0.3)  # a negative: closing must still be waiting for the checkout in flight
    assert closing.is_alive()
    release.set()
    closing.join(5)
    report: ShutdownReport = result[0]
    return report


def test_a_checkout_still_connecting_when_closing_starts_is_drained(make_engine):
    """close() waits for a checkout admitted before it and still in flight; the borrower then works and returns."""
    engine = make_engine(pool_pre_ping=True)
    in_flight, release = hold_first_checkout(engine)
    registry = Registry(drain_timeout=10)
    registry.wrap(engine, name="db")
    borrower = Borrower(engine, "select 1")
    borrower.start()
    assert in_flight.wait(5)

    report = close_while_in_flight(registry, "db", release)
    borrower.join(5)

    assert borrower.error is None
    item = report["db"]
    assert (item.outcome, item.borrowed_at_start, item.returned, item.forced) == ("clean", 1, 1, 0)


def test_a_checkout_landing_after_the_drain_deadline_is_cut_and_reported(make_engine, server):
    """A checkout still in flight at the drain deadline counts as forced; when it lands it is refused and closed."""
    engine = make_engine(pool_pre_ping=True)
    in_flight, release = hold_first_checkout(engine)
    registry = Registry(drain_timeout=0.2)
    registry.wrap(engine, name="db")
    borrower = Borrower(engine, "select 1")
    borrower.start()
    assert in_flight.wait(5)

    report = registry.close()
    release.set()
    borrower.join(5)

    item = report["db"]
    assert (item.outcome, item.borrowed_at_start, item.returned, item.forced) == ("forced", 1, 0, 1)
    assert not report.ok
    assert isinstance(borrower.error, PoolClosedError)
    assert registry["db"].borrowed == 0
    assert server.settle(lambda: server.backends() == []), server.backends()


def test_a_redis_command_still_connecting_when_closing_starts_is_drained(redis_url):
    """redis-py: close() waits for a command whose connection is still being opened; the command then succeeds."""
    connecting, release = threading.Event(), threading.Event()

    class SlowToConnect(redis.Connection):
        def connect(self, *args: Any, **kwargs: Any) -> None:
            if not connecting.is_set():
                connecting.set()
                release.wait(10)
            super().connect(*args, **kwargs)  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated

    pool = redis.ConnectionPool.from_url(redis_url, connection_class=SlowToConnect)
    client = redis.Redis(connection_pool=pool)
    registry = Registry(drain_timeout=10)
    registry.wrap(client, name="cache")
    answers: list[Any] = []
    command = threading.Thread(target=lambda: answers.append(client.ping()), daemon=True)
    command.start()
    assert connecting.wait(5)

    report = close_while_in_flight(registry, "cache", release)
    command.join(5)

    assert answers == [True]
    item = report["cache"]
    assert (item.outcome, item.borrowed_at_start, item.returned, item.forced) == ("clean", 1, 1, 0)
