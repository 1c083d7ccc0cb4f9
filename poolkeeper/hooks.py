"""Ready-made shutdown hooks: flush every logging handler, stop background asyncio tasks.

Each is registered like any hook, and ordered with ``depends_on`` ("uses"): a hook that uses a
keeper runs while that keeper is still open::

    registry.on_shutdown(poolkeeper.flush_logging)

    background = poolkeeper.BackgroundTasks()
    background.create_task(consume_orders())  # from code running on the event loop
    registry.on_shutdown(background.stop, name="consumers", depends_on=["db"])

The consumers are cancelled and awaited (their ``finally`` blocks can still use ``db``), then
``db`` closes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import TYPE_CHECKING, Any, TypeVar

from poolkeeper._concurrency import run_on_loop

if TYPE_CHECKING:
    from collections.abc import Coroutine, Iterable

__all__ = ["BackgroundTasks", "flush_logging", "stop_tasks"]

T = TypeVar("T")


def flush_logging() -> None:
    """Flush every handler of every logger, the root logger's included.

    A sync hook: the registry runs it in a thread, so a handler writing to a slow destination
    never blocks the event loop. A handler that fails to flush does not stop the others.

    Raises:
        RuntimeError: some handlers failed to flush; the message names them.
    """
    root = logging.getLogger()
    named = list(root.manager.loggerDict.values())  # one C call: safe while other threads add loggers
    loggers = [root, *(item for item in named if isinstance(item, logging.Logger))]
    seen: set[int] = set()
    failures: list[tuple[logging.Handler, Exception]] = []
    for logger in loggers:
        for handler in list(logger.handlers):
            if id(handler) in seen:
                continue
            seen.add(id(handler))
            try:
                handler.flush()
            except Exception as error:  # noqa: BLE001 -- reported below, after every handler had its turn
                failures.append((handler, error))
    if failures:
        described = "; ".join(f"{handler!r}: {type(error).__name__}: {error}" for handler, error in failures)
        raise RuntimeError(f"{len(failures)} logging handler(s) failed to flush: {described}") from failures[0][1]


def _describe(task: asyncio.Future[Any]) -> str:
    return repr(task.get_name()) if isinstance(task, asyncio.Task) else repr(task)


async def _cancel_and_wait(tasks: list[asyncio.Future[Any]]) -> list[str]:
    """On the tasks' own loop: cancel them, wait for all, describe those that failed."""
    for task in tasks:
        task.cancel()
    await asyncio.wait(tasks)
    failures = []
    for task in tasks:
        if task.cancelled():
            continue
        error = task.exception()
        if error is not None:
            failures.append(f"{_describe(task)} failed: {type(error).__name__}: {error}")
    return failures


async def stop_tasks(*tasks: asyncio.Future[Any]) -> None:
    """Cancel ``tasks`` and wait until every one has finished, whatever event loop each runs on.

    Tasks on the current loop are awaited here; tasks on a loop running in another thread are
    cancelled and awaited there. A task that ignores its cancellation keeps this waiting: the
    hook's ``timeout`` bounds that.

    Raises:
        TypeError: an argument is not an asyncio task or future.
        RuntimeError: some tasks failed (other than by being cancelled), or live on an event
            loop that no longer runs; the message names them.
    """
    for task in tasks:
        if not isinstance(task, asyncio.Future):
            raise TypeError(f"stop_tasks() needs asyncio tasks, got {task!r}")
    current = asyncio.get_running_loop()
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[Any]]] = {}
    for task in tasks:
        by_loop.setdefault(task.get_loop(), []).append(task)
    failures: list[str] = []
    waits = []
    for loop, group in by_loop.items():
        if loop is current:
            waits.append(_cancel_and_wait(group))
        elif loop.is_running():
            waits.append(run_on_loop(loop, _cancel_and_wait(group)))
        else:
            failures.extend(
                f"{_describe(task)} cannot be stopped: its event loop is not running"
                for task in group
                if not task.done()
            )
    for result in await asyncio.gather(*waits):
        failures.extend(result)
    if failures:
        raise RuntimeError("; ".join(failures))


class BackgroundTasks:
    """Background asyncio tasks that shutdown cancels and waits for, like a task group.

    Start tasks with :meth:`create_task` (or adopt running ones with :meth:`add`) and register
    :meth:`stop` as a shutdown hook. Finished tasks are forgotten as they finish; once stopped,
    no new task is accepted.
    """

    def __init__(self) -> None:
        self._tasks: set[asyncio.Future[Any]] = set()
        self._lock = threading.Lock()
        self._stopped = False

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else "running"
        return f"<BackgroundTasks {state} tasks={len(self._tasks)}>"

    def __len__(self) -> int:
        """How many tasks are still running."""
        return len(self._tasks)

    @property
    def tasks(self) -> frozenset[asyncio.Future[Any]]:
        """The tasks still running."""
        return frozenset(self._tasks)

    def create_task(self, coroutine: Coroutine[Any, Any, T], *, name: str | None = None) -> asyncio.Task[T]:
        """Start ``coroutine`` as a task on the running loop and keep it until shutdown.

        Raises:
            RuntimeError: :meth:`stop` has been called, or no event loop is running.
        """
        if self._stopped:
            coroutine.close()  # never started: no "coroutine was never awaited" warning
            raise RuntimeError("these BackgroundTasks have been stopped; no new task can start")
        task = asyncio.get_running_loop().create_task(coroutine, name=name)
        self.add(task)
        return task

    def add(self, *tasks: asyncio.Future[Any]) -> None:
        """Keep ``tasks`` (already running) until shutdown; call it from the loop they run on.

        Raises:
            TypeError: an argument is not an asyncio task or future.
            RuntimeError: :meth:`stop` has been called (the tasks are cancelled).
        """
        for task in tasks:
            if not isinstance(task, asyncio.Future):
                raise TypeError(f"BackgroundTasks.add() needs asyncio tasks, got {task!r}")
        with self._lock:
            if not self._stopped:
                self._track(tasks)
                return
        for task in tasks:
            task.get_loop().call_soon_threadsafe(task.cancel)
        raise RuntimeError("these BackgroundTasks have been stopped; the tasks were cancelled")

    def _track(self, tasks: Iterable[asyncio.Future[Any]]) -> None:
        for task in tasks:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        """Cancel every task and wait until each has finished (the shutdown hook).

        Raises:
            RuntimeError: some tasks failed while stopping (other than by being cancelled).
        """
        with self._lock:
            self._stopped = True
            tasks = list(self._tasks)
        await stop_tasks(*tasks)
