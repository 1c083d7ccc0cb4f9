"""The SQLAlchemy keeper: ``Engine`` and ``AsyncEngine``, any pool class that checks out.

``wrap()`` returns the same engine. Its pool object keeps its class: the keeper sets its own
``connect``, ``_do_return_conn``, ``recreate`` and ``dispose`` on it as instance attributes, over
the class's methods (an async pool's queue its own ``get``; a sync pool's queue gets a refusing
class once closing starts), so that:

* ``Pool.connect()`` asks the keeper first: once closing starts, ``engine.connect()``,
  ``begin()`` and ``raw_connection()`` raise :class:`~poolkeeper.PoolClosedError` at once;
* threads (or tasks) already blocked in the queue waiting for a free connection are woken
  and fail with the same error, instead of waiting for ``pool_timeout``;
* every return, including the garbage collector's, is counted, so the closer wakes on the last;
* after close, ``engine.dispose()`` does not build a fresh pool: the engine keeps refusing.
"""

from __future__ import annotations

import asyncio
import functools
import time
import weakref
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool, Pool, QueuePool, SingletonThreadPool
from sqlalchemy.pool.base import _ConnectionFairy
from sqlalchemy.util import greenlet_spawn
from sqlalchemy.util import queue as sqla_queue

from poolkeeper._concurrency import run_blocking, run_on_loop, wake_soon
from poolkeeper._redact import is_secret_key, secret_values
from poolkeeper.adapters._abort import (
    BATCH_CANCEL_FROM,
    MAX_CANCEL_WAIT,
    KeptSockets,
    cancel_by_pid,
    cancel_psycopg_in_one_query,
    cancel_statements,
    cancel_time_left,
    cut_keeping_sockets,
    psycopg_side_that_may_cancel,
    say_goodbye,
    shutdown_socket,
    socket_fd,
)
from poolkeeper.adapters._base import Driver, remove_attributes, set_methods
from poolkeeper.adapters._mysql_cancel import MySQLServerCancel, is_mysql
from poolkeeper.adapters._sqlalchemy_compat import check_supported, queue_await

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from sqlalchemy.pool import ConnectionPoolEntry

    from poolkeeper._borrowers import Borrow
    from poolkeeper._keeper import Keeper

__all__ = ["SQLAlchemyDriver", "make_driver"]


class _RefusingQueue(sqla_queue.Queue[Any]):
    """QueuePool's queue once the keeper stops lending: every ``get`` fails with the refusal.

    The queue keeps its own class while the keeper lends, so checkouts pay nothing for this;
    :func:`_refuse_queue` swaps the class in under the queue's lock and wakes the waiters.
    """

    _pk_keeper: Keeper

    def _empty(self) -> bool:
        return False  # "not empty" lets blocked getters leave their wait loop and reach _get()

    def _get(self) -> Any:
        raise self._pk_keeper.refusal()


def _refuse_queue(queue: sqla_queue.Queue[Any], keeper: Keeper) -> None:
    """Make ``queue`` refuse every ``get`` from now on and wake the threads blocked in it."""
    with queue.not_empty:
        queue._pk_keeper = keeper  # type: ignore[attr-defined]  # noqa: SLF001 -- read by _RefusingQueue
        queue.__class__ = _RefusingQueue
        queue.not_empty.notify_all()


def _take_all(queue: sqla_queue.Queue[Any]) -> list[Any]:
    """Remove and return every idle record of a (refusing) sync queue."""
    with queue.mutex:
        items = list(queue.queue)
        queue.queue.clear()
        queue.not_full.notify_all()
        return items


# AsyncAdaptedQueuePool's queue, with waits that the refusal interrupts: _async_get set on it as
# its ``get`` (set_methods(), from the start: async waiters must be registered as they start
# waiting), with the keeper, the set of waiters and the library's wait inside its greenlet
# (``_pk_await``, see _sqlalchemy_compat) beside it. Not a guarded subclass as ``__class__``,
# which would slow SQLAlchemy's own reads of the queue's attributes on every checkout and return
# (about 6,000 instructions per checkout+return, 2.5%, measured with callgrind).


def _async_get(queue: Any, block: bool = True, timeout: float | None = None) -> Any:
    """Take an idle record, waiting if allowed; refused once the keeper stops lending."""
    keeper: Keeper = queue._pk_keeper  # noqa: SLF001 -- set by SQLAlchemyDriver.guard
    if not keeper.lending:
        raise keeper.refusal()
    if not block:
        return queue.get_nowait()
    try:
        return queue._queue.get_nowait()  # noqa: SLF001 -- the asyncio.Queue inside
    except asyncio.QueueEmpty:
        pass
    return queue._pk_await(_wait_for_item(queue, timeout))  # noqa: SLF001


_ASYNC_QUEUE_GUARDS: dict[str, Callable[..., Any]] = {"get": _async_get}
_ASYNC_QUEUE_ATTRIBUTES = ("get", "_pk_keeper", "_pk_waiters", "_pk_await")


async def _wait_for_item(queue: Any, timeout: float | None) -> Any:
    refused: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    waiters: set[asyncio.Future[None]] = queue._pk_waiters  # noqa: SLF001
    waiters.add(refused)
    getter = asyncio.ensure_future(queue._queue.get())  # noqa: SLF001
    try:
        await asyncio.wait((getter, refused), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiters.discard(refused)
        if not getter.done():
            getter.cancel()
    keeper: Keeper = queue._pk_keeper  # noqa: SLF001
    if getter.done() and not getter.cancelled():
        item = getter.result()
        if keeper.lending:
            return item
        queue._queue.put_nowait(item)  # noqa: SLF001 -- refused in the same instant: give it back for the sweep
    if not keeper.lending:
        raise keeper.refusal()
    raise sqla_queue.Empty


def _is_guarded_async_queue(queue: Any) -> bool:
    return getattr(queue, "_pk_waiters", None) is not None


def _wake_waiters(queue: Any) -> None:
    """Wake every task waiting in a guarded async queue's ``get``, from any thread: each meets the refusal."""
    for future in list(queue._pk_waiters):  # noqa: SLF001
        wake_soon(future.get_loop(), future)


def _take_all_async(queue: Any) -> list[Any]:
    """Remove and return every idle record of a guarded async queue."""
    asyncio_queue = vars(queue).get("_queue")  # made lazily: never used, nothing inside
    if asyncio_queue is None:
        return []
    items = []
    while True:
        try:
            items.append(asyncio_queue.get_nowait())
        except asyncio.QueueEmpty:
            return items


# The guarded pool methods, set on the pool by _guard(). Module-level functions rather than a
# class body, so that the hot path (connect and return) is one call deep, reads no properties
# and makes no super() object. The library's own methods are looked up on the pool's class
# (type(pool)) at each call: a patch of QueuePool.connect made after wrapping is what runs.


# Pool.connect() is one line, _ConnectionFairy._checkout(pool). While it is the pool class's
# connect(), the guard makes that call itself, with the classmethod bound once here: a Python
# call and a class attribute lookup fewer per checkout, about 540 instructions (0.5% of a bare
# checkout; python -m benchmarks.instructions sqlalchemy). A patch of Pool.connect or
# QueuePool.connect is still what runs; one of the private _checkout made after this import is not.
_checkout = getattr(_ConnectionFairy, "_checkout", None)
_LIBRARY_CONNECT = Pool.connect if _checkout is not None else None  # without it, connect() is always called


def _connect(pool: Any) -> Any:
    keeper: Keeper = pool._pk_keeper  # noqa: SLF001 -- set by SQLAlchemyDriver.guard
    # Counted as out from here: connecting and pre-ping are round trips that closing may overtake.
    keeper.start_checkout()
    try:
        connect = type(pool).connect  # the pool class's own connect(), patched or not
        fairy = _checkout(pool) if connect is _LIBRARY_CONNECT else connect(pool)  # type: ignore[misc]  # _checkout is set when it matches
    except BaseException:
        keeper.end_checkout()
        raise
    # The record is the pool's unit of checkout. Its fairy_ref, SQLAlchemy's own weakref to the
    # fairy the user holds, tells on return whether the garbage collector collected the fairy.
    record = fairy._connection_record  # noqa: SLF001
    # lend() then end_checkout(), in one call: the checkout is never out of sight of the drain.
    if not keeper.lend_checkout(record, record.fairy_ref):
        # Landed after forcing began: the force-close and the sweep of idle connections may
        # be over, so close the connection now rather than put it back in the pool.
        fairy.invalidate()
        raise keeper.refusal()
    return fairy


def _connect_async(pool: Any) -> Any:
    fairy = _connect(pool)
    driver = pool._pk_driver  # noqa: SLF001
    loop = driver.loop  # where the connections live: asked of asyncio only when that loop stopped
    if loop is None or not loop.is_running():
        driver.loop = asyncio.get_running_loop()  # on Python 3.11 a getpid() system call each time
    return fairy


def _do_return_conn(pool: Any, record: ConnectionPoolEntry) -> None:
    # Back in the pool first: the return may wake the closer, which then closes idle connections.
    type(pool)._do_return_conn(pool, record)  # noqa: SLF001 -- the pool class's own
    pool._pk_keeper.checkin(record)  # noqa: SLF001 -- set by SQLAlchemyDriver.guard


def _recreate(pool: Any) -> Pool:
    driver: SQLAlchemyDriver = pool._pk_driver  # noqa: SLF001
    if not driver.keeper.lending:
        return pool  # type: ignore[no-any-return]  # Engine.dispose() after close keeps this refusing pool
    fresh: Pool = type(pool).recreate(pool)  # the pool class's own recreate()
    driver.guard(fresh)
    return fresh


def _dispose(pool: Any) -> None:
    driver: SQLAlchemyDriver = pool._pk_driver  # noqa: SLF001
    if driver.keeper.lending:
        type(pool).dispose(pool)  # the pool class's own dispose()
    else:
        driver.close_idle_now(pool)  # never touch the refusing queue through Pool.dispose()


#: What _guard_pool() sets on a pool (set_methods(): instance attributes over the class's methods,
#: not a guarded subclass as ``__class__``, which would slow SQLAlchemy's own code on the pool).
_GUARDS: dict[str, Callable[..., Any]] = {
    "connect": _connect,
    "_do_return_conn": _do_return_conn,
    "recreate": _recreate,
    "dispose": _dispose,
}
_ASYNC_GUARDS = {**_GUARDS, "connect": _connect_async}
_GUARD_ATTRIBUTES = ("_pk_driver", "_pk_keeper", *_GUARDS)


def _guard_pool(pool: Pool, driver: SQLAlchemyDriver) -> None:
    pool._pk_driver = driver  # type: ignore[attr-defined]  # noqa: SLF001 -- read by the functions above
    pool._pk_keeper = driver.keeper  # type: ignore[attr-defined]  # noqa: SLF001
    set_methods(pool, _ASYNC_GUARDS if driver.is_async else _GUARDS)


class SQLAlchemyDriver(Driver):
    """Keeps one SQLAlchemy engine (sync, or the sync core of an ``AsyncEngine``)."""

    kind = "sqlalchemy"

    def __init__(self, resource: Any, engine: Engine) -> None:
        super().__init__(resource)
        self.engine = engine
        self.pools: weakref.WeakSet[Pool] = weakref.WeakSet()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.is_async = bool(engine.pool._is_asyncio)  # noqa: SLF001 -- the flag telling async pools apart
        # Every pool guard() guarded, with its queue's own class, for detach(): held weakly, so
        # that the pool an Engine.dispose() replaced is freed once nothing uses it (a strong list
        # kept every pool of every dispose alive). The values are classes, never the pool.
        self._library_classes: weakref.WeakKeyDictionary[Pool, type[Any] | None] = weakref.WeakKeyDictionary()
        # DBAPI connections the parent process opened (set in a forked child): never closed here.
        # Held strongly: their ids stay unique, and a collected psycopg2 or asyncpg connection
        # would send its goodbye on the socket it shares with the parent.
        self._inherited: dict[int, Any] = {}
        # Sockets a force-close keeps open to the server until close_connections() (cut_keeping_sockets).
        self._kept_sockets = KeptSockets()
        # MySQL and MariaDB stop a borrowed connection's statement with KILL QUERY (_mysql_cancel);
        # every other dialect with PostgreSQL's cancel (_abort).
        self.mysql_cancel = MySQLServerCancel(engine, is_async=self.is_async) if is_mysql(engine) else None

    @property
    def managed_object(self) -> Any:
        """The sync engine: an ``AsyncEngine`` and its ``sync_engine`` share one keeper."""
        return self.engine

    @property
    def home_loop(self) -> asyncio.AbstractEventLoop | None:
        """The loop of the last async checkout (``None`` for sync engines)."""
        return self.loop

    def describe(self) -> str:
        """The engine URL with its password and secret query parameters (``sslpassword``...) masked."""
        url = self.engine.url
        masked = {key: "***" for key in url.query if is_secret_key(key)}
        return url.update_query_dict(masked).render_as_string(hide_password=True)

    def secrets(self) -> tuple[str, ...]:
        """The URL's password and secret query parameters, to be scrubbed from error texts."""
        url = self.engine.url
        found = [str(url.password)] if url.password else []
        return tuple(dict.fromkeys([*found, *secret_values(url.query)]))

    def idle_count(self) -> int | None:
        """Connections checked in to the engine's pools (``QueuePool.checkedin()``).

        ``None`` for pools that keep no queue of idle connections (``SingletonThreadPool``,
        ``StaticPool``). Every pool the engine used counts: one that ``Engine.dispose()``
        replaced still holds the connections returned to it later.
        """
        idle = 0
        for pool in list(self.pools):
            if isinstance(pool, NullPool):
                continue  # closes every connection on return: never any idle
            if not isinstance(pool, QueuePool):
                return None
            queue = pool._pool  # noqa: SLF001 -- the pool's queue of idle records
            if isinstance(queue, sqla_queue.AsyncAdaptedQueue) and "_queue" not in vars(queue):
                continue  # its asyncio queue is made on first use; making it here would race the loop
            idle += pool.checkedin()
        return idle

    # -- guards -------------------------------------------------------------------------------

    def attach(self, keeper: Keeper) -> None:
        """Guard the engine's pool; undone if that fails."""
        super().attach(keeper)
        try:
            self.guard(self.engine.pool)
            if self.mysql_cancel is not None:
                self.mysql_cancel.attach()
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        """Undo :meth:`guard` on every live pool (registration failed halfway, or ``unwrap()``)."""
        for pool, queue_class in list(self._library_classes.items()):
            queue = getattr(pool, "_pool", None)
            if queue_class is not None and isinstance(queue, _RefusingQueue):
                queue.__class__ = queue_class
                remove_attributes(queue, ("_pk_keeper",))
            elif queue is not None and _is_guarded_async_queue(queue):
                remove_attributes(queue, _ASYNC_QUEUE_ATTRIBUTES)
            remove_attributes(pool, _GUARD_ATTRIBUTES)
        self._library_classes.clear()
        self.pools.clear()
        if self.mysql_cancel is not None:
            self.mysql_cancel.detach()

    def guard(self, pool: Pool) -> None:
        """Route ``pool``'s checkouts and returns through the keeper (an async queue: its get() too)."""
        queue = getattr(pool, "_pool", None) if isinstance(pool, QueuePool) else None
        self._library_classes[pool] = type(queue) if queue is not None else None
        if isinstance(queue, sqla_queue.AsyncAdaptedQueue):
            # Async waiters must be registered as they start waiting, so its get is guarded from
            # the start; the sync queue is made refusing only at refusal time.
            queue._pk_await = queue_await(type(queue))  # type: ignore[attr-defined]  # noqa: SLF001 -- read by _async_get
            queue._pk_waiters = set()  # type: ignore[attr-defined]  # noqa: SLF001
            queue._pk_keeper = self.keeper  # type: ignore[attr-defined]  # noqa: SLF001
            set_methods(queue, _ASYNC_QUEUE_GUARDS)
        elif queue is not None and not isinstance(queue, sqla_queue.Queue):
            raise TypeError(f"unknown SQLAlchemy queue class {type(queue).__qualname__}")
        _guard_pool(pool, self)
        self.pools.add(pool)

    # -- lifecycle ----------------------------------------------------------------------------

    def refuse(self) -> None:
        """Wake the threads or tasks queued for a connection in any of the engine's pools."""
        for pool in list(self.pools):
            queue = getattr(pool, "_pool", None)
            if queue is not None and _is_guarded_async_queue(queue):
                _wake_waiters(queue)
            elif isinstance(queue, sqla_queue.Queue) and isinstance(pool, QueuePool):
                _refuse_queue(queue, self.keeper)

    def forget_inherited(self, borrowed: Sequence[Any]) -> None:
        """In a forked child: the parent's connections, idle or borrowed, are never closed from here.

        What SQLAlchemy's ``engine.dispose(close=False)`` does for the engine, this does for the
        keeper: the connections stay the parent's, the child opens its own.
        """
        records = list(borrowed)
        for pool in list(self.pools):
            queue = getattr(pool, "_pool", None)
            if isinstance(queue, sqla_queue.AsyncAdaptedQueue):
                if _is_guarded_async_queue(queue):
                    queue._pk_waiters = set()  # type: ignore[attr-defined]  # noqa: SLF001 -- the parent's tasks, on the parent's loop
                asyncio_queue = vars(queue).get("_queue")
                records += [] if asyncio_queue is None else list(asyncio_queue._queue)  # noqa: SLF001 -- asyncio.Queue's deque
            elif isinstance(queue, sqla_queue.Queue):
                records += list(queue.queue)
        self._inherited.update(
            (id(record.dbapi_connection), record.dbapi_connection)
            for record in records
            if record.dbapi_connection is not None
        )
        self.loop = None  # the parent's event loop does not run here

    def _own(self, record: Any) -> bool:
        """True if ``record``'s connection was opened by this process (and is open)."""
        connection = record.dbapi_connection
        return connection is not None and id(connection) not in self._inherited

    async def force_close(self, borrows: Sequence[Borrow], timeout: float) -> None:
        """Cancel every borrowed connection's statement on the server, then cut its socket."""
        if self._inherited:  # a forked child: the parent's connections are left alone
            borrows = [borrow for borrow in borrows if self._own(borrow.connection)]
        connections = [
            borrow.connection.driver_connection for borrow in borrows if borrow.connection.dbapi_connection is not None
        ]
        if self.mysql_cancel is not None:  # MySQL/MariaDB: KILL QUERY over a side connection, then cut
            await self.mysql_cancel.force_close(connections, timeout)
            return
        # Cancel first, all at once: a backend whose client vanished keeps running its query.
        wait = min(timeout / 2, MAX_CANCEL_WAIT)
        if wait > 0 and connections and all(_is_psycopg_31(connection) for connection in connections):
            # psycopg 3.1 can only be cancelled safely with the query (see _abort._psycopg_cancel).
            try:
                await cancel_psycopg_in_one_query(connections, wait)
            finally:
                self._cut(connections)
            return
        if len(connections) >= BATCH_CANCEL_FROM and not self.is_async and wait > 0 and _all_psycopg(connections):
            # The side connection gets half the cancel wait; the query, or the cancel requests
            # when there is no side connection, get the rest: both fit in the one wait.
            until = time.monotonic() + wait
            try:
                side = await psycopg_side_that_may_cancel(connections[0], wait / 2)
            except BaseException:  # cancelled while connecting (the deadline): cut anyway
                self._cut(connections)
                raise
            wait = cancel_time_left(until)  # what is left, never nothing
            if side is not None:
                # Cut first: every borrowing thread is woken at once, instead of after the server
                # answered the cancel while hundreds of threads wake to its errors. But the server
                # does not see the clients go before the query has answered (cut_keeping_sockets;
                # the sockets close last, in close_connections): a backend whose client is gone
                # exits as soon as the cancel stops it, and hundreds of them exiting at once hold
                # the answer back.
                pids = [connection.info.backend_pid for connection in connections]
                self._kept_sockets.add(cut_keeping_sockets(connections))
                await cancel_by_pid(side, pids, wait)  # raises CancelNotConfirmedError (reported)
                return
        try:
            # Raises CancelNotConfirmedError (reported) once the sockets below are cut anyway.
            await cancel_statements(connections, wait or None)
        finally:  # also when cancelled while the cancel requests wait on a silent server
            self._cut(connections)

    @staticmethod
    def _cut(connections: Sequence[Any]) -> None:
        for connection in connections:
            fd = socket_fd(connection)
            if fd is not None:
                shutdown_socket(fd)

    def _take_idle(self, pool: Pool) -> list[Any]:
        queue = getattr(pool, "_pool", None)
        if isinstance(queue, _RefusingQueue) or (queue is not None and _is_guarded_async_queue(queue)):
            records = _take_all(queue) if isinstance(queue, _RefusingQueue) else _take_all_async(queue)
            pool._overflow = 0 - pool.size()  # type: ignore[attr-defined]  # noqa: SLF001 -- as QueuePool.dispose does
            return records
        return []

    can_ping = True

    async def ping(self) -> None:
        """``SELECT 1`` on a side connection made the engine's own way (its creator), then closed.

        Never a pool checkout: a pool whose every connection is borrowed is busy, not down.
        Once the keeper has started closing it raises ``PoolClosedError`` and opens nothing.
        """
        self.keeper.admit()

        def ping_side() -> None:
            side = self.engine.pool._invoke_creator(None)  # type: ignore[arg-type]  # noqa: SLF001 -- the engine's connect, no record
            try:
                cursor = side.cursor()
                cursor.execute("select 1")
                cursor.close()
            finally:
                side.close()

        if self.is_async:
            await run_on_loop(self.loop, greenlet_spawn(ping_side))  # loop None: the probe's own
            return
        await run_blocking(ping_side, name="poolkeeper-sqlalchemy-ping")

    def returned_after_close(self) -> None:
        """A forced borrower gave its connection back once the sweep had begun: close it too.

        Beside the closer's own sweep, if that is still running: each takes the idle records out
        of the pool's queue under its lock, so every record is closed once.
        """
        for pool in list(self.pools):
            self.close_idle_now(pool)

    def close_idle_now(self, pool: Pool) -> None:
        """Close the idle connections of ``pool`` in this thread (or greenlet)."""
        records = self._take_idle(pool)
        if self._inherited:  # a forked child: the parent's are dropped from the pool, never closed
            records = [record for record in records if record.dbapi_connection is None or self._own(record)]
        for record in records:
            if self.is_async and record.dbapi_connection is not None:
                say_goodbye(record.driver_connection)
            record.close()
        if not isinstance(pool, QueuePool):
            type(pool).dispose(pool)  # the library's own: no queue

    def _close_idle_of(self, pools: Sequence[Pool]) -> None:
        for pool in pools:
            self.close_idle_now(pool)

    def blocking_close(self) -> Callable[[], None] | None:
        """A sync engine's close of its idle connections, run as soon as the drain ends (see Driver).

        ``None`` for an async engine (closed on its own loop) and for one with a
        SingletonThreadPool (SQLite ``:memory:``), whose connection only the closing thread may
        close: :meth:`close_connections` does both.
        """
        pools = list(self.pools)
        if self.is_async or any(isinstance(pool, SingletonThreadPool) for pool in pools):
            return None
        return functools.partial(self._close_idle_of, pools)

    async def close_connections(self) -> None:
        """Close the idle connections of every pool (in a thread, or on the engine's loop).

        Raises:
            ThreadBoundConnectionsError: some connections can be closed only by the thread
                that opened them (sqlite3), and that thread is not this one.
        """
        # SingletonThreadPool (SQLite :memory:) first, in this very thread: the one that called
        # close()/aclose(), which for a script is the one that used the engine. sqlite3 refuses
        # a close from any other thread, and SQLAlchemy only logs that refusal (issue 13, item 2).
        singletons = [pool for pool in self.pools if isinstance(pool, SingletonThreadPool)]
        pools = [pool for pool in self.pools if pool not in singletons]
        failures = [failure for pool in singletons for failure in _close_in_this_thread(pool)]
        close_all = functools.partial(self._close_idle_of, pools)
        try:
            if self.is_async:
                if self.loop is not None:  # None: never used, no connection was ever opened
                    await run_on_loop(self.loop, greenlet_spawn(close_all))
            else:
                await run_blocking(close_all, name="poolkeeper-sqlalchemy-close")
        finally:  # last, from a thread, not waited for: each close lets a cancelled backend exit
            self._kept_sockets.close()
        if failures:
            raise ThreadBoundConnectionsError(
                f"{len(failures)} connection(s) could not be closed from the thread closing the registry "
                f"({'; '.join(sorted(set(failures)))}); they stay open until the threads that opened them close them"
            )


def _all_psycopg(connections: Sequence[Any]) -> bool:
    return all(type(connection).__module__.split(".")[0] == "psycopg" for connection in connections)


def _is_psycopg_31(connection: Any) -> bool:
    """A psycopg connection without ``cancel_safe()`` (psycopg 3.1)."""
    return type(connection).__module__.split(".")[0] == "psycopg" and not hasattr(connection, "cancel_safe")


class ThreadBoundConnectionsError(Exception):
    """Connections that only the thread which opened them may close (sqlite3) are still open."""


def _close_in_this_thread(pool: Pool) -> list[str]:
    """Close every connection of a ``SingletonThreadPool`` that this thread may close; the others' errors.

    The library's own ``dispose()`` swallows the error sqlite3 raises for a connection opened by
    another thread: the connection stays open and nothing says so. Here the driver-level close
    runs first, so that a refusal is seen; the library then forgets the closed ones.
    """
    failures: list[str] = []
    records = pool._all_conns  # type: ignore[attr-defined]  # noqa: SLF001 -- every thread's connection
    for record in list(records):
        connection = record.dbapi_connection
        if connection is not None:
            try:
                pool._dialect.do_close(connection)  # noqa: SLF001 -- what Pool._close_connection calls, unswallowed
            except Exception as error:  # noqa: BLE001 -- reported by the caller
                failures.append(f"{type(error).__name__}: {error}")
                continue
            record.close()  # the library's bookkeeping (its "close" event); closing twice is harmless
        records.discard(record)
    return failures


def make_driver(resource: Any) -> SQLAlchemyDriver:
    """The driver for an ``Engine`` or an ``AsyncEngine`` (whose ``sync_engine`` it keeps)."""
    engine = getattr(resource, "sync_engine", resource)
    if not isinstance(engine, Engine):
        raise TypeError(f"expected a SQLAlchemy Engine or AsyncEngine, got {type(resource).__qualname__}")
    check_supported(engine)
    return SQLAlchemyDriver(resource, engine)
