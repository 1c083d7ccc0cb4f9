"""An in-house connection pool: a thread-safe pool of sockets to the line server. No poolkeeper here.

::

    pool = SocketPool("127.0.0.1", port, size=4, password="...")
    with pool.connection() as connection:
        connection.call("SLEEP 0.1")      # -> "SLEPT"
    pool.close()

``acquire()`` reuses an idle connection, opens one while fewer than ``size`` exist, and
otherwise waits (for ``timeout`` seconds, or for ever) until one is released. After
``close()``, ``acquire()`` raises :class:`ClosedPoolError` and waiters are woken with it.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["ClosedPoolError", "CommandCancelledError", "Connection", "PoolTimeoutError", "SocketPool"]


class ClosedPoolError(RuntimeError):
    """The pool is closed: it lends nothing any more."""


class PoolTimeoutError(TimeoutError):
    """No connection was released within the ``acquire()`` timeout."""


class CommandCancelledError(Exception):
    """The server cancelled the command (``CANCEL`` from another connection)."""


class Connection:
    """One socket to the server, with the id the server greeted it with."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._reader = sock.makefile("rb")
        greeting = self._read_line()
        if not greeting.startswith("HELLO "):
            raise ConnectionError(f"unexpected greeting {greeting!r}")
        #: The server's id of this connection (what ``CANCEL <id>`` names).
        self.id = int(greeting.split()[1])

    def _read_line(self) -> str:
        line = self._reader.readline()
        if not line:
            raise ConnectionError("the connection was closed")
        return line.decode().strip()

    def call(self, command: str) -> str:
        """Send one command line and return the answer line.

        Raises:
            ConnectionError: the connection was closed before the answer came.
            CommandCancelledError: the server cancelled the command.
        """
        self.sock.sendall(command.encode() + b"\n")
        answer = self._read_line()
        if answer == "CANCELLED":
            raise CommandCancelledError(f"{command!r} was cancelled on the server")
        return answer

    def close(self) -> None:
        """Close the socket."""
        self._reader.close()
        self.sock.close()


class SocketPool:
    """A thread-safe pool of at most ``size`` connections to ``host:port``.

    Args:
        host: the server's host.
        port: the server's port.
        size: the most connections open at once.
        password: sent with ``AUTH`` on each new connection, if set.
        connect_timeout: seconds to wait for a new connection.
    """

    def __init__(
        self, host: str, port: int, *, size: int = 4, password: str | None = None, connect_timeout: float = 5.0
    ) -> None:
        self.host = host
        self.port = port
        self.size = size
        self.password = password
        self.connect_timeout = connect_timeout
        self._cond = threading.Condition()
        self._idle: list[Connection] = []
        self._in_use: set[Connection] = set()
        self._connecting = 0
        self._closed = False

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    def connect(self) -> Connection:
        """Open a new connection, outside the pool (authenticated when the pool has a password)."""
        sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        sock.settimeout(None)
        connection = Connection(sock)
        if self.password is not None and connection.call(f"AUTH {self.password}") != "OK":
            connection.close()
            raise ConnectionError("authentication failed")
        return connection

    def _check_open(self) -> None:
        """Raise :class:`ClosedPoolError` once closed; checked by every ``acquire()`` each time it wakes."""
        if self._closed:
            raise ClosedPoolError("the pool is closed")

    def acquire(self, timeout: float | None = None) -> Connection:
        """Lend a connection, waiting up to ``timeout`` seconds (``None``: for ever) for one.

        Raises:
            ClosedPoolError: the pool is closed (also when it closes while waiting).
            PoolTimeoutError: none was released in time.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                self._check_open()
                if self._idle:
                    connection = self._idle.pop()
                    self._in_use.add(connection)
                    return connection
                if len(self._in_use) + self._connecting < self.size:
                    self._connecting += 1
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise PoolTimeoutError(f"no connection was released within {timeout}s")
                self._cond.wait(remaining)
        try:
            connection = self.connect()
        except BaseException:
            with self._cond:
                self._connecting -= 1
                self._cond.notify()
            raise
        with self._cond:
            self._connecting -= 1
            if self._closed:
                connection.close()
                raise ClosedPoolError("the pool is closed")
            self._in_use.add(connection)
            return connection

    def release(self, connection: Connection) -> None:
        """Give a connection back (closed instead if the pool is closed or the connection broken)."""
        with self._cond:
            self._in_use.discard(connection)
            if self._closed or connection.sock.fileno() < 0:
                connection.close()
            else:
                self._idle.append(connection)
            self._cond.notify()

    @contextlib.contextmanager
    def connection(self, timeout: float | None = None) -> Iterator[Connection]:
        """``acquire()`` for a ``with`` block; released at its end (closed if the call broke it)."""
        connection = self.acquire(timeout)
        try:
            yield connection
        except ConnectionError:
            connection.close()
            raise
        finally:
            self.release(connection)

    def idle(self) -> int:
        """How many connections wait, open, for reuse."""
        with self._cond:
            return len(self._idle)

    def close(self) -> None:
        """Close the idle connections, refuse every ``acquire()`` and wake the waiters; released ones close."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._cond.notify_all()
        for connection in idle:
            connection.close()
