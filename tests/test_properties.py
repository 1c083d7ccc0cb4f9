"""Property-based tests of the keeper state machine and the registry (hypothesis stateful testing).

Random interleavings of checkout, return, return by the garbage collector, close (in the
background, or blocking with a deadline), force-close, cancellation of the closing task, and
driver steps that hang, checked against a model after every step:

* no checkout succeeds once closing has started;
* the borrowed count equals the model's (so it never goes negative, nor drifts);
* close() and force_close() return within their deadline plus a small constant;
* the report's counts add up (``borrowed_at_start == returned + forced``) and match the model:
  ``borrowed_at_start`` is what was out when closing started, ``returned`` what came back
  before the force-close;
* at the end every physical connection is closed.

The first machine drives the core through an in-memory pool (``tests.faults.fake_driver``), the
second a real SQLAlchemy engine on PostgreSQL, with fewer examples.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import poolkeeper._shutdown
from poolkeeper import KeeperState, PoolClosedError, Registry, ShutdownReport
from tests.conftest import Server
from tests.faults.fake_driver import FakeDriver, FakePool, Handle, fake_adapter

# What a close may overrun its deadline by on a loaded two-core machine.
SLACK = 0.6
# The grace a cancelled aclose() gives the force-close, shortened for these tests (2 s in the library).
CANCEL_GRACE = 0.3
CLOSE_TIMEOUT = 0.15


class LoopThread:
    """An event loop in a thread of its own, where background closes run while the machine goes on."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="property-loop", daemon=True)
        self.thread.start()

    def start(self, registry: Registry) -> BackgroundClose:
        return BackgroundClose(self.loop, registry)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        assert not self.thread.is_alive()
        self.loop.close()


class BackgroundClose:
    """``registry.aclose()`` running as a task on the loop thread; it can be awaited or cancelled from here."""

    def __init__(self, loop: asyncio.AbstractEventLoop, registry: Registry) -> None:
        self.loop = loop
        self.done = threading.Event()
        self.report: ShutdownReport | None = None
        self.cancelled = False
        self.finished_at: float | None = None

        async def close() -> None:
            try:
                self.report = await registry.aclose()
            except asyncio.CancelledError:
                self.cancelled = True
            finally:
                self.finished_at = time.monotonic()
                self.done.set()

        async def spawn() -> asyncio.Task[None]:
            return asyncio.ensure_future(close())

        self.task = asyncio.run_coroutine_threadsafe(spawn(), loop).result(5)

    def cancel(self) -> None:
        self.loop.call_soon_threadsafe(self.task.cancel)


class KeeperModel:
    """What the machine knows about one keeper, to check the keeper and its report against."""

    def __init__(self) -> None:
        self.closing = False  # closing has started: every checkout must be refused
        self.forced = False  # the force-close has begun (returns from now on are not 'returned')
        self.out_at_start: int | None = None
        self.returned_while_draining = 0
        self.gc_returns = 0
        self.checkouts = 0
        self.close: BackgroundClose | None = None
        # Set once a background close was forced or cancelled. Preconditions read only the model,
        # never whether the close has finished by itself (a timing), or hypothesis could not replay.
        self.close_cut_short = False
        self.report: ShutdownReport | None = None

    def record_return(self) -> None:
        if self.closing and not self.forced:
            self.returned_while_draining += 1

    def start_closing(self, out: int) -> None:
        self.closing = True
        self.out_at_start = out

    def check_report(self, report: ShutdownReport, name: str) -> None:
        item = report[name]
        assert item.borrowed_at_start == item.returned + item.forced
        assert min(item.borrowed_at_start, item.returned, item.forced) >= 0
        if item.error is not None and item.error.startswith("cancelled before it finished"):
            return  # an abandoned close reports no counts
        assert item.borrowed_at_start == self.out_at_start
        assert item.returned == self.returned_while_draining


# -- the in-memory machine: the core alone ---------------------------------------------------------------


class FakePoolMachine(RuleBasedStateMachine):
    """The keeper of an in-memory pool, driven through every operation in any order."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = LoopThread()
        self.registry = Registry(drain_timeout=30, close_timeout=CLOSE_TIMEOUT, track_borrowers=True)
        self.pool = self.registry.wrap(FakePool(), name="fake")
        self.keeper = self.registry["fake"]
        driver = self.keeper.driver
        assert isinstance(driver, FakeDriver)
        self.driver = driver
        self.held: list[Handle] = []
        self.model = KeeperModel()
        # Once a step was made to hang, one may still be hanging (the flag is read as a step starts).
        self.may_hang = False

    # -- borrowers ------------------------------------------------------------------------------

    @rule()
    def checkout(self) -> None:
        if self.model.closing:
            with pytest.raises(PoolClosedError):
                self.pool.checkout()
            return
        self.held.append(self.pool.checkout())
        self.model.checkouts += 1

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def give_back(self, data: st.DataObject) -> None:
        handle = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
        self.model.record_return()
        handle.give_back()

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def drop_without_returning(self, data: st.DataObject) -> None:
        handle = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
        self.model.record_return()
        self.model.gc_returns += 1
        del handle  # the last reference: the collector returns the connection now
        gc.collect()

    # -- closing (each step may make the driver's force-close or close hang until cut) ------------

    def faults(self, hang_force: bool, hang_close: bool) -> None:
        self.driver.hang_force, self.driver.hang_close = hang_force, hang_close
        self.may_hang = self.may_hang or hang_force or hang_close

    @precondition(lambda self: not self.model.closing and self.model.checkouts)
    @rule(hang_force=st.booleans(), hang_close=st.booleans())
    def start_closing_in_the_background(self, hang_force: bool, hang_close: bool) -> None:
        self.faults(hang_force, hang_close)
        self.model.start_closing(len(self.held))
        self.model.close = self.loop.start(self.registry)
        deadline = time.monotonic() + 5
        while self.keeper.state is KeeperState.OPEN:  # no event exists for "the task has started"
            assert time.monotonic() < deadline
            time.sleep(0.001)

    @precondition(lambda self: not self.model.closing and self.model.checkouts)
    @rule(deadline=st.sampled_from([0.0, 0.02, 0.1]), hang_force=st.booleans(), hang_close=st.booleans())
    def close_with_a_deadline(self, deadline: float, hang_force: bool, hang_close: bool) -> None:
        self.faults(hang_force, hang_close)
        self.model.start_closing(len(self.held))
        self.model.forced = bool(self.held)  # nothing can come back while this thread is blocked in close()
        started = time.monotonic()
        report = self.registry.close(deadline=deadline)
        assert time.monotonic() - started < deadline + SLACK
        self.model.report = report

    @precondition(lambda self: self.model.checkouts)
    @rule(hang_force=st.booleans(), hang_close=st.booleans())
    def force_close(self, hang_force: bool, hang_close: bool) -> None:
        self.faults(hang_force, hang_close)
        running = self.model.close
        self.model.close_cut_short = True
        if not self.model.closing:
            self.model.start_closing(len(self.held))
        self.model.forced = self.model.forced or (bool(self.held) and self.model.report is None)
        started = time.monotonic()
        report = self.registry.force_close()
        # A hanging force-close step is cut at close_timeout, a hanging close step too.
        assert time.monotonic() - started < 2 * CLOSE_TIMEOUT + SLACK
        assert report is not None
        if running is not None:
            assert running.done.wait(2)
        self.model.report = report

    @precondition(lambda self: self.model.close is not None and not self.model.close_cut_short)
    @rule(hang_force=st.booleans(), give_one_back=st.booleans())
    def force_the_background_close(self, hang_force: bool, give_one_back: bool) -> None:
        """force_close() on the closing loop returns at once; a borrower may give back while the force runs."""
        self.faults(hang_force, self.driver.hang_close)
        self.model.close_cut_short = True
        self.model.forced = True
        returned = asyncio.run_coroutine_threadsafe(_force_on_loop(self.registry), self.loop.loop).result(5)
        assert returned is None or returned is self.registry.report  # None unless already finished
        deadline = time.monotonic() + 5
        while self.keeper.state in (KeeperState.OPEN, KeeperState.DRAINING):  # no event for "forcing began"
            if self.model.close is not None and self.model.close.done.is_set():
                break
            assert time.monotonic() < deadline
            time.sleep(0.001)
        if give_one_back and self.held:  # during the force-close when it hangs: counted as forced, not returned
            self.held.pop().give_back()

    @precondition(
        lambda self: (
            self.model.close is not None
            and not self.model.close_cut_short
            # Cancelling while a step hangs is pinned by the xfail tests of test_faults_concurrency.py:
            # the abandoned step is not awaited and the keeper never reaches CLOSED.
            and not self.may_hang
        )
    )
    @rule()
    def cancel_the_closing_task(self) -> None:
        running = self.model.close
        assert running is not None
        self.model.close_cut_short = True
        self.model.forced = self.model.forced or bool(self.held)
        cancelled = time.monotonic()
        running.cancel()
        assert running.done.wait(CANCEL_GRACE + 2 * CLOSE_TIMEOUT + SLACK)
        assert running.finished_at is not None
        assert running.finished_at - cancelled < CANCEL_GRACE + 2 * CLOSE_TIMEOUT + SLACK
        report = self.registry.report
        assert report is not None
        self.model.report = report

    # -- what must always hold --------------------------------------------------------------------

    @invariant()
    def the_borrowed_count_matches_the_model(self) -> None:
        assert self.keeper.borrowed == len(self.held) >= 0
        assert self.keeper.returned_while_draining >= 0

    @invariant()
    def nothing_is_lent_once_closing_started(self) -> None:
        if self.model.closing:
            assert not self.keeper.lending

    @invariant()
    def garbage_collected_returns_are_recorded(self) -> None:
        assert len(self.keeper.gc_leaks()) == self.model.gc_returns

    @invariant()
    def a_finished_close_reports_what_happened(self) -> None:
        running = self.model.close
        if running is not None and running.done.is_set() and running.report is not None:
            self.model.report = running.report
        if self.model.report is not None:
            self.model.check_report(self.model.report, "fake")

    def teardown(self) -> None:
        try:
            if not self.registry.closed:
                if not self.model.closing:
                    self.model.start_closing(len(self.held))
                self.model.forced = self.model.forced or bool(self.held)
                report = self.registry.force_close()
                assert report is not None
            if self.model.close is not None:
                assert self.model.close.done.wait(5)
            assert self.registry.report is not None
            self.model.check_report(self.registry.report, "fake")
            while self.held:
                self.held.pop().give_back()  # a forced borrower gives its dead connection back, late
            assert self.keeper.borrowed == 0
            assert self.pool.open_connections() == []
            assert self.keeper.state is KeeperState.CLOSED
        finally:
            self.loop.stop()


async def _force_on_loop(registry: Registry) -> ShutdownReport | None:
    return registry.force_close()


@pytest.fixture
def short_cancel_grace() -> Iterator[None]:
    """The library gives a cancelled shutdown 2 s of grace; 0.3 s keeps the examples quick."""
    with mock.patch.object(poolkeeper._shutdown, "_CANCEL_GRACE", CANCEL_GRACE):
        yield


@pytest.mark.usefixtures("short_cancel_grace")
def test_the_keeper_core_keeps_its_invariants_under_any_interleaving():
    """Random interleavings of borrows, returns, closes, forces, cancellations and hangs keep every invariant."""
    with fake_adapter():
        run_state_machine_as_test(
            FakePoolMachine,
            settings=settings(
                max_examples=60,
                stateful_step_count=20,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )


# -- the real machine: a SQLAlchemy engine on PostgreSQL ----------------------------------------------


class SQLAlchemyMachine(RuleBasedStateMachine):
    """A wrapped SQLAlchemy engine on the real PostgreSQL server, driven through the same operations."""

    make_engine: Callable[[], sa.Engine]
    server: Server
    POOL_SIZE = 3

    def __init__(self) -> None:
        super().__init__()
        self.loop = LoopThread()
        self.registry = Registry(drain_timeout=30, close_timeout=2, track_borrowers=True)
        self.engine = self.registry.wrap(self.make_engine(), name="db")
        self.keeper = self.registry["db"]
        self.held: list[Any] = []
        self.model = KeeperModel()

    @initialize()
    def connect_once(self) -> None:
        connection = self.engine.raw_connection()
        connection.close()

    @precondition(lambda self: len(self.held) < self.POOL_SIZE)  # a full pool would make checkout wait
    @rule()
    def checkout(self) -> None:
        if self.model.closing:
            with pytest.raises(PoolClosedError):
                self.engine.raw_connection()
            return
        connection = self.engine.raw_connection()
        connection.cursor().execute("select 1")
        self.held.append(connection)
        self.model.checkouts += 1

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def give_back(self, data: st.DataObject) -> None:
        connection = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
        self.model.record_return()
        connection.close()

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def drop_without_returning(self, data: st.DataObject) -> None:
        connection = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
        self.model.record_return()
        self.model.gc_returns += 1
        del connection
        gc.collect()

    @precondition(lambda self: not self.model.closing and self.model.checkouts)
    @rule()
    def start_closing_in_the_background(self) -> None:
        self.model.start_closing(len(self.held))
        self.model.close = self.loop.start(self.registry)
        deadline = time.monotonic() + 5
        while self.keeper.state is KeeperState.OPEN:  # no event exists for "the task has started"
            assert time.monotonic() < deadline
            time.sleep(0.001)

    @precondition(lambda self: not self.model.closing and self.model.checkouts)
    @rule(deadline=st.sampled_from([0.0, 0.1]))
    def close_with_a_deadline(self, deadline: float) -> None:
        self.model.start_closing(len(self.held))
        self.model.forced = bool(self.held)
        started = time.monotonic()
        self.model.report = self.registry.close(deadline=deadline)
        assert time.monotonic() - started < deadline + SLACK

    @precondition(lambda self: self.model.checkouts)
    @rule()
    def force_close(self) -> None:
        running = self.model.close
        self.model.close_cut_short = True
        if not self.model.closing:
            self.model.start_closing(len(self.held))
        self.model.forced = self.model.forced or (bool(self.held) and self.model.report is None)
        started = time.monotonic()
        report = self.registry.force_close()
        assert time.monotonic() - started < 1.0
        assert report is not None
        if running is not None:
            assert running.done.wait(2)
        self.model.report = report

    @precondition(lambda self: self.model.close is not None and not self.model.close_cut_short)
    @rule()
    def cancel_the_closing_task(self) -> None:
        running = self.model.close
        assert running is not None
        self.model.close_cut_short = True
        self.model.forced = self.model.forced or bool(self.held)
        cancelled = time.monotonic()
        running.cancel()
        assert running.done.wait(CANCEL_GRACE + SLACK + 1)
        assert running.finished_at is not None
        assert running.finished_at - cancelled < 1.0
        self.model.report = self.registry.report

    @invariant()
    def the_borrowed_count_matches_the_model(self) -> None:
        assert self.keeper.borrowed == len(self.held) >= 0
        if not self.model.closing:  # the closed pool's own counters are reset by the close
            assert self.engine.pool.checkedout() == len(self.held)  # type: ignore[attr-defined]  # a QueuePool

    @invariant()
    def nothing_is_lent_once_closing_started(self) -> None:
        if self.model.closing:
            assert not self.keeper.lending

    @invariant()
    def garbage_collected_returns_are_recorded(self) -> None:
        assert len(self.keeper.gc_leaks()) == self.model.gc_returns

    @invariant()
    def a_finished_close_reports_what_happened(self) -> None:
        running = self.model.close
        if running is not None and running.done.is_set() and running.report is not None:
            self.model.report = running.report
        if self.model.report is not None:
            self.model.check_report(self.model.report, "db")

    def teardown(self) -> None:
        try:
            if not self.registry.closed:
                if not self.model.closing:
                    self.model.start_closing(len(self.held))
                self.model.forced = self.model.forced or bool(self.held)
                report = self.registry.force_close()
                assert report is not None
            if self.model.close is not None:
                assert self.model.close.done.wait(5)
            assert self.registry.report is not None
            self.model.check_report(self.registry.report, "db")
            while self.held:
                with contextlib.suppress(Exception):  # its socket was cut by the force-close
                    self.held.pop().close()
            assert self.keeper.borrowed == 0
            assert self.keeper.state is KeeperState.CLOSED
            # Every physical connection is closed: the server sees none of this test's backends.
            assert self.server.settle(lambda: not self.server.backends())
        finally:
            self.loop.stop()


@pytest.mark.usefixtures("short_cancel_grace")
def test_a_real_engine_keeps_the_invariants_under_any_interleaving(make_engine, server: Server):
    """The same interleavings against SQLAlchemy on PostgreSQL: invariants hold and no backend is left behind."""
    engines: list[sa.Engine] = []

    def fresh_engine() -> sa.Engine:
        engine: sa.Engine = make_engine(pool_size=SQLAlchemyMachine.POOL_SIZE, max_overflow=0, pool_timeout=5)
        engines.append(engine)
        return engine

    machine = type(
        "SQLAlchemyMachineOnServer", (SQLAlchemyMachine,), {"make_engine": staticmethod(fresh_engine), "server": server}
    )
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=15,
            stateful_step_count=10,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
    assert engines, "no example ran"
