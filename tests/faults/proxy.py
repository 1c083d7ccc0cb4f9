"""A TCP proxy between a client and a real server that can be told to go silent: a blackholed peer.

Before :meth:`BlackholeProxy.blackhole` it forwards bytes both ways, with back-pressure. After
it, nothing is forwarded or read any more, in either direction, and new connections are
accepted and then ignored: every socket stays open and the client waits for an answer that
never comes, as with a peer whose host hung or whose network path dropped every packet.

Without root a process cannot stop the kernel from acknowledging TCP segments, so the kernel
still acknowledges what fits in the proxy's receive buffer (kept small on purpose: 4 KiB); from
then on the window is closed and a client that keeps sending blocks, as with a stalled peer.

The proxy runs its own event loop in a daemon thread, so it serves sync and async tests alike;
every call from the test waits a bounded time and :meth:`stop` leaves no thread or socket behind.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Coroutine
    from types import TracebackType

    from typing_extensions import Self

__all__ = ["BlackholeProxy"]

# Every call into the proxy's loop from a test waits at most this long.
_CALL_TIMEOUT = 5.0
# The proxy's receive buffer: small, so a blackholed peer's window closes after a few KiB.
_RECEIVE_BUFFER = 4096


class _Side(asyncio.Protocol):
    """One of the two sockets of a proxied connection; forwards what it reads to the other side."""

    def __init__(self, proxy: BlackholeProxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.pending: list[bytes] = []  # read before the other side was connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.proxy.sides.add(self)
        if self.proxy.silent:
            transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        if self.proxy.silent:
            return  # read in the same loop step as the blackhole began: dropped
        peer = self.peer
        if peer is None or peer.transport is None:
            self.pending.append(data)
            return
        peer.transport.write(data)

    def pause_writing(self) -> None:
        # Back-pressure: our outgoing buffer is full, so stop reading the side that fills it.
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None and not self.proxy.silent:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: ARG002 -- asyncio.Protocol's signature
        self.proxy.sides.discard(self)
        if self.proxy.silent:
            return  # a blackholed peer never hangs up
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.close()


class BlackholeProxy:
    """Forwards ``127.0.0.1:<port>`` to ``upstream`` until :meth:`blackhole` silences it.

    Args:
        upstream_host: the real server's host.
        upstream_port: the real server's port.

    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.silent = False
        self.sides: set[_Side] = set()
        self.accepted = 0  # connections accepted, before and after the blackhole
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None

    @property
    def host(self) -> str:
        """Where clients connect: always ``127.0.0.1``."""
        return "127.0.0.1"

    def start(self) -> Self:
        """Listen on an ephemeral port of 127.0.0.1 and start forwarding; returns ``self``."""
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="blackhole-proxy", daemon=True)
        self._thread.start()
        self._call(self._listen())
        return self

    async def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Set before listen(): accepted sockets inherit it, and the window it advertises.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RECEIVE_BUFFER)
        listener.bind(("127.0.0.1", 0))
        self.port = listener.getsockname()[1]
        self._server = await asyncio.get_running_loop().create_server(self._accept, sock=listener, backlog=128)

    def _accept(self) -> _Side:
        self.accepted += 1
        client = _Side(self)
        if not self.silent:
            asyncio.get_running_loop().create_task(self._connect_upstream(client))
        return client

    async def _connect_upstream(self, client: _Side) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await loop.create_connection(lambda: _Side(self), *self.upstream)
        except OSError:
            if client.transport is not None:
                client.transport.abort()  # no server: the client sees the refusal
            return
        if self.silent:
            return  # blackholed while connecting: the client keeps waiting
        client.peer, upstream.peer = upstream, client
        assert upstream.transport is not None
        for data in client.pending:
            upstream.transport.write(data)
        client.pending.clear()

    def blackhole(self) -> None:
        """From now on forward nothing, read nothing, answer no one; every socket stays open."""
        self._call(self._silence())

    async def _silence(self) -> None:
        self.silent = True
        for side in list(self.sides):
            if side.transport is not None and not side.transport.is_closing():
                side.transport.pause_reading()

    def stop(self) -> None:
        """Drop every connection (abort, no goodbye), stop listening and end the proxy's thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if loop.is_running():
            self._call(self._shut())
            loop.call_soon_threadsafe(loop.stop)
        thread.join(_CALL_TIMEOUT)
        assert not thread.is_alive(), "the proxy's thread did not stop"
        loop.close()
        self._loop = self._thread = None

    async def _shut(self) -> None:
        if self._server is not None:
            self._server.close()
        for side in list(self.sides):
            if side.transport is not None:
                side.transport.abort()
        await asyncio.sleep(0)  # let the aborted transports run connection_lost and free their sockets

    def _call(self, coroutine: Coroutine[Any, Any, None]) -> None:
        assert self._loop is not None, "the proxy is not started"
        asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(_CALL_TIMEOUT)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
