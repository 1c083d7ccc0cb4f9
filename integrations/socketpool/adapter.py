"""poolkeeper's adapter for the in-house ``SocketPool``: public adapter API only.

What counts as a borrow: a connection from ``acquire()`` (or ``with pool.connection()``) until
``release()``. From closing on, ``acquire()`` raises :class:`SocketPoolClosedError` (also the
pool's own :class:`~integrations.socketpool.pool.ClosedPoolError`), and threads waiting in
``acquire()`` for a free connection are woken with it at once. At the deadline the command a
borrower is running is cancelled on the server (``CANCEL <id>`` over a side connection, as
PostgreSQL's cancel request), then its socket is shut down, so the borrower's call fails at once.
Closing closes the pool with its own ``close()``.

Register it in an application with ``poolkeeper.register_adapter(SocketPool, SocketPoolDriver)``,
or from the distribution that ships it, with an entry point::

    [project.entry-points."poolkeeper.adapters"]
    "integrations.socketpool.pool.SocketPool" = "integrations.socketpool.adapter:SocketPoolDriver"
"""

from __future__ import annotations

import contextlib
import functools
import socket
import threading
from typing import TYPE_CHECKING, Any

from integrations.socketpool.pool import ClosedPoolError, Connection, SocketPool
from poolkeeper import PoolClosedError
from poolkeeper.adapters import Driver, run_blocking

if TYPE_CHECKING:
    from collections.abc import Sequence

    from poolkeeper import Keeper
    from poolkeeper.adapters import Borrow

__all__ = ["SocketPoolClosedError", "SocketPoolDriver"]


class SocketPoolClosedError(PoolClosedError, ClosedPoolError):
    """A checkout refused by a closing keeper; also the pool's own ``ClosedPoolError``."""


class SocketPoolDriver(Driver):
    """Keeps one :class:`SocketPool`."""

    kind = "socketpool"
    refusal_class = SocketPoolClosedError
    can_ping = True
    # A borrow site is the caller's line, not one inside the pool (or this adapter).
    library_modules = ("integrations.socketpool",)

    def __init__(self, pool: SocketPool) -> None:
        if not isinstance(pool, SocketPool):
            raise TypeError(f"expected a SocketPool, got {type(pool).__qualname__}")
        super().__init__(pool)
        self.pool = pool
        # In a forked child: the parent's connections, never cancelled or shut down from here.
        self._inherited: set[Connection] = set()

    # -- guards: the pool's checkouts and returns, reported to the keeper ------------------------

    def attach(self, keeper: Keeper) -> None:
        """Guard ``acquire``, ``release`` and the check every waiter makes when it wakes."""
        if self.pool.closed:
            raise ValueError("resource: this SocketPool is already closed")
        super().attach(keeper)
        pool = self.pool
        # The class's own methods, bound: instance attributes below shadow them.
        library_acquire, library_release, library_check = pool.acquire, pool.release, pool._check_open  # noqa: SLF001 -- our pool

        def acquire(timeout: float | None = None) -> Connection:
            keeper.start_checkout()  # out for the drain from here: waiting and connecting take time
            try:
                connection = library_acquire(timeout)
            except BaseException:
                keeper.end_checkout()
                raise
            lent = keeper.lend(connection)
            keeper.end_checkout()
            if not lent:  # landed after the force-close began: give it back, refuse
                library_release(connection)
                raise keeper.refusal()
            return connection

        def release(connection: Connection) -> None:
            try:
                library_release(connection)
            finally:
                keeper.checkin(connection)

        def check_open() -> None:
            keeper.admit()  # a waiter woken by refuse() fails here with the refusal
            library_check()

        vars(pool).update(acquire=acquire, release=release, _check_open=check_open)

    def detach(self) -> None:
        """Give the pool its own methods back."""
        for name in ("acquire", "release", "_check_open"):
            vars(self.pool).pop(name, None)

    # -- lifecycle ---------------------------------------------------------------------------------

    def refuse(self) -> None:
        """Wake the threads waiting in ``acquire()``: each re-checks and meets the refusal."""
        with self.pool._cond:  # noqa: SLF001 -- our pool: its condition is what waiters wait on
            self.pool._cond.notify_all()  # noqa: SLF001

    async def force_close(self, borrows: Sequence[Borrow], timeout: float) -> None:
        """Cancel each borrower's command on the server, then shut its socket down."""
        connections = [borrow.connection for borrow in borrows if borrow.connection not in self._inherited]
        try:
            cancel = functools.partial(self._cancel_on_server, [c.id for c in connections], timeout)
            await run_blocking(cancel, name="socketpool-cancel")
        finally:  # also when the cancel failed or timed out: the borrowers must not wait on
            for connection in connections:
                _shut_down(connection)

    def _cancel_on_server(self, ids: Sequence[int], timeout: float) -> None:
        """``CANCEL`` each id over one side connection; every step bounded by ``timeout``."""
        side = socket.create_connection((self.pool.host, self.pool.port), timeout=timeout)
        connection = Connection(side)
        try:
            if self.pool.password is not None:
                connection.call(f"AUTH {self.pool.password}")
            for connection_id in ids:
                connection.call(f"CANCEL {connection_id}")
        finally:
            connection.close()

    async def close_connections(self) -> None:
        """Close the pool: idle connections now, borrowed ones as they come back."""
        await run_blocking(self.pool.close, name="socketpool-close")

    async def ping(self) -> None:
        """``PING`` over a side connection of its own, never a pooled one."""
        self.keeper.admit()
        await run_blocking(self._ping, name="socketpool-ping")

    def _ping(self) -> None:
        connection = self.pool.connect()
        try:
            connection.sock.settimeout(self.pool.connect_timeout)
            if connection.call("PING") != "PONG":
                raise ConnectionError("the server did not answer PING")
        finally:
            connection.close()

    def idle_count(self) -> int:
        """Connections waiting, open, in the pool."""
        return self.pool.idle()

    def forget_inherited(self, borrowed: Sequence[Any]) -> None:
        """In a forked child: drop the parent's connections from the pool, never touching their sockets."""
        pool = self.pool
        self._inherited.update(pool._idle, pool._in_use, borrowed)  # noqa: SLF001 -- our pool
        pool._idle, pool._in_use = [], set()  # noqa: SLF001
        pool._cond = threading.Condition()  # noqa: SLF001 -- a thread of the parent may have held the old one

    def describe(self) -> str:
        """``socketpool://host:port``."""
        return f"socketpool://{self.pool.host}:{self.pool.port}"

    def secrets(self) -> tuple[str, ...]:
        """The pool's password, if it has one."""
        return (self.pool.password,) if self.pool.password else ()


def _shut_down(connection: Connection) -> None:
    """Shut the socket down both ways: a blocked read returns at once; the owner closes it."""
    with contextlib.suppress(OSError):  # already closed
        connection.sock.shutdown(socket.SHUT_RDWR)
