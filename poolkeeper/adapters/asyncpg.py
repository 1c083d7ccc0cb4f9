"""The asyncpg keeper: an ``asyncpg.Pool``, guarded in place.

``wrap()`` returns the same pool. It gets a guarded subclass as its class (the pool uses
``__slots__``, so the subclass adds none and ``__class__`` assignment keeps every attribute,
``isinstance(pool, asyncpg.Pool)`` and every reference to it), and its queue of connection
holders gets one too, so that:

* a checkout is counted when a holder leaves the queue and its return when the holder goes
  back, whatever brought it back: ``Pool.release()``, the connection's own ``close()``, a server
  that dropped it, or a force-close. Nothing is added to ``acquire()`` or ``release()`` themselves;
* once closing starts, ``acquire()`` and the pool-level ``fetch()``/``execute()``/... shortcuts
  raise :class:`~poolkeeper.PoolClosedError` at once, and tasks already waiting in ``acquire()``
  for a free connection are woken with it (asyncpg itself leaves them waiting);
* a force-close cancels the running statement on the server before terminating the
  connection, so no backend keeps running the query (asyncpg's own ``terminate()`` leaves
  it running);
* ``await pool.close()`` on a wrapped pool runs this keeper's close (refuse, drain up to
  ``drain_timeout``, force-close, close) instead of waiting forever for a connection that is
  never released; ``pool.terminate()`` force-closes at once.

asyncpg never gives a connection back through the garbage collector: the pool's holder keeps
the proxy the user dropped alive, so a connection that is never released stays borrowed
until the force-close.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import threading
import time
import urllib.parse
from typing import TYPE_CHECKING, Any

import asyncpg
from asyncpg import connect_utils

from poolkeeper._concurrency import run_on_loop
from poolkeeper._keeper import KeeperState
from poolkeeper._redact import redact, secret_values
from poolkeeper._report import ResourceReport
from poolkeeper._shutdown import close_keeper
from poolkeeper.adapters._abort import (
    BATCH_CANCEL_FROM,
    KeptSockets,
    cancel_statements,
    cancel_time_left,
    cancel_wait,
    confirm_cancels,
    keep_socket,
    shutdown_socket,
    socket_fd,
    stand_in_socket,
)
from poolkeeper.adapters._base import Driver, log_own_close, unsupported_version
from poolkeeper.errors import PoolClosedError, RegistrationError

if TYPE_CHECKING:
    import socket
    from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
    from typing import TypeAlias

    from poolkeeper._borrowers import Borrow
    from poolkeeper._keeper import Keeper

    # A cancel request with its backend key bound, sent when called with loop=the loop to send it on.
    CancelRequest: TypeAlias = Callable[..., Coroutine[Any, Any, None]]

__all__ = ["AsyncpgDriver", "AsyncpgPoolClosedError", "make_driver"]

logger = logging.getLogger("poolkeeper.asyncpg")

# -- what this adapter reads from asyncpg, per version line -----------------------------------
# asyncpg has no public hooks for any of this. Resolved once: at import what depends on the
# version, at wrap time the check that every name is there (the classes use __slots__, so a
# slot shows as a class attribute). A missing name makes wrap() raise UnsupportedResourceError.
#
#   Pool._check_init, ._async__init__           0.29+  overridden on the guarded class; the
#                                                      library's own reached through super() at
#                                                      each call, so a later class patch applies
#   Pool._schedule_min_size_maintenance,        0.32+  min_size upkeep: overridden so that it does
#     ._maintenance_task                               not reconnect once closing started, its task
#                                                      cancelled at close; before 0.32 a pool never
#                                                      reconnects by itself, nothing to stop
#   Pool._closed, ._closing, ._initialized,     0.29+
#     ._queue, ._holders, ._loop, ._connect_args,
#     ._connect_kwargs, ._get_new_connection
#   PoolConnectionHolder._con, ._in_use         0.29+
#   Connection._pool_release_ctr, ._protocol,   0.29+
#     ._addr, ._params, ._transport
#   connect_utils._cancel(loop, addr, params,   0.29+  the cancel request Connection._cancel sends
#     backend_pid, backend_secret)

#: The asyncpg versions this adapter is tested with.
SUPPORTED_VERSIONS = ">=0.29.0"

_HAS_MIN_SIZE_MAINTENANCE = hasattr(asyncpg.Pool, "_schedule_min_size_maintenance")  # asyncpg 0.32+

_REQUIRED: tuple[tuple[Any, str], ...] = (
    *(
        (asyncpg.Pool, name)
        for name in (
            "_check_init",
            "_async__init__",
            "_closed",
            "_closing",
            "_initialized",
            "_queue",
            "_holders",
            "_loop",
            "_connect_args",
            "_connect_kwargs",
            "_get_new_connection",
        )
    ),
    *((asyncpg.Pool, name) for name in (("_maintenance_task",) if _HAS_MIN_SIZE_MAINTENANCE else ())),
    *((asyncpg.pool.PoolConnectionHolder, name) for name in ("_con", "_in_use")),
    *(
        (asyncpg.connection.Connection, name)
        for name in ("_pool_release_ctr", "_protocol", "_addr", "_params", "_transport")
    ),
    (connect_utils, "_cancel"),
)


def _missing_names() -> list[str]:
    """The names this adapter needs that the installed asyncpg lacks."""
    return [f"{getattr(owner, '__name__', owner)}.{name}" for owner, name in _REQUIRED if not hasattr(owner, name)]


class AsyncpgPoolClosedError(PoolClosedError, asyncpg.InterfaceError):  # type: ignore[misc]  # asyncpg ships no types
    """A checkout refused by a closing keeper; an ``asyncpg.InterfaceError``, as asyncpg's "pool is closed"."""


# Pool.release() resets a connection (one round trip) before it is free. When closing, a
# connection still being released gets this long before it is terminated anyway.
_RELEASE_GRACE = 0.25


# -- the holder queue -------------------------------------------------------------------------
# asyncpg lends a connection by taking its holder from ``pool._queue`` and takes it back by
# putting the holder there again, from every path that returns one. The queue's ``_get`` and
# ``_put`` are therefore where checkouts and returns are counted: one call deep, on the same
# loop step as the library's own bookkeeping.


def _get(queue: Any) -> Any:
    keeper: Keeper = queue._pk_keeper  # noqa: SLF001 -- set by AsyncpgDriver.guard_queue
    keeper.admit()
    holder = queue._pk_library_get()  # noqa: SLF001 -- the queue class's own _get()
    # No holder weakref: the pool's holder keeps the user's proxy alive, so asyncpg never
    # returns a connection through the garbage collector.
    if not keeper.lend(holder):
        queue._queue.append(holder)  # noqa: SLF001 -- back where _get() took it, uncounted
        raise keeper.refusal()
    return holder


def _put(queue: Any, holder: Any) -> None:
    # Back in the queue first: the return may wake the closer, which then closes idle connections.
    queue._pk_library_put(holder)  # noqa: SLF001 -- the queue class's own _put()
    queue._pk_keeper.checkin(holder)  # noqa: SLF001


def _never_empty(queue: Any) -> bool:  # noqa: ARG001 -- the signature of Queue.empty()
    # "Not empty" sends every getter, new or just woken, straight to _get(), which refuses.
    return False


def _refuse(queue: Any) -> Any:
    raise queue._pk_keeper.refusal()  # noqa: SLF001


_queue_classes: dict[type[Any], tuple[type[Any], type[Any]]] = {}
_queue_classes_lock = threading.Lock()


def _guarded_queue_classes(cls: type[Any]) -> tuple[type[Any], type[Any]]:
    """The lending and the refusing subclass of asyncpg's holder queue class ``cls``."""
    with _queue_classes_lock:
        if cls not in _queue_classes:
            lending = type(
                cls.__name__,
                (cls,),
                {
                    "__module__": __name__,
                    "__qualname__": cls.__qualname__,
                    "_get": _get,
                    "_put": _put,
                    "_pk_library_get": cls._get,
                    "_pk_library_put": cls._put,
                },
            )
            refusing = type(
                cls.__name__,
                (lending,),
                {"__module__": __name__, "__qualname__": cls.__qualname__, "empty": _never_empty, "_get": _refuse},
            )
            _queue_classes[cls] = (lending, refusing)
        return _queue_classes[cls]


def _is_guarded_queue(queue: Any) -> bool:
    return any(type(queue) in classes for classes in _queue_classes.values())


# -- the pool -----------------------------------------------------------------------------------
# Pool methods that change meaning once wrapped. None of them is on the acquire/release path
# except _check_init, which keeps the library's two attribute reads as its fast path.


def _check_init(pool: Any) -> None:
    if pool._closed or not pool._initialized:  # noqa: SLF001
        keeper = pool._pk_driver.keeper  # noqa: SLF001 -- set on the guarded class
        if pool._closed and not keeper.lending:  # noqa: SLF001
            raise keeper.refusal()
        super(type(pool), pool)._check_init()  # the library's own messages otherwise


async def _async_init(pool: Any) -> Any:
    driver: AsyncpgDriver = pool._pk_driver  # noqa: SLF001
    if not pool._initialized:  # noqa: SLF001
        driver.keeper.admit()  # no connection is opened once closing has started
    await super(type(pool), pool)._async__init__()
    driver.guard_queue()  # a pool wrapped before it was initialized has its queue only now
    return pool


def _schedule_min_size_maintenance(pool: Any) -> None:
    # asyncpg 0.32+ reconnects up to min_size whenever a connection closes; not once closing started.
    if pool._pk_driver.keeper.lending:  # noqa: SLF001
        super(type(pool), pool)._schedule_min_size_maintenance()


def _is_closing(pool: Any) -> bool:
    # As asyncpg says while its own close() waits: true from the start of closing.
    return bool(pool._closed or pool._closing or not pool._pk_driver.keeper.lending)  # noqa: SLF001


async def _close(pool: Any) -> None:
    if pool._closed:  # noqa: SLF001 -- as asyncpg: closing a closed pool does nothing
        return
    pool._check_init()  # noqa: SLF001 -- as asyncpg: a pool never initialized raises InterfaceError
    await pool._pk_driver.close_pool()  # noqa: SLF001


def _terminate(pool: Any) -> None:
    pool._pk_driver.terminate_pool()  # noqa: SLF001


async def _release_while_closing(pool: Any, connection: Any, *, timeout: float | None = None) -> None:
    """``Pool.release()`` once the keeper is closing (set by ``refuse()``): the connection is ended, not reset.

    It will never be lent again. asyncpg's reset for reuse is a round trip (rollback, unlisten,
    ``RESET ALL``) that only holds the drain back, and a connection left in a transaction would
    keep its locks on the server until the close. Terminated, it tells the server goodbye (which
    rolls back and frees the locks at once), and asyncpg's own close path puts its holder back in
    the queue, which counts the return. Anything else (a connection of another pool, one already
    released, a pool already closed) goes to the library's ``release()``, with its errors.
    """
    holder = getattr(connection, "_holder", None)
    own = connection._con if holder is not None and holder._pool is pool else None  # noqa: SLF001 -- the proxy's connection
    if own is None or pool._closed:  # noqa: SLF001
        await pool._pk_driver.library_class.release(pool, connection, timeout=timeout)  # noqa: SLF001
        return
    own.terminate()


def _guarded_pool_class(cls: type[Any], driver: AsyncpgDriver) -> type[Any]:
    """A subclass of ``cls`` (an ``asyncpg.Pool`` class) that belongs to ``driver``'s pool alone.

    The pool has ``__slots__`` and no ``__dict__``, so its driver cannot live on the instance;
    it lives on this one-pool class instead, which adds no slot: ``__class__`` assignment
    needs the same layout.
    """
    namespace: dict[str, Any] = {
        "__slots__": (),
        "__module__": __name__,
        "__qualname__": cls.__qualname__,
        "_pk_driver": driver,
        "_check_init": _check_init,
        "_async__init__": _async_init,
        "is_closing": _is_closing,
        "close": _close,
        "terminate": _terminate,
    }
    if _HAS_MIN_SIZE_MAINTENANCE:
        namespace["_schedule_min_size_maintenance"] = _schedule_min_size_maintenance
    return type(cls.__name__, (cls,), namespace)


# -- aborting connections -----------------------------------------------------------------------


def _open_connections(holders: Iterable[Any]) -> list[Any]:
    return [holder._con for holder in holders if holder.is_connected()]  # noqa: SLF001


async def _side_connection(pool: Any, wait: float) -> Any:
    """A connection of the pool's own making, outside the pool, for one ``pg_cancel_backend`` query; None on failure.

    A cancel request is a connection of its own to the server (a postmaster fork each): two
    hundred of them take about 300 ms, one query takes a few. Any failure (no free connection
    slot, say) answers None and the caller sends cancel requests.
    """
    try:
        return await asyncio.wait_for(pool._get_new_connection(), wait)  # noqa: SLF001 -- the pool's own way to connect
    except Exception:  # noqa: BLE001 -- any failure means: fall back to cancel requests
        return None


async def _cancel_by_pid(side: Any, pids: Sequence[int], wait: float) -> bool:
    """Cancel the statements of the backends ``pids`` with one query on ``side``; False on any failure.

    A role not allowed to signal those backends, or a query that does not answer within ``wait``.
    """
    try:
        await asyncio.wait_for(side.fetch("select pg_cancel_backend(pid) from unnest($1::int[]) as pid", pids), wait)
    except Exception:  # noqa: BLE001 -- any failure means: fall back to cancel requests
        return False
    return True


def _still_borrowed(connections: Sequence[Any], releases: Sequence[int]) -> list[Any]:
    """Those of ``connections`` whose borrower is not giving them back yet (``releases``: their release counts before).

    A borrower may be giving its connection back already (its statement ended, or was just
    cancelled): terminated under ``Pool.release()``, its release would fail with asyncpg's
    InternalClientError. close_connections() waits a moment for those releases.
    """
    return [
        connection
        for connection, released in zip(connections, releases, strict=True)
        if connection._pool_release_ctr == released  # noqa: SLF001
    ]


@contextlib.contextmanager
def _sockets_kept(connections: Iterable[Any]) -> Iterator[list[socket.socket]]:
    """Keep each connection's socket open through its ``terminate()`` (inside the block), with nothing more sent on it.

    See :func:`~poolkeeper.adapters._abort.keep_socket`: ``terminate()`` writes its goodbye to
    the stand-in and closes that. Only for asyncio's own socket transports with nothing left to
    send (the loop stops watching the descriptor once reading is paused); any other connection,
    and every one from the first socket the process cannot keep (its open-file limit), is
    terminated as usual.
    """
    kept: list[socket.socket] = []
    with stand_in_socket(at_end_of_file=False) as stand_in:  # open until the goodbyes are written
        for connection in connections:
            if stand_in is None:
                break
            transport = connection._transport  # noqa: SLF001 -- the connection's asyncio transport
            if (
                transport is None
                or type(transport).__module__ != "asyncio.selector_events"
                or transport.is_closing()
                or transport.get_write_buffer_size()
            ):
                continue
            transport.pause_reading()  # the loop stops watching the descriptor before it names the stand-in
            sock = keep_socket(transport.get_extra_info("socket").fileno(), stand_in)
            if sock is None:
                break
            kept.append(sock)
        yield kept


async def _cancel_statements(connections: Sequence[Any], timeout: float) -> None:
    """Ask the server to cancel what each connection runs, a request each; a failed or slow cancel is abandoned.

    Raises:
        CancelNotConfirmedError: some cancel was abandoned (the caller cuts the connections anyway).
    """
    await cancel_statements(connections, cancel_wait(timeout))


def _cancel_later(connection: Any) -> CancelRequest:
    """The cancel request for ``connection``'s statement, sendable after it is terminated.

    The backend key is read now: terminating the connection drops its protocol. The server
    still honours the key while the backend lives, which is as long as its query runs.
    """
    protocol = connection._protocol  # noqa: SLF001 -- the backend key lives on the protocol
    return functools.partial(
        connect_utils._cancel,  # noqa: SLF001 -- the request Connection._cancel sends
        addr=connection._addr,  # noqa: SLF001
        params=connection._params,  # noqa: SLF001
        backend_pid=protocol.backend_pid,
        backend_secret=protocol.backend_secret,
    )


async def _send_all(requests: Sequence[CancelRequest], timeout: float) -> None:
    loop = asyncio.get_running_loop()
    sending = asyncio.gather(*(request(loop=loop) for request in requests), return_exceptions=True)
    try:
        outcomes = await asyncio.wait_for(sending, timeout)
    except asyncio.TimeoutError:
        logger.debug("poolkeeper: cancel requests got no answer within %.1fs", timeout)
        return
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            logger.debug("poolkeeper: a cancel request failed", exc_info=outcome)


# -- what the pool points at --------------------------------------------------------------------


def _split_port(spec: str) -> tuple[str, str]:
    """``"host:5432"`` -> ``("host", "5432")``; ``"[::1]"`` or a socket directory -> ``(spec, "")``."""
    host, colon, port = spec.rpartition(":")
    return (host, port) if colon and port.isdigit() else (spec, "")


def _as_list(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    return [str(item) for item in value] if isinstance(value, (list, tuple)) else str(value).split(",")


def _configured_target(args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[str, list[str]]:
    """``host:port/database`` and the passwords, from the pool's connect arguments (asyncpg's precedence)."""
    dsn = args[0] if args and isinstance(args[0], str) else None
    secrets = secret_values(kwargs)  # password=, sslpassword=
    hosts, ports, database = _as_list(kwargs.get("host")), _as_list(kwargs.get("port")), kwargs.get("database")
    if dsn:
        parts = urllib.parse.urlsplit(dsn)
        userinfo, _, hostspec = parts.netloc.rpartition("@")
        if ":" in userinfo:
            secrets.append(urllib.parse.unquote(userinfo.partition(":")[2]))
        query = dict(urllib.parse.parse_qsl(parts.query))
        secrets += secret_values(query)  # password=, sslpassword=
        if not hosts:
            pairs = [_split_port(urllib.parse.unquote(spec)) for spec in hostspec.split(",") if spec]
            hosts = _as_list(query.get("host")) or [host for host, _ in pairs]
            ports = ports or _as_list(query.get("port")) or [port for _, port in pairs]
        database = database or query.get("dbname") or query.get("database") or parts.path.lstrip("/")
    hosts = hosts or _as_list(os.environ.get("PGHOST")) or ["localhost"]
    default_port = os.environ.get("PGPORT") or "5432"
    ports = ports or [default_port]
    # One port for every host, or one each (the last repeated, as asyncpg does for a short list).
    target = ",".join(f"{host}:{ports[min(i, len(ports) - 1)] or default_port}" for i, host in enumerate(hosts))
    database = database or os.environ.get("PGDATABASE") or kwargs.get("user") or os.environ.get("PGUSER")
    return (f"{target}/{database}" if database else target), secrets


class AsyncpgDriver(Driver):
    """Keeps one ``asyncpg.Pool``."""

    kind = "asyncpg"
    refusal_class = AsyncpgPoolClosedError

    def __init__(self, pool: Any) -> None:
        super().__init__(pool)
        self.pool = pool
        self.library_class: type[Any] = type(pool)
        self._queue: Any = None
        self._queue_class: type[Any] | None = None
        # Set in a forked child: the pool, its event loop and every connection are the parent's.
        self._inherited = False
        # Sockets a force-close keeps open to the server until close_connections() (_sockets_kept).
        self._kept_sockets = KeptSockets()

    @property
    def home_loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the pool was created on."""
        loop: asyncio.AbstractEventLoop = self.pool._loop  # noqa: SLF001
        return loop

    def describe(self) -> str:
        """``host:port/database`` of the server, never a password."""
        return self._target()[0]

    def secrets(self) -> tuple[str, ...]:
        """The passwords the pool connects with, to be scrubbed from error texts."""
        return tuple(dict.fromkeys(secret for secret in self._target()[1] if secret))

    def idle_count(self) -> int:
        """Connected, unborrowed connections (``Pool.get_idle_size()``)."""
        return int(self.pool.get_idle_size())

    def _target(self) -> tuple[str, list[str]]:
        pool = self.pool
        target, secrets = _configured_target(pool._connect_args or (), dict(pool._connect_kwargs))  # noqa: SLF001
        for holder in pool._holders:  # noqa: SLF001 -- a live connection knows the resolved address
            connection = holder._con  # noqa: SLF001
            if connection is None:
                continue
            params = connection._params  # noqa: SLF001
            if isinstance(params.password, str):  # from a passfile, say
                secrets.append(params.password)
            address = connection._addr  # noqa: SLF001
            where = address if isinstance(address, str) else f"{address[0]}:{address[1]}"
            return f"{where}/{params.database}", secrets
        return target, secrets

    # -- guards -------------------------------------------------------------------------------

    def attach(self, keeper: Keeper) -> None:
        """Guard the pool and its holder queue; undone if that fails."""
        pool = self.pool
        existing: AsyncpgDriver | None = getattr(type(pool), "_pk_driver", None)
        if existing is not None:
            raise RegistrationError(f"this asyncpg Pool is already managed by poolkeeper as {existing.keeper.name!r}")
        if pool._closed or pool._closing:  # noqa: SLF001
            raise ValueError("resource: this asyncpg Pool is already closed or closing; wrap an open pool")
        super().attach(keeper)
        try:
            pool.__class__ = _guarded_pool_class(self.library_class, self)
            self.guard_queue()
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        """Give the pool and its queue their own classes back (registration failed, or ``unwrap()``)."""
        if self._queue is not None and self._queue_class is not None:
            self._queue.__class__ = self._queue_class
            vars(self._queue).pop("_pk_keeper", None)
            self._queue = self._queue_class = None
        self.pool.__class__ = self.library_class

    def guard_queue(self) -> None:
        """Give the pool's holder queue its guarded class, once it exists (pool initialized)."""
        queue = self.pool._queue  # noqa: SLF001
        if queue is None or _is_guarded_queue(queue):
            return
        lending, refusing = _guarded_queue_classes(type(queue))
        queue._pk_keeper = self.keeper  # noqa: SLF001 -- read by the guarded queue class
        self._queue, self._queue_class = queue, type(queue)
        queue.__class__ = lending
        if not self.keeper.lending:  # closing started while the pool was being initialized
            self._refuse_queue(refusing)

    # -- lifecycle ----------------------------------------------------------------------------

    def refuse(self) -> None:
        """Wake the tasks waiting in ``acquire()`` for a free connection; they get the refusal.

        From now on a connection given back is terminated, not reset for reuse
        (:func:`_release_while_closing`): set on the pool's own guarded class, so that nothing
        is added to a release while the keeper lends.
        """
        if self._inherited:
            return  # the parent's (no task of this process waits on its loop; its sockets are not ours)
        type(self.pool).release = _release_while_closing
        if self._queue is None:
            return  # not initialized: nothing to wake
        refusing = _guarded_queue_classes(self._queue_class)[1]  # type: ignore[arg-type]  # set with _queue
        if self._on_home_thread():
            self._refuse_queue(refusing)
            return
        try:
            self.home_loop.call_soon_threadsafe(self._refuse_queue, refusing)
        except RuntimeError:  # the loop is closed: no task is left to wake
            self._refuse_queue(refusing)

    def _refuse_queue(self, refusing: type[Any]) -> None:
        # On the pool's loop, so that no getter registers between the swap and the wake-up.
        queue = self._queue
        queue.__class__ = refusing
        for getter in queue._getters:  # noqa: SLF001 -- asyncio.Queue's waiting getters
            if not getter.done():
                getter.set_result(None)  # what put_nowait() does; the getter then meets the refusal

    def _on_home_thread(self) -> bool:
        loop = self.home_loop
        try:
            return asyncio.get_running_loop() is loop
        except RuntimeError:  # no loop runs in this thread
            return not loop.is_running()

    def _loop_reachable(self) -> bool:
        loop = self.home_loop
        try:
            current = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        return loop is current or (loop.is_running() and not loop.is_closed())

    def forget_inherited(self, borrowed: Sequence[Any]) -> None:  # noqa: ARG002 -- all of them are the parent's
        """In a forked child: the whole pool is the parent's (it is bound to the parent's event loop).

        Closing it here only refuses checkouts; no statement is cancelled and no connection is
        terminated or shut down. Create asyncpg pools in each process that uses them.
        """
        self._inherited = True

    async def force_close(self, borrows: Sequence[Borrow], timeout: float) -> None:
        """Cancel every borrowed connection's statement on the server, then terminate it."""
        if self._inherited:
            return
        holders = [borrow.connection for borrow in borrows]
        if self._loop_reachable():
            await run_on_loop(self.home_loop, self._cancel_then_terminate(holders, timeout))
            return
        # The pool's loop no longer runs: cancel from this loop, cut the sockets from outside.
        connections = _open_connections(holders)
        try:
            await _cancel_statements(connections, timeout)
        finally:  # cancelled while the cancel requests wait on a silent server: cut the sockets anyway
            _shutdown_sockets(connections)

    async def _cancel_then_terminate(self, holders: Sequence[Any], timeout: float) -> None:
        connections = _open_connections(holders)
        releases = [connection._pool_release_ctr for connection in connections]  # noqa: SLF001
        wait = cancel_wait(timeout)
        # The side connection gets half the cancel wait; the query, or the cancel requests when
        # there is no side connection, get the rest: both fit in the one wait.
        until = time.monotonic() + wait
        try:
            side = await _side_connection(self.pool, wait / 2) if len(connections) >= BATCH_CANCEL_FROM else None
        except BaseException:  # cancelled while connecting (the deadline): terminate anyway
            self._terminate_borrowed(connections, releases)
            raise
        wait = cancel_time_left(until)
        if side is None:
            try:
                await cancel_statements(connections, wait)
            finally:  # cancelled while the cancel requests wait on a silent server: terminate anyway
                self._terminate_borrowed(connections, releases)
            return
        # Many connections, and a side connection to cancel them all by backend pid. Every
        # borrower is woken at once (terminated), but the server must not see its clients go
        # before the query has answered: a backend whose client is gone exits as soon as the
        # cancel stops it, and hundreds of backends exiting on a small server hold the answer
        # back (500 of them: 400 ms and more on 2 cores, against 50 ms with the clients still
        # there). So each socket is kept open, with nothing more sent on it, until the pool's
        # connections are closed (_sockets_kept, close_connections). The keys are read before
        # terminating drops them: should the one query fail, a cancel request each still
        # reaches the server.
        pids = [connection.get_server_pid() for connection in connections]
        requests = [_cancel_later(connection) for connection in connections]
        try:
            with _sockets_kept(_still_borrowed(connections, releases)) as kept:  # those terminated next
                self._kept_sockets.add(kept)
                self._terminate_borrowed(connections, releases)
            if await _cancel_by_pid(side, pids, wait):
                return
        finally:
            side.terminate()
        loop = asyncio.get_running_loop()
        wait = cancel_time_left(until)
        await confirm_cancels([asyncio.ensure_future(request(loop=loop)) for request in requests], wait)

    @staticmethod
    def _terminate_borrowed(connections: Sequence[Any], releases: Sequence[int]) -> None:
        for connection in _still_borrowed(connections, releases):
            connection.terminate()  # wakes the borrower with ConnectionDoesNotExistError

    async def close_connections(self) -> None:
        """Close every connection and leave the pool closed in asyncpg too.

        Every connection is idle by now: the borrowed ones came back or were force-closed. Like
        asyncpg for its idle connections, this terminates them: PostgreSQL's Terminate message
        is sent (the server sees a normal disconnection) and the socket dropped, without waiting
        for the server to hang up, which takes a millisecond or two per connection when it
        answers at all.
        """
        if self._inherited:
            return
        try:
            if self._loop_reachable():
                await run_on_loop(self.home_loop, self._close_all())
                return
            self.pool._closed = True  # noqa: SLF001
            _shutdown_sockets(_open_connections(self.pool._holders))  # noqa: SLF001
        finally:  # last, from a thread, not waited for: each close lets a cancelled backend exit
            self._kept_sockets.close()

    async def _close_all(self) -> None:
        releasing = [holder._in_use for holder in self.pool._holders if holder._in_use is not None]  # noqa: SLF001
        if releasing:  # borrowers giving back a connection whose statement the force-close cancelled
            await asyncio.wait(releasing, timeout=_RELEASE_GRACE)
        self._terminate_all()

    def _stop_maintenance(self) -> None:
        if not _HAS_MIN_SIZE_MAINTENANCE:  # before 0.32 no task keeps min_size
            return
        pool = self.pool
        task, pool._maintenance_task = pool._maintenance_task, None  # noqa: SLF001
        if task is not None:
            task.cancel()

    def _terminate_all(self) -> None:
        pool = self.pool
        pool._closed = True  # noqa: SLF001 -- asyncpg's own checks refuse too, and a late connect closes itself
        self._stop_maintenance()
        for holder in pool._holders:  # noqa: SLF001
            holder.terminate()

    def connection_returned_after_close(self, connection: Any) -> None:
        """A holder came back once the close had begun (a connect that raced it): close what it holds.

        That holder alone: :meth:`close_connections` lets the others still being given back
        finish their release first.
        """
        if not self._inherited and connection.is_connected():
            connection._con.terminate()  # noqa: SLF001 -- the holder's connection

    can_ping = True

    async def ping(self) -> None:
        """``SELECT 1`` on a side connection made with the pool's own arguments, then closed.

        Never a pool checkout: a pool whose every connection is borrowed is busy, not down.
        Once the keeper has started closing it raises ``PoolClosedError`` and opens nothing.
        """
        self.keeper.admit()

        async def ping_side() -> None:
            pool = self.pool
            connection = await asyncpg.connect(*pool._connect_args, **pool._connect_kwargs)  # noqa: SLF001 -- the pool's own connect arguments
            try:
                await connection.fetchval("select 1")
            finally:
                connection.terminate()  # no goodbye round trip: the socket just closes

        await run_on_loop(self.home_loop, ping_side())

    # -- Pool.close() and Pool.terminate() on a wrapped pool -------------------------------------

    async def close_pool(self) -> None:
        """``await pool.close()``: this keeper's close, as the registry would run it.

        Refuses new checkouts, waits up to ``drain_timeout`` for the borrowed connections,
        force-closes the rest and closes every connection. Like asyncpg's own ``close()``,
        an error or a cancellation (``asyncio.wait_for(pool.close(), 5)``) terminates the pool,
        here by force-closing it, statements cancelled on the server.
        """
        try:
            report = await close_keeper(self.keeper, None, 0.0)
        except BaseException:
            self.terminate_pool()
            raise
        if report.outcome != "skipped":
            log_own_close(logger, report, "Pool.close()")

    def terminate_pool(self) -> None:
        """``pool.terminate()``: force-close at once, without waiting for anything.

        Like asyncpg's own ``terminate()`` it returns having aborted every connection; the
        cancel requests for the statements still running are sent right after, from a thread.
        """
        keeper = self.keeper
        if keeper.state is KeeperState.CLOSED:
            return
        if self._inherited:  # a forked child: refuse, but leave the parent's connections alone
            keeper.start_closing()
            keeper.mark_closed()
            return
        keeper.start_closing()
        keeper.request_force()  # a closer waiting for the drain stops waiting
        borrows = keeper.start_forcing()
        requests = [_cancel_later(connection) for connection in _open_connections(b.connection for b in borrows)]
        self._terminate_all()
        # What the registry reports for this keeper when it closes later; set before the state,
        # so that whoever sees the keeper closed finds its report.
        keeper.close_report = ResourceReport(
            keeper.name,
            keeper.kind,
            "forced" if borrows else "clean",
            borrowed_at_start=keeper.returned_while_draining + len(borrows),
            returned=keeper.returned_while_draining,
            forced=len(borrows),
            leaks=tuple(borrow.view(keeper.name) for borrow in borrows),
            target=redact(self.describe(), self.secrets()),
        )
        keeper.mark_closed()
        if requests:
            # From a thread with a loop of its own: terminate() is often the last thing a
            # program does, and the pool's loop may never run again to send them.
            threading.Thread(
                # Bounded by close_timeout: a silent server never keeps the thread and its sockets.
                target=lambda: asyncio.run(_send_all(requests, keeper.close_timeout)),
                name="poolkeeper-asyncpg-cancel",
                daemon=True,
            ).start()
        logger.log(
            logging.WARNING if borrows else logging.INFO,
            "poolkeeper %r: terminated by Pool.terminate() with %d connection(s) borrowed",
            keeper.name,
            len(borrows),
            extra={"poolkeeper_keeper": keeper.name, "poolkeeper_forced": len(borrows)},
        )


def _shutdown_sockets(connections: Iterable[Any]) -> None:
    for connection in connections:
        fd = socket_fd(connection)
        if fd is not None:
            shutdown_socket(fd)


def make_driver(resource: Any) -> AsyncpgDriver:
    """The driver for an ``asyncpg.Pool``.

    Raises:
        UnsupportedResourceError: the installed asyncpg lacks a name this adapter needs.
    """
    if not isinstance(resource, asyncpg.Pool):
        raise TypeError(f"expected an asyncpg Pool, got {type(resource).__qualname__}")
    missing = _missing_names()
    if missing:
        raise unsupported_version("asyncpg", asyncpg.__version__, SUPPORTED_VERSIONS, missing)
    return AsyncpgDriver(resource)
