"""The psycopg_pool keeper: ``ConnectionPool``, ``NullConnectionPool`` and their async twins, guarded in place.

``wrap()`` returns the same pool. It gets a guarded subclass of its own class as its class
(``__class__`` assignment keeps every attribute, ``isinstance`` and every reference to it, such
as the one Django keeps in ``DatabaseWrapper._connection_pools``), so that:

* ``getconn()`` (and so ``connection()``) asks the keeper first: from closing on it raises
  :class:`PsycopgPoolClosedError`, which is also ``psycopg_pool.PoolClosed``, so existing
  ``except PoolClosed`` clauses work. A checkout is counted from the moment it is admitted
  (a null pool connects inside ``getconn()``) until ``putconn()`` takes the connection back;
* clients already waiting in the pool's queue are failed with the refusal at once, through
  psycopg_pool's own ``WaitingClient.fail()``, instead of waiting for ``timeout``;
* once closing starts the pool opens no more connections (its grow and reconnect tasks are
  dropped), and ``open()`` is refused;
* a force-close cancels the running statements on the server (one ``pg_cancel_backend`` query
  for many, ``cancel_safe()`` each for a few) and then shuts the sockets down, so the borrower
  fails at once and no backend keeps running the orphaned query;
* the close runs psycopg_pool's own ``close()``, which stops the scheduler and the workers
  (threads, or tasks for the async pools; a task still running after its timeout is cancelled)
  and closes the idle connections; then any connection the pool opened and dropped without
  closing is closed too;
* ``pool.close(timeout)`` (and leaving ``with pool:``) runs this keeper's close: whichever of
  it and the registry comes first closes the pool, the other waits for that close; ``timeout``
  keeps psycopg_pool's meaning (how long its threads or tasks get to stop).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import os
import threading
import urllib.parse
import weakref
from typing import TYPE_CHECKING, Any, ClassVar

import psycopg
import psycopg_pool
from psycopg import conninfo as psycopg_conninfo
from psycopg_pool import pool as sync_pool_module
from psycopg_pool import pool_async as async_pool_module
from psycopg_pool.sched import Scheduler

from poolkeeper._concurrency import run_blocking, run_on_loop
from poolkeeper._keeper import KeeperState
from poolkeeper._redact import secret_values
from poolkeeper._shutdown import close_keeper
from poolkeeper.adapters._abort import (
    BATCH_CANCEL_FROM,
    CancelNotConfirmedError,
    cancel_statements,
    cancel_wait,
    shutdown_socket,
    socket_fd,
)
from poolkeeper.adapters._base import Driver, log_own_close, unsupported_version
from poolkeeper.errors import PoolClosedError, RegistrationError

if TYPE_CHECKING:
    from collections.abc import Coroutine, Iterable, Sequence

    from poolkeeper._borrowers import Borrow
    from poolkeeper._keeper import Keeper
    from poolkeeper._report import ResourceReport

__all__ = ["PsycopgPoolClosedError", "PsycopgPoolDriver", "make_driver"]

logger = logging.getLogger("poolkeeper.psycopg_pool")

# -- what this adapter reads from psycopg_pool -------------------------------------------------
# psycopg_pool has no hooks for any of this; the names below are the same from 3.2 to 3.3
# (the sync pool is generated from the async one, so both have every name). Checked at wrap
# time: a missing name makes wrap() raise UnsupportedResourceError.
#
#   ConnectionPool.getconn, .putconn, .open, .close,   overridden on the guarded class; the
#     .run_task, ._connect                              library's own reached through super()
#                                                       at each call, so a later class patch applies
#   pool._waiting (deque of WaitingClient), ._pool,   the waiting queue, the idle connections,
#     ._lock, ._closed, ._opened, ._workers,           the background workers and the check
#     ._sched_runner, ._check, .conninfo, .kwargs      callback (getconn() does I/O when set)
#   WaitingClient.fail(error)                          wakes a queued client with an error
#   AddConnection (pool and pool_async modules)        the task that opens a connection

#: The psycopg_pool versions this adapter is tested with.
SUPPORTED_VERSIONS = ">=3.2.0"

_CLASS_NAMES = ("getconn", "putconn", "open", "close", "run_task", "_connect")
_INSTANCE_NAMES = (
    "_waiting",
    "_pool",
    "_closed",
    "_opened",
    "_workers",
    "_sched_runner",
    "_check",
    "conninfo",
    "kwargs",
)
_ADD_CONNECTION: tuple[type[Any], ...] = tuple(
    cls
    for cls in (getattr(sync_pool_module, "AddConnection", None), getattr(async_pool_module, "AddConnection", None))
    if cls is not None
)


def _missing_names(pool: Any) -> list[str]:
    """The names this adapter needs that the installed psycopg_pool (or this pool) lacks."""
    missing = [f"{type(pool).__name__}.{name}" for name in _CLASS_NAMES if not hasattr(type(pool), name)]
    missing += [f"{type(pool).__name__}.{name}" for name in _INSTANCE_NAMES if not hasattr(pool, name)]
    if len(_ADD_CONNECTION) != 2:  # noqa: PLR2004 -- one per module
        missing.append("AddConnection")
    return missing


class PsycopgPoolClosedError(PoolClosedError, psycopg_pool.PoolClosed):
    """A checkout refused by a closing keeper; a ``psycopg_pool.PoolClosed``, as psycopg_pool's own after close."""


# psycopg 3.1 has no cancel_safe(): its cancel() is libpq's PQcancel, which holds the GIL while it
# connects and waits, so against a silent server it freezes the whole process. There the
# statements are always cancelled with one pg_cancel_backend query on a side connection (an
# ordinary connect, with connect_timeout, that releases the GIL), and never with cancel().
_HAS_CANCEL_SAFE = hasattr(psycopg.Connection, "cancel_safe")  # psycopg 3.2+


# -- the waiting queue ----------------------------------------------------------------------------
# A client finding no idle connection appends a WaitingClient to pool._waiting and waits on it.
# The queue is swapped for this subclass at wrap time, so that a client appending itself after
# the keeper stopped lending is refused there: the refusal fails the clients it finds in the
# queue, and a client appends first and reads the state second, so none falls in between.


class _WaitingQueue(collections.deque[Any]):
    """psycopg_pool's queue of waiting clients, refusing new ones once the keeper stops lending."""

    __slots__ = ("_pk_keeper",)
    _pk_keeper: Keeper

    def append(self, client: Any) -> None:
        """Queue ``client``; refused (and not queued) once closing has started."""
        super().append(client)
        keeper: Keeper = self._pk_keeper
        if keeper.lending:
            return
        with contextlib.suppress(ValueError):  # the refusal found it first and failed it
            self.remove(client)
        raise keeper.refusal()


# -- the guarded pool classes -----------------------------------------------------------------
# Module-level functions rather than class bodies, so that the checkout path is one call deep.
# The library's own method is reached through super() at each call: a later patch of the
# library class (a mock) still takes effect, as it would on an unwrapped pool.


def _getconn(pool: Any, timeout: float | None = None) -> Any:
    keeper: Keeper = pool._pk_keeper  # noqa: SLF001 -- set by PsycopgPoolDriver.attach
    if pool._pk_does_io or pool._check is not None:  # noqa: SLF001
        return _getconn_in_flight(pool, keeper, timeout)
    # A pool with idle connections and no check callback does no I/O in getconn(): a checkout
    # that lands after the closer saw the pool drained is refused by lend(), never lost.
    keeper.admit()
    connection = super(type(pool), pool).getconn(timeout)
    if not keeper.lend(connection):
        super(type(pool), pool).putconn(connection)
        raise keeper.refusal()
    return connection


def _getconn_in_flight(pool: Any, keeper: Keeper, timeout: float | None) -> Any:
    # Counted as out from here: a null pool connects, and a check callback runs, inside getconn().
    keeper.start_checkout()
    try:
        connection = super(type(pool), pool).getconn(timeout)
    except BaseException:
        keeper.end_checkout()
        raise
    lent = keeper.lend(connection)
    keeper.end_checkout()  # after lend(): the checkout is never out of sight of the drain
    if not lent:  # landed after forcing began: the pool takes it back (and closes it once closed)
        super(type(pool), pool).putconn(connection)
        raise keeper.refusal()
    return connection


async def _agetconn(pool: Any, timeout: float | None = None) -> Any:
    keeper: Keeper = pool._pk_keeper  # noqa: SLF001
    if pool._pk_does_io or pool._check is not None:  # noqa: SLF001
        keeper.start_checkout()
        try:
            connection = await super(type(pool), pool).getconn(timeout)
        except BaseException:
            keeper.end_checkout()
            raise
        lent = keeper.lend(connection)
        keeper.end_checkout()
    else:
        keeper.admit()
        connection = await super(type(pool), pool).getconn(timeout)
        lent = keeper.lend(connection)
    if not lent:
        await super(type(pool), pool).putconn(connection)
        raise keeper.refusal()
    return connection


def _putconn(pool: Any, connection: Any) -> None:
    # Back in the pool first: the return may wake the closer, which then closes the pool.
    try:
        super(type(pool), pool).putconn(connection)
    finally:
        pool._pk_keeper.checkin(connection)  # noqa: SLF001


async def _aputconn(pool: Any, connection: Any) -> None:
    try:
        await super(type(pool), pool).putconn(connection)
    finally:
        pool._pk_keeper.checkin(connection)  # noqa: SLF001


def _run_task(pool: Any, task: Any) -> None:
    # The grow, refill and reconnect tasks: no new connection once closing has started.
    if isinstance(task, _ADD_CONNECTION) and not pool._pk_keeper.lending:  # noqa: SLF001
        return
    super(type(pool), pool).run_task(task)


def _connect(pool: Any, *args: Any, **kwargs: Any) -> Any:
    connection = super(type(pool), pool)._connect(*args, **kwargs)
    pool._pk_driver.opened(connection)  # noqa: SLF001
    return connection


async def _aconnect(pool: Any, *args: Any, **kwargs: Any) -> Any:
    connection = await super(type(pool), pool)._connect(*args, **kwargs)
    pool._pk_driver.opened(connection)  # noqa: SLF001
    return connection


def _open(pool: Any, *args: Any, **kwargs: Any) -> None:
    pool._pk_keeper.admit()  # noqa: SLF001 -- no worker starts once closing has started
    super(type(pool), pool).open(*args, **kwargs)


async def _aopen(pool: Any, *args: Any, **kwargs: Any) -> None:
    pool._pk_keeper.admit()  # noqa: SLF001
    await super(type(pool), pool).open(*args, **kwargs)
    pool._pk_driver.note_loop()  # noqa: SLF001


def _close(pool: Any, timeout: float = 5.0) -> None:
    pool._pk_driver.close_pool_blocking(timeout)  # noqa: SLF001


async def _aclose(pool: Any, timeout: float = 5.0) -> None:
    await pool._pk_driver.close_pool(timeout)  # noqa: SLF001


_guarded_classes: dict[type[Any], type[Any]] = {}
_guarded_lock = threading.Lock()


def _guarded_class(cls: type[Any]) -> type[Any]:
    """A subclass of ``cls`` whose checkouts, returns and close go through the keeper; one per pool class."""
    with _guarded_lock:
        if cls not in _guarded_classes:
            is_async = issubclass(cls, psycopg_pool.AsyncConnectionPool)
            namespace = {
                "__module__": __name__,
                "__qualname__": cls.__qualname__,
                "getconn": _agetconn if is_async else _getconn,
                "putconn": _aputconn if is_async else _putconn,
                "_connect": _aconnect if is_async else _connect,
                "open": _aopen if is_async else _open,
                "close": _aclose if is_async else _close,
                "run_task": _run_task,
                # A null pool connects inside getconn(): its checkouts count as out from admission.
                "_pk_does_io": issubclass(cls, (psycopg_pool.NullConnectionPool, psycopg_pool.AsyncNullConnectionPool)),
            }
            _guarded_classes[cls] = type(cls.__name__, (cls,), namespace)
        return _guarded_classes[cls]


# -- where the pool connects to, without its password -------------------------------------------


def _configured(pool: Any) -> tuple[dict[str, Any], list[str]]:
    """The pool's connection parameters (conninfo and kwargs merged) and the secrets among them."""
    conninfo, kwargs = pool.conninfo, pool.kwargs
    secrets: list[str] = []
    if callable(conninfo):  # psycopg_pool 3.3: resolved at each connect; the live connections say
        conninfo = ""
    if callable(kwargs) or kwargs is None:
        kwargs = {}
    if "://" in conninfo:  # the password as written in the URL, percent-escapes and all
        password = urllib.parse.urlsplit(conninfo).netloc.rpartition("@")[0].partition(":")[2]
        if password:
            secrets += [password, urllib.parse.unquote(password)]
    try:
        params: dict[str, Any] = psycopg_conninfo.conninfo_to_dict(conninfo, **kwargs)
    except Exception:  # noqa: BLE001 -- a conninfo libpq cannot parse: describe what can be read
        params = dict(kwargs)
    secrets += secret_values(params)
    return params, secrets


def _split(value: Any) -> list[str]:
    return [part for part in str(value).split(",") if part] if value else []


def _target_of(params: dict[str, Any]) -> str:
    """``host:port/dbname`` from libpq parameters, with libpq's environment defaults."""
    hosts = _split(params.get("host")) or _split(params.get("hostaddr")) or _split(os.environ.get("PGHOST"))
    hosts = hosts or ["localhost"]
    ports = _split(params.get("port")) or _split(os.environ.get("PGPORT")) or ["5432"]
    target = ",".join(f"{host}:{ports[min(i, len(ports) - 1)]}" for i, host in enumerate(hosts))
    database = params.get("dbname") or os.environ.get("PGDATABASE") or params.get("user") or os.environ.get("PGUSER")
    return f"{target}/{database}" if database else target


def _live_secrets(connection: Any) -> list[str]:
    """The password a live connection was opened with (a callable conninfo, a passfile...)."""
    try:
        options = connection.pgconn.info
    except Exception:  # noqa: BLE001 -- closed: nothing to read
        return []
    return [
        option.val.decode()
        for option in options
        if option.val and option.keyword.decode() in {"password", "sslpassword"}
    ]


# -- the driver -------------------------------------------------------------------------------------


class PsycopgPoolDriver(Driver):
    """Keeps one psycopg_pool pool: ``ConnectionPool``, ``NullConnectionPool`` or an async twin."""

    kind = "psycopg_pool"
    refusal_class = PsycopgPoolClosedError
    # psycopg_pool's connection() context manager is never the borrow site; the caller is.
    library_modules: ClassVar[tuple[str, ...]] = ("psycopg_pool",)

    def __init__(self, pool: Any) -> None:
        super().__init__(pool)
        self.pool = pool
        self.is_async = isinstance(pool, psycopg_pool.AsyncConnectionPool)
        # The pool's own class, also when another registry's keeper has already guarded it.
        self.library_class: type[Any] = next(cls for cls in type(pool).__mro__ if cls not in _guarded_classes.values())
        self.guarded_class: type[Any] = _guarded_class(self.library_class)
        # Every connection the pool opened since it was wrapped, weakly: a connection the pool
        # drops without closing (a return discarded by its closing workers) is closed at the end.
        self._connections: weakref.WeakSet[Any] = weakref.WeakSet()
        self._loop: asyncio.AbstractEventLoop | None = None
        # psycopg_pool's close(timeout): how long its threads or tasks get to stop.
        self.library_close_timeout: float | None = None
        # Resolved when the pool is closed (by whichever closer came first).
        self._done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._close_started = False
        self._lock = threading.Lock()
        self._forced: set[int] = set()
        # Set in a forked child: connections the parent opened, never closed, cancelled or cut here.
        self._inherited: dict[int, Any] = {}
        self._inherited_loop = False  # an async pool in a forked child: its loop is the parent's

    # -- what the pool is -------------------------------------------------------------------------

    @property
    def home_loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop an async pool's workers run on; ``None`` for the thread-based pools."""
        if self.is_async:
            self.note_loop()
        return self._loop

    def note_loop(self) -> None:
        """Remember the loop of an async pool's workers (they are gone once it closes)."""
        runner = getattr(self.pool, "_sched_runner", None)
        if self.is_async and runner is not None:
            self._loop = runner.get_loop()

    def describe(self) -> str:
        """``host:port/dbname`` of the server, never a password."""
        return _target_of(_configured(self.pool)[0])

    def secrets(self) -> tuple[str, ...]:
        """The passwords the pool connects with, to be scrubbed from error texts."""
        found = _configured(self.pool)[1]
        for connection in list(self._connections)[:1]:
            found += _live_secrets(connection)
        return tuple(dict.fromkeys(secret for secret in found if secret))

    def idle_count(self) -> int:
        """Connections waiting in the pool (``get_stats()['pool_available']``)."""
        return len(self.pool._pool)  # noqa: SLF001

    # -- guards ---------------------------------------------------------------------------------

    def attach(self, keeper: Keeper) -> None:
        """Guard the pool and its waiting queue; undone if that fails."""
        pool = self.pool
        existing = vars(pool).get("_pk_driver")
        if existing is not None:
            raise RegistrationError(
                f"this psycopg_pool {self.library_class.__name__} is already managed by poolkeeper as "
                f"{existing.keeper.name!r}"
            )
        if pool._opened and pool._closed:  # noqa: SLF001
            raise ValueError(
                f"resource: this psycopg_pool {self.library_class.__name__} is already closed; wrap an open pool"
            )
        super().attach(keeper)
        try:
            with self._library_lock():
                waiting = _WaitingQueue(pool._waiting)  # noqa: SLF001
                waiting._pk_keeper = keeper  # noqa: SLF001
                pool._waiting = waiting  # noqa: SLF001
                for connection in list(pool._pool):  # noqa: SLF001
                    self._connections.add(connection)
                pool._pk_keeper = keeper  # noqa: SLF001
                pool._pk_driver = self  # noqa: SLF001
                pool.__class__ = self.guarded_class
            self.note_loop()
        except BaseException:
            self.detach()
            raise

    @contextlib.contextmanager
    def _library_lock(self) -> Any:
        # The sync pools' RLock orders this with every queue change; the async pools' lock is an
        # asyncio.Lock, and their queue changes only on their loop, between two awaits.
        lock = getattr(self.pool, "_lock", None)
        if self.is_async or lock is None:
            yield
            return
        with lock:
            yield

    def detach(self) -> None:
        """Give the pool its own class and queue back (registration failed, or ``unwrap()``)."""
        pool = self.pool
        with self._library_lock():
            if isinstance(pool._waiting, _WaitingQueue):  # noqa: SLF001
                pool._waiting = collections.deque(pool._waiting)  # noqa: SLF001
            pool.__class__ = self.library_class
            for attribute in ("_pk_keeper", "_pk_driver"):
                vars(pool).pop(attribute, None)

    def opened(self, connection: Any) -> None:
        """The pool opened ``connection`` (called by the guarded ``_connect``)."""
        self._connections.add(connection)

    # -- lifecycle ------------------------------------------------------------------------------

    def refuse(self) -> None:
        """Fail every client waiting in the pool's queue with the refusal, at once.

        psycopg_pool's own ``WaitingClient.fail()``: a failed client is skipped when a connection
        comes back, exactly as one whose wait timed out, so nothing is taken from the queue here.
        """
        clients = list(self.pool._waiting)  # noqa: SLF001 -- one C call: a consistent snapshot
        if not clients:
            return
        if not self.is_async:
            for client in clients:
                client.fail(self.keeper.refusal())
            return
        if self._inherited_loop:
            return  # the parent's tasks, on the parent's loop
        loop = self.home_loop
        if loop is None:
            return
        errors = [self.keeper.refusal() for _ in clients]
        with contextlib.suppress(RuntimeError):  # the loop is closed: no task is left to wake
            loop.call_soon_threadsafe(_fail_soon, clients, errors)

    def forget_inherited(self, borrowed: Sequence[Any]) -> None:
        """In a forked child: every connection the pool has now is the parent's; none is closed from here.

        An async pool is bound to the parent's event loop: closing it here only refuses. A sync
        pool's workers are threads of the parent, absent here: its locks and worker queues are
        made anew (a parent thread may have held them at the fork) and its idle connections are
        taken out, kept alive (a collected connection would say goodbye on the parent's socket)
        and never lent here. Open psycopg_pool pools in the process that uses them.
        """
        pool = self.pool
        # This driver's own state is the parent's too: a parent thread may have held the lock.
        self._lock = threading.Lock()
        self._done = concurrent.futures.Future()
        self._close_started = self._own_close_running = False
        self._forced = set()
        if self.is_async:
            self._inherited_loop = True
            self._loop = None
            return
        parents = [*borrowed, *self._connections, *pool._pool]  # noqa: SLF001
        self._inherited.update((id(connection), connection) for connection in parents)
        self._connections = weakref.WeakSet()
        pool._lock = threading.RLock()  # noqa: SLF001
        pool._pool.clear()  # noqa: SLF001
        pool._waiting.clear()  # noqa: SLF001 -- the parent's threads
        if pool._opened and not pool._closed:  # noqa: SLF001 -- the parent's workers are not in this process
            pool._sched = Scheduler()  # noqa: SLF001
            pool._tasks = type(pool._tasks)()  # noqa: SLF001
            # _workers and _sched_runner stay: the parent's threads, never alive here, so that
            # psycopg_pool's close() finds them stopped (3.2.0 asserts the scheduler is set).

    def _own(self, connection: Any) -> bool:
        return id(connection) not in self._inherited

    async def force_close(self, borrows: Sequence[Borrow], timeout: float) -> None:
        """Cancel every borrowed connection's statement on the server, then shut its socket down."""
        if self._inherited_loop:
            return
        with self._lock:  # a second closer (pool.close() beside the registry) forces nothing twice
            connections = [
                borrow.connection
                for borrow in borrows
                if self._own(borrow.connection) and id(borrow.connection) not in self._forced
            ]
            self._forced.update(id(connection) for connection in connections)
        if not connections:
            return
        wait = cancel_wait(timeout)
        try:
            to_cancel = connections
            if len(connections) >= BATCH_CANCEL_FROM or not _HAS_CANCEL_SAFE:
                batched = run_blocking(lambda: _cancel_in_one_query(connections, wait), name="poolkeeper-pg-cancel")
                await asyncio.wait((batched,), timeout=wait)
                if batched.done() and not batched.cancelled() and batched.exception() is None and batched.result():
                    to_cancel = []
                elif not _HAS_CANCEL_SAFE:
                    raise CancelNotConfirmedError(
                        f"the server did not confirm the cancel of {len(connections)} running statement(s) "
                        f"(no answer within {wait:.3g}s); they may still be running on the server"
                    )
            # Raises CancelNotConfirmedError (reported) once the sockets below are cut anyway.
            await cancel_statements(to_cancel, wait)
        finally:  # also when cancelled while the cancel requests wait on a silent server
            _shutdown_sockets(connections)

    async def close_connections(self) -> None:
        """Close the pool in psycopg_pool (workers stopped, idle connections closed), then any stray connection.

        A second closer (``pool.close()`` and the registry at once) waits for the first one's close.
        """
        with self._lock:
            first, self._close_started = not self._close_started, True
        if not first:
            await asyncio.shield(asyncio.wrap_future(self._done))
            return
        try:
            if self._inherited_loop:
                return
            if not self.is_async:
                await run_blocking(self._close_blocking, name="poolkeeper-psycopg-pool-close")
            elif self._loop_reachable():
                await run_on_loop(self.home_loop, self._close_on_loop())
            else:  # the pool's loop no longer runs: nothing can be awaited there, cut the sockets
                self.pool._closed = True  # noqa: SLF001 -- getconn() refuses in psycopg_pool too
                _shutdown_sockets(self._strays())
        finally:
            if not self._done.done():
                self._done.set_result(None)

    def _close_timeout(self) -> float:
        timeout = self.library_close_timeout
        return self.keeper.close_timeout if timeout is None else timeout

    def _strays(self) -> list[Any]:
        """Connections the pool opened that are still open and not borrowed: dropped, not closed."""
        borrowed = self.keeper._borrows.copy()  # noqa: SLF001 -- a borrower may still use these: never closed here
        return [
            connection
            for connection in list(self._connections)
            if not connection.closed and connection not in borrowed and self._own(connection)
        ]

    def _close_blocking(self) -> None:
        pool = self.pool
        workers = [*pool._workers, pool._sched_runner]  # noqa: SLF001 -- the library clears them
        self.library_class.close(pool, self._close_timeout())
        strays = self._strays()
        if any(worker is not None and worker.is_alive() for worker in workers):
            # A worker that did not stop may still be using one of them: cut, never close under it.
            _shutdown_sockets(strays)
            return
        for connection in strays:
            with contextlib.suppress(Exception):
                connection.close()

    async def _close_on_loop(self) -> None:
        pool = self.pool
        workers = [task for task in (*pool._workers, pool._sched_runner) if task is not None]  # noqa: SLF001
        await self.library_class.close(pool, self._close_timeout())
        for task in workers:
            if not task.done():  # stuck (connecting to a silent server, say) past its timeout
                task.cancel()
        if workers:
            await asyncio.wait(workers, timeout=0.1)
        for connection in self._strays():
            with contextlib.suppress(Exception):
                await connection.close()

    def _loop_reachable(self) -> bool:
        loop = self.home_loop
        if loop is None:
            return True  # never opened: nothing runs anywhere, close here
        try:
            current = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        return loop is current or (loop.is_running() and not loop.is_closed())

    can_ping = True

    async def ping(self) -> None:
        """``SELECT 1`` on a side connection made with the pool's own parameters, then closed.

        Never a pool checkout: a pool whose every connection is borrowed is busy, not down.
        Once the keeper has started closing it raises ``PoolClosedError`` and opens nothing.
        """
        self.keeper.admit()
        conninfo, kwargs = self.pool.conninfo, self.pool.kwargs
        if self.is_async:
            if callable(conninfo):
                conninfo = conninfo()
                if asyncio.iscoroutine(conninfo):
                    conninfo = await conninfo
            if callable(kwargs):
                kwargs = kwargs()
                if asyncio.iscoroutine(kwargs):
                    kwargs = await kwargs
            connection = await psycopg.AsyncConnection.connect(conninfo, **(kwargs or {}))
            try:
                await connection.execute("select 1")
            finally:
                await connection.close()
            return

        def ping_side() -> None:
            info = conninfo() if callable(conninfo) else conninfo
            params = kwargs() if callable(kwargs) else kwargs
            with psycopg.connect(info, **(params or {})) as connection:
                connection.execute("select 1")

        await run_blocking(ping_side, name="poolkeeper-psycopg-pool-ping")

    # -- pool.close(timeout) on a wrapped pool ---------------------------------------------------

    def _claim_own_close(self, timeout: float) -> bool:
        """True if this ``pool.close()`` runs the keeper's close; False if another close runs it."""
        self.library_close_timeout = timeout
        with self._lock:
            if self.keeper.state is not KeeperState.OPEN or self._own_close_running:
                return False
            self._own_close_running = True
            return True

    _own_close_running = False

    def close_pool_blocking(self, timeout: float) -> None:
        """``pool.close(timeout)`` of a sync pool: this keeper's close, as the registry would run it.

        Refuses new checkouts, waits up to ``drain_timeout`` for the borrowed connections,
        force-closes the rest and closes the pool. Called while the registry closes the pool,
        it waits for that close.
        """
        if not self._claim_own_close(timeout):
            if self.keeper.state is not KeeperState.CLOSED:
                self._done.result()
            return
        report = _run_blocking_coroutine(close_keeper(self.keeper, None, 0.0))
        if report.outcome != "skipped":
            log_own_close(logger, report, f"{self.library_class.__name__}.close()")

    async def close_pool(self, timeout: float) -> None:
        """``await pool.close(timeout)`` of an async pool: the same as :meth:`close_pool_blocking`.

        Cancelled (``asyncio.wait_for(pool.close(), 5)``), it force-closes the pool in a task of
        its own before the cancellation propagates.
        """
        if not self._claim_own_close(timeout):
            if self.keeper.state is not KeeperState.CLOSED:
                await asyncio.shield(asyncio.wrap_future(self._done))
            return
        try:
            report = await close_keeper(self.keeper, None, 0.0)
        except BaseException:
            self.keeper.request_force()
            self._forced_close = asyncio.ensure_future(close_keeper(self.keeper, None, 0.0))
            raise
        if report.outcome != "skipped":
            log_own_close(logger, report, f"{self.library_class.__name__}.close()")

    _forced_close: asyncio.Future[ResourceReport] | None = None


def _fail_soon(clients: Sequence[Any], errors: Sequence[PoolClosedError]) -> None:
    # On an async pool's loop: WaitingClient.fail() takes the client's asyncio.Condition.
    for client, error in zip(clients, errors, strict=True):
        task = asyncio.ensure_future(client.fail(error))
        _pending_fails.add(task)
        task.add_done_callback(_pending_fails.discard)


# The event loop holds its tasks weakly: the failing ones are kept here until they finish.
_pending_fails: set[asyncio.Future[Any]] = set()


def _shutdown_sockets(connections: Iterable[Any]) -> None:
    for connection in connections:
        fd = socket_fd(connection)
        if fd is not None:
            shutdown_socket(fd)


def _cancel_in_one_query(connections: Sequence[Any], wait: float) -> bool:
    """Cancel every connection's statement with one ``pg_cancel_backend`` query on a side connection.

    A cancel request is a server connection of its own (a postmaster fork each); one query on a
    side connection, opened with the parameters of a borrowed connection (its password
    included), cancels them all. False (and the caller sends cancel requests) on any failure: no
    free slot, a role not allowed to signal.
    """
    try:
        pids = [connection.info.backend_pid for connection in connections]
        params = {option.keyword.decode(): option.val.decode() for option in connections[0].pgconn.info if option.val}
        params["connect_timeout"] = str(max(2, int(wait) + 1))  # libpq's smallest is 2 seconds
        side = psycopg.connect(psycopg_conninfo.make_conninfo("", **params), autocommit=True)
    except Exception:  # noqa: BLE001 -- any failure means: fall back to cancel requests
        return False
    try:
        side.execute(f"set statement_timeout = {max(1, int(wait * 1000))}")
        side.execute("select pg_cancel_backend(pid) from unnest(%s::int[]) as pid", (pids,))
    except Exception:  # noqa: BLE001 -- same
        return False
    else:
        return True
    finally:
        side.close()


def _run_blocking_coroutine(coroutine: Coroutine[Any, Any, ResourceReport]) -> ResourceReport:
    """Run ``coroutine`` to the end from sync code: on a private loop, in a helper thread if one runs here."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        loop = asyncio.new_event_loop()
        try:
            return loop.run_until_complete(coroutine)
        finally:
            loop.close()
    result: list[ResourceReport] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(asyncio.run(coroutine))
        except BaseException as error:  # noqa: BLE001 -- handed back to the caller
            errors.append(error)

    helper = threading.Thread(target=run, name="poolkeeper-psycopg-pool-close", daemon=True)
    helper.start()
    helper.join()
    if errors:
        raise errors[0]
    return result[0]


def make_driver(resource: Any) -> PsycopgPoolDriver:
    """The driver for a psycopg_pool ``ConnectionPool``, ``NullConnectionPool`` or async twin.

    Raises:
        UnsupportedResourceError: the installed psycopg_pool lacks a name this adapter needs.
    """
    if not isinstance(resource, (psycopg_pool.ConnectionPool, psycopg_pool.AsyncConnectionPool)):
        raise TypeError(f"expected a psycopg_pool ConnectionPool, got {type(resource).__qualname__}")
    missing = _missing_names(resource)
    if missing:
        raise unsupported_version("psycopg_pool", psycopg_pool.__version__, SUPPORTED_VERSIONS, missing)
    return PsycopgPoolDriver(resource)
