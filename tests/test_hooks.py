"""The ready-made hooks: flush_logging, BackgroundTasks and stop_tasks."""

from __future__ import annotations

import asyncio
import functools
import inspect
import io
import logging
import logging.handlers
import threading
import warnings
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

import poolkeeper
from poolkeeper import BackgroundTasks, KeeperState, Registry, flush_logging, stop_tasks


class FailingHandler(logging.Handler):
    """A handler whose flush always fails."""

    def emit(self, record: logging.LogRecord) -> None:
        pass

    def flush(self) -> None:
        raise OSError("disk full")


@pytest.fixture
def buffered_loggers() -> Iterator[tuple[io.StringIO, logging.Logger]]:
    """A MemoryHandler on the root logger and one on a named logger, both writing to one buffer on flush."""
    target = io.StringIO()
    sink = logging.StreamHandler(target)
    root_buffer = logging.handlers.MemoryHandler(capacity=1000, flushLevel=logging.CRITICAL, target=sink)
    named_buffer = logging.handlers.MemoryHandler(capacity=1000, flushLevel=logging.CRITICAL, target=sink)
    named = logging.getLogger("tests.hooks.buffered")
    named.propagate = False
    logging.getLogger().addHandler(root_buffer)
    named.addHandler(named_buffer)
    yield target, named
    logging.getLogger().removeHandler(root_buffer)
    named.removeHandler(named_buffer)
    named.propagate = True


def test_flush_logging_flushes_every_handler_of_every_logger_root_included(buffered_loggers):
    """Records buffered on the root logger and on a named logger are written when the hook runs."""
    target, named = buffered_loggers
    logging.getLogger().warning("from the root")
    named.warning("from a named logger")
    before = target.getvalue()
    registry = Registry()
    registry.on_shutdown(flush_logging)
    report = registry.close()
    lines = target.getvalue().splitlines()  # records from elsewhere (asyncio's, say) may be buffered too
    assert before == ""
    assert lines.index("from the root") < lines.index("from a named logger")
    assert report["flush_logging"].outcome == "clean"


def test_flush_logging_reports_a_failing_handler_and_still_flushes_the_others(buffered_loggers):
    """A handler whose flush raises makes the hook fail, naming it, while the other handlers are flushed."""
    target, named = buffered_loggers
    failing = FailingHandler()
    logging.getLogger("tests.hooks.failing").addHandler(failing)
    try:
        named.warning("still flushed")
        registry = Registry()
        registry.on_shutdown(flush_logging, name="flush-logs")
        report = registry.close()
    finally:
        logging.getLogger("tests.hooks.failing").removeHandler(failing)
    assert "still flushed" in target.getvalue().splitlines()
    assert report["flush-logs"].outcome == "failed"
    assert "FailingHandler" in (report["flush-logs"].error or "")
    assert "OSError: disk full" in (report["flush-logs"].error or "")


@pytest.mark.asyncio
async def test_background_tasks_stop_before_the_database_they_use_closes(async_engine):
    """Consumers are cancelled and awaited first; their cleanup still queries the database, which closes after."""
    registry = Registry()
    engine = registry.wrap(async_engine, name="db")
    background = BackgroundTasks()
    started = asyncio.Event()
    cleanups: list[int] = []

    async def consumer(number: int) -> None:
        try:
            started.set()
            await asyncio.Event().wait()
        finally:
            async with engine.connect() as connection:
                cleanups.append((await connection.execute(sa.text(f"select {number}"))).scalar_one())

    for number in range(3):
        background.create_task(consumer(number), name=f"consumer-{number}")
    await started.wait()
    registry.on_shutdown(background.stop, name="consumers", depends_on=["db"])
    report = await registry.aclose()
    assert sorted(cleanups) == [0, 1, 2]
    assert len(background) == 0
    assert report["consumers"].outcome == "clean"
    assert report["db"].outcome == "clean"
    assert registry["db"].state is KeeperState.CLOSED


def test_background_tasks_on_another_loop_are_stopped_by_a_sync_close():
    """registry.close() from this thread cancels and awaits tasks running on a loop in another thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    background = BackgroundTasks()
    finished = threading.Event()

    async def start() -> None:
        async def forever() -> None:
            try:
                await asyncio.Event().wait()
            finally:
                finished.set()

        background.create_task(forever(), name="forever")

    asyncio.run_coroutine_threadsafe(start(), loop).result(5)
    registry = Registry()
    registry.on_shutdown(background.stop, name="background")
    try:
        report = registry.close()
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
    assert finished.is_set()
    assert report["background"].outcome == "clean"


@pytest.mark.asyncio
async def test_a_task_failing_while_it_stops_is_reported_by_name():
    """A task whose cleanup raises makes the hook fail, naming the task and the error."""

    async def broken_cleanup() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            raise RuntimeError("could not ack")

    task = asyncio.ensure_future(broken_cleanup())
    task.set_name("acker")
    await asyncio.sleep(0)
    registry = Registry()
    registry.on_shutdown(functools.partial(stop_tasks, task), name="stop-acker")
    report = await registry.aclose()
    assert report["stop-acker"].outcome == "failed"
    assert report["stop-acker"].error == "RuntimeError: 'acker' failed: RuntimeError: could not ack"


@pytest.mark.asyncio
async def test_a_task_ignoring_its_cancellation_is_cut_off_by_the_hook_timeout():
    """A task that swallows CancelledError cannot hold the shutdown beyond the hook's timeout."""
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue

    task = asyncio.ensure_future(stubborn())
    await asyncio.sleep(0)
    registry = Registry()
    registry.on_shutdown(functools.partial(stop_tasks, task), name="stop-stubborn", timeout=0.3)
    loop = asyncio.get_running_loop()
    started = loop.time()
    report = await registry.aclose()
    elapsed = loop.time() - started
    release.set()
    await task
    assert elapsed < 1.5
    assert "TimeoutError" in (report["stop-stubborn"].error or "")


@pytest.mark.asyncio
async def test_no_task_starts_once_stopped():
    """create_task after stop() raises and closes the coroutine, so it is never left un-awaited."""
    background = BackgroundTasks()
    await background.stop()

    async def late() -> None:
        pass

    coroutine = late()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="stopped"):
            background.create_task(coroutine)
    assert inspect.getcoroutinestate(coroutine) == inspect.CORO_CLOSED


@pytest.mark.asyncio
async def test_stop_tasks_refuses_what_is_not_a_task():
    """stop_tasks() names the argument that is not an asyncio task."""
    with pytest.raises(TypeError, match="stop_tasks"):
        await stop_tasks("not a task")  # type: ignore[arg-type]  # the wrong type under test


def test_the_hooks_are_exported_at_the_top_level():
    """The ready-made hooks are re-exported at the top level."""
    assert (poolkeeper.flush_logging, poolkeeper.BackgroundTasks, poolkeeper.stop_tasks) == (
        flush_logging,
        BackgroundTasks,
        stop_tasks,
    )
