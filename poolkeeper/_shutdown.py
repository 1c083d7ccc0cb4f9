"""Running a shutdown: each item in dependency order, concurrently where nothing orders them.

An item (keeper or hook) closes only after every item that ``depends_on`` it has finished.
One overall deadline bounds everything: each item gets a "finish by" time that leaves room
for the force-close of the items it still uses, so a slow drain is cut short in time for
the chain behind it.

A shutdown can be cut short from outside (``Registry.force_close()``, a second signal, the
cancellation of the task running it): every drain ends at once, running hooks are cancelled,
hooks not started yet are skipped, and the keepers are force-closed before the run returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from typing import TYPE_CHECKING, Any

from poolkeeper._borrowers import ThreadStacks
from poolkeeper._concurrency import run_blocking, wake_soon
from poolkeeper._hooks import Hook, HookEscapeError
from poolkeeper._keeper import Keeper, KeeperState
from poolkeeper._redact import redact
from poolkeeper._report import Outcome, ResourceReport, ShutdownReport

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping, Sequence
    from contextlib import AbstractAsyncContextManager

    from poolkeeper._borrowers import ForcedBy

__all__ = ["ForceSwitch", "Item", "run_shutdown"]

logger = logging.getLogger("poolkeeper.shutdown")

Item = Keeper | Hook

# Force-closing aborts sockets and sends cancel requests: milliseconds on a healthy network.
# Still, when a deadline cuts a drain short, it is cut this long before the item must finish
# (capped by the deadline's fifth and by the item's close_timeout), so the abort has room.
_MAX_FORCE_RESERVE = 1.0
_MIN_FORCE_RESERVE = 0.1
# Once a deadline has passed, forcing and closing still get this long: an abort never waits on
# the peer, so this bounds the "small constant" by which aclose(deadline=D) may exceed D.
_MIN_CLOSE_BUDGET = 0.1
# Once the task running a shutdown is cancelled, the force-close still gets this long before the
# cancellation propagates; items still unfinished then are abandoned and reported as failed.
_CANCEL_GRACE = 2.0


class ForceSwitch:
    """Cuts a shutdown short, from any thread or from a signal handler.

    :meth:`trip` takes no lock and never blocks: it only schedules the work on the loop that
    runs the shutdown (``call_soon_threadsafe`` writes one byte to that loop's self-pipe).
    Tripped before the shutdown starts, the shutdown starts forced.
    """

    def __init__(self) -> None:
        self._tripped = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_trip: Callable[[], None] | None = None

    @property
    def tripped(self) -> bool:
        """True once :meth:`trip` was called."""
        return self._tripped

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The loop running the shutdown, once it started."""
        return self._loop

    def bind(self, on_trip: Callable[[], None]) -> None:
        """Called on the shutdown's loop as it starts: ``on_trip`` runs there once tripped."""
        # Set before reading _tripped, mirror image of trip(): one of the two always fires it.
        self._on_trip = on_trip
        self._loop = asyncio.get_running_loop()
        if self._tripped:
            on_trip()

    def unbind(self) -> None:
        """The shutdown is over: drop ``on_trip``, which references every item it closed."""
        self._on_trip = None

    def trip(self) -> None:
        """Force the shutdown: now if it runs, as it starts otherwise."""
        self._tripped = True
        loop, on_trip = self._loop, self._on_trip
        if loop is not None and on_trip is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: that shutdown is over
                loop.call_soon_threadsafe(on_trip)


def _error_text(error: BaseException, secrets: Sequence[str] | None) -> str:
    if secrets is None:  # the secrets could not be read: a message might show one, so only the type
        return type(error).__name__
    text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    return redact(text, secrets)


def _driver_secrets(keeper: Keeper, errors: list[str] | None = None) -> tuple[str, ...] | None:
    """``keeper.driver.secrets()``; ``None`` (and an entry in ``errors``) if the driver cannot read them."""
    try:
        return tuple(keeper.driver.secrets())
    except Exception as error:  # a library that changed under the adapter must not stop the shutdown
        logger.warning(
            "poolkeeper %r: reading secrets failed",
            keeper.name,
            exc_info=True,
            extra={"poolkeeper_keeper": keeper.name},
        )
        if errors is not None:
            errors.append("secrets: " + _error_text(error, ()))
        return None


def _driver_target(keeper: Keeper, secrets: Sequence[str] | None, errors: list[str]) -> str | None:
    """``keeper.driver.describe()``, redacted; ``None`` (and an entry in ``errors``) if it cannot be read."""
    if secrets is None:
        return None  # nothing could be scrubbed from it
    try:
        return redact(keeper.driver.describe(), secrets)
    except Exception as error:  # same: reported, never raised
        logger.warning(
            "poolkeeper %r: describe failed", keeper.name, exc_info=True, extra={"poolkeeper_keeper": keeper.name}
        )
        errors.append("describe: " + _error_text(error, secrets))
        return None


def _borrow_detail(keeper: Keeper, connection: object) -> str | None:
    """``keeper.driver.describe_borrow(connection)``; ``None`` if the driver cannot say."""
    try:
        return keeper.driver.describe_borrow(connection)
    except Exception:  # a report without the detail beats no report
        logger.debug("poolkeeper %r: describe_borrow failed", keeper.name, exc_info=True)
        return None


def _reserve(item: Item, deadline_seconds: float | None) -> float:
    if deadline_seconds is None:
        return 0.0
    share = min(_MAX_FORCE_RESERVE, max(_MIN_FORCE_RESERVE, deadline_seconds / 5))
    own = item.close_timeout if isinstance(item, Keeper) else item.timeout
    return min(own, share)


def _tails(items: Mapping[str, Item], deadline_seconds: float | None) -> dict[str, float]:
    """For each item, the time its dependencies still need after it (longest chain of reserves)."""
    tails: dict[str, float] = {}

    def tail(name: str) -> float:
        if name not in tails:
            tails[name] = 0.0  # cycles are refused at registration; this only guards recursion
            tails[name] = max(
                (_reserve(items[dep], deadline_seconds) + tail(dep) for dep in items[name].depends_on if dep in items),
                default=0.0,
            )
        return tails[name]

    for name in items:
        tail(name)
    return tails


# asyncio.timeout() (3.11+): a step's budget in the closing task itself.
_timeout: Callable[[float], AbstractAsyncContextManager[None]] | None = getattr(asyncio, "timeout", None)


async def _step(
    keeper: Keeper, what: str, work: Awaitable[None], budget: float, errors: list[str]
) -> asyncio.CancelledError | None:
    """Run one I/O step of closing within ``budget``; a failure goes into ``errors``, a cancellation is returned."""
    try:
        if _timeout is None:
            await asyncio.wait_for(work, budget)  # Python 3.10
        else:
            # In this task: no task of its own to start and then hear from (two turns of the loop
            # fewer before a keeper's close goes on, issue 18); cancelled and timed out alike.
            async with _timeout(budget):
                await work
    except asyncio.CancelledError as error:
        errors.append(f"{what}: cancelled")
        return error
    except Exception as error:  # noqa: BLE001 -- logged with its traceback and named in the report, by _failed
        _failed(keeper, what, error, errors)
    return None


def _failed(keeper: Keeper, what: str, error: BaseException, errors: list[str] | None = None) -> None:
    """Log that ``what`` failed for ``keeper``, and name it in the report's ``errors`` (secrets scrubbed)."""
    logger.warning(
        "poolkeeper %r: %s failed", keeper.name, what, exc_info=error, extra={"poolkeeper_keeper": keeper.name}
    )
    if errors is not None:
        errors.append(f"{what}: " + _error_text(error, _driver_secrets(keeper)))


def _blocking_close(keeper: Keeper, errors: list[str]) -> Callable[[], None] | None:
    """The driver's :meth:`~poolkeeper.adapters.Driver.blocking_close`; a failure is reported and means none."""
    try:
        return keeper.driver.blocking_close()
    except Exception as error:  # noqa: BLE001 -- logged with its traceback and named in the report, by _failed
        _failed(keeper, "close", error, errors)
        return None


async def _drain_then_close(
    keeper: Keeper, wait: float, close: Callable[[], None]
) -> tuple[bool, float, asyncio.Future[None] | None]:
    """Wait for the drain in a helper thread that, when it ends clean, closes the idle connections at once.

    For a library without an event loop: its last return wakes that thread directly (a thread
    event, not a hop through this loop and a new thread after it), and the close is under way
    before this loop even hears of the drain. Returns whether the drain was clean, when it
    ended, and the future of the close already running (``None`` after a drain cut short:
    nothing was closed, the caller forces and closes as usual).
    """
    loop = asyncio.get_running_loop()
    drained: asyncio.Future[tuple[bool, float]] = loop.create_future()

    def drain_then_close() -> None:
        clean = False
        try:
            clean = keeper.wait_drained_blocking(wait)
        finally:
            # Told at once (also if the wait failed), so that the close is timed from the drain's end.
            wake_soon(loop, drained, (clean, time.monotonic()))
        if clean:
            keeper.start_sweep()
            close()

    closing = run_blocking(drain_then_close, name="poolkeeper-drain-close")
    clean, drained_at = await drained
    if clean:
        return True, drained_at, closing
    closing.add_done_callback(functools.partial(_warn_if_failed, keeper, "waiting for the drain"))
    return False, drained_at, None


def _close_idle(keeper: Keeper) -> Awaitable[None]:
    """The driver's close of the idle connections; any return from now on, its returner closes (Keeper.start_sweep)."""
    keeper.start_sweep()
    return keeper.driver.close_connections()


def _warn_if_failed(keeper: Keeper, what: str, future: asyncio.Future[Any]) -> None:
    error = None if future.cancelled() else future.exception()
    if error is not None:
        _failed(keeper, what, error)


async def close_keeper(keeper: Keeper, finish_by: float | None, reserve: float) -> ResourceReport:
    """Drain, force and close one keeper; never raises (errors go into the report)."""
    driver = keeper.driver
    # Read before closing (a closed session may no longer say); a failure is reported, not raised.
    errors: list[str] = []
    target = _driver_target(keeper, _driver_secrets(keeper, errors), errors)
    started = time.monotonic()
    if keeper.state is KeeperState.CLOSED:
        # Closed before the registry got to it (asyncpg's own pool.close() runs this same
        # procedure): report what that close did, or "skipped" if it left no report.
        return keeper.close_report or ResourceReport(keeper.name, keeper.kind, "skipped", target=target)
    keeper.start_closing()
    if keeper.refuse_error is not None:
        errors.append("refuse: " + _error_text(keeper.refuse_error, _driver_secrets(keeper)))

    drain_until = started + keeper.drain_timeout
    cut_by: ForcedBy = "drain_timeout"
    if finish_by is not None and finish_by - reserve < drain_until:
        drain_until, cut_by = finish_by - reserve, "deadline"
    drain_wait = max(0.0, drain_until - time.monotonic())
    blocking_close = _blocking_close(keeper, errors)
    # The close of the idle connections, when a helper thread already runs it (see _drain_then_close).
    closing: asyncio.Future[None] | None = None
    if blocking_close is None:
        clean = await keeper.wait_drained(drain_wait)
        close_started = time.monotonic()
    else:
        clean, close_started, closing = await _drain_then_close(keeper, drain_wait, blocking_close)
    drain_seconds = close_started - started

    close_until = close_started + keeper.close_timeout
    if finish_by is not None:
        close_until = min(close_until, max(finish_by, close_started + _MIN_CLOSE_BUDGET))
    forced = 0
    forced_by: ForcedBy | None = None
    leaks: tuple[object, ...] = ()
    # Cancelled past its grace (see _settle), a step still closes what it can, quickly, and
    # reaches CLOSED before the cancellation goes on.
    cancelled: asyncio.CancelledError | None = None
    if not clean:
        borrows = keeper.start_forcing()
        # Checkouts still connecting are cut too: lend() refuses them when they land.
        forced = len(borrows) + keeper.checkouts_in_flight
        if forced:
            # Asked for from outside (the grace budget, force_close()), else the time ran out.
            forced_by = keeper.force_reason or cut_by
        stacks = ThreadStacks()  # the borrowing threads' stacks read once for all of them
        leaks = tuple(
            borrow.view(
                keeper.name, forced_by=forced_by, detail=_borrow_detail(keeper, borrow.connection), stacks=stacks
            )
            for borrow in borrows
        )
        if borrows:
            # Never unbounded: a zero budget (close_timeout=0, or a deadline already spent) still
            # gets the minimum an abort needs, like closing the connections below.
            budget = max(_MIN_CLOSE_BUDGET, close_until - time.monotonic())
            cancelled = await _step(keeper, "force-close", driver.force_close(borrows, budget), budget, errors)
    budget = _MIN_CLOSE_BUDGET if cancelled else max(_MIN_CLOSE_BUDGET, close_until - time.monotonic())
    work = _close_idle(keeper) if closing is None else closing
    cancelled = await _step(keeper, "close", work, budget, errors) or cancelled
    # Counted, not snapshotted: a checkout that raced the start of closing is drained too.
    borrowed_at_start = keeper.returned_while_draining + forced
    outcome: Outcome = "failed" if errors else "forced" if forced else "clean"
    # The report first, then the state: whoever sees the keeper closed (a metrics scrape reads
    # the state, then the report) finds its report, never "closed" with nothing forced.
    keeper.close_report = ResourceReport(
        name=keeper.name,
        kind=keeper.kind,
        outcome=outcome,
        borrowed_at_start=borrowed_at_start,
        returned=keeper.returned_while_draining,
        forced=forced,
        drain_seconds=drain_seconds,
        close_seconds=time.monotonic() - close_started,
        error="; ".join(errors) or None,
        leaks=leaks,  # type: ignore[arg-type]  # tuple of Borrower built above
        target=target,
        forced_by=forced_by,
    )
    keeper.mark_closed()
    if cancelled is not None:
        raise cancelled
    return keeper.close_report


async def run_hook(hook: Hook, finish_by: float | None, forced: asyncio.Future[None]) -> ResourceReport:
    """Run one hook within its timeout (and the deadline) unless forced; never raises."""
    if forced.done():
        return ResourceReport(hook.name, "hook", "failed", error="not run: the shutdown was forced")
    started = time.monotonic()
    until = started + hook.timeout
    if finish_by is not None:
        until = min(until, max(finish_by, started + _MIN_CLOSE_BUDGET))
    timeout = max(0.0, until - time.monotonic())
    error: str | None = None
    running = asyncio.ensure_future(hook.run())
    await asyncio.wait((running, forced), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    if not running.done():
        # Cancelled, not awaited to the end: a hook that ignores its cancellation must not hold
        # up the shutdown (asyncio.wait_for would wait for it). It gets a moment to clean up.
        running.cancel()
        running.add_done_callback(_consume)
        await asyncio.wait((running,), timeout=_MIN_CLOSE_BUDGET)
        if forced.done():
            error = "cancelled: the shutdown was forced"
            logger.warning("poolkeeper hook %r cancelled: forced", hook.name, extra={"poolkeeper_hook": hook.name})
        else:
            error = f"TimeoutError: did not finish within {timeout:.3f}s"
            logger.warning("poolkeeper hook %r timed out", hook.name, extra={"poolkeeper_hook": hook.name})
    elif running.cancelled():
        error = "cancelled"
    elif (exc := running.exception()) is not None:
        error = _error_text(exc.__cause__ if isinstance(exc, HookEscapeError) and exc.__cause__ else exc, ())
        logger.warning(
            "poolkeeper hook %r failed",
            hook.name,
            exc_info=(type(exc), exc, exc.__traceback__),
            extra={"poolkeeper_hook": hook.name},
        )
    return ResourceReport(
        name=hook.name,
        kind="hook",
        outcome="failed" if error else "clean",
        close_seconds=time.monotonic() - started,
        error=error,
    )


def _consume(task: asyncio.Future[Any]) -> None:
    # Mark an abandoned task's outcome as seen, so asyncio does not log it as never retrieved.
    if not task.cancelled():
        task.exception()


def _users(items: Mapping[str, Item]) -> dict[str, list[str]]:
    """For each item, the items that use it (name it in ``depends_on``); unknown names are logged."""
    users: dict[str, list[str]] = {name: [] for name in items}
    for name, item in items.items():
        for dependency in item.depends_on:
            if dependency in users:
                users[dependency].append(name)
            else:
                logger.warning(
                    "poolkeeper: %r depends on unknown %r; ignored at shutdown",
                    name,
                    dependency,
                    extra={"poolkeeper_item": name, "poolkeeper_unknown_dependency": dependency},
                )
    return users


def _outcome(item: Item, task: asyncio.Task[ResourceReport]) -> ResourceReport:
    """The item's report; for an item whose closing was abandoned or broke, a "failed" one."""
    exc = None if not task.done() or task.cancelled() else task.exception()
    if task.done() and not task.cancelled() and exc is None:
        return task.result()
    if exc is None:
        error = "cancelled before it finished closing"
    else:
        error = _error_text(exc, _driver_secrets(item) if isinstance(item, Keeper) else ())
    return ResourceReport(item.name, item.kind, "failed", error=error)


def _force_all(items: Mapping[str, Item], forced: asyncio.Future[None]) -> None:
    """Cut every drain short and tell hooks the shutdown is forced (on the shutdown's loop)."""
    if not forced.done():
        forced.set_result(None)
    for item in items.values():
        if isinstance(item, Keeper):
            item.request_force()


async def _settle(tasks: Sequence[asyncio.Task[ResourceReport]], grace: float) -> None:
    """Wait up to ``grace`` seconds for ``tasks``, even if cancelled again meanwhile; cancel the rest."""
    end = time.monotonic() + grace
    pending = {task for task in tasks if not task.done()}
    while pending and time.monotonic() < end:
        try:
            _, pending = await asyncio.wait(pending, timeout=end - time.monotonic())
        except asyncio.CancelledError:
            continue  # cancelled once more: the grace period bounds this wait anyway
    for task in pending:
        task.cancel()
        task.add_done_callback(_consume)
    # Let the cancelled steps run their own cleanup (a keeper cancelled mid-force still closes
    # its connections, briefly): on a private loop nothing would run them after this returns.
    end = time.monotonic() + 2 * _MIN_CLOSE_BUDGET
    while pending and time.monotonic() < end:
        try:
            _, pending = await asyncio.wait(pending, timeout=end - time.monotonic())
        except asyncio.CancelledError:
            continue


async def run_shutdown(
    items: Mapping[str, Item],
    deadline_seconds: float | None,
    force: ForceSwitch | None = None,
    publish: Callable[[ShutdownReport], None] | None = None,
) -> ShutdownReport:
    """Close every item in dependency order within ``deadline_seconds`` and report.

    Args:
        items: the keepers and hooks, by name.
        deadline_seconds: the overall deadline, or ``None`` for each item's own timeouts.
        force: tripping it cuts the shutdown short (see :class:`ForceSwitch`).
        publish: called with the report as soon as it exists, also when the task running the
            shutdown is cancelled (the cancellation propagates after the force-close).
    """
    started = time.monotonic()
    overall = None if deadline_seconds is None else started + deadline_seconds
    users = _users(items)
    tails = _tails(items, deadline_seconds)
    tasks: dict[str, asyncio.Task[ResourceReport]] = {}
    forced: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    on_force = functools.partial(_force_all, items, forced)
    switch = force or ForceSwitch()
    switch.bind(on_force)

    async def close_item(name: str) -> ResourceReport:
        waiting_for = [tasks[user] for user in users[name]]
        if waiting_for:
            await asyncio.wait(waiting_for)
        item = items[name]
        finish_by = None if overall is None else overall - tails[name]
        if isinstance(item, Keeper):
            return await close_keeper(item, finish_by, _reserve(item, deadline_seconds))
        return await run_hook(item, finish_by, forced)

    for name in items:
        tasks[name] = asyncio.ensure_future(close_item(name))
    interrupted: BaseException | None = None
    try:
        if tasks:
            await asyncio.wait(list(tasks.values()))
    except BaseException as error:  # noqa: BLE001 -- cancelled (or interrupted): force-close, then re-raise
        interrupted = error
        on_force()
        await _settle(list(tasks.values()), _CANCEL_GRACE)
    report = ShutdownReport(
        items=tuple(_outcome(items[name], tasks[name]) for name in items),
        duration=time.monotonic() - started,
        deadline=deadline_seconds,
    )
    # The registry keeps its switch: a closed keeper must not keep its resource alive through it.
    switch.unbind()
    if publish is not None:
        publish(report)
    if interrupted is not None:
        raise interrupted
    # SystemExit or KeyboardInterrupt from an async hook did not stop the cleanup (the hook is
    # reported failed); now that everything is closed, the intent it carried goes on, as
    # asyncio's TaskGroup does. Sync hooks run in threads, where sys.exit() ends only the thread.
    escaped = next((item.escaped for item in items.values() if isinstance(item, Hook) and item.escaped), None)
    if escaped is not None:
        raise escaped
    return report
