"""``leak_threshold``: warn, with the borrow site, about a connection held longer than allowed.

One daemon thread for the whole process sleeps on a condition until the earliest threshold
falls due, so a keeper without a threshold pays nothing and one with a threshold pays a heap
push per checkout. The thread is started on first use.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from poolkeeper._borrowers import Borrow
    from poolkeeper._keeper import Keeper

__all__ = ["watch_for_leak"]

logger = logging.getLogger("poolkeeper.leaks")


class _LeakWatch:
    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._heap: list[tuple[float, int, Keeper, Borrow]] = []
        self._counter = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, keeper: Keeper, borrow: Borrow, threshold: float) -> None:
        due = borrow.started + threshold
        with self._condition:
            heapq.heappush(self._heap, (due, next(self._counter), keeper, borrow))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="poolkeeper-leak-watch", daemon=True)
                self._thread.start()
            if self._heap[0][3] is borrow:  # a new earliest due time: re-arm the sleeper
                self._condition.notify()

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    timeout = None if not self._heap else self._heap[0][0] - time.monotonic()
                    self._condition.wait(timeout)
                _, _, keeper, borrow = heapq.heappop(self._heap)
            if keeper.is_borrowed(borrow.connection, borrow.entry):
                view = borrow.view(keeper.name)
                logger.warning(
                    "poolkeeper %r: a connection has been borrowed for %.3fs, longer than "
                    "leak_threshold; possible leak:\n%s",
                    keeper.name,
                    view.held_seconds,
                    view.format(),
                    extra={
                        "poolkeeper_keeper": keeper.name,
                        "poolkeeper_held_seconds": view.held_seconds,
                        "poolkeeper_borrow_site": view.site,
                    },
                )


_watch = _LeakWatch()


def watch_for_leak(keeper: Keeper, borrow: Borrow, threshold: float) -> None:
    """Warn once if ``borrow`` is still out ``threshold`` seconds after it started."""
    _watch.watch(keeper, borrow, threshold)
