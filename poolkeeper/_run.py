"""``poolkeeper.run``: the main of a worker or script with no server.

``sys.exit(poolkeeper.run(main))`` runs ``main()`` on a new event loop; the first SIGTERM or
SIGINT cancels it (``main`` sees ``CancelledError`` and cleans up), then the registry closes
on that same loop, and the exit code says whether everything went well. A second signal
force-closes everything at once, and ends the process if ``main`` still does not finish (it
swallows the cancellation): a second signal always stops the process, and so does the end of
``deadline`` counted from the first signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import signal
import sys
import threading
import warnings
from typing import TYPE_CHECKING, Any

from poolkeeper._budget import Budget
from poolkeeper._signals import _Interceptor, check_registry, check_signals, plan_for, shutdown_delay_argument
from poolkeeper._timeouts import check_timeout

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable

    from poolkeeper._registry import Registry

__all__ = ["run"]

logger = logging.getLogger("poolkeeper.run")

# After the second signal has force-closed the registry, how long main gets to finish before the
# process is ended anyway: main swallows CancelledError, and nothing else would ever stop it.
_EXIT_GRACE = 2.0


class _Stopper:
    """Turns signals into cancelling ``main`` (and a second one into forcing the shutdown)."""

    def __init__(
        self,
        registry: Registry,
        deadline: float | None,
        shutdown_delay: float = 0.0,
        delay_on_sigint: bool = False,
    ) -> None:
        self._registry = registry
        self._deadline = deadline
        self._shutdown_delay = shutdown_delay
        self._delay_on_sigint = delay_on_sigint
        self._hurry = threading.Event()  # a second signal cuts the shutdown delay short
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Future[Any] | None = None
        self.requested = False
        #: Set once main's task is done, however it ended.
        self.main_done = threading.Event()
        self.budget: Budget | None = None

    def started(self, loop: asyncio.AbstractEventLoop, task: asyncio.Future[Any]) -> None:
        with self._lock:
            self._loop, self._task = loop, task
            requested = self.requested
        if requested:  # a signal arrived before main started
            task.cancel()

    def react(self, sig: signal.Signals, count: int) -> None:
        # In poolkeeper's dispatcher thread.
        if count == 1:
            self._registry.start_draining()
            if self.budget is not None:
                self.budget.start()
            if self._deadline is not None:
                threading.Thread(
                    target=self._expire, args=(sig, self._deadline), name="poolkeeper-deadline", daemon=True
                ).start()
            # Ctrl-C is a developer, not a load balancer: nobody needs the endpoint-propagation gap.
            delay = self._shutdown_delay if sig != signal.SIGINT or self._delay_on_sigint else 0.0
            logger.info(
                "poolkeeper: %s received: stopping main in %.3gs",
                sig.name,
                delay,
                extra={"poolkeeper_signal": sig.name, "poolkeeper_delay": delay},
            )
            if delay > 0:
                threading.Thread(target=self._stop_after, args=(delay,), name="poolkeeper-delay", daemon=True).start()
                return
        else:
            logger.warning(
                "poolkeeper: %s received again: force-closing everything now",
                sig.name,
                extra={"poolkeeper_signal": sig.name, "poolkeeper_signal_count": count},
            )
            self._hurry.set()
            threading.Thread(target=self._force, args=(sig,), name="poolkeeper-force", daemon=True).start()
        self.stop_main()

    def exit_now(self) -> None:
        """The grace budget's exit point: what a second SIGTERM does, within the budget's margin."""
        self._hurry.set()
        wait = _EXIT_GRACE if self.budget is None else min(_EXIT_GRACE, self.budget.plan.margin / 2)
        threading.Thread(
            target=self._force,
            args=(signal.SIGTERM, "at the grace budget's exit point", wait),
            name="poolkeeper-force",
            daemon=True,
        ).start()
        self.stop_main()

    def _stop_after(self, delay: float) -> None:
        self._hurry.wait(delay)
        self.stop_main()

    def stop_main(self) -> None:
        """Cancel ``main`` (again, on a second signal: its cleanup is cut short too)."""
        with self._lock:
            self.requested = True
            loop, task = self._loop, self._task
        if loop is not None and task is not None and not loop.is_closed():
            loop.call_soon_threadsafe(task.cancel)

    def _expire(self, sig: signal.Signals, deadline: float) -> None:
        # The deadline bounds the whole stop, counted from the first signal: main that has not
        # finished by then (it swallows CancelledError) is treated like a second signal.
        if self.main_done.wait(deadline):
            return
        logger.error(
            "poolkeeper: main did not stop within the %gs deadline after %s; force-closing everything now",
            deadline,
            sig.name,
            extra={"poolkeeper_signal": sig.name},
        )
        self._force(sig, reason=f"within the {deadline:g}s deadline after {sig.name}")

    def _force(self, sig: signal.Signals, reason: str | None = None, wait: float = _EXIT_GRACE) -> None:
        try:
            self._registry.force_close()  # the report is logged by the registry
        except Exception:
            logger.exception("poolkeeper: force-closing on a second signal failed")
        if self.main_done.wait(wait):
            return  # main gave up: run() goes on, closes (already closed) and returns
        # Cancelled twice and still running: main swallows CancelledError. Like a second Ctrl-C
        # at a shell, the second signal ends the process; the registry is closed already.
        logger.error(
            "poolkeeper: main did not stop %s (does it swallow CancelledError?); "
            "the registry is closed, ending the process",
            reason or f"on a second {sig.name}",
            extra={"poolkeeper_signal": sig.name},
        )
        logging.shutdown()  # os._exit skips the flushing done at a normal exit
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # closed, or a pipe nobody reads any more
                stream.flush()
        os._exit(128 + sig)


async def _guarded(awaitable: Awaitable[Any]) -> BaseException | None:
    # SystemExit and KeyboardInterrupt would escape the event loop and skip the close: keep them.
    try:
        await awaitable
    except (SystemExit, KeyboardInterrupt) as escape:
        return escape
    return None


async def _supervise(
    main: Callable[[], Awaitable[Any]], registry: Registry, deadline: float | None, stopper: _Stopper
) -> int:
    task = asyncio.ensure_future(_guarded(main()))
    task.add_done_callback(lambda _: stopper.main_done.set())
    stopper.started(asyncio.get_running_loop(), task)
    try:
        await asyncio.wait((task,))
    except asyncio.CancelledError:
        # Cancelled from outside (asyncio's own SIGINT handling when run() handles no signal):
        # stop main and still close before the cancellation propagates.
        task.cancel()
        await asyncio.wait((task,))
        await registry.aclose(deadline)
        raise
    failed = False
    escape = None
    if task.cancelled():
        if not stopper.requested:
            logger.warning("poolkeeper: main was cancelled, not by a signal")
            failed = True
    elif (error := task.exception()) is not None:
        logger.error("poolkeeper: main failed", exc_info=(type(error), error, error.__traceback__))
        failed = True
    else:
        escape = task.result()
    remaining = None if stopper.budget is None else stopper.budget.remaining()
    if remaining is not None:  # a signal started the grace budget: the close fits in what is left
        deadline = remaining if deadline is None else min(deadline, remaining)
    report = await registry.aclose(deadline)
    if escape is not None:
        raise escape
    return 0 if report.ok and not failed else 1


def run(
    main: Callable[[], Awaitable[Any]],
    *,
    registry: Registry | None = None,
    deadline: float | None = None,
    signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT),
    shutdown_delay: float = 0.0,
    grace_period: float | None = None,
    delay_on_sigint: bool = False,
) -> int:
    """Run ``main()`` on a new event loop, close the registry, and return the exit code.

    For workers and scripts with no server: ``sys.exit(poolkeeper.run(main))``. The registry's
    registrations are checked first (:meth:`Registry.check`). The first of ``signals`` cancels
    ``main`` (it sees ``CancelledError`` and can clean up) and marks the registry as draining;
    once ``main`` has finished, however it finished, the registry closes on the same loop within
    ``deadline``. A second signal force-closes everything at once, and if ``main`` has not
    finished 2 seconds later (it swallows ``CancelledError``), ends the process with exit code
    128 + the signal number, the report logged. With a ``deadline``, the same happens without a
    second signal once ``deadline`` seconds have passed since the first one and ``main`` has
    still not finished. The replaced signal handlers are restored before returning.

    With ``shutdown_delay``, ``main`` keeps running that long after the first SIGTERM (readiness
    already failing; none after SIGINT unless ``delay_on_sigint``). The whole shutdown is planned
    inside ``grace_period`` from the first signal: at the force point (``grace_period -
    close_timeout - margin``) connections still borrowed are force-closed and the registry
    closes; at the exit point (``grace_period - margin``) ``main`` is cancelled again.

    Args:
        main: a coroutine function taking no argument.
        registry: the registry to close (default: :func:`poolkeeper.get_registry`).
        deadline: seconds the registry's shutdown may take; ``None``: the items' own timeouts.
            Counted from the first signal, it also bounds how long ``main`` may take to stop.
        signals: the signals that stop ``main``; empty to handle none.
        shutdown_delay: seconds between the first signal and cancelling ``main``.
        grace_period: seconds from the first signal to SIGKILL (default:
            ``$POOLKEEPER_GRACE_PERIOD``, else 30).
        delay_on_sigint: wait out ``shutdown_delay`` on SIGINT too (Ctrl-C skips it by default).

    Returns:
        0 when ``main`` returned (or was stopped by a signal) and the shutdown report is ok;
        1 when ``main`` raised (the error is logged) or the report is not ok. A ``SystemExit``
        or ``KeyboardInterrupt`` from ``main`` propagates, after the registry has closed.

    Raises:
        RegistrationError: :meth:`Registry.check` found a ``depends_on`` naming nothing.
        TypeError: an argument has the wrong type.
        ValueError: ``deadline``, ``shutdown_delay`` or ``grace_period`` is negative, NaN or
            infinite, or a signal cannot be handled.
    """
    if not (inspect.iscoroutinefunction(main) or inspect.iscoroutinefunction(getattr(main, "__call__", None))):  # noqa: B004 -- an object whose __call__ is async
        raise TypeError(f"main must be a coroutine function (async def), got {main!r}")
    checked = check_registry(registry)
    seconds = check_timeout("deadline", deadline)
    wanted = check_signals("signals", signals)
    delay = shutdown_delay_argument(shutdown_delay, None)
    if not isinstance(delay_on_sigint, bool):
        raise TypeError(f"delay_on_sigint must be True or False, got {delay_on_sigint!r}")
    plan = plan_for(checked, grace_period, delay)
    checked.check()
    stopper = _Stopper(checked, seconds, delay, delay_on_sigint)
    stopper.budget = Budget(checked, plan, stopper.exit_now)
    interceptor = _Interceptor(
        wanted,
        stopper.react,
        checked._mark_draining,  # noqa: SLF001 -- poolkeeper-internal: the flag a signal handler may flip
    )
    if wanted and threading.current_thread() is not threading.main_thread():
        warnings.warn(
            "poolkeeper.run() was called off the main thread; Python lets only the main thread install "
            "signal handlers, so signals will not stop main",
            RuntimeWarning,
            stacklevel=2,
        )
    elif wanted:
        interceptor.install()
    # What main wraps is closed at its end even if main dropped it (poolkeeper._held).
    checked._pin()  # noqa: SLF001 -- poolkeeper-internal
    try:
        return asyncio.run(_supervise(main, checked, seconds, stopper))
    finally:
        checked._unpin()  # noqa: SLF001 -- poolkeeper-internal
        interceptor.uninstall()
        stopper.budget.stop()
