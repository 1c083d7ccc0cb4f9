"""Running a shutdown: each item in dependency order, concurrently where nothing orders them.

An item (keeper or hook) closes only after every item that ``depends_on`` it has finished.
One overall deadline bounds everything: each item gets a "finish by" time that leaves room
for the force-close of the items it still uses, so a slow drain is cut short in time for
the chain behind it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from poolkeeper._hooks import Hook
from poolkeeper._keeper import Keeper, KeeperState
from poolkeeper._redact import redact
from poolkeeper._report import Outcome, ResourceReport, ShutdownReport

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

__all__ = ["Item", "run_shutdown"]

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


def _error_text(error: BaseException, secrets: Sequence[str]) -> str:
    text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    return redact(text, secrets)


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


async def close_keeper(keeper: Keeper, finish_by: float | None, reserve: float) -> ResourceReport:
    """Drain, force and close one keeper; never raises (errors go into the report)."""
    driver = keeper.driver
    secrets = driver.secrets()
    target = redact(driver.describe(), secrets)
    started = time.monotonic()
    if keeper.state is KeeperState.CLOSED:
        return ResourceReport(keeper.name, keeper.kind, "skipped", target=target)
    keeper.start_closing()

    drain_until = started + keeper.drain_timeout
    if finish_by is not None:
        drain_until = min(drain_until, finish_by - reserve)
    clean = await keeper.wait_drained(max(0.0, drain_until - time.monotonic()))
    drain_seconds = time.monotonic() - started

    close_started = time.monotonic()
    close_until = close_started + keeper.close_timeout
    if finish_by is not None:
        close_until = min(close_until, max(finish_by, close_started + _MIN_CLOSE_BUDGET))
    errors: list[str] = []
    forced = 0
    leaks: tuple[object, ...] = ()
    if not clean:
        borrows = keeper.start_forcing()
        forced = len(borrows)
        leaks = tuple(borrow.view(keeper.name) for borrow in borrows)
        if borrows:
            budget = max(0.0, close_until - time.monotonic())
            try:
                await asyncio.wait_for(driver.force_close(borrows, budget), budget or None)
            except Exception as error:
                logger.warning(
                    "poolkeeper %r: force-close failed",
                    keeper.name,
                    exc_info=True,
                    extra={"poolkeeper_keeper": keeper.name},
                )
                errors.append("force-close: " + _error_text(error, secrets))
    budget = max(_MIN_CLOSE_BUDGET, close_until - time.monotonic())
    try:
        await asyncio.wait_for(driver.close_connections(), budget)
    except Exception as error:
        logger.warning(
            "poolkeeper %r: closing connections failed",
            keeper.name,
            exc_info=True,
            extra={"poolkeeper_keeper": keeper.name},
        )
        errors.append("close: " + _error_text(error, secrets))
    keeper.mark_closed()
    # Counted, not snapshotted: a checkout that raced the start of closing is drained too.
    borrowed_at_start = keeper.returned_while_draining + forced
    outcome: Outcome = "failed" if errors else "forced" if forced else "clean"
    return ResourceReport(
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
    )


async def run_hook(hook: Hook, finish_by: float | None) -> ResourceReport:
    """Run one hook within its timeout (and the deadline); never raises."""
    started = time.monotonic()
    until = started + hook.timeout
    if finish_by is not None:
        until = min(until, max(finish_by, started + _MIN_CLOSE_BUDGET))
    timeout = max(0.0, until - time.monotonic())
    error: str | None = None
    try:
        await asyncio.wait_for(hook.run(), timeout)
    except asyncio.TimeoutError:
        error = f"TimeoutError: did not finish within {timeout:.3f}s"
        logger.warning("poolkeeper hook %r timed out", hook.name, extra={"poolkeeper_hook": hook.name})
    except Exception as exc:
        error = _error_text(exc, ())
        logger.warning("poolkeeper hook %r failed", hook.name, exc_info=True, extra={"poolkeeper_hook": hook.name})
    return ResourceReport(
        name=hook.name,
        kind="hook",
        outcome="failed" if error else "clean",
        close_seconds=time.monotonic() - started,
        error=error,
    )


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


async def run_shutdown(items: Mapping[str, Item], deadline_seconds: float | None) -> ShutdownReport:
    """Close every item in dependency order within ``deadline_seconds`` and report."""
    started = time.monotonic()
    overall = None if deadline_seconds is None else started + deadline_seconds
    users = _users(items)
    tails = _tails(items, deadline_seconds)
    tasks: dict[str, asyncio.Task[ResourceReport]] = {}

    async def close_item(name: str) -> ResourceReport:
        waiting_for = [tasks[user] for user in users[name]]
        if waiting_for:
            await asyncio.wait(waiting_for)
        item = items[name]
        finish_by = None if overall is None else overall - tails[name]
        if isinstance(item, Keeper):
            return await close_keeper(item, finish_by, _reserve(item, deadline_seconds))
        return await run_hook(item, finish_by)

    for name in items:
        tasks[name] = asyncio.ensure_future(close_item(name))
    try:
        if tasks:
            await asyncio.wait(list(tasks.values()))
    except asyncio.CancelledError:
        # Cancelled: cut every drain short, let each item force-close, then propagate.
        for item in items.values():
            if isinstance(item, Keeper):
                item.request_force()
        if tasks:
            await asyncio.wait(list(tasks.values()), timeout=_MAX_FORCE_RESERVE + _MIN_CLOSE_BUDGET)
        raise
    return ShutdownReport(
        items=tuple(tasks[name].result() for name in items),
        duration=time.monotonic() - started,
        deadline=deadline_seconds,
    )
