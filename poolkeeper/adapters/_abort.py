"""Aborting one database connection from outside the thread or task that uses it.

Force-close is an abort, not a polite goodbye: first cancel the running statement on the
server (so no backend keeps running an orphaned query, which asyncpg's ``terminate()`` leaves
behind), then shut the socket down. ``shutdown(2)`` through the file descriptor wakes the
borrower blocked in a read at once, sends no bytes the peer must acknowledge, and never frees
the descriptor under the borrower's feet.

Each driver is recognised by its module name, so this module imports no driver itself.

Version seams (the rest of the module reads :func:`_psycopg_cancel`):

* psycopg ``Connection.cancel_safe(timeout=)`` / ``AsyncConnection.cancel_safe`` (a coroutine):
  psycopg 3.2 and later, preferred; psycopg 3.1 has only the blocking ``cancel()`` (libpq's
  ``PQcancel``, no timeout), on both connection classes, run in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from poolkeeper._concurrency import run_blocking

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

__all__ = [
    "BATCH_CANCEL_FROM",
    "MAX_CANCEL_WAIT",
    "MIN_CANCEL_WAIT",
    "BlockingCancelRefusedError",
    "CancelNotConfirmedError",
    "KeptSockets",
    "cancel_by_pid",
    "cancel_psycopg_in_one_query",
    "cancel_statement",
    "cancel_statements",
    "cancel_time_left",
    "cancel_wait",
    "confirm_cancels",
    "cut_keeping_sockets",
    "keep_socket",
    "psycopg_side_that_may_cancel",
    "say_goodbye",
    "shutdown_socket",
    "socket_fd",
    "stand_in_socket",
]

#: How long a force-close waits for its cancel requests before cutting the sockets anyway. A
#: server that answers at all answers in milliseconds; one that does not must not hold the
#: borrower for half the close timeout.
MAX_CANCEL_WAIT = 0.5

#: A cancel request is one short-lived connection to the server: milliseconds on a healthy
#: network. Even with no time left, a cancel gets this long before the connections are cut anyway.
MIN_CANCEL_WAIT = 0.05

#: From this many statements to cancel on, one ``pg_cancel_backend`` query on a side connection
#: beats a cancel request each (every cancel request is a server connection, a postmaster fork).
BATCH_CANCEL_FROM = 8


def shutdown_socket(fd: int) -> None:
    """Shut down both directions of the socket behind ``fd`` without closing ``fd``.

    Through a socket object over ``fd`` itself, detached (never closed) afterwards: no second
    descriptor is needed, so a process at its open-file limit still cuts its connections.
    """
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return  # already closed by its owner, or not a socket (a pipe or file): nothing to shut down
    try:
        with contextlib.suppress(OSError):  # not connected any more
            sock.shutdown(socket.SHUT_RDWR)
    finally:
        sock.detach()  # fd stays its owner's


# -- keeping a socket open to the server past the client's close -----------------------------
# A force-close of many PostgreSQL connections wakes every borrower first, then cancels their
# statements with one pg_cancel_backend query. A backend whose client is gone exits as soon as
# the cancel stops it, and hundreds of backends exiting at once on a small server hold the
# query's answer back (500: 400 ms and more on 2 cores, against 50 ms with the clients still
# there). So the sockets stay open to the server, with nothing more sent on them, until the
# query has answered: each gets a second descriptor (a socket object, kept), and its own
# descriptor is made to name one end of a local socket pair, the stand-in. Whatever the client
# does next (its goodbye, its close) happens on the stand-in; the server sees nothing until the
# kept sockets are closed (KeptSockets, from a thread: every close lets a backend exit).


@contextlib.contextmanager
def stand_in_socket(*, at_end_of_file: bool) -> Iterator[socket.socket | None]:
    """One end of a local socket pair, named in place of kept sockets (:func:`keep_socket`); ``None`` if out of them.

    ``at_end_of_file``: the other end is closed at once, so that reading the stand-in says the
    connection was closed (a borrower woken from its read); else it stays open until the block
    ends, and writes to the stand-in succeed. Never blocking: what does not fit is dropped by
    whoever wrote it.
    """
    try:
        end, other_end = socket.socketpair()
    except OSError:  # out of descriptors: nothing is kept
        yield None
        return
    with end, other_end:
        end.setblocking(False)  # noqa: FBT003 -- the socket module's own signature
        if at_end_of_file:
            other_end.close()
        yield end


def keep_socket(fd: int, stand_in: socket.socket) -> socket.socket | None:
    """The socket behind ``fd``, kept open under a descriptor of its own; ``fd`` then names ``stand_in``.

    ``None`` when ``fd`` is no socket, or the process is out of descriptors (``fd`` unchanged).
    """
    try:
        duplicate = os.dup(fd)
    except OSError:
        return None
    try:
        kept = socket.socket(fileno=duplicate)
    except OSError:  # not a socket
        os.close(duplicate)
        return None
    os.dup2(stand_in.fileno(), fd)
    return kept


class KeptSockets:
    """The sockets a driver's force-close keeps open to the server, until the driver closes its connections."""

    def __init__(self) -> None:
        self._sockets: list[socket.socket] = []

    def add(self, sockets: list[socket.socket]) -> None:
        """Keep ``sockets`` (what :func:`keep_socket` returned) until :meth:`close`."""
        self._sockets += sockets

    def close(self) -> None:
        """Close every kept socket from a thread of its own, not waited for: each close lets a backend exit."""
        sockets, self._sockets = self._sockets, []
        if sockets:
            thread = threading.Thread(target=_close_each, args=(sockets,), name="poolkeeper-sockets", daemon=True)
            thread.start()


def _close_each(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


def cut_keeping_sockets(connections: Sequence[Any]) -> list[socket.socket]:
    """Wake every thread reading ``connections`` as :func:`shutdown_socket` does, their sockets kept open to the server.

    Returns the kept sockets (see :func:`keep_socket`); the caller closes them
    (:class:`KeptSockets`). A reader is woken by shutting the kept socket down for reading, which
    sends the server nothing, and reads the end of file on the stand-in. A connection whose
    socket cannot be kept (the process's open-file limit) is cut the usual way.
    """
    kept: list[socket.socket] = []
    with stand_in_socket(at_end_of_file=True) as stand_in:
        for connection in connections:
            fd = socket_fd(connection)
            if fd is None:
                continue
            sock = None if stand_in is None else keep_socket(fd, stand_in)
            if sock is None:
                shutdown_socket(fd)
            else:
                kept.append(sock)
    # Then the wake-ups, all together: each woken thread takes its turn at the GIL.
    for sock in kept:
        with contextlib.suppress(OSError):  # no longer connected
            sock.shutdown(socket.SHUT_RD)
    return kept


def _module(connection: Any) -> str:
    return type(connection).__module__.split(".")[0]


def socket_fd(connection: Any) -> int | None:
    """The socket file descriptor of a driver-level connection, or ``None`` if unknown or closed."""
    module = _module(connection)
    try:
        if module == "psycopg":
            return int(connection.pgconn.socket)
        if module == "asyncpg":
            transport = connection._transport  # noqa: SLF001 -- asyncpg exposes no public socket
            sock = None if transport is None else transport.get_extra_info("socket")
            return None if sock is None else int(sock.fileno())
        fileno = getattr(connection, "fileno", None)  # psycopg2, mysqlclient
        if callable(fileno):
            return int(fileno())
        sock = getattr(connection, "_sock", None)  # PyMySQL
        if sock is not None:
            return int(sock.fileno())
    except Exception:  # noqa: BLE001 -- a closed connection raises; it has no socket to cut
        return None
    return None


async def cancel_statement(connection: Any, timeout: float) -> bool:
    """Ask the server to cancel what ``connection`` is running; True if a cancel was sent.

    Runs on whatever loop is current: every method opens its own short-lived cancel
    connection and touches nothing the borrower is using.
    """
    module = _module(connection)
    if module == "psycopg":
        await _psycopg_cancel(connection, timeout)
        return True
    if module == "psycopg2":
        await run_blocking(connection.cancel, name="poolkeeper-pg-cancel")
        return True
    if module == "asyncpg":
        from asyncpg import connect_utils  # noqa: PLC0415 -- loaded already: it made `connection`

        protocol = connection._protocol  # noqa: SLF001 -- the backend key lives on the protocol
        await connect_utils._cancel(  # noqa: SLF001 -- the cancel request Connection._cancel sends
            loop=asyncio.get_running_loop(),
            addr=connection._addr,  # noqa: SLF001
            params=connection._params,  # noqa: SLF001
            backend_pid=protocol.backend_pid,
            backend_secret=protocol.backend_secret,
        )
        return True
    if module == "sqlite3" or (type(connection).__name__ == "Connection" and hasattr(connection, "interrupt")):
        connection.interrupt()  # sqlite3 documents interrupt() as safe from another thread
        return True
    return False


class BlockingCancelRefusedError(Exception):
    """psycopg 3.1's ``cancel()`` was not called: it would freeze the process on a silent server."""


async def _psycopg_cancel(connection: Any, timeout: float) -> None:
    cancel_safe = getattr(connection, "cancel_safe", None)  # psycopg >= 3.2
    if cancel_safe is None:
        # psycopg 3.1's cancel() is libpq's PQcancel, which holds the GIL while it connects and
        # waits: against a silent server it freezes every thread, the deadline's included. Drivers
        # cancel 3.1's statements with one pg_cancel_backend query on a side connection instead
        # (an ordinary connect, which releases the GIL); when that failed, the cancel is reported
        # unconfirmed rather than sent this way.
        raise BlockingCancelRefusedError(
            "psycopg 3.1's cancel() would block the whole process on an unresponsive server "
            "(psycopg 3.2+ cancels without it)"
        )
    if asyncio.iscoroutinefunction(cancel_safe):  # psycopg.AsyncConnection
        await cancel_safe(timeout=timeout)
    else:
        await run_blocking(lambda: cancel_safe(timeout=timeout), name="poolkeeper-pg-cancel")


async def cancel_psycopg_in_one_query(connections: Sequence[Any], wait: float) -> None:
    """Cancel every psycopg connection's statement with one ``pg_cancel_backend`` query, within ``wait``.

    The side connection is an ``AsyncConnection`` made from the first connection's own parameters
    (``info.dsn`` and the password it authenticated with), on the running loop: at ``wait`` it is
    cancelled, which closes its socket, so nothing (no thread, no socket) outlives the call even
    against a silent server. For psycopg 3.1, whose ``cancel()`` would freeze the process there.

    Raises:
        CancelNotConfirmedError: the query did not run within ``wait`` or failed.
    """
    import psycopg  # noqa: PLC0415 -- loaded already: it made `connections`

    conninfo = _psycopg_conninfo(connections[0])
    pids = [connection.info.backend_pid for connection in connections]

    async def cancel_all() -> None:
        side = await psycopg.AsyncConnection.connect(conninfo, autocommit=True)
        try:
            await _cancel_pids(side, pids)
        finally:
            await side.close()

    try:
        await asyncio.wait_for(cancel_all(), wait)
    except Exception as error:  # noqa: BLE001 -- every failure is the same news: not confirmed
        raise _none_confirmed(len(pids), error, wait) from None


async def _cancel_pids(side: Any, pids: Sequence[int]) -> None:
    """Cancel the statements of the backends ``pids`` with one query on the async psycopg connection ``side``."""
    await side.execute("select pg_cancel_backend(pid) from unnest(%s::int[]) as pid", (list(pids),))


def cancel_wait(timeout: float) -> float:
    """How long a force-close with ``timeout`` seconds left waits for its cancels: half, within the bounds."""
    return max(MIN_CANCEL_WAIT, min(timeout / 2, MAX_CANCEL_WAIT))


def cancel_time_left(until: float) -> float:
    """The seconds a cancel has left until ``until`` (``time.monotonic()``), never less than MIN_CANCEL_WAIT."""
    return max(MIN_CANCEL_WAIT, until - time.monotonic())


def _none_confirmed(count: int, error: Exception, wait: float) -> CancelNotConfirmedError:
    """The error for a one-query cancel of ``count`` statements that failed with ``error`` (or timed out)."""
    timed_out = isinstance(error, asyncio.TimeoutError)
    reason = f"no answer within {wait:.3g}s" if timed_out else f"{type(error).__name__}: {error}"
    return CancelNotConfirmedError(
        f"the server did not confirm the cancel of {count} of {count} running statement(s) "
        f"({reason}); they may still be running on the server"
    )


def _psycopg_conninfo(connection: Any) -> str:
    """A psycopg connection's own parameters (``info.dsn``), with the password it authenticated with."""
    import psycopg  # noqa: PLC0415 -- loaded already: it made `connection`

    password = connection.pgconn.password
    return psycopg.conninfo.make_conninfo(
        connection.info.dsn, **({} if password is None else {"password": password.decode()})
    )


async def psycopg_side_that_may_cancel(first: Any, wait: float) -> Any:
    """An async side connection whose role may cancel ``first``'s statement (it just did), or None.

    Made from ``first``'s own parameters on the running loop and bounded by ``wait``: against a
    silent server it is cancelled, which closes its socket, so no thread or socket outlives the
    call. None (the caller sends a cancel request each) when it cannot be had in time, or when its
    role may not signal ``first``'s backend, which it tries by cancelling that one statement.
    """
    import psycopg  # noqa: PLC0415 -- loaded already: it made `first`

    async def open_and_try() -> Any:
        side = await psycopg.AsyncConnection.connect(_psycopg_conninfo(first), autocommit=True)
        try:
            await side.execute("select pg_cancel_backend(%s)", (first.info.backend_pid,))
        except BaseException:
            await side.close()
            raise
        return side

    try:
        return await asyncio.wait_for(open_and_try(), wait)
    except Exception:  # noqa: BLE001 -- any failure means: fall back to cancel requests
        return None


async def cancel_by_pid(side: Any, pids: Sequence[int], wait: float) -> None:
    """Cancel the statements of the backends ``pids`` with one query on the async psycopg ``side``, then close it.

    Raises:
        CancelNotConfirmedError: the query failed or did not answer within ``wait``.
    """
    try:
        await asyncio.wait_for(_cancel_pids(side, pids), wait)
    except Exception as error:  # noqa: BLE001 -- every failure is the same news: not confirmed
        raise _none_confirmed(len(pids), error, wait) from None
    finally:
        await side.close()


class CancelNotConfirmedError(Exception):
    """The server did not confirm the cancel of some running statements: they may still run there.

    Raised by a driver's ``force_close`` once its sockets are cut anyway; the shutdown reports
    the keeper as ``failed`` with this text, never as a clean force (issue 13, item 3).
    """


async def cancel_statements(connections: Sequence[Any], wait: float | None) -> None:
    """Cancel every connection's statement at once, waiting up to ``wait`` seconds for the server.

    "Confirmed" means the server answered the cancel request (it closes the request's
    connection once it has signalled the backend, which then stops at its next interrupt
    check); it does not mean the backend has finished yet.

    Raises:
        CancelNotConfirmedError: a cancel request failed or got no answer within ``wait``.
    """
    cancels: list[asyncio.Future[Any]] = [
        asyncio.ensure_future(cancel_statement(connection, wait or 30.0)) for connection in connections
    ]
    await confirm_cancels(cancels, wait)


async def confirm_cancels(cancels: list[asyncio.Future[Any]], wait: float | None) -> None:
    """Wait up to ``wait`` seconds for cancel requests already sent; abandon what is left.

    ``cancels`` is emptied: a raised error's traceback holds the callers' frames, which must not
    keep the requests (their errors hold the cancel connections' sockets) alive.

    Raises:
        CancelNotConfirmedError: a cancel request failed or got no answer within ``wait``.
    """
    if not cancels:
        return
    try:
        await asyncio.wait(cancels, timeout=wait)
    finally:  # also when cancelled while the requests wait on a silent server
        _abandon(cancels)
    unconfirmed = [reason for reason in map(_unconfirmed, cancels, [wait] * len(cancels)) if reason is not None]
    total = len(cancels)
    # The error's traceback keeps this frame alive (in a log record, say): it must not keep the
    # requests, whose own errors hold the cancel connections' sockets open until a gc pass.
    cancels.clear()
    if unconfirmed:
        raise CancelNotConfirmedError(
            f"the server did not confirm the cancel of {len(unconfirmed)} of {total} running "
            f"statement(s) ({'; '.join(sorted(set(unconfirmed)))}); they may still be running on the server"
        )


def _abandon(cancels: Sequence[asyncio.Future[bool]]) -> None:
    """Cancel the requests still waiting; every outcome is retrieved, so asyncio logs none as lost."""
    for cancel in cancels:
        if not cancel.done():
            cancel.cancel()
        cancel.add_done_callback(_retrieve)


def _unconfirmed(cancel: asyncio.Future[bool], wait: float | None) -> str | None:
    """Why ``cancel`` is not confirmed, or ``None`` if the server answered it."""
    if not cancel.done() or cancel.cancelled():
        return f"no answer within {wait:.3g}s" if wait is not None else "abandoned"
    error = cancel.exception()
    if error is None:
        return None
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _retrieve(cancel: asyncio.Future[bool]) -> None:
    # An abandoned request's outcome is seen, so asyncio does not log it as never retrieved.
    if not cancel.cancelled():
        cancel.exception()


def say_goodbye(connection: Any) -> None:
    """Close an idle connection without waiting for the server to hang up, where that is faster.

    asyncpg's graceful ``close()`` sends Terminate and then waits for the server to close the
    socket (about 1.5 ms on loopback); its ``terminate()`` sends the same Terminate and closes at
    once. On an idle connection nothing is in flight, so the server still ends the session
    cleanly. Other drivers already close without waiting; for them this does nothing.
    """
    if _module(connection) == "asyncpg" and not connection.is_closed():
        connection.terminate()
