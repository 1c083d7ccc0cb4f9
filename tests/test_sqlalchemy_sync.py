"""The SQLAlchemy keeper on a sync Engine, against the real PostgreSQL server."""

from __future__ import annotations

import gc
import logging
import sqlite3
import threading
import time
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

import poolkeeper
from poolkeeper import KeeperState, PoolClosedError, Registry
from tests.conftest import Server, descriptors_left, open_descriptors, sqlalchemy_url
from tests.waiting import until


class Borrower(threading.Thread):
    """A thread that checks out a connection, runs ``sql`` and records what happened."""

    def __init__(self, engine: sa.Engine, sql: str = "select 1", *, hold: threading.Event | None = None) -> None:
        super().__init__(daemon=True)
        self.engine, self.sql, self.hold = engine, sql, hold
        self.checked_out = threading.Event()
        self.error: BaseException | None = None
        self.finished_at: float | None = None

    def run(self) -> None:
        try:
            with self.engine.connect() as connection:
                self.checked_out.set()
                connection.execute(sa.text(self.sql))
                if self.hold is not None:
                    self.hold.wait(30)
        except BaseException as error:
            self.error = error
        finally:
            self.finished_at = time.monotonic()


def check_out(engine: sa.Engine, how: str) -> None:
    """Check a connection out the way ``how`` names, and give it back."""
    if how == "begin":
        with engine.begin():
            pass
    else:
        getattr(engine, how)().close()


def close_in_thread(registry: Registry, **kwargs: Any) -> tuple[threading.Thread, list[Any]]:
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(registry.close(**kwargs)), daemon=True)
    thread.start()
    return thread, result


def test_wrap_returns_the_same_engine_still_usable(make_engine):
    """wrap() returns the very engine it was given, and it keeps working."""
    engine = make_engine()
    registry = Registry()
    assert registry.wrap(engine, name="db") is engine
    with engine.connect() as connection:
        assert connection.execute(sa.text("select 41 + 1")).scalar() == 42
    assert isinstance(engine.pool, sa.pool.QueuePool)
    assert registry["db"].borrowed == 0
    registry.close()


def test_wrapping_twice_registers_once(make_engine):
    """A second wrap() of the same engine returns it and registers nothing new."""
    engine = make_engine()
    registry = Registry()
    registry.wrap(engine, name="db")
    assert registry.wrap(engine, name="db") is engine
    assert registry.wrap(engine) is engine
    assert [keeper.name for keeper in registry.keepers] == ["db"]
    registry.close()


def test_borrowed_counts_checkouts_and_returns(make_engine):
    """keeper.borrowed follows checkouts and returns."""
    engine = make_engine()
    registry = Registry()
    registry.wrap(engine, name="db")
    keeper = registry["db"]
    first = engine.connect()
    second = engine.raw_connection()
    assert keeper.borrowed == 2
    first.close()
    second.close()
    assert keeper.borrowed == 0
    registry.close()


@pytest.mark.parametrize("checkout", ["connect", "begin", "raw_connection"])
def test_checkouts_are_refused_while_draining(make_engine, checkout):
    """Once closing starts, connect(), begin() and raw_connection() raise PoolClosedError naming the keeper."""
    engine = make_engine()
    registry = Registry(drain_timeout=10)
    registry.wrap(engine, name="db")
    hold = threading.Event()
    borrower = Borrower(engine, hold=hold)
    borrower.start()
    assert borrower.checked_out.wait(5)
    closer, _ = close_in_thread(registry)
    until(lambda: registry["db"].state is KeeperState.DRAINING)

    started = time.monotonic()
    with pytest.raises(PoolClosedError, match=r"'db' is draining") as caught:
        check_out(engine, checkout)
    assert time.monotonic() - started < 0.5
    assert caught.value.keeper == "db"
    assert caught.value.state == "draining"

    hold.set()
    closer.join(10)
    assert borrower.error is None


def test_a_waiter_blocked_in_the_pool_is_woken_at_once(make_engine):
    """A thread waiting for a free connection gets PoolClosedError when closing starts, not at pool_timeout."""
    engine = make_engine(pool_size=1, max_overflow=0, pool_timeout=30)
    registry = Registry(drain_timeout=10)
    registry.wrap(engine, name="db")
    hold = threading.Event()
    holder = Borrower(engine, hold=hold)
    holder.start()
    assert holder.checked_out.wait(5)
    waiter = Borrower(engine)
    waiter.start()
    queue = engine.pool._pool
    until(lambda: len(queue.not_empty._waiters) == 1)

    started = time.monotonic()
    closer, _ = close_in_thread(registry)
    waiter.join(5)
    assert isinstance(waiter.error, PoolClosedError)
    assert waiter.finished_at is not None
    assert waiter.finished_at - started < 0.5

    hold.set()
    closer.join(10)
    assert holder.error is None


def test_clean_drain_wakes_the_closer_when_the_last_connection_returns(make_engine):
    """The closer returns right after the last borrowed connection comes back; the report says clean."""
    engine = make_engine()
    registry = Registry(drain_timeout=20)
    registry.wrap(engine, name="db")
    hold = threading.Event()
    borrowers = [Borrower(engine, hold=hold) for _ in range(3)]
    for borrower in borrowers:
        borrower.start()
        assert borrower.checked_out.wait(5)
    closer, result = close_in_thread(registry)
    until(lambda: registry["db"].state is KeeperState.DRAINING)
    time.sleep(0.2)  # the borrowers keep working for a while during the drain
    assert closer.is_alive()

    returned = time.monotonic()
    hold.set()
    closer.join(10)
    elapsed = time.monotonic() - returned
    assert elapsed < 0.5
    report = result[0]
    item = report["db"]
    assert (item.outcome, item.borrowed_at_start, item.returned, item.forced) == ("clean", 3, 3, 0)
    assert report.ok
    assert all(borrower.error is None for borrower in borrowers)


def test_force_close_cancels_the_query_on_the_server(make_engine, server: Server):
    """At the drain deadline a borrower stuck in a query errors at once, and no backend keeps running it."""
    engine = make_engine()
    registry = Registry(drain_timeout=0.3, close_timeout=5, track_borrowers=True)
    registry.wrap(engine, name="db")
    borrower = Borrower(engine, "select pg_sleep(60)")
    borrower.start()
    assert borrower.checked_out.wait(5)
    assert server.settle(lambda: len(server.running("pg_sleep")) == 1)

    started = time.monotonic()
    report = registry.close()
    elapsed = time.monotonic() - started
    borrower.join(5)

    assert not borrower.is_alive()
    assert borrower.error is not None
    assert borrower.finished_at is not None
    assert borrower.finished_at - started < 1.5
    assert elapsed < 2.0
    item = report["db"]
    assert (item.outcome, item.borrowed_at_start, item.returned, item.forced) == ("forced", 1, 0, 1)
    assert not report.ok
    assert item.leaks[0].site is not None
    assert item.leaks[0].site.startswith(__file__)
    assert server.settle(lambda: server.running("pg_sleep") == []), "the cancel (a signal) never ended the query"
    assert server.settle(lambda: server.backends() == []), server.backends()


def test_force_close_ends_an_idle_in_transaction_borrower(make_engine, server: Server):
    """A borrower idle inside a transaction at the deadline loses its connection; the server ends the backend."""
    engine = make_engine()
    registry = Registry(drain_timeout=0.2, close_timeout=5)
    registry.wrap(engine, name="db")
    connection = engine.connect()
    connection.execute(sa.text("select 1"))  # opens a transaction and keeps it open
    assert server.settle(lambda: [state for _, state, _ in server.backends()] == ["idle in transaction"])

    report = registry.close()

    assert report["db"].outcome == "forced"
    with pytest.raises(sa.exc.OperationalError):
        connection.execute(sa.text("select 1"))
    connection.close()
    assert server.settle(lambda: server.backends() == []), server.backends()


def test_after_close_the_engine_refuses_and_never_reopens(make_engine, server: Server):
    """After close every physical connection is gone and dispose() does not bring a fresh pool back."""
    engine = make_engine(pool_size=3)
    registry = Registry()
    registry.wrap(engine, name="db")
    connections = [engine.connect() for _ in range(3)]
    for connection in connections:
        connection.execute(sa.text("select 1"))
        connection.close()
    assert len(server.backends()) == 3

    registry.close()

    assert registry["db"].state is KeeperState.CLOSED
    assert server.settle(lambda: server.backends() == []), server.backends()
    with pytest.raises(PoolClosedError, match="'db' is closed"):
        engine.connect()
    engine.dispose()
    with pytest.raises(PoolClosedError):
        engine.connect()
    assert server.backends() == []


def test_dispose_while_open_keeps_the_new_pool_managed(make_engine):
    """Engine.dispose() while open swaps in a pool that poolkeeper still manages."""
    engine = make_engine()
    registry = Registry()
    registry.wrap(engine, name="db")
    held = engine.connect()
    engine.dispose()
    with engine.connect() as connection:
        connection.execute(sa.text("select 1"))
    assert registry["db"].borrowed == 1  # the connection from the old pool is still out
    held.close()
    report = registry.close()
    assert report["db"].outcome == "clean"
    with pytest.raises(PoolClosedError):
        engine.connect()


def test_connection_dropped_by_its_borrower_counts_as_returned_and_as_a_leak(make_engine, caplog):
    """A connection only the garbage collector gives back counts for draining and is recorded as a leak."""
    engine = make_engine()
    registry = Registry(track_borrowers=True)
    registry.wrap(engine, name="db")
    keeper = registry["db"]

    def leak() -> None:
        connection = engine.raw_connection()
        connection.cursor().execute("select 1")
        # returns without closing it

    with caplog.at_level(logging.WARNING, logger="poolkeeper"):
        leak()
        gc.collect()

    assert keeper.borrowed == 0
    leaks = keeper.gc_leaks()
    assert len(leaks) == 1
    assert leaks[0].returned_by_gc
    assert leaks[0].stack is not None
    assert leaks[0].stack[-1].function == "leak"
    assert "garbage collector" in caplog.text
    assert registry.close()["db"].outcome == "clean"


def test_a_connection_garbage_collected_during_the_drain_ends_it(make_engine):
    """The closer wakes when the garbage collector returns the last borrowed connection."""
    engine = make_engine()
    registry = Registry(drain_timeout=20)
    registry.wrap(engine, name="db")
    holder = {"connection": engine.raw_connection()}
    closer, result = close_in_thread(registry)
    until(lambda: registry["db"].state is KeeperState.DRAINING)

    holder.clear()
    gc.collect()
    # From here: the connection is back. A full collection itself takes as long as the process's
    # heap is large (0.1-0.4 s in a whole-suite run on a loaded machine), and holds the GIL
    # meanwhile; that is the collector's time, not the closer's.
    started = time.monotonic()
    closer.join(10)

    assert time.monotonic() - started < 0.5
    assert result[0]["db"].outcome == "clean"


def test_close_from_eight_threads_runs_one_shutdown(make_engine, caplog):
    """Eight threads closing at once share one shutdown and get the same report."""
    engine = make_engine()
    registry = Registry(drain_timeout=10)
    registry.wrap(engine, name="db")
    hold = threading.Event()
    borrower = Borrower(engine, hold=hold)
    borrower.start()
    assert borrower.checked_out.wait(5)
    barrier = threading.Barrier(8)
    reports: list[Any] = []

    def close() -> None:
        barrier.wait()
        reports.append(registry.close())

    with caplog.at_level(logging.INFO, logger="poolkeeper"):
        threads = [threading.Thread(target=close) for _ in range(8)]
        for thread in threads:
            thread.start()
        until(lambda: registry["db"].state is KeeperState.DRAINING)
        hold.set()
        for thread in threads:
            thread.join(10)

    assert len(reports) == 8
    assert all(report is reports[0] for report in reports)
    assert registry.report is reports[0]
    assert registry.closed
    assert caplog.text.count("open -> draining") == 1


def test_sqlalchemy_nullpool_is_supported(make_engine, server: Server):
    """A NullPool engine is kept too: refused after close, nothing left on the server."""
    engine = make_engine(poolclass=sa.pool.NullPool)
    registry = Registry()
    registry.wrap(engine, name="db")
    with engine.connect() as connection:
        connection.execute(sa.text("select 1"))
    assert registry.close()["db"].outcome == "clean"
    with pytest.raises(PoolClosedError):
        engine.connect()
    assert server.settle(lambda: server.backends() == [])


def test_default_registry_and_module_level_wrap(make_engine, monkeypatch):
    """poolkeeper.wrap registers with the default registry unless one is given."""
    fresh = Registry()
    monkeypatch.setattr("poolkeeper._registry._default_registry", fresh)
    engine = make_engine()
    assert poolkeeper.wrap(engine, name="db") is engine
    assert poolkeeper.get_registry() is fresh
    assert fresh["db"].resource is engine
    fresh.close()


def a_dozen_in_pg_sleep(engine: sa.Engine, server: Server) -> tuple[Registry, list[Borrower]]:
    """``engine`` wrapped (drain_timeout 0.2 s) and twelve borrowing threads, each in ``pg_sleep`` on the server."""
    registry = Registry(drain_timeout=0.2)
    registry.wrap(engine, name="db")
    borrowers = [Borrower(engine, "select pg_sleep(60)") for _ in range(12)]
    for borrower in borrowers:
        borrower.start()
        assert borrower.checked_out.wait(5)
    assert server.settle(lambda: len(server.running("pg_sleep")) == 12)
    return registry, borrowers


def test_many_borrowed_connections_are_cancelled_on_the_server_together(make_engine, server: Server):
    """Force-closing a dozen busy connections (one pg_cancel_backend query) leaves no backend running its query."""
    registry, borrowers = a_dozen_in_pg_sleep(make_engine(pool_size=12, max_overflow=0), server)
    started = time.monotonic()
    report = registry.close()
    for borrower in borrowers:
        borrower.join(5)

    assert time.monotonic() - started < 2.0
    assert all(borrower.error is not None for borrower in borrowers)
    assert report["db"].forced == 12
    assert report["db"].error is None  # every cancel was confirmed by the server
    # A confirmed cancel is delivered, not yet acted on: the backend ends its statement at its
    # next interrupt check, moments after close() returned (see docs/lifecycle.md).
    assert server.settle(lambda: server.running("pg_sleep") == []), "the cancel (a signal) never ended the query"
    assert server.settle(lambda: server.backends() == []), server.backends()


def test_a_batched_force_close_closes_every_socket_it_kept_open(make_engine, server: Server):
    """The borrowers are woken at once, their sockets kept open to the server through the cancel query, then closed."""
    before = open_descriptors()
    registry, borrowers = a_dozen_in_pg_sleep(make_engine(pool_size=12, max_overflow=0), server)
    report = registry.close()
    for borrower in borrowers:
        borrower.join(5)

    assert all(isinstance(borrower.error, sa.exc.OperationalError) for borrower in borrowers)
    assert (report["db"].outcome, report["db"].forced, report["db"].error) == ("forced", 12, None)
    assert server.settle(lambda: server.backends() == []), server.backends()
    # Closed from a thread of its own once the pool is closed: the server saw them go (above),
    # and the process holds nothing more than before the engine's connections.
    until(lambda: open_descriptors() <= before)


def test_at_its_open_file_limit_a_process_still_force_closes_a_dozen(make_engine, server: Server):
    """With too few descriptors left to keep every socket open, the rest are cut as usual: nothing is missed."""
    before = open_descriptors()
    registry, borrowers = a_dozen_in_pg_sleep(make_engine(pool_size=12, max_overflow=0), server)
    with descriptors_left(6):  # the side connection, the socket pair and a few of the twelve
        report = registry.close()
    for borrower in borrowers:
        borrower.join(5)

    assert all(isinstance(borrower.error, sa.exc.OperationalError) for borrower in borrowers)
    assert (report["db"].outcome, report["db"].forced, report["db"].error) == ("forced", 12, None)
    assert server.settle(lambda: server.running("pg_sleep") == []), server.backends()
    # Every socket kept open is closed: no backend is left, and no descriptor on this side
    # either, also of the connections whose borrowers gave them back as the idle ones closed.
    assert server.settle(lambda: server.backends() == []), server.backends()
    until(lambda: open_descriptors() <= before)


def test_a_connection_given_back_while_the_idle_ones_are_being_closed_is_closed_too(make_engine):
    """A return that lands behind the closer's sweep of the idle connections is not left open in the pool.

    The forced borrower gives its connection back from inside the sweep (SQLAlchemy's ``close``
    event of the idle connection it closes), after the sweep took the pool's idle connections.
    With no reset on return, the connection comes back still open on this side: the return has
    to close it, since nothing sweeps the pool again.
    """
    engine = make_engine(pool_size=2, max_overflow=0, pool_reset_on_return=None)
    registry = Registry(drain_timeout=0.05)
    registry.wrap(engine, name="db")
    borrowed, idle = engine.connect(), engine.connect()
    driver_connection, idle_connection = borrowed.connection.dbapi_connection, idle.connection.dbapi_connection
    idle.close()
    given_back: list[int] = []

    @sa.event.listens_for(engine, "close")
    def give_back_during_the_sweep(dbapi_connection: Any, _record: Any) -> None:
        if not given_back:
            given_back.append(dbapi_connection)
            borrowed.close()

    report = registry.close()

    assert given_back == [idle_connection]  # given back while the idle one was being closed
    assert (report["db"].outcome, report["db"].forced) == ("forced", 1)
    assert driver_connection.closed  # its socket too: the close is psycopg's own
    assert engine.pool.checkedin() == 0


def test_a_role_that_may_not_signal_the_borrowers_gets_their_statements_cancelled_a_request_each(
    pg_url, application_name, server: Server
):
    """The one pg_cancel_backend query is refused for this role: cancel requests (backend keys) stop every statement.

    Every connection logs in as the superuser and then acts as a role that may not signal the
    superuser's backends. psycopg 3.1 has no cancel that is safe to send (see _abort), so there
    the report says the cancel was not confirmed instead.
    """
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute("do $$ begin create role poolkeeper_no_signal; exception when duplicate_object then null; end $$")
    engine = sa.create_engine(
        sqlalchemy_url(pg_url, "psycopg"),
        connect_args={"application_name": application_name, "options": "-c role=poolkeeper_no_signal"},
        pool_size=12,
        max_overflow=0,
    )
    try:
        with engine.connect() as connection, pytest.raises(sa.exc.ProgrammingError) as refused:
            connection.execute(  # its own backend only: the role may not signal the superuser's
                sa.text("select pg_cancel_backend(pg_backend_pid())")
            )
        assert isinstance(refused.value.orig, psycopg.errors.InsufficientPrivilege)
        registry, borrowers = a_dozen_in_pg_sleep(engine, server)
        report = registry.close()
        for borrower in borrowers:
            borrower.join(5)

        assert all(borrower.error is not None for borrower in borrowers)
        assert report["db"].forced == 12
        if hasattr(psycopg.Connection, "cancel_safe"):  # psycopg 3.2+
            assert (report["db"].outcome, report["db"].error) == ("forced", None)
            assert server.settle(lambda: server.running("pg_sleep") == []), server.backends()
        else:
            assert report["db"].outcome == "failed"
            assert "did not confirm the cancel of 12 of 12" in (report["db"].error or "")
    finally:
        engine.dispose()
        server.terminate_all()


def test_an_in_memory_sqlite_engine_is_really_closed(caplog):
    """sqlite:// (SingletonThreadPool): close() closes the sqlite3 connection itself, in the thread sqlite3 requires."""
    engine = sa.create_engine("sqlite://")
    registry = Registry()
    registry.wrap(engine, name="db")
    with engine.connect() as connection:
        connection.execute(sa.text("select 1"))
        raw = connection.connection.dbapi_connection
    assert raw is not None

    report = registry.close()

    assert (report["db"].outcome, report["db"].error) == ("clean", None)
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        raw.execute("select 1")
    assert "Exception closing connection" not in caplog.text


def test_an_in_memory_sqlite_connection_of_another_thread_is_reported_not_closed():
    """A sqlite3 connection opened by another thread cannot be closed from here: the report says failed and why."""
    engine = sa.create_engine("sqlite://")
    registry = Registry()
    registry.wrap(engine, name="db")
    opened: list[Any] = []

    def use() -> None:
        with engine.connect() as connection:
            connection.execute(sa.text("select 1"))
            opened.append(connection.connection.dbapi_connection)

    thread = threading.Thread(target=use)
    thread.start()
    thread.join()

    report = registry.close()

    item = report["db"]
    assert (item.outcome, report.ok) == ("failed", False)
    assert item.error is not None
    assert "1 connection(s) could not be closed from the thread closing the registry" in item.error
    assert "same thread" in item.error  # sqlite3's own reason
