"""``leak_threshold``: warn, with the borrow site, about a connection held longer than allowed.

Memory stays bounded whatever the threshold and the checkout rate: nothing is recorded per
checkout beyond the keeper's own borrow entry. Each keeper with a threshold has one
:class:`LeakWatch`, armed with at most one timer at a time. When the timer falls due, the watch
scans the keeper's live borrows, warns once about each one past the threshold, and re-arms for
the earliest one still to fall due; with nothing left to watch it disarms, and the next checkout
arms it again. So a checkout pays one attribute read while the watch is armed, and a borrow
that came back before its time costs nothing at all.

One daemon thread for the whole process sleeps on a condition until the earliest timer; it is
started on first use. Its heap holds one entry per armed watch, by weak reference: a closed or
dropped keeper, and its connections, are never kept alive by it.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

from poolkeeper._borrowers import Borrow, ThreadStacks

if TYPE_CHECKING:
    from poolkeeper._borrowers import Entry
    from poolkeeper._keeper import Keeper

__all__ = ["LeakWatch", "forget_inherited"]

logger = logging.getLogger("poolkeeper.leaks")


class LeakWatch:
    """The leak threshold of one keeper: one timer, scanning the keeper's live borrows."""

    __slots__ = ("__weakref__", "_armed", "_keeper", "_threshold", "_warned")

    def __init__(self, keeper: Keeper, threshold: float) -> None:
        self._keeper = weakref.ref(keeper)
        self._threshold = threshold
        # True while a timer is pending; read without a lock on every checkout (see borrowed()).
        self._armed = False
        # The borrows already warned about, by connection, so that each is warned about once.
        # Pruned at every scan to those still out: never more than the keeper's live borrows.
        self._warned: dict[Any, Entry] = {}

    def forget_inherited(self) -> None:
        """In a forked child: no timer is pending here, and the parent's borrows were not the child's."""
        self._armed = False
        self._warned = {}

    def borrowed(self) -> None:
        """A connection was just lent (and is already in the keeper's borrows): make sure a timer runs.

        An armed timer falls due no later than this borrow's threshold (it was armed for an
        earlier borrow, or re-arms after its scan), so there is nothing to do then.
        """
        if not self._armed:
            _scheduler.arm(self, time.monotonic() + self._threshold)

    def scan(self) -> float | None:
        """Warn about the borrows past the threshold; the next due time, or ``None`` to disarm.

        Run by the scheduler's thread, outside its lock.
        """
        keeper = self._keeper()
        if keeper is None or keeper.state.value == "closed":
            self._warned = {}
            return None
        threshold = self._threshold
        warned = self._warned
        still_warned: dict[Any, Entry] = {}
        next_due: float | None = None
        now = time.monotonic()
        stacks = ThreadStacks()  # the borrowing threads' stacks read once per scan, if any is warned about
        # list() copies the dict in one step under the GIL, while other threads lend and return.
        for connection, entry in list(keeper._borrows.items()):  # noqa: SLF001 -- the keeper's own records
            if warned.get(connection) is entry:
                still_warned[connection] = entry
                continue
            due = entry[0] + threshold
            if due <= now:
                _warn(keeper, Borrow(connection, entry), stacks)
                still_warned[connection] = entry
            elif next_due is None or due < next_due:
                next_due = due
        self._warned = still_warned
        return next_due

    def has_unwarned(self) -> float | None:
        """The earliest due time among borrows not warned about yet, or ``None`` (after disarming)."""
        keeper = self._keeper()
        if keeper is None or keeper.state.value == "closed":
            return None
        warned = self._warned
        starts = [
            entry[0]
            for connection, entry in list(keeper._borrows.items())  # noqa: SLF001
            if warned.get(connection) is not entry
        ]
        return min(starts) + self._threshold if starts else None


def _warn(keeper: Keeper, borrow: Borrow, stacks: ThreadStacks) -> None:
    view = borrow.view(keeper.name, stacks=stacks)
    logger.warning(
        "poolkeeper %r: a connection has been borrowed for %.3fs, longer than leak_threshold; possible leak:\n%s",
        keeper.name,
        view.held_seconds,
        view.format(),
        extra={
            "poolkeeper_keeper": keeper.name,
            "poolkeeper_held_seconds": view.held_seconds,
            "poolkeeper_borrow_site": view.site,
        },
    )


class _Scheduler:
    """The process's one leak-watch thread and its heap of armed watches."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._heap: list[tuple[float, int, weakref.ref[LeakWatch]]] = []
        self._counter = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, watch: LeakWatch, due: float) -> None:
        with self._condition:
            if watch._armed:  # noqa: SLF001 -- armed by another thread meanwhile
                return
            watch._armed = True  # noqa: SLF001
            self._push(watch, due)

    def _push(self, watch: LeakWatch, due: float) -> None:
        # Called with the condition held.
        heapq.heappush(self._heap, (due, next(self._counter), weakref.ref(watch)))
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="poolkeeper-leak-watch", daemon=True)
            self._thread.start()
        if self._heap[0][0] == due:  # a new earliest due time: re-arm the sleeper
            self._condition.notify()

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    timeout = None if not self._heap else self._heap[0][0] - time.monotonic()
                    self._condition.wait(timeout)
                _, _, ref = heapq.heappop(self._heap)
            watch = ref()
            if watch is None:
                continue
            try:
                due = watch.scan()
            except Exception:
                logger.exception("poolkeeper: the leak watch failed; leak warnings for this keeper stop")
                due = None
            with self._condition:
                if due is None:
                    watch._armed = False  # noqa: SLF001
                    # A checkout that read "armed" just before this line did not arm a timer:
                    # look once more, now that the next checkout will arm one itself.
                    due = watch.has_unwarned()
                    if due is not None:
                        watch._armed = True  # noqa: SLF001
                if due is not None:
                    self._push(watch, due)
            del watch


_scheduler = _Scheduler()


def forget_inherited() -> None:
    """In a forked child: the parent's scheduler thread is not here; a new one starts on first use."""
    global _scheduler  # noqa: PLW0603 -- per process
    _scheduler = _Scheduler()
