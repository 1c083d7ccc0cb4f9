"""MySQL / MariaDB server-side cancel for the SQLAlchemy adapter: ``KILL QUERY`` over one side connection.

The PostgreSQL counterpart lives in ``_abort.py`` (cancel requests, and the batched
``pg_cancel_backend`` in ``sqlalchemy.py``). MySQL has no out-of-band cancel request, and a
MySQL server keeps running a statement whose client socket is gone (``SELECT SLEEP(60)`` runs its
60 seconds). So force-close first opens **one** side connection, made the engine's own way (its
creator: URL, ``connect_args`` and ``do_connect`` listeners), sends ``KILL QUERY <id>`` on it for
every borrowed connection and closes it; the borrowed sockets are cut once the server has
answered (after ``MAX_CANCEL_WAIT`` at the latest, so that a slow answer never holds the
borrowers; see :meth:`MySQLServerCancel.force_close`). Once its statement is stopped and its
socket shut, the server ends the session: nothing of it is left in ``SHOW PROCESSLIST``.

The connection id is the one the server sent in its handshake, which every driver keeps
(``thread_id()``: PyMySQL, mysqlclient, aiomysql, asyncmy): no query at connect, nothing per
checkout, read when force-close needs it. That is also the right id where a reconnect happened
(PyMySQL's ``ping(reconnect=True)`` reads a fresh handshake) and behind a proxy (ProxySQL,
MaxScale: ``KILL`` takes the proxy's session id, while ``SELECT CONNECTION_ID()`` names one of its
backend sessions).

Bounded, as force-close must be on a silent server:

* sync drivers (PyMySQL, mysqlclient): the side connection runs in a daemon thread with the
  driver's connect, read and write timeouts set to the wait, through a ``do_connect`` listener
  that acts only for this side connection; the thread ends by itself soon after it is abandoned;
* async drivers (aiomysql, asyncmy): on the closer's event loop, cancelled at the wait; both close
  their socket when a connect or a read is cancelled.

A ``KILL QUERY`` that does not succeed (no answer within :data:`MAX_KILL_WAIT`, no privilege) makes force-close raise
:class:`~poolkeeper.adapters._abort.CancelNotConfirmedError` once the sockets are cut anyway, and
the keeper is reported ``failed``: the statement may still run on the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import math
import os
import socket
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.util import greenlet_spawn

from poolkeeper._concurrency import run_blocking
from poolkeeper.adapters._abort import MAX_CANCEL_WAIT, CancelNotConfirmedError, shutdown_socket
from poolkeeper.adapters._abort import socket_fd as _generic_socket_fd

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from sqlalchemy.engine import Dialect, Engine
    from sqlalchemy.pool import ConnectionPoolEntry

__all__ = ["MAX_KILL_WAIT", "MySQLServerCancel", "connection_id", "is_mysql", "socket_fd"]

#: How long force-close waits for the server to answer its ``KILL QUERY`` statements (at most 80%
#: of what is left of the close budget) before reporting the cancel unconfirmed. The sockets are
#: cut after ``MAX_CANCEL_WAIT`` at the latest, whatever the answer. Longer than PostgreSQL's
#: cancel wait: a connect and a login, then one round trip per statement, and MariaDB answers a
#: ``KILL`` only once it could signal the statement, retrying for up to 2 s (``THD::awake``;
#: measured here on sessions in ``SLEEP()``, whose wait shares one server-wide mutex). It is spent
#: in full only when the server does not answer.
MAX_KILL_WAIT = 5.0

#: ``KILL QUERY`` of an id the server no longer knows: that session has already ended.
_UNKNOWN_THREAD_ID = 1094

# The driver's timeout keywords for the side connection, per SQLAlchemy driver name. mysqlclient
# (libmariadb / libmysqlclient) takes whole seconds; PyMySQL takes any float.
_WHOLE_SECONDS = frozenset({"mysqldb"})
_SYNC_TIMEOUT_KEYWORDS: dict[str, tuple[str, ...]] = {
    "pymysql": ("connect_timeout", "read_timeout", "write_timeout"),
    "mysqldb": ("connect_timeout", "read_timeout", "write_timeout"),
}

# Set only inside the side connection's own thread: the timeouts the do_connect listener applies.
_side_timeouts: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar(
    "poolkeeper_mysql_side_timeouts", default=None
)


def is_mysql(engine: Engine) -> bool:
    """True for SQLAlchemy's MySQL and MariaDB dialects (``mysql+...://``, ``mariadb+...://``)."""
    return engine.dialect.name in ("mysql", "mariadb")


def connection_id(connection: Any) -> int | None:
    """The server's id of a driver-level connection (its handshake's), or ``None`` if it is closed.

    Raises:
        LookupError: the driver keeps no connection id poolkeeper knows how to read.
    """
    module = type(connection).__module__.split(".")[0]
    try:
        if module in ("pymysql", "MySQLdb") and not connection.open:
            return None
        if module == "aiomysql" and connection.closed:
            return None
        if module == "asyncmy" and not connection.connected:
            return None
        thread_id = getattr(connection, "thread_id", None)
        if callable(thread_id):
            return int(thread_id())
    except Exception as error:  # noqa: BLE001 -- whatever the driver raises (mysqlclient: in use by another thread)
        raise LookupError(f"{type(error).__name__}: {error}") from None
    raise LookupError(f"{type(connection).__module__}.{type(connection).__qualname__} has no thread_id()")


def socket_fd(connection: Any) -> int | None:
    """The socket file descriptor of a MySQL driver connection, or ``None`` if closed or unknown."""
    module = type(connection).__module__.split(".")[0]
    if module not in ("aiomysql", "asyncmy"):
        return _generic_socket_fd(connection)  # PyMySQL (its _sock) and mysqlclient (fileno())
    # aiomysql keeps a StreamWriter; asyncmy its transport (older releases: a StreamWriter too).
    writer = getattr(connection, "_writer", None)
    transport = getattr(connection, "_transport", None) or getattr(writer, "transport", None)
    sock = None if transport is None else transport.get_extra_info("socket")
    try:
        return None if sock is None else int(sock.fileno())
    except OSError:
        return None


@dataclass(frozen=True)
class _ReadAtConnect:
    """A mysqlclient connection's server id and socket, read when it was made (see :data:`_READ_AT_CONNECT`)."""

    server_id: int
    fd: int
    local: Any  # the socket's getsockname() and getpeername(): proof that fd is still this socket
    peer: Any


# mysqlclient (MySQLdb, 2.2 and later) refuses every call on a connection, thread_id() and
# fileno() included, while another thread is inside a query on it ("already in use from another
# thread"): exactly when force-close needs them. So for it both are read when the connection is
# made (the pool's "connect" event, nothing per checkout), kept beside it weakly, and the socket
# is checked to be still the same one before it is cut (its fd number may since have been reused).
_READ_AT_CONNECT = frozenset({"mysqldb"})


class MySQLServerCancel:
    """Stops the statements of an engine's borrowed MySQL/MariaDB connections, with ``KILL QUERY``.

    Args:
        engine: the sync engine (an ``AsyncEngine``'s ``sync_engine``).
        is_async: whether its dialect is an asyncio one (aiomysql, asyncmy).
    """

    def __init__(self, engine: Engine, *, is_async: bool) -> None:
        self.engine = engine
        self.is_async = is_async
        self.read_at_connect = str(engine.dialect.driver) in _READ_AT_CONNECT
        self._known: weakref.WeakKeyDictionary[Any, _ReadAtConnect] = weakref.WeakKeyDictionary()
        self._listeners: list[tuple[str, Callable[..., Any]]] = []

    def attach(self) -> None:
        """Install the engine listeners: side-connection timeouts (sync drivers), ids read at connect (mysqlclient)."""
        if self._listeners:
            return
        if not self.is_async:
            self._listeners.append(("do_connect", _connect_side))
        if self.read_at_connect:
            self._listeners.append(("connect", self._remember))
            # Connections made before wrap(): read now, while idle in the pool.
            queue = getattr(self.engine.pool, "_pool", None)
            for record in list(getattr(queue, "queue", ())):
                if record.dbapi_connection is not None:
                    self._remember(record.dbapi_connection, record)
        for name, listener in self._listeners:
            event.listen(self.engine, name, listener)

    def detach(self) -> None:
        """Remove the listeners :meth:`attach` added."""
        for name, listener in self._listeners:
            event.remove(self.engine, name, listener)
        self._listeners.clear()

    def _remember(self, dbapi_connection: Any, _record: Any) -> None:
        """Pool ``connect`` event: read a new mysqlclient connection's id and socket while nobody uses it."""
        try:
            fd = int(dbapi_connection.fileno())
            with socket.socket(fileno=os.dup(fd)) as sock:
                local, peer = sock.getsockname(), sock.getpeername()
            self._known[dbapi_connection] = _ReadAtConnect(int(dbapi_connection.thread_id()), fd, local, peer)
        except Exception:  # noqa: BLE001 -- not kept: force-close then reports the cancel unconfirmed
            return

    def server_id(self, connection: Any) -> int | None:
        """The server's id of a borrowed driver connection; ``None`` if it is closed.

        Raises:
            LookupError: the id cannot be read (a driver without ``thread_id()``, a mysqlclient
                connection in use whose id was not read at connect).
        """
        if self.read_at_connect:
            known = self._known.get(connection)
            if not getattr(connection, "open", True):
                return None
            if known is not None:
                return known.server_id
        return connection_id(connection)

    def cut(self, connection: Any) -> None:
        """Shut down a borrowed connection's socket (both directions) without closing its descriptor."""
        known = self._known.get(connection) if self.read_at_connect else None
        if known is None:
            fd = socket_fd(connection)
            if fd is not None:
                shutdown_socket(fd)
            return
        if not getattr(connection, "open", False):
            return  # closed by its owner: the descriptor is not its own any more
        try:
            duplicate = os.dup(known.fd)
        except OSError:
            return
        with socket.socket(fileno=duplicate) as sock, contextlib.suppress(OSError):
            if (sock.getsockname(), sock.getpeername()) == (known.local, known.peer):
                sock.shutdown(socket.SHUT_RDWR)

    async def force_close(self, connections: Sequence[Any], timeout: float) -> None:
        """``KILL QUERY`` every connection's statement, then cut every socket, within ``timeout``.

        The sockets are cut as soon as the server has answered, and at the latest after
        ``MAX_CANCEL_WAIT``: the borrowers get their error promptly even while the server is slow
        to answer (MariaDB answers a ``KILL`` only once it could signal the statement, retrying
        for up to 2 s). The report waits longer for that answer, up to :data:`MAX_KILL_WAIT`.

        Raises:
            CancelNotConfirmedError: once the sockets are cut, if the server did not confirm.
        """
        wait = min(timeout * 0.8, MAX_KILL_WAIT)
        killing = asyncio.ensure_future(self.kill_queries(connections, wait))
        try:
            await asyncio.wait((killing,), timeout=min(wait, MAX_CANCEL_WAIT))
        except BaseException:  # cancelled (the deadline): nothing waits for the answer any more
            killing.cancel()
            killing.add_done_callback(_retrieve)
            raise
        finally:
            for connection in connections:
                self.cut(connection)
        await killing

    async def kill_queries(self, connections: Sequence[Any], wait: float) -> None:
        """Send ``KILL QUERY`` for every connection over one side connection, waiting up to ``wait`` seconds.

        Raises:
            CancelNotConfirmedError: some statements were not confirmed stopped (no answer within
                ``wait``, a refused ``KILL``, a driver whose connection id is unknown).
        """
        ids: list[int] = []
        unknown: list[str] = []
        for connection in connections:
            try:
                found = self.server_id(connection)
            except LookupError as error:
                unknown.append(str(error))
                continue
            if found is not None:
                ids.append(found)
        problems: list[str] = []
        if ids:
            problems = await self._kill_bounded(ids, wait)
        total = len(ids) + len(unknown)
        failed = len(problems) + len(unknown)
        if failed:
            reasons = sorted({*problems, *(f"no connection id: {reason}" for reason in unknown)})
            raise CancelNotConfirmedError(
                f"the server did not confirm the cancel of {min(failed, total)} of {total} running "
                f"statement(s) ({'; '.join(reasons)}); they may still be running on the server"
            )

    async def _kill_bounded(self, ids: list[int], wait: float) -> list[str]:
        """Kill on a side connection within ``wait``; one problem text per id not confirmed."""
        if self.is_async:
            killing: asyncio.Future[list[str]] = asyncio.ensure_future(greenlet_spawn(self._kill_on_side, ids))
        else:
            timeouts = _timeouts(self.engine.dialect, wait)

            def kill_in_thread() -> list[str]:
                _side_timeouts.set(timeouts)  # this thread's own context: no other connect sees it
                return self._kill_on_side(ids)

            killing = run_blocking(kill_in_thread, name="poolkeeper-mysql-kill")
        try:
            await asyncio.wait((killing,), timeout=wait)
        finally:  # also when cancelled while the side connection waits on a silent server
            if not killing.done():
                killing.cancel()  # async: closes the side socket; sync: the thread's own timeouts end it
            killing.add_done_callback(_retrieve)
        if not killing.done() or killing.cancelled():
            return [f"no answer within {wait:.3g}s"] * len(ids)
        error = killing.exception()
        if error is not None:
            text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
            return [text] * len(ids)
        return killing.result()

    def _kill_on_side(self, ids: list[int]) -> list[str]:
        """Open the side connection (in a thread, or in SQLAlchemy's greenlet), kill, close it."""
        side = self.engine.pool._invoke_creator(None)  # type: ignore[arg-type]  # noqa: SLF001 -- the engine's connect, no record
        try:
            cursor = side.cursor()
            problems = []
            for server_id in ids:
                try:
                    cursor.execute(f"KILL QUERY {int(server_id)}")
                except Exception as error:  # noqa: BLE001 -- reported per statement
                    if error.args and error.args[0] == _UNKNOWN_THREAD_ID:
                        continue  # the session ended meanwhile: nothing runs there any more
                    problems.append(f"{type(error).__name__}: {error}")
            with contextlib.suppress(Exception):
                cursor.close()
            return problems
        finally:
            side.close()


def _timeouts(dialect: Dialect, wait: float) -> dict[str, float]:
    """The side connection's driver timeouts for ``wait`` seconds (none for drivers not listed)."""
    driver = str(dialect.driver)
    seconds: float = max(1, math.ceil(wait)) if driver in _WHOLE_SECONDS else max(wait, 0.001)
    return dict.fromkeys(_SYNC_TIMEOUT_KEYWORDS.get(driver, ()), seconds)


def _connect_side(
    dialect: Dialect, record: ConnectionPoolEntry | None, cargs: list[Any], cparams: dict[str, Any]
) -> Any:
    """``do_connect`` listener: the side connection (no pool record, in its thread) gets the timeouts.

    Every other connect goes on as before (``None``: the next listener, or the dialect, connects).
    Registered last, it sees what the application's own listeners put in ``cparams`` (a token).
    """
    timeouts = _side_timeouts.get()
    if record is not None or not timeouts:
        return None
    return dialect.connect(*cargs, **{**cparams, **timeouts})


def _retrieve(future: asyncio.Future[Any]) -> None:
    # An abandoned kill's outcome is seen, so asyncio does not log it as never retrieved.
    if not future.cancelled():
        future.exception()
