"""The aiohttp keeper on a ClientSession, against a real aiohttp.web server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from poolkeeper import KeeperState, PoolClosedError, Registry
from poolkeeper._redact import redact
from tests.waiting import auntil

pytestmark = pytest.mark.asyncio

AIOHTTP_VERSION = tuple(int(part) for part in aiohttp.__version__.split(".")[:2])


class HttpServer:
    """The web server of one test: handlers that answer at once, and handlers held open until told to finish."""

    def __init__(self) -> None:
        self.finish = asyncio.Event()  # held handlers complete once this is set
        self.arrived = 0  # requests that reached a held handler
        self._arrivals = asyncio.Condition()
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def _arrive(self) -> None:
        async with self._arrivals:
            self.arrived += 1
            self._arrivals.notify_all()

    async def wait_arrived(self, count: int) -> None:
        """Wait until ``count`` requests have reached a held handler."""
        async with self._arrivals:
            await asyncio.wait_for(self._arrivals.wait_for(lambda: self.arrived >= count), 5)

    @property
    def open_connections(self) -> int:
        """Client connections whose socket the server still has open (a held handler may outlive its socket)."""
        assert self.runner is not None
        assert self.runner.server is not None
        return sum(handler.transport is not None for handler in self.runner.server.connections)

    async def fast(self, _request: web.Request) -> web.Response:
        return web.Response(text="fast")

    async def echo(self, request: web.Request) -> web.Response:
        return web.Response(body=await request.read())

    async def slow(self, _request: web.Request) -> web.Response:
        """Sends nothing, not even headers, until ``finish`` is set."""
        await self._arrive()
        await self.finish.wait()
        return web.Response(text="slow")

    async def hop(self, _request: web.Request) -> web.Response:
        """Redirects to ``/fast``, once ``finish`` is set."""
        await self._arrive()
        await self.finish.wait()
        raise web.HTTPFound("/fast")

    async def stream(self, request: web.Request) -> web.StreamResponse:
        """Sends headers and a first chunk at once, the last chunk once ``finish`` is set."""
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"first;")
        await self._arrive()
        await self.finish.wait()
        with contextlib.suppress(ConnectionError):  # the client may have gone (force-close tests)
            await response.write(b"last")
            await response.write_eof()
        return response

    async def cut(self, request: web.Request) -> web.StreamResponse:
        """Sends headers and part of the body, then drops the connection."""
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"partial")
        assert request.transport is not None
        request.transport.close()
        return response

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        async for message in socket:
            await socket.send_str(f"echo:{message.data}")
        return socket


@pytest_asyncio.fixture
async def http_server() -> AsyncIterator[HttpServer]:
    """A real aiohttp.web server on 127.0.0.1, on an ephemeral port."""
    server = HttpServer()
    app = web.Application()
    app.router.add_get("/fast", server.fast)
    app.router.add_post("/echo", server.echo)
    app.router.add_get("/slow", server.slow)
    app.router.add_get("/hop", server.hop)
    app.router.add_get("/stream", server.stream)
    app.router.add_get("/cut", server.cut)
    app.router.add_get("/ws", server.websocket)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server.runner = runner
    port = runner.addresses[0][1]
    server.url = f"http://127.0.0.1:{port}"
    yield server
    server.finish.set()
    await runner.cleanup()


@pytest_asyncio.fixture
async def make_session() -> AsyncIterator[Callable[..., aiohttp.ClientSession]]:
    """Build client sessions that are closed at teardown if a test left them open."""
    sessions: list[aiohttp.ClientSession] = []

    def make(**options: Any) -> aiohttp.ClientSession:
        session = aiohttp.ClientSession(**options)
        sessions.append(session)
        return session

    yield make
    for session in sessions:
        vars(session).pop("_request", None)  # a refusing guard must not stop the cleanup
        await session.close()


async def read_all(session: aiohttp.ClientSession, url: str) -> bytes:
    async with session.get(url) as response:
        return await response.read()


async def failure_time(session: aiohttp.ClientSession, url: str) -> tuple[float, BaseException]:
    """Request ``url`` and read its body; return when and how it failed."""
    try:
        async with session.get(url) as response:
            await response.read()
    except Exception as error:
        return time.monotonic(), error
    raise AssertionError("the request was not interrupted")


async def test_wrap_returns_the_same_session_and_it_still_works(http_server, make_session):
    """wrap() returns the same session; get/post/request work as awaitables and context managers, ws too."""
    session = make_session()
    registry = Registry()
    assert registry.wrap(session, name="http") is session
    keeper = registry["http"]
    url = http_server.url

    response = await session.get(f"{url}/fast")
    assert await response.text() == "fast"
    async with session.post(f"{url}/echo", data=b"payload") as response:
        assert await response.read() == b"payload"
    async with session.request("GET", f"{url}/fast") as response:
        assert response.status == 200
    async with session.ws_connect(f"{url}/ws") as socket:
        await socket.send_str("hi")
        assert (await socket.receive_str()) == "echo:hi"
        assert keeper.borrowed == 1
    assert keeper.borrowed == 0

    report = await registry.aclose()
    assert (report["http"].outcome, report["http"].borrowed_at_start) == ("clean", 0)
    assert session.closed


async def test_new_requests_are_refused_at_once_while_draining(http_server, make_session):
    """Once closing starts, a new request raises PoolClosedError at once; the one in flight completes."""
    session = make_session()
    registry = Registry(drain_timeout=10)
    registry.wrap(session, name="http")
    in_flight = asyncio.ensure_future(read_all(session, f"{http_server.url}/slow"))
    await http_server.wait_arrived(1)
    closing = asyncio.ensure_future(registry.aclose())
    await auntil(lambda: registry["http"].state is KeeperState.DRAINING)

    started = time.monotonic()
    with pytest.raises(PoolClosedError, match="'http' is draining"):
        await session.get(f"{http_server.url}/fast")
    with pytest.raises(PoolClosedError, match="'http' is draining"):
        async with session.ws_connect(f"{http_server.url}/ws"):
            pass
    assert time.monotonic() - started < 0.5

    http_server.finish.set()
    assert await in_flight == b"slow"
    item = (await asyncio.wait_for(closing, 5))["http"]
    assert (item.outcome, item.borrowed_at_start, item.returned, item.forced) == ("clean", 1, 1, 0)


async def test_in_flight_requests_complete_and_aclose_wakes_on_the_last_release(http_server, make_session):
    """Requests in flight complete during the drain; aclose() returns right after the last response is released."""
    session = make_session()
    registry = Registry(drain_timeout=20)
    registry.wrap(session, name="http")
    slow = asyncio.ensure_future(read_all(session, f"{http_server.url}/slow"))
    streamed = asyncio.ensure_future(read_all(session, f"{http_server.url}/stream"))
    await http_server.wait_arrived(2)
    closing = asyncio.ensure_future(registry.aclose())
    await asyncio.sleep(0.2)
    assert not closing.done()

    http_server.finish.set()
    bodies = list(await asyncio.gather(slow, streamed))
    released = time.monotonic()
    report = await asyncio.wait_for(closing, 10)

    assert time.monotonic() - released < 0.5
    assert bodies == [b"slow", b"first;last"]
    item = report["http"]
    assert (item.outcome, item.borrowed_at_start, item.returned, item.forced) == ("clean", 2, 2, 0)
    assert session.closed


async def test_streamed_body_is_borrowed_until_released(http_server, make_session):
    """A response whose body is still being read is borrowed; the closer wakes once it is released."""
    session = make_session()
    registry = Registry(drain_timeout=20)
    registry.wrap(session, name="http")
    keeper = registry["http"]

    async with session.get(f"{http_server.url}/stream") as response:
        assert await response.content.readexactly(len(b"first;")) == b"first;"
        assert keeper.borrowed == 1
        closing = asyncio.ensure_future(registry.aclose())
        await asyncio.sleep(0.2)
        assert not closing.done()
        assert keeper.state is KeeperState.DRAINING
    released = time.monotonic()  # released without reading the rest

    report = await asyncio.wait_for(closing, 10)
    assert time.monotonic() - released < 0.5
    assert (report["http"].outcome, report["http"].returned) == ("clean", 1)


async def test_response_read_to_the_end_without_release_is_returned(http_server, make_session):
    """A response read to its end is returned when aiohttp frees its connection, with no release() call."""
    session = make_session()
    registry = Registry(drain_timeout=20)
    registry.wrap(session, name="http")
    keeper = registry["http"]
    response = await session.get(f"{http_server.url}/stream")
    await http_server.wait_arrived(1)
    assert keeper.borrowed == 1
    closing = asyncio.ensure_future(registry.aclose())

    http_server.finish.set()
    chunks = [chunk async for chunk in response.content.iter_any()]

    assert b"".join(chunks) == b"first;last"
    assert keeper.borrowed == 0
    item = (await asyncio.wait_for(closing, 5))["http"]
    assert (item.outcome, item.returned, item.forced) == ("clean", 1, 0)
    assert keeper.gc_leaks() == []


async def test_a_redirect_followed_during_the_drain_completes(http_server, make_session):
    """A request is borrowed across its redirects: the hop made after closing started is not refused."""
    session = make_session()
    registry = Registry(drain_timeout=20)
    registry.wrap(session, name="http")
    redirected = asyncio.ensure_future(read_all(session, f"{http_server.url}/hop"))
    await http_server.wait_arrived(1)
    closing = asyncio.ensure_future(registry.aclose())
    await auntil(lambda: registry["http"].state is KeeperState.DRAINING)

    http_server.finish.set()
    assert await redirected == b"fast"
    item = (await asyncio.wait_for(closing, 5))["http"]
    assert (item.outcome, item.borrowed_at_start, item.returned) == ("clean", 1, 1)


@pytest.mark.parametrize(
    ("path", "phase"), [("/slow", "awaiting its headers"), ("/stream", "reading its body")], ids=["headers", "body"]
)
async def test_deadline_force_closes_and_the_caller_errors_promptly(http_server, make_session, path, phase):
    """At the drain deadline a request still out is aborted: its caller gets an error at once, the server sees it go."""
    session = make_session()
    registry = Registry(drain_timeout=0.3, close_timeout=5, track_borrowers=True)
    registry.wrap(session, name="http")
    caller = asyncio.ensure_future(failure_time(session, f"{http_server.url}{path}"))
    await http_server.wait_arrived(1)

    started = time.monotonic()
    report = await registry.aclose()
    failed_at, error = await asyncio.wait_for(caller, 5)

    assert failed_at - started < 1.5, phase
    assert isinstance(error, aiohttp.ClientConnectionError), repr(error)
    assert "force-closed" in str(error)
    item = report["http"]
    assert (item.outcome, item.forced) == ("forced", 1)
    assert item.leaks[0].stack
    assert item.leaks[0].stack[-1].function == "failure_time"
    await auntil(lambda: http_server.open_connections == 0)


async def test_requests_queued_for_a_connection_complete_during_the_drain(http_server, make_session):
    """A request sent before closing but waiting for a free connection is in flight: it completes."""
    session = make_session(connector=aiohttp.TCPConnector(limit=1))
    registry = Registry(drain_timeout=20)
    registry.wrap(session, name="http")
    first = asyncio.ensure_future(read_all(session, f"{http_server.url}/slow"))
    await http_server.wait_arrived(1)
    queued = asyncio.ensure_future(read_all(session, f"{http_server.url}/fast"))
    await auntil(lambda: registry["http"].borrowed == 2)
    closing = asyncio.ensure_future(registry.aclose())
    await auntil(lambda: registry["http"].state is KeeperState.DRAINING)

    http_server.finish.set()
    assert list(await asyncio.gather(first, queued)) == [b"slow", b"fast"]
    item = (await asyncio.wait_for(closing, 5))["http"]
    assert (item.outcome, item.borrowed_at_start, item.returned) == ("clean", 2, 2)


async def test_request_queued_for_a_connection_errors_promptly_at_the_deadline(http_server, make_session):
    """A request still waiting for a free connection at the deadline fails at once with a connection error."""
    session = make_session(connector=aiohttp.TCPConnector(limit=1))
    registry = Registry(drain_timeout=0.3, close_timeout=5)
    registry.wrap(session, name="http")
    holder = asyncio.ensure_future(failure_time(session, f"{http_server.url}/slow"))
    await http_server.wait_arrived(1)
    queued = asyncio.ensure_future(failure_time(session, f"{http_server.url}/fast"))
    await auntil(lambda: registry["http"].borrowed == 2)

    started = time.monotonic()
    report = await registry.aclose()
    results = await asyncio.wait_for(asyncio.gather(holder, queued), 5)

    for failed_at, error in results:
        assert failed_at - started < 1.5
        assert isinstance(error, aiohttp.ClientConnectionError), repr(error)
    assert not queued.cancelled()
    assert (report["http"].outcome, report["http"].forced) == ("forced", 2)


async def test_a_callers_own_cancellation_stays_a_cancellation(http_server, make_session):
    """A request its caller cancels ends in CancelledError and is counted as returned."""
    session = make_session()
    registry = Registry()
    registry.wrap(session, name="http")
    request = asyncio.ensure_future(read_all(session, f"{http_server.url}/slow"))
    await http_server.wait_arrived(1)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    assert registry["http"].borrowed == 0
    assert (await registry.aclose())["http"].outcome == "clean"


async def test_requests_are_refused_after_close(http_server, make_session):
    """After close, requests raise PoolClosedError rather than aiohttp's 'Session is closed'."""
    session = make_session()
    registry = Registry()
    registry.wrap(session, name="http")
    assert await read_all(session, f"{http_server.url}/fast") == b"fast"
    await registry.aclose()

    with pytest.raises(PoolClosedError, match="'http' is closed"):
        await session.get(f"{http_server.url}/fast")
    with pytest.raises(PoolClosedError, match="'http' is closed"):
        async with session.post(f"{http_server.url}/echo", data=b"x"):
            pass


@contextlib.contextmanager
def unclosed_warnings(loop: asyncio.AbstractEventLoop) -> Iterator[list[str]]:
    """Collect aiohttp's "Unclosed ..." complaints (ResourceWarnings and loop exception-handler calls)."""
    messages: list[str] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: messages.append(str(context.get("message"))))
    try:
        with warnings.catch_warnings(record=True) as records:
            warnings.simplefilter("always", ResourceWarning)
            yield messages
            gc.collect()  # aiohttp complains from __del__
        messages += [str(record.message) for record in records if record.category is ResourceWarning]
    finally:
        loop.set_exception_handler(previous)
    messages[:] = [message for message in messages if "Unclosed" in message]


async def test_session_and_connector_are_closed_without_warnings(http_server):
    """After a close (forced, even), session and connector are closed and nothing warns about them."""
    loop = asyncio.get_running_loop()
    with unclosed_warnings(loop) as control:  # the same capture does see aiohttp's warnings
        raw = aiohttp.ClientSession()
        raw_connector = raw.connector
        assert await read_all(raw, f"{http_server.url}/fast") == b"fast"
        del raw
    assert "Unclosed client session" in control
    assert raw_connector is not None
    await raw_connector.close()

    with unclosed_warnings(loop) as captured:
        session = aiohttp.ClientSession()
        registry = Registry(drain_timeout=0.3)
        registry.wrap(session, name="http")
        connector = session.connector
        assert await read_all(session, f"{http_server.url}/fast") == b"fast"
        held = asyncio.ensure_future(failure_time(session, f"{http_server.url}/stream"))
        await http_server.wait_arrived(1)
        report = await registry.aclose()
        await held
        assert report["http"].outcome == "forced"
        assert session.closed
        assert connector is not None
        assert connector.closed
        del session, registry, connector, held, report
    assert captured == []


async def test_shared_connector_stays_open_for_its_other_sessions(http_server, make_session):
    """A session that does not own its connector is closed alone; the connector keeps serving others."""
    connector = aiohttp.TCPConnector()
    session = make_session(connector=connector, connector_owner=False)
    other = make_session(connector=connector, connector_owner=False)
    registry = Registry()
    registry.wrap(session, name="http")
    assert await read_all(session, f"{http_server.url}/fast") == b"fast"

    assert (await registry.aclose())["http"].outcome == "clean"
    assert session.closed
    assert not connector.closed
    assert await read_all(other, f"{http_server.url}/fast") == b"fast"
    await connector.close()


async def test_websocket_is_borrowed_until_closed_and_aborted_at_the_deadline(http_server, make_session):
    """An open websocket holds the drain; at the deadline it is aborted and its reader sees it close at once."""
    session = make_session()
    registry = Registry(drain_timeout=0.3)
    registry.wrap(session, name="http")
    socket = await session.ws_connect(f"{http_server.url}/ws")
    await socket.send_str("hi")
    assert await socket.receive_str() == "echo:hi"
    assert registry["http"].borrowed == 1

    started = time.monotonic()
    receiving = asyncio.ensure_future(socket.receive())
    report = await registry.aclose()
    message = await asyncio.wait_for(receiving, 5)

    assert time.monotonic() - started < 1.5
    assert message.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.ERROR)
    assert (report["http"].outcome, report["http"].forced) == ("forced", 1)
    await socket.close()


async def test_dropped_unread_response_is_force_closed_at_the_deadline(http_server, make_session):
    """A response dropped before its never-ending body was read does not hold shutdown beyond the deadline."""
    session = make_session()
    registry = Registry(drain_timeout=0.3, close_timeout=2)
    registry.wrap(session, name="http")
    response = await session.get(f"{http_server.url}/stream")
    await http_server.wait_arrived(1)
    del response
    gc.collect()

    started = time.monotonic()
    report = await registry.aclose()
    assert time.monotonic() - started < 1.5
    assert (report["http"].outcome, report["http"].forced) == ("forced", 1)
    await auntil(lambda: http_server.open_connections == 0)


async def test_response_released_by_the_garbage_collector_is_a_leak(http_server, make_session):
    """A response dropped unreleased and collected comes back, counted as returned by the garbage collector."""
    session = make_session()
    registry = Registry(track_borrowers=True)
    registry.wrap(session, name="http")
    keeper = registry["http"]
    response = await session.get(f"{http_server.url}/cut")
    assert keeper.borrowed == 1
    del response

    def returned() -> bool:
        gc.collect()
        return keeper.borrowed == 0

    await auntil(returned)
    leaks = keeper.gc_leaks()
    assert [leak.returned_by_gc for leak in leaks] == [True]
    assert leaks[0].stack
    assert leaks[0].stack[-1].function == "test_response_released_by_the_garbage_collector_is_a_leak"
    assert (await registry.aclose())["http"].outcome == "clean"


async def test_describe_and_secrets_keep_credentials_out(make_session):
    """describe() names the base URL without credentials; every password and Authorization value is a secret."""
    # Before aiohttp 3.11, base_url must be an origin: no credentials, path or query in it.
    full_base_url = AIOHTTP_VERSION >= (3, 11)
    base_url, described = (
        ("http://user:url-pass@127.0.0.1:1/api/?key=query-secret", "http://127.0.0.1:1/api/")
        if full_base_url
        else ("http://127.0.0.1:1", "http://127.0.0.1:1")
    )
    with warnings.catch_warnings():  # aiohttp 3.14 deprecates BasicAuth and auth=; they are what this test is about
        warnings.simplefilter("ignore", DeprecationWarning)
        basic = aiohttp.BasicAuth("login", "basic-pass")
        session = make_session(
            base_url=base_url,
            auth=basic,
            headers={"Authorization": "Bearer header-token"},
        )
    registry = Registry()
    registry.wrap(session, name="http")
    driver = registry["http"].driver

    assert driver.describe() == described
    secrets = driver.secrets()
    words = (
        ("url-pass", "basic-pass", "header-token", "bG9naW4")
        if full_base_url
        else ("basic-pass", "header-token", "bG9naW4")
    )
    leaky = f"url-pass basic-pass Bearer header-token {basic.encode()}"
    assert all(word not in redact(leaky, secrets) for word in words)
    report = await registry.aclose()
    assert report["http"].target == described
    assert not any(word in str(report.to_dict()) for word in ("url-pass", "basic-pass", "header-token", "query-secret"))


async def test_describe_without_base_url(make_session):
    """A session without base_url is described as an aiohttp ClientSession."""
    registry = Registry()
    registry.wrap(make_session(), name="http")
    assert registry["http"].driver.describe() == "aiohttp ClientSession"
    assert registry["http"].driver.secrets() == ()
    await registry.aclose()


async def test_wrapping_a_closed_session_is_refused(make_session):
    """A closed session cannot be wrapped; nothing is registered or installed."""
    session = make_session()
    await session.close()
    registry = Registry()
    with pytest.raises(ValueError, match="resource: this aiohttp ClientSession is already closed"):
        registry.wrap(session, name="http")
    assert "http" not in registry
    assert "_request" not in vars(session)


async def test_sync_close_from_another_thread_closes_on_the_sessions_loop(http_server, make_session):
    """registry.close() from a worker thread drains and closes the session on the loop that owns it."""
    session = make_session()
    registry = Registry(drain_timeout=10)
    registry.wrap(session, name="http")
    in_flight = asyncio.ensure_future(read_all(session, f"{http_server.url}/slow"))
    await http_server.wait_arrived(1)
    closing = asyncio.ensure_future(asyncio.to_thread(registry.close))
    await auntil(lambda: registry["http"].state is KeeperState.DRAINING)

    http_server.finish.set()
    assert await in_flight == b"slow"
    report = await asyncio.wait_for(closing, 5)
    assert (report["http"].outcome, report["http"].returned) == ("clean", 1)
    assert session.closed


async def test_session_closed_by_its_owner_first_closes_cleanly(http_server, make_session):
    """A session its owner closed already is reported clean, and a request on it leaves nothing borrowed."""
    session = make_session()
    registry = Registry()
    registry.wrap(session, name="http")
    await session.close()
    with pytest.raises(RuntimeError, match="Session is closed"):
        await session.get(f"{http_server.url}/fast")
    assert registry["http"].borrowed == 0
    assert (await registry.aclose())["http"].outcome == "clean"


async def test_an_upload_on_a_shared_connector_is_aborted_and_other_sessions_keep_theirs(http_server, make_session):
    """connector_owner=False: the force-close aborts the stuck upload's socket; another session's request completes."""
    peers: list[asyncio.StreamWriter] = []

    async def never_read(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peers.append(writer)  # accepts, then reads nothing: the client's buffers fill up

    peer = await asyncio.start_server(never_read, "127.0.0.1", 0, limit=1024)
    port = peer.sockets[0].getsockname()[1]
    connector = aiohttp.TCPConnector()
    session = make_session(connector=connector, connector_owner=False)
    other = make_session(connector=connector, connector_owner=False)
    registry = Registry(drain_timeout=0.1, close_timeout=1)
    registry.wrap(session, name="upload")

    async def upload() -> None:
        async with session.post(f"http://127.0.0.1:{port}/", data=b"x" * (32 * 1024 * 1024)) as response:
            await response.read()

    uploading = asyncio.ensure_future(upload())
    waiting = asyncio.ensure_future(read_all(other, f"{http_server.url}/slow"))
    await http_server.wait_arrived(1)

    def upload_transport() -> asyncio.Transport | None:
        for protocol in connector._acquired:  # the test's way to see the client's socket
            transport = protocol.transport
            if transport is not None and transport.get_extra_info("peername")[1] == port:
                return transport
        return None

    await auntil(lambda: (transport := upload_transport()) is not None and transport.get_write_buffer_size() > 0)
    transport = upload_transport()
    assert transport is not None
    sock = transport.get_extra_info("socket")

    report = await asyncio.wait_for(registry.aclose(), 5)
    with pytest.raises(aiohttp.ClientConnectionError):
        await asyncio.wait_for(uploading, 2)
    await asyncio.sleep(0)  # an aborted transport closes its socket on the next loop step

    assert report["upload"].forced == 1
    assert sock.fileno() == -1
    http_server.finish.set()
    assert await asyncio.wait_for(waiting, 5) == b"slow"
    await connector.close()
    peer.close()
    for writer in peers:
        writer.close()
    await peer.wait_closed()


async def test_a_force_closed_websocket_receiver_is_told_why(http_server, make_session):
    """A websocket receiver aborted at the deadline gets an ERROR message carrying the force-close error."""
    session = make_session()
    registry = Registry(drain_timeout=0.1)
    registry.wrap(session, name="http")
    socket = await session.ws_connect(f"{http_server.url}/ws")
    receiving = asyncio.ensure_future(socket.receive())
    await registry.aclose()
    message = await asyncio.wait_for(receiving, 5)

    assert message.type is aiohttp.WSMsgType.ERROR
    assert isinstance(message.data, aiohttp.ClientConnectionError)
    assert "poolkeeper 'http' force-closed this request" in str(message.data)
    await socket.close()
