"""The httpx keeper: ``Client`` and ``AsyncClient`` (also httpx2's, its successor with the same internals).

``wrap()`` returns the same client. Two kinds of instance attributes are added, nothing else
changes: the client's own ``send`` (every ``get``/``post``/``request``/``stream`` goes through
it), and, on the httpcore connection pool of each of the client's transports (its default
transport and every mounted one), its own ``handle_request`` / ``handle_async_request``, which
tells the borrow which pool request it is. So that:

* once closing starts, a new request raises :class:`~poolkeeper.PoolClosedError` at once;
* a request is borrowed from the moment it is sent until its response is closed: at once for a
  plain request (httpx reads the body inside ``send``), and for a streamed one (``stream=True``,
  ``client.stream(...)``) when ``close()``/``aclose()`` is called, the ``with`` block ends or
  the body is read to its end; a streamed response dropped unclosed comes back through the
  garbage collector (counted as a leak);
* requests queued inside httpcore's pool for a free connection (``Limits.max_connections``)
  when closing starts are woken at once with the refusal, and withdrawn (``Keeper.withdraw``):
  a refusal, not a borrow; requests already on a connection complete within the drain;
* at the deadline, every borrowed request's socket is shut down (``shutdown(2)``, which wakes
  a blocked reader or writer at once and waits for nothing from the peer): the caller gets
  :class:`httpx.NetworkError` saying poolkeeper force-closed it, from ``send`` or from its next
  read of a streamed body; a request still queued for a connection gets the same error, and an
  async one with no socket yet (still connecting) is interrupted through its task;
* the client is closed with ``Client.close()`` / ``AsyncClient.aclose()``, which closes every
  connection of every transport's pool.

Only transports poolkeeper can see into are accepted: ``HTTPTransport`` / ``AsyncHTTPTransport``
(and subclasses) over an httpcore pool, which is what ``Client(...)`` makes, with or without a
proxy, ``limits``, ``retries`` or ``http2``. Anything else (``MockTransport``, ``ASGITransport``,
``WSGITransport``, a third-party transport) is refused at wrap time: poolkeeper could refuse and
drain its requests, but not abort them at the deadline, which is the promise it would then break.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import contextvars
import functools
import importlib
import sys
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from poolkeeper._concurrency import run_blocking, run_on_loop
from poolkeeper.adapters._abort import shutdown_socket
from poolkeeper.adapters._base import Driver, unsupported_version
from poolkeeper.errors import PoolClosedError, UnsupportedResourceError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
    from types import ModuleType

    from poolkeeper._borrowers import Borrow
    from poolkeeper._keeper import Keeper

__all__ = ["Httpx2PoolClosedError", "HttpxDriver", "HttpxPoolClosedError", "make_driver"]  # noqa: F822 -- see __getattr__

# -- what this adapter reads from httpx and httpcore, per version line --------------------------
# Every name below but the public classes is private: httpx and httpcore offer no public access to
# the pool's queue or a connection's socket. They are checked when a client is wrapped; a missing
# one makes wrap() raise UnsupportedResourceError, never a shutdown fail halfway.
#
#   Client._transport, ._mounts                 httpx 0.18+  the transports a client sends through
#   HTTPTransport._pool                         httpx 0.18+  its httpcore pool (a ConnectionPool,
#                                                            or HTTPProxy / SOCKSProxy, subclasses)
#   ConnectionPool._requests,                   httpcore 1.0.3+  the pool's queue: PoolRequest
#     ._optional_thread_lock                                 (.request, .connection,
#                                                            .is_queued(), .assign_to_connection())
#   HTTPConnection._connection,                 httpcore 1.0+  down to the network stream, whose
#     HTTP11Connection / HTTP2Connection                     get_extra_info("socket") is public
#     ._network_stream
# httpx2 / httpcore2 (2.x) keep every one of these names.

#: The versions this adapter is tested with.
SUPPORTED_VERSIONS = {"httpx": ">=0.27.2 with httpcore >=1.0.5", "httpx2": ">=2.0 with httpcore2 >=2.0"}

_CLIENT_NAMES = ("_transport", "_mounts")
_POOL_NAMES = ("_requests", "_optional_thread_lock")
_POOL_REQUEST_METHODS = ("is_queued", "assign_to_connection")
# How deep a proxy's connection may nest connections before its network stream (tunnel -> HTTP/1.1).
_MAX_NESTING = 4


@dataclass(frozen=True)
class _Library:
    """One of the two libraries this adapter serves (httpx with httpcore, httpx2 with httpcore2)."""

    name: str
    version: str
    module: ModuleType
    core: ModuleType
    refusal_class: type[PoolClosedError]
    # The streamed body's wrappers, subclasses of the library's SyncByteStream / AsyncByteStream:
    # httpx checks a response's stream against them.
    sync_stream: type[_ReleasingStream]
    async_stream: type[_AsyncReleasingStream]


_libraries: dict[str, _Library] = {}


def _library(name: str) -> _Library:
    """The library ``name`` ("httpx" or "httpx2"), imported on first use, with its refusal class."""
    found = _libraries.get(name)
    if found is None:
        module = importlib.import_module(name)
        core = importlib.import_module("httpcore" if name == "httpx" else "httpcore2")
        refusal = type(
            "HttpxPoolClosedError" if name == "httpx" else "Httpx2PoolClosedError",
            (PoolClosedError, module.HTTPError, RuntimeError),
            {
                "__module__": __name__,
                "__doc__": f"A request refused by a closing keeper: also an ``{name}.HTTPError``, and a "
                "``RuntimeError`` as httpx raises on a closed client.",
            },
        )
        sync_stream = type("_ReleasingStream", (_ReleasingStream, module.SyncByteStream), {"__module__": __name__})
        async_stream = type(
            "_AsyncReleasingStream", (_AsyncReleasingStream, module.AsyncByteStream), {"__module__": __name__}
        )
        found = _libraries.setdefault(
            name, _Library(name, module.__version__, module, core, refusal, sync_stream, async_stream)
        )
    return found


def __getattr__(name: str) -> type[PoolClosedError]:
    """``HttpxPoolClosedError`` / ``Httpx2PoolClosedError``: the refusal classes, made when first asked for.

    Each subclasses its library's ``HTTPError``, so it exists only once that library is imported.
    """
    if name == "HttpxPoolClosedError":
        return _library("httpx").refusal_class
    if name == "Httpx2PoolClosedError":
        return _library("httpx2").refusal_class
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# The request being sent by the current thread or task: how a pool's guard finds its borrow.
_sending: contextvars.ContextVar[_Request | None] = contextvars.ContextVar("poolkeeper_httpx", default=None)


class _Request:
    """One ``send``, from the moment it is sent until its response is closed: the unit of borrow.

    It is also the borrow's holder (see ``Keeper.lend``): calling it answers ``None`` once its
    streamed response was dropped unclosed and collected.
    """

    __slots__ = ("__weakref__", "cancelled_at", "core_request", "forced", "refused", "response", "task")

    def __init__(self) -> None:
        # The httpcore request of the hop being sent now (set by the pool's guard): how refuse()
        # and force_close() find its place in the pool's queue.
        self.core_request: Any = None
        self.response: weakref.ref[Any] | None = None
        # Set by the force-close: makes the error the borrower gets instead of whatever the cut socket raised.
        self.forced: Callable[[], Exception] | None = None
        # Set by refuse() when it wakes the request in the pool's queue: it never had a connection.
        self.refused = False
        # An async request's task while it is inside send, and its cancellation count before the
        # force-close cancelled it (None: never cancelled by us).
        self.task: asyncio.Task[Any] | None = None
        self.cancelled_at: int | None = None

    def __call__(self) -> _Request | None:
        ref = self.response
        return self if ref is None or ref() is not None else None


class _Refusing:
    """Handed to a queued pool request in place of a connection: sending on it raises ``error()``.

    httpcore's pool then takes the request out of its queue as for any failure.
    """

    def __init__(self, error: Callable[[], BaseException]) -> None:
        self.error = error

    def handle_request(self, _request: Any) -> Any:
        raise self.error()

    async def handle_async_request(self, _request: Any) -> Any:
        raise self.error()


def _socket_of(connection: Any) -> int | None:
    """The file descriptor of the socket under an httpcore connection; ``None`` while it connects."""
    node = connection
    for _ in range(_MAX_NESTING):
        stream = getattr(node, "_network_stream", None)
        if stream is not None:
            sock = stream.get_extra_info("socket")
            with contextlib.suppress(OSError, ValueError):  # closed meanwhile
                fd = None if sock is None else int(sock.fileno())
                return None if fd is None or fd < 0 else fd
            return None
        node = getattr(node, "_connection", None)
        if node is None:
            return None
    return None


_CANCEL_MESSAGE = "poolkeeper force-close"

if sys.version_info >= (3, 11):

    def _cancel_count(task: asyncio.Task[Any]) -> int:
        return task.cancelling()

    def _uncancel(task: asyncio.Task[Any]) -> int:
        return task.uncancel()

else:  # no cancellation counting before 3.11: every cancellation after a force-close is ours

    def _cancel_count(task: asyncio.Task[Any]) -> int:  # noqa: ARG001 -- same signature as on 3.11+
        return 0

    def _uncancel(task: asyncio.Task[Any]) -> int:  # noqa: ARG001
        return 0


def _withdraw_cancel(task: asyncio.Task[Any] | None, cancelled_at: int) -> bool:
    """Take back the force-close's cancellation of ``task``; True if no one else cancelled it meanwhile.

    This is how ``asyncio.timeout`` tells its own cancellation apart from the task's other ones
    (the same as the aiohttp adapter's).
    """
    return task is None or _uncancel(task) <= cancelled_at


def _credentials(header: str) -> list[str]:
    """The credentials of an Authorization header: the token, and a Basic header's password."""
    scheme, _, token = header.strip().partition(" ")
    found = [token.strip()]
    if scheme.lower() == "basic":
        with contextlib.suppress(binascii.Error, ValueError):
            found.append(base64.b64decode(token.strip(), validate=True).decode("latin-1").partition(":")[2])
    return found


def _forced_error(library: _Library, name: str) -> Exception:
    error: Exception = library.module.NetworkError(
        f"poolkeeper {name!r} force-closed this request: the drain deadline passed before its response was closed"
    )
    return error


def _library_send(client: Any) -> Callable[..., Any]:
    """``client.send`` as the class has it now: a mock patched onto the class after wrapping still runs."""
    attribute = type(client).send
    bind = getattr(type(attribute), "__get__", None)
    return attribute if bind is None else bind(attribute, client, type(client))  # type: ignore[no-any-return]


class HttpxDriver(Driver):
    """Keeps one ``httpx.Client`` or ``httpx.AsyncClient`` (or httpx2's)."""

    kind = "httpx"

    def __init__(self, client: Any, library: _Library, pools: Sequence[Any]) -> None:
        super().__init__(client)
        self.client = client
        self.library = library
        self.is_async = isinstance(client, library.module.AsyncClient)
        self.pools = tuple(pools)
        # What a refused request raises: a PoolClosedError that is also httpx's (or httpx2's) own.
        self.refusal_class = library.refusal_class  # type: ignore[misc]  # a class per library, made on first use
        self.kind = library.name  # type: ignore[misc]  # "httpx" or "httpx2"
        # Requests sent and not yet closed: what refuse() looks for in the pools' queues.
        self.in_flight: set[_Request] = set()
        # The event loop an AsyncClient's connections live on: the loop of its latest request.
        self.loop: asyncio.AbstractEventLoop | None = None
        # In a forked child: the parent's connections and queued requests, kept (never closed).
        self._inherited: list[Any] = []

    @property
    def home_loop(self) -> asyncio.AbstractEventLoop | None:
        """The loop an ``AsyncClient`` sends its requests on; ``None`` for a ``Client`` or before any request."""
        return self.loop

    def describe(self) -> str:
        """The client's ``base_url`` without credentials or query, or ``"httpx Client"``."""
        base_url = self.client.base_url
        if not str(base_url):
            return f"{self.library.name} {type(self.client).__name__}"
        return str(base_url.copy_with(username=None, password=None, query=None, fragment=None))

    def secrets(self) -> tuple[str, ...]:
        """Passwords of the base URL, the client's auth and proxies, and its Authorization headers."""
        client = self.client
        found: list[str] = [client.base_url.password or ""]
        headers = [*client.headers.get_list("Authorization"), *client.headers.get_list("Proxy-Authorization")]
        header = getattr(client.auth, "_auth_header", None)  # BasicAuth keeps only the header it sends
        if isinstance(header, str):
            headers.append(header)
        password = getattr(client.auth, "_password", None)  # DigestAuth
        if isinstance(password, bytes):
            found.append(password.decode("utf-8", "replace"))
        for pool in self.pools:  # a proxy's credentials, as its pool sends them
            headers += [
                value.decode("latin-1")
                for name, value in getattr(pool, "_proxy_headers", ())
                if name.lower() == b"proxy-authorization"
            ]
        for value in headers:
            found += [value, *_credentials(value)]
        return tuple(dict.fromkeys(secret for secret in found if secret))

    def idle_count(self) -> int:
        """Keep-alive connections waiting in the transports' pools for reuse."""
        # list() copies in one step under the GIL: a request may add or drop connections meanwhile.
        return sum(1 for pool in self.pools for connection in list(pool._connections) if connection.is_idle())  # noqa: SLF001 -- pool.connections takes the pool's lock

    # -- guards -------------------------------------------------------------------------------

    def attach(self, keeper: Keeper) -> None:
        """Give the client its guarded ``send`` and each pool its guarded entry point."""
        super().attach(keeper)
        if self.client.is_closed:
            raise ValueError(f"resource: this {self.library.name} {type(self.client).__name__} is already closed")
        guard = self._async_send if self.is_async else self._sync_send
        vars(self.client)["send"] = guard(keeper)
        entry = "handle_async_request" if self.is_async else "handle_request"
        for pool in self.pools:
            vars(pool)[entry] = functools.partial(_noting_pool, pool, entry)

    def detach(self) -> None:
        """Give the client back its class's ``send`` and the pools their own entry point."""
        vars(self.client).pop("send", None)
        for pool in self.pools:
            vars(pool).pop("handle_async_request" if self.is_async else "handle_request", None)

    def _release(self, request: _Request) -> None:
        self.in_flight.discard(request)
        self.keeper.checkin(request)

    def _withdraw(self, request: _Request) -> None:
        self.in_flight.discard(request)
        self.keeper.withdraw(request)

    def _sync_send(self, keeper: Keeper) -> Callable[..., Any]:
        client, release, withdraw = self.client, self._release, self._withdraw
        lend, in_flight = keeper.lend, self.in_flight

        def send(request: Any, **options: Any) -> Any:
            call = _library_send(client)
            borrow = _Request()
            in_flight.add(borrow)  # before it is lent: refuse() must find it if it queues
            if not keeper.lending or not lend(borrow, borrow):
                in_flight.discard(borrow)
                raise keeper.refusal()
            token = _sending.set(borrow)
            try:
                response = call(request, **options)
            except BaseException as error:
                if borrow.refused:  # woken in the pool's queue: a refused checkout, never a borrow
                    withdraw(borrow)
                    raise
                release(borrow)
                if borrow.forced is not None:
                    raise borrow.forced() from error
                raise
            finally:
                _sending.reset(token)
            return self._hand_over(response, borrow, self.library.sync_stream)

        return send

    def _async_send(self, keeper: Keeper) -> Callable[..., Any]:
        client, release, withdraw = self.client, self._release, self._withdraw
        lend, in_flight = keeper.lend, self.in_flight

        async def send(request: Any, **options: Any) -> Any:
            call = _library_send(client)
            borrow = _Request()
            # The loop its connections live on: the loop of the latest request (a client moved to
            # a new loop, as across tests, leaves its old connections unusable anyway).
            self.loop = asyncio.get_running_loop()
            in_flight.add(borrow)  # before it is lent: refuse() must find it if it queues
            if not keeper.lending or not lend(borrow, borrow):
                in_flight.discard(borrow)
                raise keeper.refusal()
            token = _sending.set(borrow)
            borrow.task = task = asyncio.current_task()
            try:
                response = await call(request, **options)
            except BaseException as error:
                borrow.task = None
                if borrow.refused:  # woken in the pool's queue: a refused checkout, never a borrow
                    withdraw(borrow)
                    raise
                release(borrow)
                forced = borrow.forced
                if forced is None:
                    raise
                if borrow.cancelled_at is not None and not _withdraw_cancel(task, borrow.cancelled_at):
                    raise  # cancelled by someone else too: that cancellation goes on
                raise forced() from (None if isinstance(error, asyncio.CancelledError) else error)
            finally:
                _sending.reset(token)
            borrow.task = None
            forced = borrow.forced
            if forced is not None and borrow.cancelled_at is not None and _withdraw_cancel(task, borrow.cancelled_at):
                await response.aclose()  # the cancellation was swallowed inside: forced all the same
                release(borrow)
                raise forced()
            return self._hand_over(response, borrow, self.library.async_stream)

        return send

    def _hand_over(self, response: Any, borrow: _Request, stream_class: type[Any]) -> Any:
        """Give the caller its response: closed, the borrow ends; open (streamed), it ends when it closes."""
        if getattr(response, "is_closed", True):  # read inside send (or a mock answered): back in the pool
            self._release(borrow)
            return response
        release = functools.partial(self._release, borrow)
        borrow.response = weakref.ref(response)
        # A streamed response dropped unclosed is collected without closing its stream (httpx has
        # no finaliser): the borrow is returned then, and Keeper.checkin reports the leak.
        finalizer = weakref.finalize(response, release)
        response.stream = stream_class(response.stream, borrow, release, finalizer)
        return response

    # -- lifecycle ----------------------------------------------------------------------------

    def refuse(self) -> None:
        """Wake the requests queued in the pools for a free connection: they fail with the refusal."""
        requests = self.in_flight.copy()
        if not requests:
            return
        if not self.is_async:
            self._refuse_queued(requests)
            return
        loop = self.loop
        if loop is not None:  # queued requests live on the client's loop: woken there
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody is queued any more
                loop.call_soon_threadsafe(self._refuse_queued, requests)

    def _refuse_queued(self, requests: Iterable[_Request]) -> None:
        self._answer_queued(requests, self.keeper.refusal, refusing=True)

    def _answer_queued(
        self, requests: Iterable[_Request], error: Callable[[], BaseException], *, refusing: bool = False
    ) -> tuple[list[int], set[_Request]]:
        """Hand each queued request of ``requests`` a connection that raises ``error()``.

        Returns the sockets of the others, those already on a connected connection, and every
        request reached either way.
        """
        ours = {id(request.core_request): request for request in requests if request.core_request is not None}
        sockets: list[int] = []
        reached: set[_Request] = set()
        for pool in self.pools:
            with pool._optional_thread_lock:  # noqa: SLF001 -- what httpcore's pool holds to change its queue
                for pool_request in list(pool._requests):  # noqa: SLF001
                    request = ours.get(id(pool_request.request))
                    if request is None:
                        continue
                    if pool_request.is_queued():
                        request.refused = refusing
                        pool_request.assign_to_connection(_Refusing(error))
                        reached.add(request)
                        continue
                    fd = _socket_of(pool_request.connection)
                    if fd is not None:
                        sockets.append(fd)
                        reached.add(request)
        return sockets, reached

    async def force_close(self, borrows: Sequence[Borrow], timeout: float) -> None:  # noqa: ARG002 -- aborting never waits
        """Shut down the sockets of the borrowed requests; wake those still queued with the error.

        An async request with no socket yet (still connecting, or between two hops) is
        interrupted through its task, the way ``asyncio.timeout`` does it.
        """
        requests = [borrow.connection for borrow in borrows if isinstance(borrow.connection, _Request)]
        error = functools.partial(_forced_error, self.library, self.keeper.name)
        for request in requests:
            request.forced = error  # before the sockets go: the borrower's error is told apart by it
        if self.is_async:
            sockets = await run_on_loop(self.loop, self._abort_async(requests, error))
        else:
            sockets, _ = self._answer_queued(requests, error)
        for fd in sockets:
            shutdown_socket(fd)  # the borrower's read or write fails at once; httpcore then closes it

    async def _abort_async(self, requests: Sequence[_Request], error: Callable[[], BaseException]) -> list[int]:
        # A coroutine only to run on the client's loop, where its queued requests and tasks are.
        sockets, reached = self._answer_queued(requests, error)
        for request in requests:
            task = request.task
            if task is not None and request not in reached and request.cancelled_at is None:
                request.cancelled_at = _cancel_count(task)
                task.cancel(_CANCEL_MESSAGE)
        return sockets

    def forget_inherited(self, borrowed: Sequence[Any]) -> None:  # noqa: ARG002 -- the pools hold them all
        """In a forked child: the parent's connections, idle or in use, are dropped from the pools, never closed.

        They stay referenced here (no ``ResourceWarning``, no close on a socket the parent uses);
        the child opens connections of its own, which closing the client closes.
        """
        for pool in self.pools:
            self._inherited += [*pool._connections, *pool._requests]  # noqa: SLF001 -- see the table above
            pool._connections = []  # noqa: SLF001 -- no lock: no other thread exists right after a fork
            pool._requests = []  # noqa: SLF001
        self.in_flight.clear()
        self.loop = None  # the parent's event loop does not run here

    def blocking_close(self) -> Callable[[], None] | None:
        """A sync client's close, run as soon as the drain ends (see Driver); ``None`` for an async one."""
        return None if self.is_async or self.client.is_closed else self.client.close

    async def close_connections(self) -> None:
        """Close the client: every transport, and every connection of their pools."""
        if self.client.is_closed:
            return
        if self.is_async:
            await run_on_loop(self.loop, self.client.aclose())
        else:
            await run_blocking(self.client.close, name="poolkeeper-httpx-close")


def _noting_pool(pool: Any, entry: str, request: Any) -> Any:
    """A pool's ``handle_request`` / ``handle_async_request``: note which request the current send is at.

    A hop (a redirect, an auth retry) sent after the force-close is refused here: it would open
    a connection the force-close has already passed over.
    """
    borrow = _sending.get()
    if borrow is not None:
        if borrow.forced is not None:
            raise borrow.forced()
        borrow.core_request = request
    # Looked up on the class at each request: a patch made after wrapping still applies.
    return getattr(type(pool), entry)(pool, request)


class _ReleasingStream:
    """A streamed response's body: closing it ends the borrow; a read cut by the force-close says so."""

    def __init__(self, stream: Any, borrow: _Request, release: Callable[[], None], finalizer: Any) -> None:
        self._stream = stream
        self._borrow = borrow
        self._release = release
        self._finalizer = finalizer

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._stream
        except Exception as error:
            forced = self._borrow.forced
            if forced is not None:
                raise forced() from error
            raise

    def close(self) -> None:
        try:
            self._stream.close()
        finally:
            self._finalizer.detach()
            self._release()


class _AsyncReleasingStream:
    """The async twin of :class:`_ReleasingStream`."""

    def __init__(self, stream: Any, borrow: _Request, release: Callable[[], None], finalizer: Any) -> None:
        self._stream = stream
        self._borrow = borrow
        self._release = release
        self._finalizer = finalizer

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._stream:
                yield chunk
        except Exception as error:
            forced = self._borrow.forced
            if forced is not None:
                raise forced() from error
            raise

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            self._finalizer.detach()
            self._release()


def _transports(client: Any) -> list[Any]:
    """Every transport a client sends through: its own and the mounted ones (``None`` mounts send nothing)."""
    return [client._transport, *(t for t in client._mounts.values() if t is not None)]  # noqa: SLF001 -- see the table above


def make_driver(resource: Any) -> HttpxDriver:
    """The driver for an ``httpx.Client`` / ``httpx.AsyncClient`` (or httpx2's).

    Raises:
        UnsupportedResourceError: the client sends through a transport poolkeeper cannot see
            into, or the installed httpx / httpcore lacks a name this adapter needs.
    """
    # The library whose Client / AsyncClient the object is (or subclasses: an application's own).
    names = [cls.__module__.split(".")[0] for cls in type(resource).__mro__]
    library = _library(next((name for name in names if name in SUPPORTED_VERSIONS), names[0]))
    module = library.module
    if not isinstance(resource, (module.Client, module.AsyncClient)):
        raise TypeError(f"expected an {library.name} Client or AsyncClient, got {type(resource).__qualname__}")
    is_async = isinstance(resource, module.AsyncClient)
    label = f"{library.name} {'AsyncClient' if is_async else 'Client'}"
    missing = [f"Client.{name}" for name in _CLIENT_NAMES if not hasattr(resource, name)]
    if missing:
        raise unsupported_version(library.name, library.version, SUPPORTED_VERSIONS[library.name], missing)
    transport_class = module.AsyncHTTPTransport if is_async else module.HTTPTransport
    pool_class = library.core.AsyncConnectionPool if is_async else library.core.ConnectionPool
    pools = []
    for transport in _transports(resource):
        pool = getattr(transport, "_pool", None)
        if not isinstance(transport, transport_class) or not isinstance(pool, pool_class):
            raise UnsupportedResourceError(
                f"poolkeeper cannot wrap this {label}: it sends through "
                f"{type(transport).__module__}.{type(transport).__qualname__}, whose connections poolkeeper "
                f"cannot see, so it could not abort them at the deadline; poolkeeper supports clients whose "
                f"transports are {library.name}.{transport_class.__name__} (the default, with any limits, "
                "retries, proxy or http2)"
            )
        pools.append(pool)
    request_name = "AsyncPoolRequest" if is_async else "PoolRequest"
    pool_module = f"{library.core.__name__}.{'_async' if is_async else '_sync'}.connection_pool"
    pool_request = getattr(importlib.import_module(pool_module), request_name, None)
    missing = [f"{pool_class.__name__}.{name}" for name in _POOL_NAMES if not all(hasattr(p, name) for p in pools)]
    missing += [f"{request_name}.{name}" for name in _POOL_REQUEST_METHODS if not hasattr(pool_request, name)]
    if missing:
        installed = f"{library.version} (with {library.core.__name__} {getattr(library.core, '__version__', '?')})"
        raise unsupported_version(library.name, installed, SUPPORTED_VERSIONS[library.name], missing)
    return HttpxDriver(resource, library, pools)
