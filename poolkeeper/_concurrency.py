"""Running blocking calls and foreign-loop coroutines from the shutdown's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sys
import threading
import weakref
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

__all__ = ["current_task_of", "run_blocking", "run_on_loop", "wake_soon"]

T = TypeVar("T")


#: ``current_task_of(loop)``: the task running on ``loop`` now, or ``None``; for hot paths.
#: On 3.12+ that is ``asyncio.current_task``, in C. On 3.11 ``current_task`` is a Python function
#: around the dict the C tasks record themselves in: reading the dict directly costs a fifth.
current_task_of: Callable[[asyncio.AbstractEventLoop], asyncio.Task[Any] | None]
if sys.version_info >= (3, 12):
    current_task_of = asyncio.current_task
else:
    current_task_of = asyncio.tasks._current_tasks.get  # type: ignore[attr-defined]  # noqa: SLF001 -- what current_task(loop) returns on 3.11


def _resolve(future: asyncio.Future[T], result: T) -> None:
    if not future.done():
        future.set_result(result)


def wake_soon(loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], result: Any = None) -> None:
    """Resolve ``future`` (with ``result``) on its ``loop`` from any thread; a closed loop has nobody left to wake.

    On that loop's own thread (an async library's return, on the loop the closer waits on) it is
    resolved at once: no byte through the loop's self-pipe, no extra turn of the loop.
    """
    if asyncio._get_running_loop() is loop:  # noqa: SLF001 -- None without raising: get_running_loop() raises
        _resolve(future, result)
        return
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(_resolve, future, result)


def _settle(future_ref: weakref.ref[asyncio.Future[Any]], result: Any, error: BaseException | None) -> None:
    future = future_ref()
    if future is None or future.done():  # abandoned (cancelled or dropped) while the call ran
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def run_blocking(function: Callable[[], T], *, name: str = "poolkeeper-blocking") -> asyncio.Future[T]:
    """Run ``function`` in a new daemon thread; the returned future is bound to the running loop.

    Unlike ``asyncio.to_thread``, an abandoned call (a peer that never answers) never holds up
    interpreter exit or ``loop.shutdown_default_executor()``.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    # The thread sees the future only weakly. A failure's traceback holds the thread's frames, and
    # a frame that held the future would close a cycle (future -> error -> frame -> future) that
    # keeps whatever the failed call still references (the socket of a timed-out cancel request)
    # open until the garbage collector runs. Whoever awaits the future keeps it alive.
    settle = functools.partial(_settle, weakref.ref(future))

    def target() -> None:
        try:
            outcome: tuple[Any, BaseException | None] = (function(), None)
        except (SystemExit, KeyboardInterrupt) as error:
            # Handed to a task as they are, these would escape the event loop itself and stop it.
            failure = RuntimeError(f"{type(error).__name__} raised in a worker thread")
            failure.__cause__ = error
            outcome = (None, failure)
        except BaseException as error:  # noqa: BLE001 -- handed over to the awaiting task
            outcome = (None, error)
        with contextlib.suppress(RuntimeError):  # the loop closed while we ran: nobody is waiting
            loop.call_soon_threadsafe(settle, *outcome)
        # The exception's traceback holds this frame: drop the frame's reference back to the
        # exception, or the cycle keeps whatever it holds (a socket to a dead server) until the
        # garbage collector runs.
        del outcome

    threading.Thread(target=target, name=name, daemon=True).start()
    return future


async def run_on_loop(loop: asyncio.AbstractEventLoop | None, coroutine: Coroutine[Any, Any, T]) -> T:
    """Await ``coroutine`` on ``loop`` (the library's own loop), from whichever loop we are on."""
    current = asyncio.get_running_loop()
    if loop is None or loop is current:
        return await coroutine
    if loop.is_closed() or not loop.is_running():
        coroutine.close()
        raise RuntimeError(
            "the event loop these connections belong to is not running; close the registry "
            "with 'await registry.aclose()' from that loop"
        )
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, loop))
