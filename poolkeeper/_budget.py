"""The grace budget: every shutdown phase planned inside the pod's grace period, counted from the first SIGTERM.

Kubernetes kills a pod ``terminationGracePeriodSeconds`` (30 s by default) after SIGTERM. Within
that budget ``G``, with the shutdown delay ``D``, the keepers' ``close_timeout`` ``C`` and a safety
margin ``M = max(1 s, G / 10)``::

    t = 0          SIGTERM: readiness answers 503 at once
    t = D          the signal goes on to the server, which stops accepting and drains its requests
    t = G - C - M  force point: connections still borrowed are force-closed (statement cancelled on
                   the server, then the socket cut), so stuck requests fail and the server's drain
                   ends; the registry closes (hooks, then keepers), within C
    t = G - M      exit point: a server still running is asked to exit now (uvicorn: the second
                   signal, SIGINT, sets ``force_exit``), the registry force-closed first so the
                   report is logged
    t = G          SIGKILL

The plan does not fit when the force point comes before the shutdown delay ends (``G - C - M < D``):
then the force point is moved to ``D`` and the plan says so (``poolkeeper check`` exits 1).

``C`` is read when the first signal arrives, not when the handlers were installed: a lifespan
installs them before the app's own ``setup`` has created its engines, and a keeper may be wrapped
(or unwrapped) at any time, so the close_timeout that counts is that of the keepers there are
when the shutdown starts. The plan made at install time only serves the early warning.

Once the first signal has started the clock, the process is on its way out, and the last thing
it does, the interpreter's own teardown, is not free: for a FastAPI + SQLAlchemy app on a busy
2-core machine its final garbage collections took 1.2 s of an 8 s budget after the report was
logged. So the first signal also registers an exit handler that freezes the heap
(``gc.freeze()``) as the interpreter exits, which skips those collections (0.08 s then).
Objects are still freed by reference counting; only the finalizers of objects caught in
reference cycles do not run at exit, which Python never promised anyway.
Only the standard library is imported.
"""

from __future__ import annotations

import atexit
import dataclasses
import gc
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from poolkeeper._timeouts import check_timeout

if TYPE_CHECKING:
    from collections.abc import Callable

    from poolkeeper._borrowers import Borrower
    from poolkeeper._registry import Registry

__all__ = [
    "DEFAULT_GRACE_PERIOD",
    "GRACE_PERIOD_ENV",
    "Budget",
    "Plan",
    "grace_period_or_default",
    "plan_now",
    "set_server_grace_period",
    "warn_misfit",
]

logger = logging.getLogger("poolkeeper.budget")

#: Kubernetes' default ``terminationGracePeriodSeconds``.
DEFAULT_GRACE_PERIOD = 30.0
#: The environment variable read when ``grace_period`` is not given.
GRACE_PERIOD_ENV = "POOLKEEPER_GRACE_PERIOD"
#: The safety margin is this share of the grace period, and at least MIN_MARGIN seconds: time for
#: the process to exit, flush its logs, and for the kubelet's own timing.
MARGIN_SHARE = 0.1
MIN_MARGIN = 1.0


# Set by a pre-fork server's hooks (poolkeeper.gunicorn) in each worker: the grace period that
# worker really has, which a lifespan without an explicit grace_period uses.
_server_grace_period: float | None = None


def set_server_grace_period(seconds: float | None) -> None:
    """Set this process's grace period as its server knows it (``None``: none); see :func:`grace_period_or_default`."""
    global _server_grace_period  # noqa: PLW0603 -- one per process, like the server that sets it
    _server_grace_period = seconds


def grace_period_or_default(value: object, *, server: bool = True) -> float:
    """``value`` checked, else the server's (see :func:`set_server_grace_period`), else the environment, else 30.

    Raises:
        ValueError: ``value`` or ``$POOLKEEPER_GRACE_PERIOD`` is no positive finite number (named).
    """
    if value is None and server and _server_grace_period is not None:
        return _server_grace_period
    if value is None:
        text = os.environ.get(GRACE_PERIOD_ENV, "").strip()
        if not text:
            return DEFAULT_GRACE_PERIOD
        try:
            number = float(text)
        except ValueError:
            raise ValueError(f"{GRACE_PERIOD_ENV} must be a number of seconds, got {text!r}") from None
        value, argument = number, GRACE_PERIOD_ENV
    else:
        argument = "grace_period"
    seconds = check_timeout(argument, value, allow_none=False)
    if not seconds:
        raise ValueError(f"{argument} must be a positive number of seconds, got {value!r}")
    return seconds


@dataclass(frozen=True)
class Plan:
    """When each shutdown phase starts, in seconds after the first SIGTERM (see the module docstring)."""

    grace_period: float
    shutdown_delay: float
    close_timeout: float
    #: The registry's own drain, after the server has drained; the force point cuts it if needed.
    drain_timeout: float = 0.0

    @property
    def margin(self) -> float:
        """Seconds kept free at the end of the grace period."""
        return max(MIN_MARGIN, MARGIN_SHARE * self.grace_period)

    @property
    def fits(self) -> bool:
        """True when the force point comes after the shutdown delay and the exit point after it."""
        return self.grace_period - self.close_timeout - self.margin >= self.shutdown_delay

    @property
    def force_at(self) -> float:
        """The force point: ``G - C - M``, never before the shutdown delay ends."""
        return max(self.shutdown_delay, self.grace_period - self.close_timeout - self.margin)

    @property
    def exit_at(self) -> float:
        """The exit point: ``G - M``, never before the force point."""
        return max(self.force_at, self.grace_period - self.margin)

    def problems(self) -> list[str]:
        """Why the configured timeouts do not fit the grace period (empty when they do)."""
        problems = []
        if not self.fits:
            needed = self.shutdown_delay + self.close_timeout + self.margin
            problems.append(
                f"shutdown delay {self.shutdown_delay:g}s + close_timeout {self.close_timeout:g}s + margin "
                f"{self.margin:g}s = {needed:g}s does not fit in the grace period of {self.grace_period:g}s: "
                "requests get no time to drain; raise the grace period or lower the delay or close_timeout"
            )
        elif self.shutdown_delay + self.drain_timeout > self.force_at:
            problems.append(
                f"drain_timeout {self.drain_timeout:g}s cannot be honoured: after the shutdown delay of "
                f"{self.shutdown_delay:g}s the force point at {self.force_at:g}s cuts it to "
                f"{self.force_at - self.shutdown_delay:g}s; lower drain_timeout or raise the grace period"
            )
        return problems

    def timeline(self) -> list[tuple[float, str]]:
        """``(seconds after SIGTERM, what happens)`` for each phase."""
        return [
            (0.0, "SIGTERM: readiness answers 503; requests are still served"),
            (self.shutdown_delay, "the signal goes on to the server: it stops accepting and drains its requests"),
            (
                self.force_at,
                "force point: still-borrowed connections are force-closed (cancel, then cut); the registry closes",
            ),
            (self.exit_at, "exit point: a server still running is asked to exit now (uvicorn force_exit)"),
            (self.grace_period, "SIGKILL"),
        ]


class Budget:
    """Runs a :class:`Plan` from the first signal: forces the registry at the force point, the exit at the exit point.

    Args:
        registry: the registry to force-close at the force point.
        plan: the phases as planned at install time.
        force_exit: called at the exit point if the process still runs (ask the server to exit now).
        loop_of_registry: returns the event loop the registry is best closed on, or ``None``.
    """

    def __init__(
        self,
        registry: Registry,
        plan: Plan,
        force_exit: Callable[[], None],
        loop_of_registry: Callable[[], Any] | None = None,
    ) -> None:
        self.registry = registry
        self.plan = plan
        self._force_exit = force_exit
        self._loop_of_registry = loop_of_registry
        self._stop = threading.Event()
        self.started_at: float | None = None

    def start(self) -> None:
        """Start the clock (the first signal has arrived) and plan with today's timeouts; idempotent."""
        if self.started_at is not None:
            return
        self.started_at = time.monotonic()
        planned, self.plan = self.plan, plan_now(self.registry, self.plan.grace_period, self.plan.shutdown_delay)
        if self.plan != planned:
            logger.info(
                "poolkeeper: grace budget: close_timeout %gs and drain_timeout %gs at the first signal "
                "(%gs and %gs when installed): force point %.3gs, exit point %.3gs",
                self.plan.close_timeout,
                self.plan.drain_timeout,
                planned.close_timeout,
                planned.drain_timeout,
                self.plan.force_at,
                self.plan.exit_at,
                extra={"poolkeeper_event": "budget-replan"},
            )
            warn_misfit(self.plan)
        _skip_final_collections_at_exit()
        threading.Thread(target=self._run, name="poolkeeper-budget", daemon=True).start()

    def stop(self) -> None:
        """Stop the clock: nothing more will be forced."""
        self._stop.set()

    def remaining(self) -> float | None:
        """Seconds until the exit point, or ``None`` before the first signal."""
        if self.started_at is None:
            return None
        return max(0.0, self.started_at + self.plan.exit_at - time.monotonic())

    def _wait_until(self, at: float) -> bool:
        """Sleep until ``at`` seconds after the first signal; False if stopped meanwhile."""
        assert self.started_at is not None  # noqa: S101 -- set by start() before the thread runs
        return not self._stop.wait(max(0.0, self.started_at + at - time.monotonic()))

    def _run(self) -> None:
        if not self._wait_until(self.plan.force_at):
            return
        if not self.registry.closed:
            self._force()
        if not self._wait_until(self.plan.exit_at):
            return
        logger.warning(
            "poolkeeper: grace budget: the process still runs %.3gs after the first signal (grace period %.3gs); "
            "asking the server to exit now",
            self.plan.exit_at,
            self.plan.grace_period,
            extra={"poolkeeper_event": "budget-exit"},
        )
        try:
            for keeper in self.registry.keepers:
                keeper.request_force("budget")
            self.registry.force_close()
        except Exception:
            logger.exception("poolkeeper: force-closing at the exit point failed")
        self._force_exit()

    def _force(self) -> None:
        if logger.isEnabledFor(logging.WARNING):  # naming thousands of borrowers is not free
            held = [
                dataclasses.replace(borrower, forced_by="budget")
                for keeper in self.registry.keepers
                for borrower in keeper.borrowers()
            ]
            logger.warning(
                "poolkeeper: grace budget: force point %.3gs after the first signal (grace period %.3gs - "
                "close_timeout %.3gs - margin %.3gs): force-closing %d borrowed connection%s: %s",
                self.plan.force_at,
                self.plan.grace_period,
                self.plan.close_timeout,
                self.plan.margin,
                len(held),
                "" if len(held) == 1 else "s",
                "; ".join(_describe(borrower) for borrower in held) or "none",
                extra={
                    "poolkeeper_event": "budget-force",
                    "poolkeeper_budget_forced": [borrower.to_dict() for borrower in held],
                },
            )
        for keeper in self.registry.keepers:
            keeper.request_force("budget")  # a drain running now, or starting later, ends at once
        loop = self._loop_of_registry() if self._loop_of_registry is not None else None
        deadline = self.plan.close_timeout
        try:
            if loop is not None and loop.is_running():
                import asyncio  # noqa: PLC0415 -- only with a loop to close on

                future = asyncio.run_coroutine_threadsafe(self.registry.aclose(deadline), loop)
                future.result(timeout=deadline + self.plan.margin)
            else:
                self.registry.close(deadline=deadline)
        except Exception:
            logger.exception("poolkeeper: closing the registry at the force point failed")


_exit_handler_registered = False


def _skip_final_collections_at_exit() -> None:
    """Register, once per process, ``gc.freeze()`` as an exit handler (see the module docstring)."""
    global _exit_handler_registered  # noqa: PLW0603 -- one exit handler per process
    if not _exit_handler_registered:
        _exit_handler_registered = True
        atexit.register(gc.freeze)  # registered late, so it runs early among the exit handlers


def plan_now(registry: Registry, grace_period: float, shutdown_delay: float) -> Plan:
    """The plan for ``registry`` as its keepers are configured now (the longest close and drain timeouts)."""
    keepers = registry.keepers
    close_timeout = max((keeper.close_timeout for keeper in keepers), default=registry.close_timeout)
    drain_timeout = max((keeper.drain_timeout for keeper in keepers), default=registry.drain_timeout)
    return Plan(grace_period, shutdown_delay, close_timeout, drain_timeout)


def warn_misfit(plan: Plan) -> None:
    """Log a warning for each reason the plan's timeouts do not fit its grace period."""
    for problem in plan.problems():
        logger.warning("poolkeeper: grace budget: %s", problem, extra={"poolkeeper_event": "budget-misfit"})


def _describe(borrower: Borrower) -> str:
    site = f" at {borrower.site}" if borrower.site else ""
    return f"{borrower.keeper} held {borrower.held_seconds:.1f}s{site}"
