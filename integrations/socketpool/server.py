"""A small line-protocol TCP server on loopback: what the in-house pool talks to.

Each connection is greeted with ``HELLO <id>``; then, one line per command:

* ``AUTH <password>`` -> ``OK`` (or ``ERR`` and the connection is closed), when a password is set;
* ``PING`` -> ``PONG``;
* ``SLEEP <seconds>`` -> ``SLEPT`` after that long, or ``CANCELLED`` if cancelled meanwhile
  (the server-side work a force-close must stop);
* ``CANCEL <id>`` -> ``OK``: interrupts the command connection ``<id>`` is running, the way
  PostgreSQL's cancel request does, over another connection.

The server keeps count of what a test wants to see on the server side: the connections open
now, and the commands running now.
"""

from __future__ import annotations

import itertools
import socketserver
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self is 3.11+; only annotations use it

__all__ = ["LineServer"]


class _Handler(socketserver.StreamRequestHandler):
    server: _TCPServer

    def handle(self) -> None:
        owner = self.server.owner
        connection_id = owner.opened()
        try:
            self.wfile.write(f"HELLO {connection_id}\n".encode())
            authenticated = owner.password is None
            for raw in self.rfile:
                command, _, argument = raw.decode().strip().partition(" ")
                if not authenticated:
                    if command != "AUTH" or argument != owner.password:
                        self.wfile.write(b"ERR authentication failed\n")
                        return
                    authenticated = True
                    self.wfile.write(b"OK\n")
                elif command == "PING":
                    self.wfile.write(b"PONG\n")
                elif command == "SLEEP":
                    finished = owner.run_sleep(connection_id, float(argument))
                    self.wfile.write(b"SLEPT\n" if finished else b"CANCELLED\n")
                elif command == "CANCEL":
                    owner.cancel(int(argument))
                    self.wfile.write(b"OK\n")
                else:
                    self.wfile.write(b"ERR unknown command\n")
        except OSError:
            pass  # the client went away (reset): nothing to answer
        finally:
            owner.closed(connection_id)


class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: LineServer


class LineServer:
    """The server, started in a thread on ``127.0.0.1`` and an ephemeral port.

    Args:
        password: when set, each connection must send ``AUTH <password>`` first.
    """

    def __init__(self, password: str | None = None) -> None:
        self.password = password
        self._ids = itertools.count(1)
        self._lock = threading.Condition()
        self._open: set[int] = set()
        self._running: dict[int, threading.Event] = {}
        self._server = _TCPServer(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        self._thread = threading.Thread(target=self._server.serve_forever, name="line-server", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` the server listens on."""
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> LineServer:
        """Start serving in a daemon thread; returns the server."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, and interrupt every running command."""
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            for cancelled in self._running.values():
                cancelled.set()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # -- what the server sees ------------------------------------------------------------------

    def open_connections(self) -> int:
        """Client connections the server still has open."""
        with self._lock:
            return len(self._open)

    def running(self) -> int:
        """Commands (``SLEEP``) running now."""
        with self._lock:
            return len(self._running)

    def wait_for(self, predicate: Any, timeout: float = 5.0) -> bool:
        """Wait until ``predicate(server)`` holds (woken by every change); False after ``timeout``."""
        with self._lock:
            return bool(self._lock.wait_for(lambda: predicate(self), timeout))

    # -- bookkeeping, called by the handlers ---------------------------------------------------

    def opened(self) -> int:
        """A connection was accepted: its id."""
        with self._lock:
            connection_id = next(self._ids)
            self._open.add(connection_id)
            self._lock.notify_all()
            return connection_id

    def closed(self, connection_id: int) -> None:
        """A connection ended."""
        with self._lock:
            self._open.discard(connection_id)
            self._lock.notify_all()

    def run_sleep(self, connection_id: int, seconds: float) -> bool:
        """Run ``SLEEP`` for a connection; False if it was cancelled."""
        cancelled = threading.Event()
        with self._lock:
            self._running[connection_id] = cancelled
            self._lock.notify_all()
        try:
            return not cancelled.wait(seconds)
        finally:
            with self._lock:
                del self._running[connection_id]
                self._lock.notify_all()

    def cancel(self, connection_id: int) -> None:
        """Interrupt the command connection ``connection_id`` is running, if any."""
        with self._lock:
            running = self._running.get(connection_id)
        if running is not None:
            running.set()
