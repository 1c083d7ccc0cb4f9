"""The redis-py keeper: ``redis.Redis`` and ``redis.asyncio.Redis``, on any of their connection pools.

``wrap()`` returns the same client. What the keeper manages is the client's connection pool:
a borrow is a connection taken from it for as long as it is held (one command, a pipeline's
``execute`` or its ``WATCH``, a pubsub until it is closed, a blocking ``BLPOP``, the pinned
connection of a ``single_connection_client``). The pool object keeps its class; the keeper
sets its own ``get_connection`` and ``release`` (and, on an asyncio pool, ``can_get_connection``)
on it as instance attributes, over the class's methods, so that:

* ``get_connection()`` asks the keeper first: once closing starts every command, pipeline and
  pubsub raises :class:`~poolkeeper.PoolClosedError` at once;
* callers queued in a ``BlockingConnectionPool`` (a thread in its queue, a task on its
  condition) are woken and fail with the same error instead of waiting for its ``timeout``;
* every ``release()`` is counted, so the closer wakes on the last return.

redis-py reconnects silently: a command that meets a closed socket disconnects, sleeps its
``Retry`` backoff and reconnects, and ``ConnectionPool.disconnect()`` is followed by fresh
connections. So a connection that is force-closed or closed by the keeper is first *sealed*:
its ``connect_check_health`` (the one door every reconnect goes through, sync and async)
raises the refusal. The refusal (a ``redis.RedisError``) is not a ``redis.ConnectionError``,
so no ``Retry`` retries it and the retry loop ends at its next attempt instead of reconnecting.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import queue
import threading
from typing import TYPE_CHECKING, Any

import redis
from redis.asyncio.connection import BlockingConnectionPool as AsyncBlockingConnectionPool
from redis.asyncio.connection import ConnectionPool as AsyncConnectionPool
from redis.asyncio.connection import SSLConnection as AsyncSSLConnection
from redis.client import Redis
from redis.connection import AbstractConnection, BlockingConnectionPool, ConnectionPool, SSLConnection
from redis.exceptions import RedisError

from poolkeeper._concurrency import run_blocking, run_on_loop
from poolkeeper._grammar import with_article
from poolkeeper._redact import secret_values
from poolkeeper.adapters._abort import shutdown_socket
from poolkeeper.adapters._base import Driver, remove_attributes, set_methods, unsupported_version
from poolkeeper.errors import PoolClosedError, RegistrationError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    from poolkeeper._borrowers import Borrow
    from poolkeeper._keeper import Keeper

__all__ = ["RedisDriver", "RedisPoolClosedError", "make_driver"]

logger = logging.getLogger("poolkeeper.redis")

Pool = ConnectionPool | AsyncConnectionPool

# -- what this adapter reads from redis-py, per version line --------------------------------
# Resolved once: at import for what depends on the redis-py version, at wrap time for what
# depends on the pool (its class, its instance attributes). A missing name makes wrap() raise
# UnsupportedResourceError; nothing in a shutdown looks a name up by chance.
#
#   ConnectionPool.get_connection, .release   5.0+  public; the guards set on the pool call the
#                                                   class's own, looked up at each call, so that a
#                                                   patch of the class made after wrapping applies
#   asyncio ConnectionPool.can_get_connection 5.0+  the predicate BlockingConnectionPool waiters re-check
#   asyncio BlockingConnectionPool._condition 5.0+  what its waiters wait on
#   BlockingConnectionPool.pool               5.0+  its queue.Queue of connections
#   ConnectionPool._get_free_connections,     sync 7.0+, asyncio 8.1+: the library's own views of
#     ._get_in_use_connections                its connections (taken under its lock); before, read
#                                             from _available_connections and _in_use_connections
#                                             (sync BlockingConnectionPool: pool.queue and
#                                             _connections), which every version 5.0+ has
#   Connection.connect_check_health           6.0+  the one door every reconnect goes through,
#                                                   sealed when a connection is closed; before 6.0
#                                                   that door is Connection.connect
#   Redis.single_connection_lock              sync 5.3+ (asyncio ._single_conn_lock 5.0+): before
#                                                   5.3 the pinned connection is cut like any other
#   Connection.is_connected                   sync 8.0+ (asyncio 5.0+); before, a sync connection
#                                                   is connected while its _sock is set
#   Connection._sock, asyncio Connection._writer, Retry._supported_errors   5.0+

#: The redis-py versions this adapter is tested with.
SUPPORTED_VERSIONS = ">=5.0.8"

_REDIS_VERSION = tuple(int(part) for part in redis.__version__.split(".")[:2] if part.isdigit())

# The method every reconnect goes through (sync and asyncio alike, in one redis-py version).
_RECONNECT_DOOR = "connect_check_health" if hasattr(AbstractConnection, "connect_check_health") else "connect"


if hasattr(AbstractConnection, "is_connected"):  # sync redis-py 8.0+

    def _sync_is_connected(connection: Any) -> bool:
        return bool(connection.is_connected)

else:

    def _sync_is_connected(connection: Any) -> bool:
        return _innermost(connection)._sock is not None  # noqa: SLF001 -- set while connected


def _async_is_connected(connection: Any) -> bool:
    return bool(connection.is_connected)  # asyncio connections: 5.0+


if _REDIS_VERSION >= (5, 3):

    def _pinned_lock(client: Any) -> Any:
        """The lock a sync single-connection client holds while a command uses its connection."""
        return getattr(client, "single_connection_lock", None)

else:  # before 5.3 redis-py takes no lock: such a client is used from one thread at a time

    def _pinned_lock(client: Any) -> Any:  # noqa: ARG001 -- same signature as on 5.3+
        """A lock of its own: nothing else takes it, so the pinned connection is always free."""
        return threading.Lock()


class RedisPoolClosedError(PoolClosedError, RedisError):
    """A command refused by a closing keeper; a ``redis.RedisError``.

    Not a ``redis.ConnectionError``: redis-py's ``Retry`` retries those, and a refusal must
    end the command, not be retried (for ever, with ``retries=-1``).
    """


# -- the guarded pool methods (set on the pool by _guard()) --------------------------------------
# Module-level functions rather than a class body, so that the hot path (get and release) is
# one call deep, reads no properties and makes no super() object.


# The library's own methods are looked up on the pool's class (type(pool)) at each call rather
# than saved when the pool is guarded: a patch of ConnectionPool.get_connection made after
# wrapping (mock.patch) is then what runs, as it would for an unwrapped pool.


def _get_connection(pool: Any, *args: Any, **options: Any) -> Any:
    keeper: Keeper = pool._pk_keeper  # noqa: SLF001 -- set by RedisDriver.attach
    # Counted as out from here: connecting (and the health check) are round trips that closing
    # may overtake; a checkout landing after forcing began is cut (issue 13, item 1).
    keeper.start_checkout()
    library: Any = type(pool)  # the pool's own class: its get_connection and release are the library's
    window: _QueueLockWindow | None = pool._pk_queue_window  # noqa: SLF001 -- None but on a blocking pool
    try:
        if window is None:
            # Nothing to pass on (redis-py 6+ commands pass nothing): a plain call costs about
            # 1,000 instructions less than forwarding empty *args and **options.
            if args or options:
                connection = library.get_connection(pool, *args, **options)
            else:
                connection = library.get_connection(pool)
        else:
            with window:  # the queue's get holds its plain lock: see _QueueLockWindow
                connection = library.get_connection(pool, *args, **options)
    except BaseException:
        keeper.end_checkout()
        raise
    if not keeper.lend_checkout(connection):  # lend() and end_checkout() in one call
        connection.disconnect()  # the sweep of idle connections may be over: do not leave it open
        library.release(pool, connection)
        raise keeper.refusal()
    return connection


def _release(pool: Any, connection: Any) -> None:
    window: _QueueLockWindow | None = pool._pk_queue_window  # noqa: SLF001
    if window is None:
        # Back in the pool first: the return may wake the closer, which then closes idle connections.
        try:
            type(pool).release(pool, connection)
        finally:
            pool._pk_keeper.checkin(connection)  # noqa: SLF001
    elif window.entered_here:
        # A finaliser (Pipeline.__del__, PubSub.__del__) run by a collection while this thread
        # may hold the blocking pool's queue lock: the put would block on it for ever.
        window.defer(functools.partial(_release, pool, connection))
    else:
        with window:
            try:
                type(pool).release(pool, connection)
            finally:
                pool._pk_keeper.checkin(connection)  # noqa: SLF001


async def _get_connection_async(pool: Any, *args: Any, **options: Any) -> Any:
    keeper: Keeper = pool._pk_keeper  # noqa: SLF001 -- set by RedisDriver.attach
    keeper.start_checkout()  # as in _get_connection: out for the drain while it connects
    library: Any = type(pool)
    try:
        if args or options:  # as in _get_connection: a plain call when there is nothing to pass on
            connection = await library.get_connection(pool, *args, **options)
        else:
            connection = await library.get_connection(pool)
    except BaseException:
        keeper.end_checkout()
        raise
    if not keeper.lend_checkout(connection):  # lend() and end_checkout() in one call
        await connection.disconnect()  # the sweep of idle connections may be over
        await library.release(pool, connection)
        raise keeper.refusal()
    driver = pool._pk_driver  # noqa: SLF001
    loop = driver.loop  # where the connections live: asked of asyncio only when that loop stopped
    if loop is None or not loop.is_running():
        driver.loop = asyncio.get_running_loop()  # on Python 3.11 a getpid() system call each time
    return connection


async def _release_async(pool: Any, connection: Any) -> None:
    try:
        await type(pool).release(pool, connection)
    finally:
        pool._pk_keeper.checkin(connection)  # noqa: SLF001


def _can_get_connection(pool: Any) -> bool:
    # The predicate asyncio BlockingConnectionPool's waiters re-check when notified: raising here
    # makes a woken waiter fail with the refusal before it takes or makes a connection.
    pool._pk_keeper.admit()  # noqa: SLF001
    return bool(type(pool).can_get_connection(pool))


#: The pool methods the keeper puts over the library's, per pool kind (set_methods(): instance
#: attributes, not a guarded subclass as ``__class__``, which would make every attribute read of
#: redis-py's own code on the pool slower).
_SYNC_GUARDS: dict[str, Callable[..., Any]] = {"get_connection": _get_connection, "release": _release}
_ASYNC_GUARDS: dict[str, Callable[..., Any]] = {
    "get_connection": _get_connection_async,
    "release": _release_async,
    "can_get_connection": _can_get_connection,
}
#: Everything _guard() sets on a pool, removed by detach().
_GUARD_ATTRIBUTES = ("_pk_keeper", "_pk_driver", "_pk_queue_window", *_ASYNC_GUARDS)


def _guard(pool: Any, driver: RedisDriver) -> None:
    """Route the pool's checkouts and returns through ``driver``'s keeper.

    The guards look the library's methods up on ``type(pool)`` at each call: a patch of
    ``ConnectionPool.get_connection`` made after wrapping (``mock.patch``) is then what runs, as
    it would for an unwrapped pool.
    """
    pool._pk_keeper = driver.keeper  # noqa: SLF001 -- read by the functions above
    pool._pk_driver = driver  # noqa: SLF001
    # The sync BlockingConnectionPool's queue lock window (see _QueueLockWindow), read by _release.
    pool._pk_queue_window = _QueueLockWindow() if isinstance(pool, BlockingConnectionPool) else None  # noqa: SLF001
    set_methods(pool, _ASYNC_GUARDS if driver.is_async else _SYNC_GUARDS)


def _is_guarded(pool: Any) -> bool:
    return getattr(pool, "_pk_driver", None) is not None


# -- sync BlockingConnectionPool: its queue refuses once the keeper stops lending -----------------

_refusing_queue_classes: dict[type[Any], type[Any]] = {}
_refusing_lock = threading.Lock()


def _refusing_get(q: Any) -> Any:
    raise q._pk_keeper.refusal()  # noqa: SLF001 -- set by _refuse_queue


def _refusing_queue_class(cls: type[Any]) -> type[Any]:
    """``cls`` (a ``queue.Queue``) made to look non-empty and to raise the refusal on every get."""
    with _refusing_lock:
        if cls not in _refusing_queue_classes:
            namespace = {"_qsize": lambda _q: 1, "_get": _refusing_get, "__module__": __name__}
            _refusing_queue_classes[cls] = type(f"Refusing{cls.__name__}", (cls,), namespace)
        return _refusing_queue_classes[cls]


class _QueueLockWindow:
    """The window in which this thread may hold a ``BlockingConnectionPool`` queue's plain lock.

    ``queue.Queue`` allocates while holding its lock (``Condition.notify`` builds a deque), so a
    collection may run there, and a finaliser that gives a connection back (``Pipeline.__del__``,
    ``PubSub.__del__``) would block for ever on the lock its own thread holds. Inside the window
    such a release is queued and runs when the thread leaves it, as the keeper's
    ``GcSafeLock`` does for its own lock. Only a per-thread depth: no lock of its own, so a
    thread may block in ``get()`` inside it.
    """

    __slots__ = ("_deferred", "_depth")

    def __init__(self) -> None:
        self._depth = _Depth()
        self._deferred: collections.deque[Callable[[], object]] = collections.deque()

    def __enter__(self) -> None:
        self._depth.value += 1

    def __exit__(self, *_exc: object) -> None:
        self._depth.value -= 1
        if self._deferred and not self._depth.value:
            while True:
                try:
                    call = self._deferred.popleft()
                except IndexError:  # empty, or another thread took the last one
                    return
                try:
                    call()
                except Exception:  # like an exception in a finaliser: logged, the rest still run
                    logger.exception("poolkeeper: a connection return deferred from a finaliser failed")

    @property
    def entered_here(self) -> bool:
        """True while this thread is inside the window."""
        return self._depth.value > 0

    def defer(self, call: Callable[[], object]) -> None:
        """Run ``call`` once this thread has left the window."""
        self._deferred.append(call)


class _Depth(threading.local):
    value = 0  # every thread's starting value


def _refuse_queue(pool: BlockingConnectionPool, keeper: Keeper) -> None:
    """Make the pool's queue refuse every ``get`` from now on and wake the threads blocked in it."""
    q: queue.Queue[Any] = pool.pool
    refusing_class = _refusing_queue_class(type(q))  # made before the queue's lock is taken
    window: _QueueLockWindow = pool._pk_queue_window  # type: ignore[attr-defined]  # noqa: SLF001 -- set by attach
    with window, q.not_empty:  # the queue's mutex, inside the window
        q._pk_keeper = keeper  # type: ignore[attr-defined]  # noqa: SLF001 -- read by _refusing_get
        q.maxsize = 0  # "looks non-empty" must not make release()'s put_nowait() raise Full
        q.__class__ = refusing_class
        q.not_empty.notify_all()


async def _wake_async_waiters(pool: AsyncBlockingConnectionPool) -> None:
    """Notify every task waiting on the pool's condition: each re-checks and meets the refusal."""
    async with pool._condition:  # noqa: SLF001 -- the condition its get_connection() waits on
        pool._condition.notify_all()  # noqa: SLF001


# -- sealing and cutting one connection -----------------------------------------------------------


def _innermost(connection: Any) -> Any:
    """The connection that owns the socket (a ``CacheProxyConnection`` wraps another)."""
    while (wrapped := getattr(connection, "_conn", None)) is not None:
        connection = wrapped
    return connection


def _seal(connection: Any, refuse: Callable[..., Any]) -> None:
    """Make every (re)connect of ``connection`` raise the refusal (sync and asyncio alike).

    An instance attribute shadows the class's method: every reconnect path of redis-py, from
    ``send_command`` to the pubsub's resubscribe, goes through ``_RECONNECT_DOOR``.
    """
    setattr(_innermost(connection), _RECONNECT_DOOR, refuse)


def _transport(connection: Any) -> Any:
    """What carries ``connection`` now: its socket (sync) or stream writer (asyncio); ``None`` if not connected."""
    inner = _innermost(connection)
    sock = getattr(inner, "_sock", None)  # sync connections
    return sock if sock is not None else getattr(inner, "_writer", None)  # asyncio connections


def _socket_fd(connection: Any) -> int | None:
    """The file descriptor of ``connection``'s socket, or ``None`` when it is not connected."""
    inner = _innermost(connection)
    sock = getattr(inner, "_sock", None)  # sync connections
    if sock is None:
        writer = getattr(inner, "_writer", None)  # asyncio connections
        sock = None if writer is None else writer.get_extra_info("socket")
    try:
        return None if sock is None else int(sock.fileno())
    except (OSError, ValueError):  # closed meanwhile
        return None


def _cut(connection: Any, refuse: Callable[..., Any]) -> None:
    """Seal ``connection``, then shut its socket down: a blocked read returns at once.

    Sealed first, so that the borrower's retry cannot reconnect in between. ``shutdown(2)``
    leaves the descriptor to its owner, who closes it on the error (see ``_abort``).
    """
    _seal(connection, refuse)
    fd = _socket_fd(connection)
    if fd is not None:
        shutdown_socket(fd)


def _retried_errors(pool: Pool) -> list[type[BaseException]]:
    """Every exception type the pool's connections retry (their ``Retry`` and ``retry_on_error``)."""
    kwargs = pool.connection_kwargs
    errors: list[Any] = list(kwargs.get("retry_on_error") or ())
    retries = [kwargs.get("retry")]
    retries.extend(getattr(connection, "retry", None) for connection in _connections(pool))
    for retry in retries:
        errors.extend(getattr(retry, "_supported_errors", ()))
    return [error for error in errors if isinstance(error, type)]


def _connections(pool: Pool) -> list[Any]:
    return [*_idle(pool), *_in_use(pool)]


def _idle(pool: Pool) -> list[Any]:
    return [connection for connection in _views(type(pool))[0](pool) if connection is not None]


def _in_use(pool: Pool) -> list[Any]:
    return list(_views(type(pool))[1](pool))


# -- the pool's connections, per version line (see the table at the top) ---------------------

View = tuple["Callable[[Any], Iterable[Any]]", "Callable[[Any], Iterable[Any]]"]


def _library_free(pool: Any) -> Iterable[Any]:
    return pool._get_free_connections()  # type: ignore[no-any-return]  # noqa: SLF001 -- sync 7.0+, asyncio 8.1+


def _library_in_use(pool: Any) -> Iterable[Any]:
    return pool._get_in_use_connections()  # type: ignore[no-any-return]  # noqa: SLF001


def _listed_free(pool: Any) -> Iterable[Any]:
    return list(pool._available_connections)  # noqa: SLF001 -- every ConnectionPool, 5.0+


def _listed_in_use(pool: Any) -> Iterable[Any]:
    return list(pool._in_use_connections)  # noqa: SLF001


def _queued_free(pool: Any) -> Iterable[Any]:
    return list(pool.pool.queue)  # the sync BlockingConnectionPool's slots (None: not made yet), 5.0+


def _queued_in_use(pool: Any) -> Iterable[Any]:
    free = {id(connection) for connection in _queued_free(pool)}
    return [connection for connection in list(pool._connections) if id(connection) not in free]  # noqa: SLF001


_LIBRARY_VIEW: View = (_library_free, _library_in_use)
_LISTED_VIEW: View = (_listed_free, _listed_in_use)
_QUEUED_VIEW: View = (_queued_free, _queued_in_use)


def _views(cls: type[Any]) -> View:
    """How to list the idle and the in-use connections of a pool of class ``cls``."""
    if hasattr(cls, "_get_free_connections") and hasattr(cls, "_get_in_use_connections"):
        return _LIBRARY_VIEW
    if issubclass(cls, BlockingConnectionPool):
        return _QUEUED_VIEW
    return _LISTED_VIEW


def _view_names(pool: Any) -> tuple[str, ...]:
    """The instance attributes the view of ``pool`` reads (none: the library's own methods)."""
    view = _views(type(pool))
    if view is _QUEUED_VIEW:
        return ("pool", "_connections")
    if view is _LISTED_VIEW:
        return ("_available_connections", "_in_use_connections")
    return ()


def _missing_names(pool: Any) -> list[str]:
    """The names this adapter needs that the installed redis-py (or this pool) lacks."""
    cls = type(pool)
    missing = [f"{cls.__name__}.{name}" for name in _view_names(pool) if not hasattr(pool, name)]
    if isinstance(pool, AsyncConnectionPool) and not hasattr(cls, "can_get_connection"):
        missing.append(f"{cls.__name__}.can_get_connection")
    if isinstance(pool, AsyncBlockingConnectionPool) and not hasattr(pool, "_condition"):
        missing.append(f"{cls.__name__}._condition")
    connection_class = getattr(pool, "connection_class", None)
    if connection_class is None:
        missing.append(f"{cls.__name__}.connection_class")
    elif not hasattr(connection_class, _RECONNECT_DOOR):
        missing.append(f"{connection_class.__name__}.{_RECONNECT_DOOR}")
    return missing


class RedisDriver(Driver):
    """Keeps the connection pool of one redis-py client (sync or asyncio)."""

    kind = "redis"
    refusal_class = RedisPoolClosedError

    def __init__(self, resource: Any, pool: Pool) -> None:
        super().__init__(resource)
        self.pool = pool
        self.is_async = isinstance(pool, AsyncConnectionPool)
        self.loop: asyncio.AbstractEventLoop | None = None
        # asyncio connections given back after the close, and the task closing them (see
        # connection_returned_after_close).
        self._late_returns: list[Any] = []
        self._late_closer: asyncio.Future[None] | None = None
        # Sockets (stream writers) the parent process opened (set in a forked child): never touched
        # here, as redis-py's own pid check leaves them. Held strongly so that their ids stay unique.
        self._inherited: dict[int, Any] = {}

    @property
    def home_loop(self) -> asyncio.AbstractEventLoop | None:
        """The loop of the last asyncio checkout (``None`` for sync clients)."""
        return self.loop

    def describe(self) -> str:
        """``redis://host:port/db`` (``rediss://`` with TLS, ``unix://path?db=N``), no credentials."""
        kwargs = self.pool.connection_kwargs
        db = kwargs.get("db", 0)
        if kwargs.get("path"):
            return f"unix://{kwargs['path']}?db={db}"
        tls = issubclass(self.pool.connection_class, (SSLConnection, AsyncSSLConnection))
        return f"{'rediss' if tls else 'redis'}://{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{db}"

    def secrets(self) -> tuple[str, ...]:
        """The password, the TLS key password and any other secret connect argument, to be scrubbed."""
        return tuple(dict.fromkeys(secret_values(self.pool.connection_kwargs)))

    def idle_count(self) -> int:
        """Connected connections in the pool's free list (disconnected ones kept for reuse do not count)."""
        is_connected = _async_is_connected if self.is_async else _sync_is_connected
        return sum(1 for connection in _idle(self.pool) if is_connected(connection))

    def _refuse_reconnect(self, *_args: Any, **_kwargs: Any) -> Any:
        raise self.keeper.refusal()

    def forget_inherited(self, borrowed: Sequence[Any]) -> None:
        """In a forked child: the parent's sockets, idle or in use, are never shut down or closed from here."""
        connections = [*_connections(self.pool), *borrowed, getattr(self.resource, "connection", None)]
        transports = (_transport(connection) for connection in connections if connection is not None)
        self._inherited.update((id(transport), transport) for transport in transports if transport is not None)
        self.loop = None  # the parent's event loop does not run here
        self._late_returns = []  # the parent's, on its loop
        self._late_closer = None

    def _own(self, connections: Iterable[Any]) -> list[Any]:
        """The connections of ``connections`` that are not on a socket the parent opened."""
        if not self._inherited:  # not a forked child: all of them (and no cost per connection)
            return list(connections)
        return [connection for connection in connections if id(_transport(connection)) not in self._inherited]

    # -- guards -------------------------------------------------------------------------------

    @property
    def managed_object(self) -> Any:
        """The client's connection pool: clients sharing a pool share its keeper."""
        return self.pool

    def attach(self, keeper: Keeper) -> None:
        """Guard the client's pool and count the connections already out; undone if that fails.

        Raises:
            RegistrationError: the pool is already managed, through another client.
            TypeError: a ``BlockingConnectionPool`` whose ``queue_class`` is not a ``queue.Queue``.
        """
        pool = self.pool
        if _is_guarded(pool):
            owner: Keeper = pool._pk_keeper  # type: ignore[union-attr]  # noqa: SLF001 -- set below, by its keeper
            raise RegistrationError(
                f"this {type(self.resource).__name__}'s connection pool is already managed by keeper "
                f"{owner.name!r}, through another client; clients that share a pool are refused together "
                "once it closes, so wrap only one of them"
            )
        if isinstance(pool, BlockingConnectionPool) and not isinstance(pool.pool, queue.Queue):
            raise TypeError(
                f"poolkeeper cannot guard a BlockingConnectionPool whose queue_class is "
                f"{type(pool.pool).__qualname__}; use a queue.Queue subclass (the default is LifoQueue)"
            )
        super().attach(keeper)
        try:
            self._warn_if_refusal_is_retried()
            _guard(pool, self)
            # Connections already out (a pubsub, the pinned connection of a single-connection
            # client) are borrows too: the drain waits for them, the force-close cuts them.
            for connection in _in_use(pool):
                keeper.lend(connection)
            if self.is_async:
                with contextlib.suppress(RuntimeError):  # no running loop: the first checkout tells
                    self.loop = asyncio.get_running_loop()
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        """Undo :meth:`attach` (used when registration fails halfway, and by ``unwrap()``)."""
        remove_attributes(self.pool, _GUARD_ATTRIBUTES)

    def _warn_if_refusal_is_retried(self) -> None:
        retried = [error for error in _retried_errors(self.pool) if issubclass(self.refusal_class, error)]
        if retried:
            logger.warning(
                "poolkeeper %r: this client retries %s, which includes poolkeeper's refusal (a redis.RedisError): once "
                "the keeper closes, a refused command is retried (for ever with retries=-1) instead of "
                "failing; retry redis.ConnectionError and redis.TimeoutError only",
                self.keeper.name,
                ", ".join(sorted({error.__name__ for error in retried})),
                extra={"poolkeeper_keeper": self.keeper.name},
            )

    # -- lifecycle ----------------------------------------------------------------------------

    def refuse(self) -> None:
        """Wake the threads or tasks queued in a ``BlockingConnectionPool`` (other pools queue nobody)."""
        pool = self.pool
        if isinstance(pool, BlockingConnectionPool):
            _refuse_queue(pool, self.keeper)
        elif isinstance(pool, AsyncBlockingConnectionPool):
            loop = self.loop
            if loop is not None and not loop.is_closed():  # None: never used, nobody waits
                with contextlib.suppress(RuntimeError):  # closed in between
                    asyncio.run_coroutine_threadsafe(_wake_async_waiters(pool), loop)

    async def force_close(self, borrows: Sequence[Borrow], timeout: float) -> None:  # noqa: ARG002 -- never waits
        """Seal each borrowed connection and shut its socket down; nothing here waits on the server.

        Redis has no statement to cancel: once the socket is shut down the server sees the
        client leave and drops it (and its ``BLPOP``) at once.
        """
        for connection in self._own(borrow.connection for borrow in borrows):
            _cut(connection, self._refuse_reconnect)

    def blocking_close(self) -> Callable[[], None] | None:
        """A sync client's close, run as soon as the drain ends (see Driver); ``None`` for an asyncio one."""
        return None if self.is_async else self._close_all

    async def close_connections(self) -> None:
        """Disconnect every idle connection and cut any still out; none of them reconnects."""
        if not self.is_async:
            await run_blocking(self._close_all, name="poolkeeper-redis-close")
            return
        loop = self.loop
        if loop is None:  # never used from a loop: no connection was ever opened
            return
        if loop.is_closed() or not loop.is_running():
            self._cut_all()  # no loop left to close the transports on: cut the sockets
            return
        await run_on_loop(loop, self._aclose_all())

    def _close_all(self) -> None:
        refuse = self._refuse_reconnect
        self._close_pinned()
        for connection in self._own(_in_use(self.pool)):
            _cut(connection, refuse)
        for connection in self._own(_idle(self.pool)):
            _seal(connection, refuse)
            connection.disconnect()

    def _cut_all(self) -> None:
        for connection in self._own(_connections(self.pool)):
            _cut(connection, self._refuse_reconnect)

    async def _aclose_all(self) -> None:
        refuse = self._refuse_reconnect
        await self._aclose_pinned()
        for connection in self._own(_in_use(self.pool)):
            _cut(connection, refuse)
        idle = self._own(_idle(self.pool))
        for connection in idle:
            _seal(connection, refuse)
        await _disconnect_all(idle)

    can_ping = True

    async def ping(self) -> None:
        """``PING`` on a side connection made with the pool's own class and arguments, then closed.

        Never a pool checkout: a pool whose every connection is borrowed is busy, not down.
        Once the keeper has started closing it raises ``PoolClosedError`` and opens nothing.
        """
        self.keeper.admit()
        pool = self.pool
        if self.is_async:

            async def ping_side() -> None:
                connection = pool.connection_class(**pool.connection_kwargs)
                try:
                    await connection.connect()
                    await connection.send_command("PING")
                    await connection.read_response()
                finally:
                    await connection.disconnect()

            await run_on_loop(self.loop, ping_side())
            return

        def ping_side_blocking() -> None:
            connection = pool.connection_class(**pool.connection_kwargs)
            try:
                connection.connect()
                connection.send_command("PING")
                connection.read_response()
            finally:
                connection.disconnect()

        await run_blocking(ping_side_blocking, name="poolkeeper-redis-ping")

    # A single-connection client holds its connection for its whole life; when no command is
    # using it (its lock is free), it is disconnected outright rather than only cut, so that the
    # next command meets the refusal at once instead of a broken pipe first.

    def _close_pinned(self) -> None:
        connection = getattr(self.resource, "connection", None)
        lock = _pinned_lock(self.resource)
        if connection is None or lock is None or not self._own([connection]) or not lock.acquire(blocking=False):
            return
        try:
            _seal(connection, self._refuse_reconnect)
            connection.disconnect()
        finally:
            lock.release()

    async def _aclose_pinned(self) -> None:
        connection = getattr(self.resource, "connection", None)
        lock = getattr(self.resource, "_single_conn_lock", None)
        if connection is None or lock is None or lock.locked() or not self._own([connection]):
            return
        _seal(connection, self._refuse_reconnect)
        await connection.disconnect(nowait=True)

    def connection_returned_after_close(self, connection: Any) -> None:
        """A forced borrower gave ``connection`` back once the sweep had begun: close that one.

        That one alone: thousands of forced borrowers come back one after another, and a sweep of
        the pool each would cost the square of their number (5,000 asyncio returns made about 12
        million disconnect tasks and ran the process out of memory).
        """
        if not self._own([connection]):  # a forked child's connection on the parent's socket
            return
        _seal(connection, self._refuse_reconnect)
        if not self.is_async:
            connection.disconnect()
            return
        # Returns that come while a batch is being closed join the next batch of the same task.
        if self._late_closer is None:
            try:
                self._late_closer = asyncio.ensure_future(self._close_late_returns())
            except RuntimeError:  # no running loop here (a finaliser in another thread): nothing can be awaited
                return
        self._late_returns.append(connection)

    async def _close_late_returns(self) -> None:
        try:
            while self._late_returns:
                batch, self._late_returns = self._late_returns, []
                await _disconnect_all(batch)
        finally:
            self._late_closer = None  # in the same step as the last look: no return falls between


async def _disconnect_all(connections: Iterable[Any]) -> None:
    # nowait: never wait for a close handshake; the caller bounds the time anyway.
    await asyncio.gather(*(connection.disconnect(nowait=True) for connection in connections), return_exceptions=True)


def make_driver(resource: Any) -> RedisDriver:
    """The driver for a ``redis.Redis`` or ``redis.asyncio.Redis`` client (it keeps the client's pool).

    Raises:
        UnsupportedResourceError: the installed redis-py lacks a name this adapter needs.
    """
    pool = getattr(resource, "connection_pool", None)
    if not isinstance(pool, (ConnectionPool, AsyncConnectionPool)):
        kind = "redis.Redis" if isinstance(resource, Redis) else "redis.asyncio.Redis"
        raise TypeError(
            f"expected {with_article(kind)} with a redis-py connection pool, "
            f"got a pool of type {type(pool).__qualname__}"
        )
    missing = _missing_names(pool)
    if missing:
        raise unsupported_version("redis-py", redis.__version__, SUPPORTED_VERSIONS, missing)
    return RedisDriver(resource, pool)
