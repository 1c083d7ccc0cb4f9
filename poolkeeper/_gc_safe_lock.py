"""A keeper's lock that the garbage collector cannot deadlock.

A borrower that drops a connection into a reference cycle gets it returned by the garbage
collector: SQLAlchemy's ``_finalize_fairy`` weakref callback, ``ClientResponse.__del__`` in
aiohttp, ``Pipeline.__del__`` / ``PubSub.__del__`` in redis-py all end in ``Keeper.checkin()``.
A collection runs at any allocation (3.11) or between any two bytecodes (3.12+), so that
finaliser may run in the very thread that holds the keeper's lock, in the middle of a critical
section. With a plain lock it blocks on itself for ever; with an ``RLock`` it would get in, and
change the state (the borrow table, the counters, the waiter lists) under the feet of the code
it interrupted.

So neither: the re-entered call does not run, it is queued, and runs when the thread leaves the
section. :class:`GcSafeLock` is a plain lock plus two things:

* a per-thread depth, raised *before* acquiring and lowered *after* releasing, so that
  ``entered_here`` is true for the whole window in which this thread holds (or is taking, or
  is letting go of) the lock. A thread blocked in ``acquire()`` runs no Python code, so no
  finaliser can run in it there; everywhere else in the window, deferring is right.
* a queue of deferred calls (``collections.deque``: ``append`` and ``popleft`` are atomic, take
  no lock, and call no Python code), run by whichever thread next leaves a section with the
  depth back at zero, i.e. at the latest when the interrupted section ends.

A deferred call that fails is logged, like an exception in a finaliser, and the rest still run.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import TracebackType

__all__ = ["GcSafeLock"]

logger = logging.getLogger("poolkeeper.keeper")


class _Depth(threading.local):
    # A class attribute is every thread's starting value: no getattr default on the hot path.
    value = 0


class GcSafeLock:
    """A non-reentrant lock whose same-thread re-entries (from finalisers) are deferred, not blocked."""

    __slots__ = ("_deferred", "_depth", "_lock")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = _Depth()
        self._deferred: collections.deque[Callable[[], object]] = collections.deque()

    def __enter__(self) -> None:
        depth = self._depth
        depth.value += 1  # first: a finaliser run from here on defers instead of blocking
        try:
            self._lock.acquire()
        except BaseException:
            depth.value -= 1
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._lock.release()
        depth = self._depth
        depth.value -= 1  # last: a finaliser run before this line defers, and is run just below
        if self._deferred and not depth.value:
            self.run_deferred()

    @property
    def entered_here(self) -> bool:
        """True while this thread holds the lock, or is taking or releasing it."""
        return self._depth.value > 0

    def defer(self, call: Callable[[], object]) -> None:
        """Run ``call`` once this thread has left the lock (see the module docstring)."""
        self._deferred.append(call)
        if not self._depth.value:  # left in the meantime (cannot happen from a finaliser; harmless)
            self.run_deferred()

    def run_deferred(self) -> None:
        """Run the deferred calls, oldest first; a failing one is logged and the rest still run."""
        deferred = self._deferred
        while True:
            try:
                call = deferred.popleft()
            except IndexError:  # empty, or another thread took the last one
                return
            try:
                call()
            except Exception:
                logger.exception(
                    "poolkeeper: a connection return deferred from a finaliser failed",
                    extra={"poolkeeper_deferred_call": repr(call)},
                )
