"""An in-memory pool of fake connections and its Driver: for unit tests of the keeper core.

This is not a mocked database driver: it is a small pool of its own, with the same contract a
real adapter has (``poolkeeper.adapters._base.Driver``), so that the core's state machine,
accounting, deadlines and cancellation can be driven step by step, and made to hang exactly
where a test wants (in the force-close, in the close), which real servers do not do on demand.

:func:`fake_adapter` registers :class:`FakePool` with ``poolkeeper.adapters`` for the duration of
a ``with`` block, so that ``Registry.wrap(FakePool())`` goes through the whole public path.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any
from unittest import mock

import poolkeeper.adapters
from poolkeeper.adapters._base import Driver

if TYPE_CHECKING:
    from poolkeeper._borrowers import Borrow

__all__ = ["FakeConnection", "FakeDriver", "FakePool", "Handle", "fake_adapter", "make_driver"]

_ids = itertools.count(1)


class FakeConnection:
    """A physical connection: open until closed (politely) or aborted (by the force-close)."""

    def __init__(self) -> None:
        self.id = next(_ids)
        self.closed = False
        self.aborted = False

    def __repr__(self) -> str:
        state = "aborted" if self.aborted else "closed" if self.closed else "open"
        return f"<FakeConnection {self.id} {state}>"


class Handle:
    """What a borrower holds; dropping it unreturned gives the connection back through the garbage collector."""

    def __init__(self, pool: FakePool, connection: FakeConnection) -> None:
        self.connection = connection
        self._finalizer = weakref.finalize(self, pool.checkin, connection)

    def give_back(self) -> None:
        """Return the connection, as a borrower does."""
        self._finalizer()  # runs pool.checkin once; the collector will not run it again


class FakePool:
    """A pool that lends fake connections, reusing idle ones, through the keeper's admit/lend/checkin trio."""

    def __init__(self) -> None:
        self.idle: list[FakeConnection] = []
        self.connections: list[FakeConnection] = []  # every one ever opened
        self.driver: FakeDriver | None = None
        self.lock = threading.Lock()

    def checkout(self) -> Handle:
        """Lend a connection (raises PoolClosedError once the keeper stops lending)."""
        assert self.driver is not None, "wrap the pool first"
        keeper = self.driver.keeper
        keeper.admit()
        with self.lock:
            connection = self.idle.pop() if self.idle else FakeConnection()
            if connection not in self.connections:
                self.connections.append(connection)
        handle = Handle(self, connection)
        if not keeper.lend(connection, weakref.ref(handle)):
            handle.give_back()
            raise keeper.refusal()
        return handle

    def checkin(self, connection: FakeConnection) -> None:
        with self.lock:
            if not connection.closed:
                self.idle.append(connection)
        assert self.driver is not None
        self.driver.keeper.checkin(connection)

    def open_connections(self) -> list[FakeConnection]:
        return [connection for connection in self.connections if not connection.closed]


class FakeDriver(Driver):
    """The driver of a :class:`FakePool`; ``hang_force`` / ``hang_close`` make its steps hang until cancelled.

    A hanging step still closes what it must when it is cancelled (as a well-written adapter
    cuts its sockets in a ``finally``), so a test can tell the core's bookkeeping from I/O.
    With ``blocking`` set it is a library without an event loop: it offers :meth:`blocking_close`
    (which ``hang_close`` makes block until ``unblock`` is set), and records which thread closed.
    """

    kind = "fake"

    def __init__(self, pool: FakePool) -> None:
        super().__init__(pool)
        self.pool = pool
        self.hang_force = False
        self.hang_close = False
        self.refused = threading.Event()
        self.force_started = threading.Event()
        self.close_started = threading.Event()
        self.forced: list[FakeConnection] = []
        self.blocking = False
        self.unblock = threading.Event()
        self.closed_by: list[str] = []  # the name of each thread that closed the idle connections

    def attach(self, keeper: Any) -> None:
        super().attach(keeper)
        self.pool.driver = self

    def refuse(self) -> None:
        self.refused.set()

    async def force_close(self, borrows: Sequence[Borrow], timeout: float) -> None:  # noqa: ARG002 -- the core bounds it
        self.force_started.set()
        connections = [borrow.connection for borrow in borrows]
        try:
            if self.hang_force:
                await asyncio.Event().wait()
        finally:
            for connection in connections:
                connection.aborted = connection.closed = True
                self.forced.append(connection)

    async def close_connections(self) -> None:
        self.close_started.set()
        try:
            if self.hang_close:
                await asyncio.Event().wait()
        finally:
            self._close_idle()

    def blocking_close(self) -> Callable[[], None] | None:
        return self._close_blocking if self.blocking else None

    def _close_blocking(self) -> None:
        self.close_started.set()
        if self.hang_close:
            self.unblock.wait()
        self._close_idle()

    def _close_idle(self) -> None:
        with self.pool.lock:
            idle, self.pool.idle = self.pool.idle, []
        for connection in idle:
            connection.closed = True
        self.closed_by.append(threading.current_thread().name)

    def returned_after_close(self) -> None:
        self._close_idle()


def make_driver(resource: Any) -> FakeDriver:
    """The driver for a :class:`FakePool` (found by ``poolkeeper.adapters.driver_for``)."""
    if not isinstance(resource, FakePool):
        raise TypeError(f"expected a FakePool, got {type(resource).__qualname__}")
    return FakeDriver(resource)


@contextlib.contextmanager
def fake_adapter() -> Iterator[None]:
    """Let ``wrap()`` accept a :class:`FakePool` inside this block."""
    entry = {f"{FakePool.__module__}.{FakePool.__qualname__}": (__name__, "fake pool")}
    with mock.patch.dict(poolkeeper.adapters._ADAPTERS, entry):  # the adapter table, with a test-only entry
        yield
