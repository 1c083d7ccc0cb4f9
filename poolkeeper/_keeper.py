"""The keeper: the lifecycle state machine and borrow accounting of one wrapped pool.

Everything here is pure bookkeeping under one lock: may this checkout happen, how many
connections are out and who holds them, and waking whoever waits for them to come back.
No I/O happens here; the adapter's driver (``poolkeeper.adapters``) does that, and
``poolkeeper._shutdown`` runs the steps in order.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import functools
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from poolkeeper._borrowers import Borrow, Borrower, Entry, ForcedBy, ThreadStacks, collected, tracked_entry
from poolkeeper._concurrency import wake_soon
from poolkeeper._gc_safe_lock import GcSafeLock
from poolkeeper._leak_watch import LeakWatch

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from poolkeeper._report import ResourceReport
    from poolkeeper.adapters._base import Driver
    from poolkeeper.errors import PoolClosedError

__all__ = ["Keeper", "KeeperState"]

logger = logging.getLogger("poolkeeper.keeper")


class KeeperState(enum.Enum):
    """Where a keeper is in its life. It only ever moves down this list."""

    #: Lending connections normally.
    OPEN = "open"
    #: Closing has started: new checkouts are refused, borrowed connections are awaited.
    DRAINING = "draining"
    #: The drain deadline passed: connections still borrowed are being force-closed.
    FORCING = "forcing"
    #: Every physical connection is closed; checkouts are refused for good.
    CLOSED = "closed"


_ORDER = {state: index for index, state in enumerate(KeeperState)}
# Typed as the enum, not its literal, so that reading the state twice is not "unreachable".
_OPEN: KeeperState = KeeperState.OPEN
_monotonic = time.monotonic


class Keeper:
    """The lifecycle manager of one wrapped pool or client.

    Keepers are made by :func:`poolkeeper.wrap` / :meth:`Registry.wrap`, never directly.
    Adapters call the ``admit`` / ``lend`` / ``checkin`` trio; everything else is read-only
    for users.
    """

    def __init__(
        self,
        name: str,
        driver: Driver,
        *,
        drain_timeout: float,
        close_timeout: float,
        depends_on: Sequence[str],
        track_borrowers: bool,
        leak_threshold: float | None,
    ) -> None:
        self._name = name
        self._driver = driver
        self.drain_timeout = drain_timeout
        self.close_timeout = close_timeout
        self.depends_on: tuple[str, ...] = tuple(depends_on)
        # Tracking is implied by a leak threshold: a leak warning without its borrow site is useless.
        self._track = track_borrowers or leak_threshold is not None
        # One timer per keeper scanning its live borrows: nothing is kept per checkout.
        self._leak_watch = None if leak_threshold is None else LeakWatch(self, leak_threshold)
        # Lock discipline (issue 19): the garbage collector may return a connection (checkin,
        # _note_gc_return) from a finaliser at any allocation, in the thread that holds this lock.
        # Such a re-entry is deferred until the section ends (GcSafeLock), never blocked on; the
        # lock-free paths only pop/add single keys, and every walk over _borrows is over a
        # dict.copy(), which runs no Python code, so a finaliser cannot change it mid-walk.
        self._lock = GcSafeLock()
        self._state = KeeperState.OPEN
        self._borrows: dict[Any, Entry] = {}
        # Checkouts admitted by start_checkout() and not yet lent or abandoned: one item each.
        # A deque because append() and pop() are atomic without the lock (the checkout path
        # takes none); only its length means anything. They count as out for the drain.
        self._checkouts_in_flight: collections.deque[None] = collections.deque()
        self._gc_leaks: list[Borrower] = []
        self._force_requested = False
        self._force_reason: ForcedBy | None = None  # who asked first, for the report
        # Set (under the lock) once a closer has seen the keeper drained: from then on a late
        # lend() is refused, since the closer will not wait for it (issue 13, item 1).
        self._drain_seen = False
        # Set (under the lock) once a closer starts closing the idle connections: a return after
        # that may land behind its sweep, so the returner has the driver close it (checkin).
        self._sweep_started = False
        self._drain_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._thread_waiters: list[threading.Event] = []
        self._returned_while_draining = 0
        self._refused = 0
        #: What closing this keeper did, once it has closed (set by poolkeeper._shutdown).
        self.close_report: ResourceReport | None = None
        #: Why the driver could not wake the library's queued checkouts, if it could not.
        self.refuse_error: Exception | None = None
        # Set by the registry, which holds keepers weakly: told when this keeper closes, so that
        # a keeper whose object is garbage collected later can be told apart from one left open.
        self.on_closed: Callable[[], None] | None = None

    # -- read-only surface ---------------------------------------------------------------

    @property
    def name(self) -> str:
        """The keeper's name, unique in its registry."""
        return self._name

    @property
    def kind(self) -> str:
        """What it wraps: ``"sqlalchemy"``, ``"asyncpg"``, ``"redis"``, ``"aiohttp"``..."""
        return self._driver.kind

    @property
    def resource(self) -> Any:
        """The wrapped object, as ``wrap()`` returned it."""
        return self._driver.resource

    @property
    def driver(self) -> Driver:
        """The adapter that does this keeper's I/O. Internal."""
        return self._driver

    @property
    def state(self) -> KeeperState:
        """The current :class:`KeeperState`."""
        return self._state

    @property
    def borrowed(self) -> int:
        """How many connections are out right now."""
        return len(self._borrows)

    @property
    def idle(self) -> int | None:
        """How many physical connections sit idle in the pool now; ``None`` when the library does not say."""
        try:
            return self._driver.idle_count()
        except Exception:  # a scrape must never fail: a library that changed under the adapter says "unknown"
            logger.debug("poolkeeper %r: idle count unavailable", self._name, exc_info=True)
            return None

    @property
    def refused(self) -> int:
        """How many checkouts were refused (:class:`PoolClosedError` raised) since closing started."""
        return self._refused

    @property
    def tracks_borrowers(self) -> bool:
        """Whether borrow sites are recorded (``track_borrowers`` or ``leak_threshold``)."""
        return self._track

    def borrowers(self) -> list[Borrower]:
        """Who holds a connection now, since when, and (when tracked) where it was borrowed."""
        with self._lock:
            borrows = self._borrows.copy()
        stacks = ThreadStacks()  # the threads' stacks read once for all of them
        return [Borrow(connection, entry).view(self._name, stacks=stacks) for connection, entry in borrows.items()]

    def gc_leaks(self, *, clear: bool = False) -> list[Borrower]:
        """Borrowers whose connection only came back through the garbage collector (tracked keepers)."""
        with self._lock:
            if clear:
                leaks, self._gc_leaks = self._gc_leaks, []
            else:
                leaks = self._gc_leaks.copy()
        return leaks

    def __repr__(self) -> str:
        return f"<Keeper {self._name!r} kind={self.kind} state={self._state.value} borrowed={self.borrowed}>"

    # -- the checkout protocol adapters call ------------------------------------------------

    def refusal(self) -> PoolClosedError:
        """The error a refused checkout raises; each call counts one refusal (see :attr:`refused`)."""
        # Under the lock, so that concurrent refusals lose no count; refusals only happen once
        # closing has started, so the checkout path never pays for it.
        with self._lock:
            self._refused += 1
        return self._driver.refusal_class(self._name, self._state.value)

    @property
    def lending(self) -> bool:
        """True while checkouts are admitted."""
        return self._state is _OPEN  # the module constant: an enum member read from its class costs 5x more

    def admit(self) -> None:
        """Raise :class:`PoolClosedError` if closing has started; call before checking out."""
        if self._state is not _OPEN:
            raise self.refusal()

    # Issue 13 (item 1): a checkout admitted while open whose connect or pre-ping round trip is
    # still in flight when closing starts used to be invisible to the drain: wait_drained() saw
    # nothing borrowed, the report said clean, and the connection was lent afterwards. Adapters
    # whose checkout does I/O between admission and lend() use start_checkout() instead of
    # admit(), then lend() and end_checkout() (also when the checkout fails): until it ends, the
    # checkout counts as out, and one landing after forcing began is refused by lend().

    def start_checkout(self) -> None:
        """:meth:`admit`, counting the checkout as out until :meth:`end_checkout`."""
        self._checkouts_in_flight.append(None)  # before reading the state: see end_checkout()
        if self._state is not _OPEN:
            self.end_checkout()
            raise self.refusal()

    def end_checkout(self) -> None:
        """A checkout begun by :meth:`start_checkout` was lent (call after :meth:`lend`) or failed.

        The closer flips the state, then reads the count; a checkout counts itself, then reads
        the state. So either the checkout saw closing and leaves, or the closer sees it.
        """
        self._checkouts_in_flight.pop()
        if self._state is not _OPEN:
            with self._lock:
                self._wake_if_drained()

    @property
    def checkouts_in_flight(self) -> int:
        """Checkouts admitted and still connecting (or pinging): not lent yet, but out for the drain."""
        return len(self._checkouts_in_flight)

    def lend_checkout(self, connection: Any, holder: Any = None) -> bool:
        """:meth:`lend`, then :meth:`end_checkout`: the checkout begun by :meth:`start_checkout` is done.

        Returns what :meth:`lend` returns. The hot path of every adapter that counts its
        checkouts in flight, so the two in one call, reading the state once: the borrow is
        recorded, the checkout stops counting as in flight, then the state is read. Seen open,
        the closer has not flipped it yet, and will count this borrow when it looks; seen
        closing, :meth:`_lent_while_closing` does what both methods do then, under the lock.
        """
        # tracked_entry() walks from frame 3 above it: here, lend_checkout, the adapter's hook, its caller.
        entry = tracked_entry(holder) if self._track else (_monotonic(), holder)
        new = self._borrows.setdefault(connection, entry) is entry
        self._checkouts_in_flight.pop()
        if self._state is not _OPEN:
            return self._lent_while_closing(connection, new)
        watch = self._leak_watch
        if new and watch is not None and not watch._armed:  # noqa: SLF001 -- borrowed()'s own test, inline
            watch.borrowed()
        return True

    def _lent_while_closing(self, connection: Any, new: bool) -> bool:
        # lend_checkout() saw closing started: refuse a late borrow as lend() does, wake the closer.
        lent = not new or self._accept_late(connection)
        if lent and new and self._leak_watch is not None:
            self._leak_watch.borrowed()
        with self._lock:
            self._wake_if_drained()
        return lent

    def lend(self, connection: Any, holder: Any = None) -> bool:
        """``connection`` has been checked out; returns False if it must be given back and refused.

        Lock-free while open: this runs on every checkout. A checkout that raced the start of
        closing is still counted (and drained); one that completes after forcing began is not
        accepted, so nothing is lent that the force-close has already passed over.

        Args:
            connection: the library's unit of checkout (a key: record, connection object...).
            holder: ``None``, or a weakref to the object the user holds; if it is dead when the
                connection comes back, the garbage collector returned it (a leak).
        """
        # tracked_entry() walks from frame 3 above it: here, lend, the adapter's hook, its caller.
        entry = tracked_entry(holder) if self._track else (_monotonic(), holder)
        if self._borrows.setdefault(connection, entry) is not entry:
            return True  # the same connection handed out again (SingletonThreadPool): one borrow
        if self._state is not _OPEN and not self._accept_late(connection):
            return False
        if self._leak_watch is not None:
            self._leak_watch.borrowed()
        return True

    def _accept_late(self, connection: Any) -> bool:
        # A checkout completing after closing started: drained like the rest while draining,
        # refused once forcing began (the force-close has already passed it over).
        with self._lock:
            if self._state is KeeperState.DRAINING and not self._drain_seen:
                return True
            self._borrows.pop(connection, None)
            return False

    def withdraw(self, connection: Any) -> None:
        """Take back the lend of ``connection``: its checkout was refused after all, it was never used.

        For adapters that lend before the library's own queue (an httpx request is lent from
        ``send`` on) and whose queued checkout is then woken with the refusal: it never had a
        connection, so it is neither a borrow nor a return in the report, only a refusal.
        """
        if self._lock.entered_here:  # a finaliser interrupted this thread's critical section
            self._lock.defer(functools.partial(self.withdraw, connection))
            return
        with self._lock:
            self._borrows.pop(connection, None)
            self._wake_if_drained()

    def checkin(self, connection: Any) -> None:
        """``connection`` came back (from its borrower, or from the garbage collector)."""
        if self._state is _OPEN:
            entry = self._borrows.pop(connection, None)
            if self._state is _OPEN:  # read again: closing may have started since the pop
                # collected(entry), inline: this runs on every return.
                if entry is not None and entry[1] is not None and entry[1]() is None:
                    self._note_gc_return(connection, entry)
                return
            # Closing started meanwhile: count the return and wake the closer, as below.
            self._count_return(connection, entry)
            return
        if self._lock.entered_here:  # a finaliser interrupted this thread's critical section
            self._lock.defer(functools.partial(self.checkin, connection))
            return
        with self._lock:
            entry = self._borrows.pop(connection, None)
            swept = self._returned_during_close(entry)
        if swept:
            self._driver.connection_returned_after_close(connection)
        if entry is not None and collected(entry):
            self._note_gc_return(connection, entry)

    def checkin_collected(self, connection: Any) -> None:
        """:meth:`checkin` of a connection the garbage collector gave back: its borrower leaked it.

        For adapters that lend with no holder to ask and whose release callback can tell (an
        aiohttp response released by its ``__del__``): reported as :meth:`checkin` reports a
        return whose holder is dead.
        """
        entry = self._borrows.get(connection)
        self.checkin(connection)
        if entry is not None and not collected(entry):  # else checkin() has noted it, asking the holder
            self._note_gc_return(connection, entry)

    def _count_return(self, connection: Any, entry: Entry | None) -> None:
        # A return popped while open, but closing started meanwhile: count it, wake the closer.
        if self._lock.entered_here:
            self._lock.defer(functools.partial(self._count_return, connection, entry))
            return
        with self._lock:
            swept = self._returned_during_close(entry)
        if swept:
            self._driver.connection_returned_after_close(connection)
        if entry is not None and collected(entry):
            self._note_gc_return(connection, entry)

    def _returned_during_close(self, entry: Entry | None) -> bool:
        # Called with the lock held. Returns after the force-close began were counted as forced.
        # True if the closer's sweep of idle connections may already have passed this one: read
        # under the lock that start_sweep() takes, so that every return is either in the pool
        # before the sweep begins or closed by the returner (the sweep and the returner's close
        # may both run: the drivers take each idle connection out of the pool once).
        if entry is not None and self._state is KeeperState.DRAINING:
            self._returned_while_draining += 1
        self._wake_if_drained()
        return self._sweep_started or self._state is KeeperState.CLOSED

    def _note_gc_return(self, connection: Any, entry: Entry) -> None:
        if self._lock.entered_here:  # a finaliser interrupted this thread's critical section
            self._lock.defer(functools.partial(self._note_gc_return, connection, entry))
            return
        view = Borrow(connection, entry).view(self._name, returned_by_gc=True)
        if self._track:
            with self._lock:
                self._gc_leaks.append(view)
        logger.warning(
            "poolkeeper %r: a connection was returned by the garbage collector, not by its borrower%s",
            self._name,
            "" if view.site is None else f"; borrowed at {view.site}",
            extra={"poolkeeper_keeper": self._name, "poolkeeper_borrow_site": view.site},
        )

    def is_borrowed(self, connection: Any, entry: Entry) -> bool:
        """True if ``connection`` is still out under this very borrow entry."""
        return self._borrows.get(connection) is entry

    # -- lifecycle steps, driven by poolkeeper._shutdown --------------------------------------

    def _wake_if_drained(self) -> None:
        # Called with the lock held.
        if self._state is KeeperState.OPEN:
            return
        if self._force_requested or self.drained:
            waiters, self._drain_waiters = self._drain_waiters, []
            for loop, future in waiters:
                wake_soon(loop, future)
            events, self._thread_waiters = self._thread_waiters, []
            for event in events:
                event.set()

    def _advance(self, state: KeeperState) -> bool:
        """Move forward to ``state``; returns False if already there or beyond."""
        with self._lock:
            if _ORDER[state] <= _ORDER[self._state]:
                return False
            previous, self._state = self._state, state
            borrowed = len(self._borrows)
            self._wake_if_drained()
        logger.info(
            "poolkeeper %r: %s -> %s (%d borrowed)",
            self._name,
            previous.value,
            state.value,
            borrowed,
            extra={
                "poolkeeper_keeper": self._name,
                "poolkeeper_kind": self.kind,
                "poolkeeper_state": state.value,
                "poolkeeper_previous_state": previous.value,
                "poolkeeper_borrowed": borrowed,
            },
        )
        return True

    def start_closing(self) -> bool:
        """OPEN -> DRAINING and wake the library's queued waiters; False if already closing."""
        if not self._advance(KeeperState.DRAINING):
            return False
        try:
            self._driver.refuse()
        except Exception as error:  # checkouts are refused anyway; the close report names the failure
            logger.warning("poolkeeper %r: waking queued checkouts failed", self._name, exc_info=True)
            self.refuse_error = error
        return True

    def request_force(self, reason: ForcedBy = "force_close") -> None:
        """Cut the drain short now: whoever waits in :meth:`wait_drained` wakes at once.

        ``reason`` goes into the report as ``forced_by``; the first request's reason stays.
        """
        with self._lock:
            self._force_requested = True
            if self._force_reason is None:
                self._force_reason = reason
            self._wake_if_drained()

    @property
    def force_reason(self) -> ForcedBy | None:
        """Why :meth:`request_force` was first called, or ``None`` if it was not."""
        return self._force_reason

    @property
    def drained(self) -> bool:
        """True when nothing is borrowed and no admitted checkout is still on its way."""
        return not self._borrows and not self._checkouts_in_flight

    @property
    def returned_while_draining(self) -> int:
        """Connections given back between the start of closing and the force-close."""
        return self._returned_while_draining

    async def wait_drained(self, timeout: float | None) -> bool:
        """Wait, event-driven, until nothing is borrowed; False on timeout or a forced close."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._note_drained():
                return True
            if self._force_requested:
                return False
            future: asyncio.Future[None] = loop.create_future()
            self._drain_waiters.append((loop, future))
        # The future itself, awaited with a timer that resolves it: the return that resolves it
        # wakes this task in one turn of the loop (asyncio.wait() takes two: its own callback first).
        timer = None if timeout is None else loop.call_later(timeout, wake_soon, loop, future)
        try:
            await future
        finally:
            if timer is not None:
                timer.cancel()
            with self._lock:
                if (loop, future) in self._drain_waiters:
                    self._drain_waiters.remove((loop, future))
                drained = self._note_drained()
        return drained

    def _note_drained(self) -> bool:
        # Called with the lock held, by a closer: the drain is over if nothing is out.
        if self._state is not KeeperState.OPEN and self.drained:
            self._drain_seen = True
        return self.drained

    def wait_drained_blocking(self, timeout: float | None) -> bool:
        """Thread-blocking twin of :meth:`wait_drained`, for code with no event loop."""
        event = threading.Event()
        with self._lock:
            if self._note_drained():
                return True
            if self._force_requested:
                return False
            self._thread_waiters.append(event)
        event.wait(timeout)
        with self._lock:
            if event in self._thread_waiters:
                self._thread_waiters.remove(event)
            return self._note_drained()

    def start_forcing(self) -> list[Borrow]:
        """DRAINING -> FORCING; returns the borrows still out, to be force-closed."""
        self._advance(KeeperState.FORCING)
        with self._lock:
            borrows = self._borrows.copy()
        return [Borrow(connection, entry) for connection, entry in borrows.items()]

    def start_sweep(self) -> None:
        """The closer is about to close the idle connections: later returns are the returners' to close."""
        with self._lock:
            self._sweep_started = True

    def mark_closed(self) -> None:
        """-> CLOSED: every physical connection has been closed."""
        self._advance(KeeperState.CLOSED)
        if self.on_closed is not None:
            self.on_closed()

    # -- fork: keepers are per process (PRODUCT.md 4.9) ---------------------------------------

    def _forget_inherited(self) -> None:
        """In a forked child: own nothing the parent had; called once by ``_registry``'s at-fork hook.

        The parent's borrows, waiters and counters are dropped (never force-closed from here),
        the lock is new (another thread may have held it at the fork), and the driver is told to
        leave every connection that existed at the fork to the parent. A keeper the parent had
        already started closing stays refused here, as ``CLOSED`` with nothing of its own to close.
        """
        inherited = list(self._borrows)
        self._lock = GcSafeLock()
        self._borrows = {}
        self._gc_leaks = []
        self._force_requested = False
        self._force_reason = None
        self._drain_waiters = []
        self._thread_waiters = []
        self._returned_while_draining = 0
        self._refused = 0
        self.close_report = None
        if self._leak_watch is not None:  # the parent's timer thread is not in the child
            self._leak_watch.forget_inherited()
        if self._state is not _OPEN:
            self._state = KeeperState.CLOSED
        self._driver.forget_inherited(inherited)
