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
import inspect
import sys
import weakref
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import BasicAuth, ClientConnectionError, ClientResponse, ClientSession, WSMessage, WSMsgType, hdrs
from aiohttp.connector import Connection
from yarl import URL

from poolkeeper._concurrency import run_on_loop
from poolkeeper.adapters._base import Driver, unsupported_version
from poolkeeper.errors import PoolClosedError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine, Sequence

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
#   ClientSession._loop, ._base_url,    3.9+  (listed in ClientSession.ATTRS)
#     ._request_class                         the request class, swapped for a subclass whose
#                                             send() records the connection a request is sent on
#   ClientRequest.send                  3.9+  (called by that subclass)
#   ResponseHandler._payload            3.9+  a websocket's message queue, where a force-close
#                                             queues its error for the receiver: a
#                                             FlowControlDataQueue before 3.11, then a
#                                             WebSocketDataQueue (looked up with getattr: a
#                                             missing one only loses the error's text)
#   ClientSession._default_proxy,       3.11+ the session-wide proxy; before 3.11 a session has no
#     ._default_proxy_auth                    proxy of its own, so there are no proxy credentials
#   ClientResponse._connection, ._closed 3.9+ (class-level defaults)
#   Connection.add_callback, .transport 3.9+
#   BaseConnector._acquired, ._conns    3.9+  (instance attributes: checked at wrap time)

#: The aiohttp versions this adapter is tested with.
SUPPORTED_VERSIONS = ">=3.9.5"

_SESSION_NAMES = ("_loop", "_base_url", "_request_class")
_PROXY_NAMES = ("_default_proxy", "_default_proxy_auth")
_CONNECTOR_NAMES = ("_acquired", "_conns")
# The class of a websocket's message queue: FlowControlDataQueue (3.9, 3.10), WebSocketDataQueue (3.11+).
_WEBSOCKET_QUEUES = frozenset({"FlowControlDataQueue", "WebSocketDataQueue"})
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

    It is also the connection's release callback (``Connection.add_callback``): calling it ends
    the borrow, as a return by the garbage collector (a leak) when the response was released by
    ``ClientResponse.__del__`` rather than by its holder. Being the callback itself, rather than
    giving aiohttp a bound method of it, saves 64 bytes per request in flight.
    """

    __slots__ = ("cancelled_at", "connection", "keeper", "response", "sending", "task")

    def __init__(self, keeper: Keeper, task: asyncio.Task[Any] | None) -> None:
        self.keeper = keeper
        # Set while the request is inside ClientSession._request, the only place it can be
        # suspended then: a force-close interrupts it through its task.
        self.task = task
        # Set when _request returned a response whose connection is still in use.
        self.connection: Connection | None = None
        # The connection the request is being sent on, while still inside _request (see
        # _recording_request_class): the force-close aborts it whoever owns the connector.
        self.sending: Connection | None = None
        self.response: weakref.ref[ClientResponse] | None = None
        # The task's cancellation count before a force-close cancelled it (None: never forced).
        self.cancelled_at: int | None = None

    def __call__(self) -> None:
        """The connection was released: the borrow ends."""
        ref = self.response
        response = None if ref is None else ref()
        # Every release path sets _closed first; only ClientResponse.__del__ releases an open one.
        if ref is not None and (response is None or not response._closed):  # noqa: SLF001 -- no public flag
            self.keeper.checkin_collected(self)
        else:
            self.keeper.checkin(self)


# The request being sent by each task's _request: how the session's request class finds which
# borrow the connection it is given belongs to. A dict by task rather than a context variable:
# setting and resetting one leaves two new mappings (about 256 bytes) in the task's context for as
# long as the task lives, for every request it made; an entry here is gone once the request is sent.
_in_flight: dict[asyncio.Task[Any] | None, _InFlight] = {}
_recording_classes: dict[type[Any], type[Any]] = {}


def _recording_request_class(cls: type[Any]) -> type[Any]:
    """A subclass of the request class ``cls`` that tells the borrow which connection it is sent on.

    Without it, the force-close knows the connections in use only when the session owns its
    connector (then all of them are its own); a session on a shared connector would leave a
    request stuck sending to a peer that stopped reading with its socket open.
    """
    if not isinstance(cls, type) or cls in _recording_classes.values():
        return cls  # not a class (a factory, a mock): nothing to subclass; or already recording
    if cls not in _recording_classes:

        async def send(self: Any, conn: Connection) -> Any:
            request = _in_flight.get(asyncio.current_task())
            if request is not None:
                request.sending = conn
            return await cls.send(self, conn)

        namespace = {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "send": send}
        _recording_classes.setdefault(cls, type(cls.__name__, (cls,), namespace))
    return _recording_classes[cls]


def _abort_sending(request: _InFlight) -> None:
    """Abort the socket a request is still being sent on, if any.

    aiohttp closes the connection of a cancelled request with ``transport.close()``, which waits
    for the write buffer to drain: to a peer that stopped reading, it never does.
    """
    sending = request.sending
    if sending is not None and sending.transport is not None:
        sending.transport.abort()


def _tell_websocket(connection: Connection, error: ClientConnectionError) -> None:
    """Queue ``error`` for the receiver of a websocket on ``connection``, as aiohttp queues its own errors.

    Without it the receiver wakes on the aborted socket and reports whatever failed next (a
    close frame it could not write), not why its websocket was closed.
    """
    protocol = connection.protocol
    queue = getattr(protocol, "_payload", None)  # the websocket's message queue once upgraded
    if type(queue).__name__ in _WEBSOCKET_QUEUES:
        queue.feed_data(WSMessage(WSMsgType.ERROR, error, None), 0)  # type: ignore[union-attr]


def _discard(library_call: Awaitable[Any]) -> None:
    """Close a request coroutine that will never run (its request was refused): no "never awaited" warning."""
    close = getattr(library_call, "close", None)
    if inspect.iscoroutine(library_call) and close is not None:
        close()


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

    def _request(method: str, str_or_url: Any, **kwargs: Any) -> Any:
        # The class's own _request is called now, as an unwrapped session calls it: a mock patched
        # onto the class after wrapping sees the call at once, even one nobody awaits (a plain
        # MagicMock, as aiohttp's own tests use). Calling a coroutine function runs none of it.
        library_call: Any = _library_request(session)(method, str_or_url, **kwargs)  # a mock may return anything
        if not inspect.isawaitable(library_call):
            return library_call  # a mock answered synchronously: no connection, no borrow
        return _borrowed(library_call)

    async def _borrowed(library_call: Awaitable[ClientResponse]) -> ClientResponse:
        task = asyncio.current_task()
        request = _InFlight(keeper, task)
        if not keeper.lending or not keeper.lend(request):  # no holder: the release callback tells
            _discard(library_call)
            raise keeper.refusal()
        outer = _in_flight.get(task)  # a request made inside another's _request (a trace callback's)
        _in_flight[task] = request
        try:
            response: ClientResponse = await library_call
        except BaseException as error:
            request.task = request.sending = None
            checkin(request)
            if request.cancelled_at is not None and _withdraw_cancel(task, request.cancelled_at):
                cause = None if isinstance(error, asyncio.CancelledError) else error
                raise _forced_error(keeper.name) from cause
            raise
        finally:
            if outer is None:
                _in_flight.pop(task, None)
            else:
                _in_flight[task] = outer
        request.task = request.sending = None
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
            connection.add_callback(request)
        return response

    return _request


class AiohttpDriver(Driver):
    """Keeps one ``aiohttp.ClientSession``."""

    kind = "aiohttp"
    refusal_class = AiohttpPoolClosedError

    def __init__(self, session: ClientSession) -> None:
        super().__init__(session)
        self.session = session
        # Set in a forked child: the session, its event loop and its connections are the parent's.
        self._inherited = False

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
        self.session._request_class = _recording_request_class(self.session._request_class)  # noqa: SLF001 -- no public setter

    def detach(self) -> None:
        """Give the session back its class's own ``_request`` and request class."""
        vars(self.session).pop("_request", None)
        recording = self.session._request_class  # noqa: SLF001
        if recording in _recording_classes.values():
            self.session._request_class = recording.__mro__[1]  # noqa: SLF001

    # -- lifecycle ----------------------------------------------------------------------------

    def refuse(self) -> None:
        """Nothing to wake: a request waits only after it was admitted, and then it is in flight."""

    async def force_close(self, borrows: Sequence[Borrow], timeout: float) -> None:  # noqa: ARG002 -- aborting never waits
        """Interrupt requests still being sent, abort the sockets of responses still being read."""
        if self._inherited:
            return
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
                _abort_sending(request)
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
            _tell_websocket(connection, _forced_error(name))
            transport = connection.transport
            if transport is not None:
                transport.abort()  # no goodbye to a peer that may never answer
            connection.close()  # frees its connector slot and counts the return

    def forget_inherited(self, borrowed: Sequence[Any]) -> None:  # noqa: ARG002 -- all of them are the parent's
        """In a forked child: the whole session is the parent's (it is bound to the parent's event loop).

        Closing it here only refuses requests; no connection is aborted or closed (a TLS
        connection's goodbye would go out on the socket the parent still uses). Create sessions
        in each process that uses them.
        """
        self._inherited = True

    async def close_connections(self) -> None:
        """Close the session (and its connector, when the session owns it) on the session's loop."""
        if self.session.closed or self._inherited:  # closed by its owner (its loop may be gone), or the parent's
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
