"""Cutting a shutdown short: cancellation, KeyboardInterrupt, force_close() from anywhere, the deadline."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from poolkeeper import KeeperState, Registry
from tests.waiting import auntil


@pytest.fixture
def sigint_raises_keyboard_interrupt() -> Iterator[None]:
    """Python's own SIGINT handler for the duration of the test."""
    original = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, original)


def borrow_in_thread(engine: sa.Engine) -> tuple[threading.Thread, list[BaseException]]:
    """A thread that borrows a connection and runs pg_sleep(60) on it; returns once it is borrowed."""
    errors: list[BaseException] = []
    borrowed = threading.Event()

    def borrow() -> None:
        try:
            with engine.connect() as connection:
                borrowed.set()
                connection.execute(sa.text("select pg_sleep(60)"))
        except Exception as error:
            errors.append(error)

    thread = threading.Thread(target=borrow, daemon=True)
    thread.start()
    assert borrowed.wait(10)
    return thread, errors


def wait_until_closing_started(registry: Registry, timeout: float = 10.0) -> None:
    """Block until the keeper "db" left OPEN (there is no event for "closing started")."""
    end = time.monotonic() + timeout
    while registry["db"].state is KeeperState.OPEN:
        assert time.monotonic() < end, "closing never started"
        time.sleep(0.002)


async def hold(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        await connection.execute(sa.text("select pg_sleep(60)"))


@pytest.mark.asyncio
async def test_cancelling_aclose_force_closes_everything_before_the_cancellation_propagates(async_engine, server):
    """The cancelled aclose() leaves no backend in pg_stat_activity; other callers get the report."""
    registry = Registry(drain_timeout=30)
    engine = registry.wrap(async_engine, name="db")
    holder = asyncio.ensure_future(hold(engine))
    assert await asyncio.to_thread(server.settle, lambda: bool(server.running("pg_sleep")))
    closing = asyncio.ensure_future(registry.aclose())
    other_caller = asyncio.ensure_future(registry.aclose())
    await auntil(lambda: registry["db"].state is KeeperState.DRAINING)
    started = time.monotonic()
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    elapsed = time.monotonic() - started
    report = await other_caller
    holder_error = await asyncio.gather(holder, return_exceptions=True)
    assert elapsed < 1.5
    assert registry["db"].state is KeeperState.CLOSED
    assert registry.report is report
    assert report["db"].outcome == "forced"
    assert isinstance(holder_error[0], Exception)
    assert await asyncio.to_thread(server.settle, lambda: not server.backends())


@pytest.mark.asyncio
async def test_cancelling_aclose_cancels_a_running_hook(make_engine, server):
    """A hook still running when aclose() is cancelled is cancelled too, and reported so."""
    registry = Registry(drain_timeout=30)
    engine = registry.wrap(make_engine(), name="db")
    hook_started = asyncio.Event()
    hook_cancelled = asyncio.Event()

    @registry.on_shutdown(name="ack-messages", depends_on=["db"])
    async def ack_messages() -> None:
        hook_started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            hook_cancelled.set()
            raise

    thread, errors = borrow_in_thread(engine)
    assert await asyncio.to_thread(server.settle, lambda: bool(server.running("pg_sleep")))
    closing = asyncio.ensure_future(registry.aclose())
    await hook_started.wait()
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    await asyncio.to_thread(thread.join, 5)
    report = registry.report
    assert hook_cancelled.is_set()
    assert report is not None
    assert report["ack-messages"].error == "cancelled: the shutdown was forced"
    assert report["db"].outcome == "forced"
    assert errors
    assert await asyncio.to_thread(server.settle, lambda: not server.backends())


@pytest.mark.usefixtures("sigint_raises_keyboard_interrupt")
def test_keyboard_interrupt_during_close_still_force_closes(make_engine, server):
    """Ctrl-C in the middle of close() force-closes, publishes the report, then raises KeyboardInterrupt."""
    registry = Registry(drain_timeout=30)
    engine = registry.wrap(make_engine(), name="db")
    thread, errors = borrow_in_thread(engine)
    assert server.settle(lambda: bool(server.running("pg_sleep")))
    main = threading.main_thread().ident
    assert main is not None

    @registry.on_shutdown(name="press-ctrl-c", depends_on=["db"])
    def press_ctrl_c() -> None:
        signal.pthread_kill(main, signal.SIGINT)
        threading.Event().wait(30)  # still "running" when the interrupt lands

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        registry.close()
    elapsed = time.monotonic() - started
    thread.join(5)
    assert elapsed < 2.5
    assert registry.closed
    assert registry.report is not None
    assert registry.report["db"].outcome == "forced"
    assert errors
    assert server.settle(lambda: not server.backends())


@pytest.mark.asyncio
async def test_force_close_from_the_closing_loop_returns_at_once_and_forces(make_engine):
    """force_close() called on the loop running aclose() does not deadlock: it returns None and forces."""
    registry = Registry(drain_timeout=30)
    engine = registry.wrap(make_engine(), name="db")
    thread, _ = borrow_in_thread(engine)
    closing = asyncio.ensure_future(registry.aclose())
    await auntil(lambda: registry["db"].state is KeeperState.DRAINING)
    started = time.monotonic()
    assert registry.force_close() is None
    report = await closing
    await asyncio.to_thread(thread.join, 5)
    assert time.monotonic() - started < 1.5
    assert report["db"].outcome == "forced"
    assert registry.force_close() is report


@pytest.mark.asyncio
async def test_force_close_on_a_loop_with_no_shutdown_starts_a_forced_one(make_engine):
    """force_close() from a coroutine before any shutdown starts one, forced, on this loop."""
    registry = Registry(drain_timeout=30)
    engine = registry.wrap(make_engine(), name="db")
    thread, _ = borrow_in_thread(engine)
    assert registry.force_close() is None
    report = await registry.aclose()
    await asyncio.to_thread(thread.join, 5)
    assert report["db"].outcome == "forced"


@pytest.mark.asyncio
async def test_close_from_the_closing_loop_raises_instead_of_deadlocking(make_engine):
    """close() called on the loop where aclose() is running says to use aclose()."""
    registry = Registry()
    registry.wrap(make_engine(), name="db")
    release = threading.Event()
    registry.on_shutdown(lambda: release.wait(5), name="slow")
    closing = asyncio.ensure_future(registry.aclose())
    await auntil(lambda: registry.draining)
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="aclose"):
        registry.close()
    release.set()
    assert (await closing).ok


def test_force_close_from_another_thread_cuts_a_running_close_short(make_engine):
    """force_close() in another thread makes the blocking close() in this one return at once, same report."""
    registry = Registry(drain_timeout=30)
    engine = registry.wrap(make_engine(), name="db")
    thread, _ = borrow_in_thread(engine)
    forced: list[object] = []

    def force_when_draining() -> None:
        wait_until_closing_started(registry)
        forced.append(registry.force_close())

    forcer = threading.Thread(target=force_when_draining, daemon=True)
    forcer.start()
    started = time.monotonic()
    report = registry.close()
    forcer.join(5)
    thread.join(5)
    assert time.monotonic() - started < 1.5
    assert forced == [report]
    assert report["db"].outcome == "forced"


def test_force_close_from_a_signal_handler_interrupting_close(make_engine):
    """A user's signal handler calling force_close() while close() runs in the main thread neither blocks nor raises."""
    registry = Registry(drain_timeout=30)
    engine = registry.wrap(make_engine(), name="db")
    thread, _ = borrow_in_thread(engine)
    returned: list[object] = []
    original = signal.signal(signal.SIGUSR1, lambda _signum, _frame: returned.append(registry.force_close()))
    main = threading.main_thread().ident
    assert main is not None

    def signal_when_draining() -> None:
        wait_until_closing_started(registry)
        signal.pthread_kill(main, signal.SIGUSR1)

    try:
        threading.Thread(target=signal_when_draining, daemon=True).start()
        started = time.monotonic()
        report = registry.close()
        elapsed = time.monotonic() - started
    finally:
        signal.signal(signal.SIGUSR1, original)
    thread.join(5)
    assert returned == [None]
    assert elapsed < 1.5
    assert report["db"].outcome == "forced"


def test_the_deadline_cuts_a_chain_of_hanging_thread_hooks_short(make_engine):
    """Two sync hooks hanging in threads, chained before the database, cannot stretch close(deadline=1)."""
    registry = Registry(drain_timeout=30, close_timeout=30)
    engine = registry.wrap(make_engine(), name="db")
    registry.on_shutdown(lambda: time.sleep(30), name="second", depends_on=["db"])
    registry.on_shutdown(lambda: time.sleep(30), name="first", depends_on=["second"])
    thread, _ = borrow_in_thread(engine)
    started = time.monotonic()
    report = registry.close(deadline=1.0)
    elapsed = time.monotonic() - started
    thread.join(5)
    assert elapsed < 1.6
    assert [report[name].outcome for name in ("first", "second", "db")] == ["failed", "failed", "forced"]


def test_a_hook_that_ignores_its_cancellation_cannot_hold_the_deadline():
    """An async hook that swallows CancelledError is abandoned at the deadline, not awaited."""
    registry = Registry()
    stop = threading.Event()

    @registry.on_shutdown(name="stubborn")
    async def stubborn() -> None:
        while not stop.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.05)

    started = time.monotonic()
    report = registry.close(deadline=0.5)
    elapsed = time.monotonic() - started
    stop.set()
    assert elapsed < 1.2
    assert "TimeoutError" in (report["stubborn"].error or "")


def test_without_a_deadline_each_hook_gets_its_own_timeout():
    """With no deadline, a hook is stopped at its own timeout while a quick one is clean."""
    registry = Registry(close_timeout=30)
    registry.on_shutdown(lambda: time.sleep(30), name="slow", timeout=0.3)
    registry.on_shutdown(lambda: None, name="quick")
    started = time.monotonic()
    report = registry.close()
    elapsed = time.monotonic() - started
    assert 0.25 <= elapsed < 1.2
    assert report["slow"].outcome == "failed"
    assert report["quick"].outcome == "clean"
