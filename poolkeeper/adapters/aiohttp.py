"""The aiohttp keeper: ``ClientSession``.

``wrap()`` returns the same session. One attribute of the instance is added: its own
``_request``, the coroutine every ``get``/``post``/``request``/``ws_connect`` goes through,
guarded so that:

* once closing starts, a new request raises :class:`~poolkeeper.PoolClosedError` at once;
* a request is borrowed from the moment it is sent until its response is released: by
  ``async with``, ``release()``, ``close()``, reading the body to its end (aiohttp then gives the
  connection back by itself), closing a websocket, or the garbage collector (counted as a leak);
  the count is made where aiohttp gives the connection back to its connector
  (``Connection.add_callback``), so the closer wakes as soon as the last one is back;
* requests already sent when closing starts complete, including those queued inside the
  connector for a free connection: they were sent before shutdown began, so nothing is
  queued *before* admission and there is nobody for ``refuse()`` to wake;
* at the deadline, a request still inside ``_request`` (connecting, queued for a connection,
  sending, awaiting headers) is interrupted the way ``asyncio.timeout`` does it and its caller
  gets :class:`aiohttp.ClientConnectionError`; a response whose body is still being read gets
  the same error on its next read and its socket is aborted;
* the session is closed with ``ClientSession.close()``: its connector too when the session
  owns it, so nothing warns about an unclosed session or connector afterwards.

A response dropped unread is kept alive by aiohttp's own protocol until its body ends, so it
comes back by itself when the server finishes; a body that never ends is force-closed at the
deadline.
"""

from __future__ import annotations

import asyncio
import functools
import sys
import weakref
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import BasicAuth, ClientConnectionError, ClientResponse, ClientSession, hdrs
from aiohttp.connector import Connection
from yarl import URL

from poolkeeper._concurrency import run_on_loop
from poolkeeper.adapters._base import Driver, unsupported_version
from poolkeeper.errors import PoolClosedError

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine, Sequence

    from poolkeeper._borrowers import Borrow
    from poolkeeper._keeper import Keeper

__all__ = ["AiohttpDriver", "AiohttpPoolClosedError", "make_driver"]

_CANCEL_MESSAGE = "poolkeeper force-close"

# -- what this adapter reads from aiohttp, per version line ----------------------------------
# Every name below is private: aiohttp offers no public accessor for it. Class-level names are
# resolved here, at import; the connector's instance attributes when a session is wrapped. A
# missing one makes wrap() raise UnsupportedResourceError, never a shutdown fail halfway.
#
#   ClientSession._request              3.9+  the coroutine every request goes through; looked up
#                                             on the class at each request, so that a patch made
#                                             after wrapping (mock.patch, aioresponses) applies
#   ClientSession._loop, ._base_url     3.9+  (listed in ClientSession.ATTRS)
#   ClientSession._default_proxy,       3.11+ the session-wide proxy; before 3.11 a session has no
#     ._default_proxy_auth                    proxy of its own, so there are no proxy credentials
#   ClientResponse._connection, ._closed 3.9+ (class-level defaults)
#   Connection.add_callback, .transport 3.9+
#   BaseConnector._acquired, ._conns    3.9+  (instance attributes: checked at wrap time)

#: The aiohttp versions this adapter is tested with.
SUPPORTED_VERSIONS = ">=3.9.5"

_SESSION_NAMES = ("_loop", "_base_url")
_PROXY_NAMES = ("_default_proxy", "_default_proxy_auth")
_CONNECTOR_NAMES = ("_acquired", "_conns")
# The attribute names a session may have (3.9+); aiohttp's debug mode warns about any other.
_SESSION_ATTRS: frozenset[str] = getattr(ClientSession, "ATTRS", frozenset())
_CLASS_NAMES = (
    (ClientSession, "_request"),
    (ClientResponse, "_connection"),
    (ClientResponse, "_closed"),
    (Connection, "add_callback"),
    (Connection, "transport"),
)

if set(_PROXY_NAMES) <= _SESSION_ATTRS:  # aiohttp 3.11+

    def _session_proxy(session: ClientSession) -> tuple[Any, Any]:
        """The session-wide proxy URL and its ``BasicAuth`` (``None`` when unset)."""
        return session._default_proxy, session._default_proxy_auth  # noqa: SLF001 -- no public accessor

else:  # aiohttp 3.9, 3.10: proxies are per request only

    def _session_proxy(session: ClientSession) -> tuple[Any, Any]:  # noqa: ARG001 -- same signature as on 3.11+
        """No session-wide proxy before aiohttp 3.11."""
        return None, None


def _missing_names(session: ClientSession) -> list[str]:
    """The private names this adapter needs that the installed aiohttp (or this session) lacks."""
    missing = [f"ClientSession.{name}" for name in _SESSION_NAMES if name not in _SESSION_ATTRS]
    missing += [f"{cls.__name__}.{name}" for cls, name in _CLASS_NAMES if not hasattr(cls, name)]
    connector = session.connector
    if connector is not None:
        missing += [f"{type(connector).__name__}.{name}" for name in _CONNECTOR_NAMES if not hasattr(connector, name)]
    return missing


def _library_request(session: ClientSession) -> Callable[..., Coroutine[Any, Any, Any]]:
    """``session._request`` as the class has it now, bound as normal attribute lookup would bind it.

    Read at each request: the instance attribute holding the guard shadows the class's, and a
    mock patched onto the class after wrapping must still be what runs. A plain mock is not a
    descriptor: like an unwrapped session, it is called without the session.
    """
    attribute = type(session)._request  # noqa: SLF001 -- see the table above
    bind = getattr(type(attribute), "__get__", None)
    return attribute if bind is None else bind(attribute, session, type(session))


class AiohttpPoolClosedError(PoolClosedError, RuntimeError):
    """A request refused by a closing keeper; a ``RuntimeError``, what aiohttp raises on a closed session."""


class _InFlight:
    """One request, from the moment it is sent until its response is released: the unit of borrow.

    It is also the borrow's holder (see ``Keeper.lend``): calling it answers ``None`` once the
    response was released by the garbage collector rather than by its holder.
    """

    __slots__ = ("cancelled_at", "connection", "response", "task")

    def __init__(self, task: asyncio.Task[Any] | None) -> None:
        # Set while the request is inside ClientSession._request, the only place it can be
        # suspended then: a force-close interrupts it through its task.
        self.task = task
        # Set when _request returned a response whose connection is still in use.
        self.connection: Connection | None = None
        self.response: weakref.ref[ClientResponse] | None = None
        # The task's cancellation count before a force-close cancelled it (None: never forced).
        self.cancelled_at: int | None = None

    def __call__(self) -> _InFlight | None:
        ref = self.response
        if ref is None:
            return self
        response = ref()
        # Every release path sets _closed first; only ClientResponse.__del__ releases an open one.
        return None if response is None or not response._closed else self  # noqa: SLF001 -- no public flag


def _forced_error(name: str) -> ClientConnectionError:
    return ClientConnectionError(
        f"poolkeeper {name!r} force-closed this request: the drain deadline passed before its response was released"
    )


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

    This is how ``asyncio.timeout`` tells its own cancellation apart from the task's other ones.
    """
    return task is None or _uncancel(task) <= cancelled_at


def _guarded_request(session: ClientSession, driver: AiohttpDriver) -> Callable[..., Coroutine[Any, Any, Any]]:
    """The ``_request`` of ``session``'s class, wrapped in the keeper's borrow accounting."""
    keeper = driver.keeper
    checkin = keeper.checkin

    async def _request(method: str, str_or_url: Any, **kwargs: Any) -> ClientResponse:
        keeper.admit()
        task = asyncio.current_task()
        request = _InFlight(task)
        if not keeper.lend(request, request):
            raise keeper.refusal()
        try:
            response: ClientResponse = await _library_request(session)(method, str_or_url, **kwargs)
        except BaseException as error:
            request.task = None
            checkin(request)
            if request.cancelled_at is not None and _withdraw_cancel(task, request.cancelled_at):
                cause = None if isinstance(error, asyncio.CancelledError) else error
                raise _forced_error(keeper.name) from cause
            raise
        request.task = None
        if request.cancelled_at is not None and _withdraw_cancel(task, request.cancelled_at):  # swallowed inside
            response.close()
            checkin(request)
            raise _forced_error(keeper.name)
        # None once aiohttp gave it back; not a ClientResponse: a mock answered, no connection was used.
        connection = response._connection if isinstance(response, ClientResponse) else None  # noqa: SLF001
        if connection is None:  # the body was complete on arrival: already back in the pool
            checkin(request)
        else:
            request.connection = connection
            request.response = weakref.ref(response)
            connection.add_callback(functools.partial(checkin, request))
        return response

    return _request


class AiohttpDriver(Driver):
    """Keeps one ``aiohttp.ClientSession``."""

    kind = "aiohttp"
    refusal_class = AiohttpPoolClosedError

    def __init__(self, session: ClientSession) -> None:
        super().__init__(session)
        self.session = session

    @property
    def home_loop(self) -> asyncio.AbstractEventLoop:
        """The loop the session was made on."""
        return self.session._loop  # noqa: SLF001 -- the public .loop property is deprecated and warns

    def describe(self) -> str:
        """The session's ``base_url`` without credentials or query, or ``"aiohttp ClientSession"``."""
        base_url = self.session._base_url  # noqa: SLF001 -- no public accessor
        if base_url is None:
            return "aiohttp ClientSession"
        return str(base_url.with_user(None).with_query(None).with_fragment(None))

    def secrets(self) -> tuple[str, ...]:
        """Passwords of the session's auth, proxy auth, base and proxy URLs, and its Authorization headers."""
        session = self.session
        found: list[str] = []
        proxy, proxy_auth = _session_proxy(session)
        for auth in (session.auth, proxy_auth):
            if isinstance(auth, BasicAuth):
                header = auth.encode()  # "Basic <base64>", as sent
                found += [header, header.partition(" ")[2], auth.password]
        for url in (session._base_url, proxy):  # noqa: SLF001 -- no public accessor
            if url is not None:
                found.append(URL(url).password or "")
        for name in (hdrs.AUTHORIZATION, hdrs.PROXY_AUTHORIZATION):
            for value in session.headers.getall(name, ()):
                found += [value, value.partition(" ")[2].strip()]  # the header, and its credentials alone
        return tuple(dict.fromkeys(secret for secret in found if secret))

    def idle_count(self) -> int:
        """Keep-alive connections waiting in the session's connector for reuse."""
        connector = self.session.connector  # None once the session is closed
        if connector is None:
            return 0
        # list() copies the values in one step under the GIL: the loop may add or drop hosts meanwhile.
        return sum(len(connections) for connections in list(connector._conns.values()))  # noqa: SLF001 -- no public count

    # -- guards -------------------------------------------------------------------------------

    def attach(self, keeper: Keeper) -> None:
        """Give the session its guarded ``_request``; nothing is left behind if that fails."""
        super().attach(keeper)
        if self.session.closed:
            raise ValueError("resource: this aiohttp ClientSession is already closed")
        # Written into the instance's __dict__: ClientSession.__setattr__ warns about unknown
        # attributes in aiohttp's debug mode, and an instance attribute shadows the method.
        vars(self.session)["_request"] = _guarded_request(self.session, self)

    def detach(self) -> None:
        """Give the session back its class's own ``_request``."""
        vars(self.session).pop("_request", None)

    # -- lifecycle ----------------------------------------------------------------------------

    def refuse(self) -> None:
        """Nothing to wake: a request waits only after it was admitted, and then it is in flight."""

    async def force_close(self, borrows: Sequence[Borrow], timeout: float) -> None:  # noqa: ARG002 -- aborting never waits
        """Interrupt requests still being sent, abort the sockets of responses still being read."""
        requests = [borrow.connection for borrow in borrows if isinstance(borrow.connection, _InFlight)]
        await run_on_loop(self.home_loop, self._abort(requests))

    async def _abort(self, requests: Sequence[_InFlight]) -> None:
        # A coroutine only to run on the session's loop: nothing here awaits.
        name = self.keeper.name
        connector = self.session.connector
        if connector is not None and self.session.connector_owner:
            # Every connection in use in a connector this session owns belongs to a request being
            # forced. Abort them first: a request cancelled while still sending its body is closed
            # by aiohttp with transport.close(), which waits for the write buffer to drain, and to
            # a peer that stopped reading it never does.
            for protocol in list(connector._acquired):  # noqa: SLF001 -- no public view of connections in use
                transport = getattr(protocol, "transport", None)
                if transport is not None:
                    transport.abort()
        for request in requests:
            task = request.task
            if task is not None:
                # Still inside _request, wherever it waits (DNS, connect, a free connection,
                # headers): interrupted like asyncio.timeout does; the guard turns it into an error.
                if request.cancelled_at is None:
                    request.cancelled_at = _cancel_count(task)
                    task.cancel(_CANCEL_MESSAGE)
                continue
            connection = request.connection
            if connection is None:
                continue
            ref, request.response = request.response, None  # released by us, not the garbage collector
            response = None if ref is None else ref()
            if response is not None and response.content.exception() is None:
                response.content.set_exception(_forced_error(name))  # the reader fails on its next read
            transport = connection.transport
            if transport is not None:
                transport.abort()  # no goodbye to a peer that may never answer
            connection.close()  # frees its connector slot and counts the return

    async def close_connections(self) -> None:
        """Close the session (and its connector, when the session owns it) on the session's loop."""
        if self.session.closed:  # closed by its owner already: its loop may even be gone
            return
        await run_on_loop(self.home_loop, self.session.close())


def make_driver(resource: Any) -> AiohttpDriver:
    """The driver for an ``aiohttp.ClientSession``.

    Raises:
        UnsupportedResourceError: the installed aiohttp lacks a name this adapter needs.
    """
    if not isinstance(resource, ClientSession):
        raise TypeError(f"expected an aiohttp ClientSession, got {type(resource).__qualname__}")
    missing = _missing_names(resource)
    if missing:
        raise unsupported_version("aiohttp", aiohttp.__version__, SUPPORTED_VERSIONS, missing)
    return AiohttpDriver(resource)
