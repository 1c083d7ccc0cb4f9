"""The httpx keeper on Client and AsyncClient (and httpx2's), against a real aiohttp.web server on 127.0.0.1.

The server runs its own event loop in a daemon thread, so that sync clients (blocking in the
test's thread or in borrower threads) and async clients talk to the same real server.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import json
import logging
import pickle
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import pytest
from aiohttp import web

from poolkeeper import KeeperState, PoolClosedError, Registry, UnsupportedResourceError
from tests.faults import BlackholeProxy, sockets_to
from tests.waiting import auntil, until

# httpx2 (httpx's successor, the same internals) installs on Python 3.11+ only.
LIBRARIES = ["httpx", *(["httpx2"] if sys.version_info >= (3, 11) else [])]
# The shutdown's deadline in the blackhole tests, and what a loaded two-core machine may overrun it by.
DEADLINE = 1.0
SLACK = 0.6


class HttpServer:
    """A real aiohttp.web server in a thread of its own: handlers that answer at once, and held ones."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.runner: web.AppRunner | None = None
        self.port = 0
        self._finish: asyncio.Event | None = None
        self._arrived = 0
        self._arrivals = threading.Condition()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-http-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=10)

    def start(self) -> HttpServer:
        self._thread.start()
        self._call(self._start())
        return self

    async def _start(self) -> None:
        self._finish = asyncio.Event()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/fast", self.fast)
        app.router.add_post("/sink", self.sink)
        app.router.add_get("/slow", self.slow)
        app.router.add_get("/stream", self.stream)
        app.router.add_get("/hop", self.hop)
        self.runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]

    def stop(self) -> None:
        self.finish()
        assert self.runner is not None
        self._call(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        self.loop.close()

    def finish(self) -> None:
        """Let every held handler complete."""
        assert self._finish is not None
        self.loop.call_soon_threadsafe(self._finish.set)

    def _arrive(self) -> None:
        with self._arrivals:
            self._arrived += 1
            self._arrivals.notify_all()

    def wait_arrived(self, count: int, timeout: float = 5.0) -> None:
        """Block until ``count`` requests have reached a held handler."""
        with self._arrivals:
            assert self._arrivals.wait_for(lambda: self._arrived >= count, timeout), "requests never arrived"

    async def await_arrived(self, count: int) -> None:
        await asyncio.to_thread(self.wait_arrived, count)

    @property
    def open_connections(self) -> int:
        """Client connections whose socket the server still has open."""
        assert self.runner is not None
        assert self.runner.server is not None
        return sum(handler.transport is not None for handler in self.runner.server.connections)

    async def fast(self, _request: web.Request) -> web.Response:
        return web.Response(text="fast")

    async def slow(self, _request: web.Request) -> web.Response:
        """Sends nothing, not even headers, until told to finish."""
        assert self._finish is not None
        self._arrive()
        await self._finish.wait()
        return web.Response(text="slow")

    async def sink(self, request: web.Request) -> web.Response:
        return web.Response(text=str(len(await request.read())))

    async def hop(self, _request: web.Request) -> web.Response:
        """Redirects to ``/fast`` at once."""
        raise web.HTTPFound("/fast")

    async def stream(self, request: web.Request) -> web.StreamResponse:
        """Sends headers and a first chunk at once, the last chunk once told to finish."""
        assert self._finish is not None
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"first;")
        self._arrive()
        await self._finish.wait()
        with contextlib.suppress(ConnectionError):  # the client may have gone (force-close tests)
            await response.write(b"last")
            await response.write_eof()
        return response


@pytest.fixture
def http_server() -> Iterator[HttpServer]:
    """A real aiohttp.web server on an ephemeral port of 127.0.0.1, in a thread."""
    server = HttpServer().start()
    yield server
    server.stop()


@pytest.fixture(params=LIBRARIES)
def lib(request: pytest.FixtureRequest) -> ModuleType:
    """httpx, then httpx2: the same keeper serves both."""
    return importlib.import_module(request.param)


@pytest.fixture
def clients() -> Iterator[list[Any]]:
    """Clients a test made; closed at teardown, unguarded first, if the test left them open."""
    made: list[Any] = []
    yield made
    for client in made:
        vars(client).pop("send", None)
        if client.is_closed:
            continue
        if hasattr(client, "aclose"):  # its connections' loop is gone: closing them there is all we can do
            with contextlib.suppress(Exception):
                asyncio.run(client.aclose())
        else:
            client.close()


def refused_quickly(call: Callable[[], Any]) -> PoolClosedError:
    started = time.monotonic()
    with pytest.raises(PoolClosedError) as caught:
        call()
    assert time.monotonic() - started < 0.5
    return caught.value


# -- the client still works, and what counts as a borrow ------------------------------------------


def test_wrap_returns_the_same_client_and_requests_are_borrowed_until_closed(lib, http_server, clients):
    """wrap() returns the same Client; a plain request is borrowed inside send, a streamed one until closed."""
    client = lib.Client(base_url=http_server.url)
    clients.append(client)
    registry = Registry()
    assert registry.wrap(client, name="http") is client
    assert registry.wrap(client) is client  # wrapping twice registers once
    keeper = registry["http"]

    assert client.get("/fast").text == "fast"
    assert client.get("/hop", follow_redirects=True).text == "fast"
    assert keeper.borrowed == 0
    with client.stream("GET", "/fast") as response:
        assert keeper.borrowed == 1
        assert response.read() == b"fast"
    assert keeper.borrowed == 0
    response = client.send(client.build_request("GET", "/fast"), stream=True)
    assert keeper.borrowed == 1
    assert list(response.iter_bytes()) == [b"fast"]  # read to its end: closed by httpx
    assert keeper.borrowed == 0

    report = registry.close()
    assert (report["http"].outcome, report["http"].kind, report["http"].borrowed_at_start) == ("clean", lib.__name__, 0)
    assert client.is_closed


def test_an_applications_subclass_of_client_is_wrapped_like_the_client(lib, http_server, clients):
    """A subclass of Client defined by the application is managed as its base class is."""
    app_client = type("AppClient", (lib.Client,), {"__module__": __name__})(base_url=http_server.url)
    clients.append(app_client)
    registry = Registry()
    assert registry.wrap(app_client, name="http") is app_client
    assert app_client.get("/fast").text == "fast"
    assert registry["http"].kind == lib.__name__
    assert registry.close()["http"].outcome == "clean"


def test_a_tracked_borrow_site_is_the_line_that_sent_the_request(lib, http_server, clients):
    """With track_borrowers, a streamed response's borrow site is the application's line, not httpx's."""
    client = lib.Client(base_url=http_server.url)
    clients.append(client)
    registry = Registry(track_borrowers=True)
    registry.wrap(client, name="http")
    with client.stream("GET", "/fast"):  # the borrow site
        [borrower] = registry["http"].borrowers()
    assert borrower.stack
    innermost = borrower.stack[-1]
    assert (innermost.filename, innermost.function) == (
        __file__,
        "test_a_tracked_borrow_site_is_the_line_that_sent_the_request",
    )
    registry.close()


@pytest.mark.asyncio
async def test_async_client_requests_are_borrowed_until_closed(lib, http_server, clients):
    """The same for AsyncClient: plain and streamed requests, borrowed until their response is closed."""
    client = lib.AsyncClient(base_url=http_server.url)
    clients.append(client)
    registry = Registry()
    assert registry.wrap(client, name="http") is client
    keeper = registry["http"]

    assert (await client.get("/fast")).text == "fast"
    async with client.stream("GET", "/fast") as response:
        assert keeper.borrowed == 1
        assert await response.aread() == b"fast"
    assert keeper.borrowed == 0

    report = await registry.aclose()
    assert (report["http"].outcome, report["http"].borrowed_at_start) == ("clean", 0)
    assert client.is_closed


def test_a_users_transport_with_limits_and_retries_is_managed(lib, http_server, clients):
    """A client on the user's own HTTPTransport (limits, retries) is wrapped, drained and closed."""
    transport = lib.HTTPTransport(limits=lib.Limits(max_connections=2, max_keepalive_connections=1), retries=2)
    client = lib.Client(base_url=http_server.url, transport=transport)
    clients.append(client)
    registry = Registry()
    registry.wrap(client, name="http")
    assert client.get("/fast").text == "fast"
    assert registry["http"].idle == 1

    report = registry.close()
    assert report["http"].outcome == "clean"
    assert transport._pool.connections == []  # every connection of the pool closed


# -- refusal, woken waiters, clean drain -------------------------------------------------------------


def test_new_requests_are_refused_while_draining_and_the_one_in_flight_completes(lib, http_server, clients):
    """From closing on, a new request raises PoolClosedError (an httpx HTTPError) at once; the one in flight ends."""
    client = lib.Client(base_url=http_server.url)
    clients.append(client)
    registry = Registry(drain_timeout=10)
    registry.wrap(client, name="http")
    results: list[str] = []
    in_flight = threading.Thread(target=lambda: results.append(client.get("/slow").text), daemon=True)
    in_flight.start()
    http_server.wait_arrived(1)
    closing = threading.Thread(target=registry.close, daemon=True)
    closing.start()
    until(lambda: registry["http"].state is KeeperState.DRAINING)

    error = refused_quickly(lambda: client.get("/fast"))
    assert isinstance(error, lib.HTTPError)
    assert isinstance(error, RuntimeError)  # what httpx raises on a closed client
    assert "'http' is draining" in str(error)
    copy = pickle.loads(pickle.dumps(error))  # noqa: S301 -- our own error, round-tripped
    assert (type(copy), copy.keeper, copy.state) == (type(error), "http", "draining")
    refused_quickly(lambda: client.stream("GET", "/fast").__enter__())

    http_server.finish()
    in_flight.join(timeout=5)
    closing.join(timeout=5)
    assert results == ["slow"]
    report = registry.report
    assert report is not None
    assert (report["http"].outcome, report["http"].borrowed_at_start, report["http"].returned) == ("clean", 1, 1)
    assert registry["http"].refused == 2


@pytest.mark.asyncio
async def test_async_requests_are_refused_while_draining_and_the_one_in_flight_completes(lib, http_server, clients):
    """AsyncClient: refused at once during the drain; the request in flight completes and the close is clean."""
    client = lib.AsyncClient(base_url=http_server.url)
    clients.append(client)
    registry = Registry(drain_timeout=10)
    registry.wrap(client, name="http")
    in_flight = asyncio.ensure_future(client.get("/slow"))
    await http_server.await_arrived(1)
    closing = asyncio.ensure_future(registry.aclose())
    await auntil(lambda: registry["http"].state is KeeperState.DRAINING)

    started = time.monotonic()
    with pytest.raises(PoolClosedError, match="'http' is draining"):
        await client.get("/fast")
    assert time.monotonic() - started < 0.5

    http_server.finish()
    assert (await in_flight).text == "slow"
    report = await closing
    assert (report["http"].outcome, report["http"].returned) == ("clean", 1)


def test_requests_queued_on_the_pool_limit_wake_with_the_refusal(lib, http_server, clients):
    """With max_connections=1, a request queued behind a slow one fails with PoolClosedError once closing starts."""
    client = lib.Client(base_url=http_server.url, limits=lib.Limits(max_connections=1))
    clients.append(client)
    registry = Registry(drain_timeout=10)
    registry.wrap(client, name="http")
    slow = threading.Thread(target=lambda: client.get("/slow"), daemon=True)
    slow.start()
    http_server.wait_arrived(1)
    queued_error: list[BaseException] = []
    woke = threading.Event()

    def queue() -> None:
        try:
            client.get("/fast")
        except BaseException as error:
            queued_error.append(error)
        woke.set()

    threading.Thread(target=queue, daemon=True).start()
    pool = client._transport._pool
    until(lambda: any(request.is_queued() for request in list(pool._requests)))  # parked in httpcore's queue
    closing = threading.Thread(target=registry.close, daemon=True)
    closing.start()

    assert woke.wait(0.5)  # at once, while the slow request still holds the only connection
    assert isinstance(queued_error[0], PoolClosedError)
    assert isinstance(queued_error[0], lib.HTTPError)
    http_server.finish()
    closing.join(timeout=5)
    slow.join(timeout=5)
    report = registry.report
    assert report is not None
    # The queued request never had a connection: a refusal, not a borrow.
    assert (report["http"].outcome, report["http"].borrowed_at_start, report["http"].returned) == ("clean", 1, 1)
    assert registry["http"].refused == 1


@pytest.mark.asyncio
async def test_async_requests_queued_on_the_pool_limit_wake_with_the_refusal(lib, http_server, clients):
    """AsyncClient: a request queued for the only connection is woken with PoolClosedError when closing starts."""
    client = lib.AsyncClient(base_url=http_server.url, limits=lib.Limits(max_connections=1))
    clients.append(client)
    registry = Registry(drain_timeout=10)
    registry.wrap(client, name="http")
    slow = asyncio.ensure_future(client.get("/slow"))
    await http_server.await_arrived(1)
    queued = asyncio.ensure_future(client.get("/fast"))
    pool = client._transport._pool
    await auntil(lambda: any(request.is_queued() for request in pool._requests))
    closing = asyncio.ensure_future(registry.aclose())

    done, _ = await asyncio.wait([queued], timeout=0.5)
    assert done == {queued}
    assert isinstance(queued.exception(), PoolClosedError)
    assert not slow.done()
    http_server.finish()
    assert (await slow).text == "slow"
    report = await closing
    assert (report["http"].outcome, report["http"].borrowed_at_start, report["http"].returned) == ("clean", 1, 1)
    assert registry["http"].refused == 1


# -- force-close --------------------------------------------------------------------------------------


def test_a_request_past_the_drain_deadline_is_aborted_and_its_socket_closed(lib, http_server, clients):
    """At the drain deadline the blocked caller gets httpx.NetworkError at once and no socket stays open."""
    client = lib.Client(base_url=http_server.url)
    clients.append(client)
    registry = Registry(drain_timeout=0.3)
    registry.wrap(client, name="http")
    errors: list[BaseException] = []
    failed_at: list[float] = []

    def wait_for_slow() -> None:
        try:
            client.get("/slow")
        except BaseException as error:
            errors.append(error)
            failed_at.append(time.monotonic())

    borrower = threading.Thread(target=wait_for_slow, daemon=True)
    borrower.start()
    http_server.wait_arrived(1)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        started = time.monotonic()
        report = registry.close()
        ended = time.monotonic()
        borrower.join(timeout=2)
        gc.collect()

    item = report["http"]
    assert (item.outcome, item.borrowed_at_start, item.forced) == ("forced", 1, 1)
    assert isinstance(errors[0], lib.NetworkError)
    assert "'http' force-closed this request" in str(errors[0])
    assert failed_at[0] - started < 0.3 + 1.0
    assert ended - started < 0.3 + 1.0
    assert sockets_to(http_server.port) == 0
    until(lambda: http_server.open_connections == 0)  # the server saw the socket go
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []


@pytest.mark.asyncio
async def test_a_streamed_response_held_past_the_deadline_fails_on_its_next_read(lib, http_server, clients):
    """A streamed response whose body is still coming is borrowed; forced, its next read fails with NetworkError."""
    client = lib.AsyncClient(base_url=http_server.url)
    clients.append(client)
    registry = Registry(drain_timeout=0.3)
    registry.wrap(client, name="http")
    async with client.stream("GET", "/stream") as response:
        chunks = response.aiter_raw()
        assert await chunks.__anext__() == b"first;"
        await http_server.await_arrived(1)
        assert registry["http"].borrowed == 1

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            report = await registry.aclose()
            with pytest.raises(lib.NetworkError, match="'http' force-closed this request"):
                await chunks.__anext__()
    gc.collect()

    assert (report["http"].outcome, report["http"].forced) == ("forced", 1)
    assert sockets_to(http_server.port) == 0
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []


def test_a_streamed_response_dropped_unclosed_comes_back_through_the_collector(lib, http_server, clients, caplog):
    """A streamed response dropped without close() is returned when collected, as a leak, and the close is clean."""
    client = lib.Client(base_url=http_server.url)
    clients.append(client)
    registry = Registry()
    registry.wrap(client, name="http")
    response = client.send(client.build_request("GET", "/fast"), stream=True)
    assert registry["http"].borrowed == 1

    with caplog.at_level(logging.WARNING, logger="poolkeeper"):
        del response
        gc.collect()
    assert registry["http"].borrowed == 0
    assert "returned by the garbage collector" in caplog.text
    assert registry.close()["http"].outcome == "clean"
    assert sockets_to(http_server.port) == 0


# -- a blackholed peer ------------------------------------------------------------------------------


@pytest.fixture
def proxy(http_server: HttpServer) -> Iterator[BlackholeProxy]:
    """A proxy in front of the server that can be told to go silent."""
    started = BlackholeProxy("127.0.0.1", http_server.port).start()
    yield started
    started.stop()


def test_a_request_to_a_blackholed_peer_is_aborted_within_the_deadline(lib, proxy, http_server, clients):
    """Sync: a caller waiting on a silent peer gets an error by the deadline; no socket to the peer stays open."""
    client = lib.Client(base_url=f"http://{proxy.host}:{proxy.port}", timeout=None)
    clients.append(client)
    registry = Registry(drain_timeout=30, close_timeout=10)
    registry.wrap(client, name="target")
    assert client.get("/fast").text == "fast"  # warm: one idle connection
    errors: list[BaseException] = []
    done = threading.Event()

    def wait_for_slow() -> None:
        try:
            client.get("/slow")
        except BaseException as error:
            errors.append(error)
        done.set()

    threading.Thread(target=wait_for_slow, daemon=True).start()
    http_server.wait_arrived(1)
    proxy.blackhole()

    started = time.monotonic()
    report = registry.close(deadline=DEADLINE)
    assert time.monotonic() - started < DEADLINE + SLACK
    assert done.wait(2.0)
    assert time.monotonic() - started < DEADLINE + SLACK

    item = report["target"]
    assert (item.outcome, item.borrowed_at_start, item.forced) == ("forced", 1, 1)
    assert isinstance(errors[0], lib.NetworkError)
    gc.collect()
    assert sockets_to(proxy.port) == 0


def test_an_upload_stuck_on_a_blackholed_peer_is_aborted_within_the_deadline(lib, proxy, clients):
    """Sync: a POST of 32 MiB blocked writing to a silent peer fails by the deadline and leaves no socket open."""
    client = lib.Client(base_url=f"http://{proxy.host}:{proxy.port}", timeout=None)
    clients.append(client)
    registry = Registry(drain_timeout=30, close_timeout=10)
    registry.wrap(client, name="target")
    assert client.get("/fast").text == "fast"
    proxy.blackhole()
    errors: list[BaseException] = []
    done = threading.Event()

    def upload() -> None:
        try:
            client.post("/sink", content=b"x" * (32 * 1024 * 1024))
        except BaseException as error:
            errors.append(error)
        done.set()

    threading.Thread(target=upload, daemon=True).start()
    until(lambda: registry["target"].borrowed == 1)
    assert not done.wait(0.2)  # the client fills the socket buffers; nothing signals "buffers full"

    started = time.monotonic()
    report = registry.close(deadline=DEADLINE)
    assert done.wait(2.0)
    assert time.monotonic() - started < DEADLINE + SLACK
    assert report["target"].forced == 1
    assert isinstance(errors[0], lib.NetworkError)
    gc.collect()
    assert sockets_to(proxy.port) == 0


@pytest.mark.asyncio
async def test_an_async_request_to_a_blackholed_peer_is_aborted_within_the_deadline(lib, proxy, http_server, clients):
    """Async: the same, and the request refused meanwhile never waits on the silent peer."""
    client = lib.AsyncClient(base_url=f"http://{proxy.host}:{proxy.port}", timeout=None)
    clients.append(client)
    registry = Registry(drain_timeout=30, close_timeout=10)
    registry.wrap(client, name="target")
    assert (await client.get("/fast")).text == "fast"
    borrower = asyncio.ensure_future(client.get("/slow"))
    await http_server.await_arrived(1)
    proxy.blackhole()

    started = time.monotonic()
    closing = asyncio.ensure_future(registry.aclose(deadline=DEADLINE))
    await auntil(lambda: registry["target"].state is KeeperState.DRAINING)
    with pytest.raises(PoolClosedError):
        await client.get("/fast")
    report = await closing
    assert time.monotonic() - started < DEADLINE + SLACK
    await asyncio.wait([borrower], timeout=2.0)
    assert time.monotonic() - started < DEADLINE + SLACK

    assert (report["target"].outcome, report["target"].forced) == ("forced", 1)
    assert isinstance(borrower.exception(), lib.NetworkError)
    gc.collect()
    assert sockets_to(proxy.port) == 0


# -- bad input and secrets ------------------------------------------------------------------------------


def test_a_transport_poolkeeper_cannot_see_into_is_refused_at_wrap_time(lib, clients):
    """MockTransport (default or mounted) is refused with UnsupportedResourceError naming it; nothing is registered."""
    client = lib.Client(transport=lib.MockTransport(lambda _request: lib.Response(200)))
    clients.append(client)
    mounted = lib.Client(mounts={"http://example.invalid": lib.MockTransport(lambda _request: lib.Response(200))})
    clients.append(mounted)
    registry = Registry()

    for wrapped in (client, mounted):
        with pytest.raises(UnsupportedResourceError, match=r"MockTransport.*supports clients whose transports are"):
            registry.wrap(wrapped, name="http")
        assert "send" not in vars(wrapped)
    assert registry.keepers == ()
    assert client.get("http://example.invalid/").status_code == 200  # untouched


def test_a_closed_client_is_refused_and_nothing_is_registered(lib):
    """Wrapping a client that is already closed raises ValueError naming the resource; nothing stays registered."""
    client = lib.Client()
    client.close()
    registry = Registry()
    with pytest.raises(ValueError, match=f"resource: this {lib.__name__} Client is already closed"):
        registry.wrap(client, name="http")
    assert registry.keepers == ()
    assert "send" not in vars(client)


def test_secrets_never_reach_the_report_or_the_logs(lib, http_server, clients, caplog):
    """The base URL's password and the auth's credentials stay out of the report and poolkeeper's logs."""
    client = lib.Client(
        base_url=f"http://user:url-s3cret@127.0.0.1:{http_server.port}",
        auth=("user", "auth-s3cret"),
        headers={"X-Api-Key": "not-a-secret"},
    )
    clients.append(client)
    registry = Registry(drain_timeout=0.2)
    registry.wrap(client, name="http")
    driver = registry["http"].driver
    assert "url-s3cret" in driver.secrets()
    assert "auth-s3cret" in driver.secrets()
    assert driver.describe() == f"http://127.0.0.1:{http_server.port}"

    def wait_for_slow() -> None:
        with contextlib.suppress(Exception):
            client.get("/slow")

    borrower = threading.Thread(target=wait_for_slow, daemon=True)
    borrower.start()
    http_server.wait_arrived(1)
    with caplog.at_level(logging.DEBUG, logger="poolkeeper"):
        report = registry.close()
    borrower.join(timeout=2)

    shown = [
        str(report),
        repr(report.to_dict()),
        *(r.getMessage() for r in caplog.records if r.name.startswith("poolkeeper")),
    ]
    for text in shown:
        assert "url-s3cret" not in text
        assert "auth-s3cret" not in text


# -- processes ------------------------------------------------------------------------------------------

# Run in a process of its own (never fork the pytest process): a parent with a request in flight
# on one connection and a second connection idle forks; the child makes a request of its own (on
# a connection of its own, never the parent's idle one) and closes its registry; the parent's
# request must still complete, and its connections must still serve it.
FORK_PROGRAM = """
import json, os, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import poolkeeper

lib = __import__(sys.argv[1])
arrived, release = threading.Event(), threading.Event()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.path == "/slow":
            arrived.set()
            release.wait(10)
        body = f"{self.path} {self.client_address[1]}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
threading.Thread(target=server.serve_forever, daemon=True).start()
registry = poolkeeper.Registry(drain_timeout=2)
client = registry.wrap(lib.Client(base_url=f"http://127.0.0.1:{server.server_port}"), name="http")
result = {}
slow = threading.Thread(target=lambda: result.update(slow=client.get("/slow").text.split()))
slow.start()
arrived.wait(5)
warm_port = client.get("/warm").text.split()[1]  # a second connection, idle from now on
read, write = os.pipe()
pid = os.fork()
if pid == 0:
    child_port = client.get("/child").text.split()[1]
    report = registry.close()
    os.write(write, json.dumps({"report": report.to_dict(), "child_port": child_port}).encode())
    os._exit(0)
os.close(write)
_, status = os.waitpid(pid, 0)
child = json.loads(os.read(read, 65536))
release.set()
slow.join(5)
result["after_port"] = client.get("/after").text.split()[1]
result["parent_report"] = registry.close().to_dict()
result.update(child=child, child_status=status, warm_port=warm_port)
print(json.dumps(result))
"""


def test_a_forked_childs_close_never_touches_the_parents_connections(lib, tmp_path):
    """The child closes only what it opened: the parent's request in flight and its idle connection keep working."""
    program = tmp_path / "fork_httpx.py"
    program.write_text(FORK_PROGRAM)
    completed = subprocess.run(
        [sys.executable, str(program), lib.__name__], capture_output=True, text=True, timeout=60, check=False
    )
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout.splitlines()[-1])

    assert result["child_status"] == 0
    [child_item] = result["child"]["report"]["items"]
    assert (child_item["outcome"], child_item["borrowed_at_start"]) == ("clean", 0)
    path, slow_port = result["slow"]
    assert path == "/slow"  # the parent's request in flight completed
    # The child opened its own connection: it never sent on the parent's idle one.
    assert result["child"]["child_port"] not in {result["warm_port"], slow_port}
    assert result["after_port"] in {result["warm_port"], slow_port}  # the parent's connections still serve it
    assert result["parent_report"]["ok"] is True
    assert "ResourceWarning" not in completed.stderr


def test_an_httpcore_without_the_pool_queue_is_refused_at_wrap_time(lib, monkeypatch, clients):
    """An httpcore lacking the pool queue's API (as before 1.0.3) makes wrap() name what is missing and the range."""
    core = importlib.import_module("httpcore" if lib.__name__ == "httpx" else "httpcore2")
    pool_request = importlib.import_module(f"{core.__name__}._sync.connection_pool").PoolRequest
    monkeypatch.delattr(pool_request, "assign_to_connection")
    client = lib.Client()
    clients.append(client)
    registry = Registry()

    with pytest.raises(UnsupportedResourceError) as caught:
        registry.wrap(client, name="http")
    message = str(caught.value)
    assert "lacks PoolRequest.assign_to_connection" in message
    assert f"the installed {lib.__name__} {lib.__version__} (with {core.__name__} " in message
    assert f"poolkeeper supports {lib.__name__} >=" in message
    assert registry.keepers == ()
    assert "send" not in vars(client)


@pytest.fixture
def unanswered_port() -> Iterator[tuple[int, int]]:
    """A port whose listen queue is full: a new connection's SYN is dropped and its connect hangs, as to a dead host.

    Yields the port and how many sockets this process holds to it before the test connects.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):  # more than the queue holds: the kernel accepts the first ones, then drops SYNs
        filler = socket.socket()
        filler.settimeout(0)  # non-blocking: the connect is only started
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    until(lambda: sockets_to(port) == len(fillers))
    yield port, len(fillers)
    for filler in fillers:
        filler.close()
    listener.close()


@pytest.mark.asyncio
async def test_an_async_request_still_connecting_is_interrupted_at_the_deadline(lib, unanswered_port, clients):
    """A request whose connect gets no answer (no timeout set) is interrupted by the deadline with NetworkError."""
    port, before = unanswered_port
    client = lib.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=None)
    clients.append(client)
    registry = Registry(drain_timeout=30, close_timeout=10)
    registry.wrap(client, name="target")
    borrower = asyncio.ensure_future(client.get("/"))
    await auntil(lambda: sockets_to(port) == before + 1)  # the client's socket, in SYN_SENT

    started = time.monotonic()
    report = await registry.aclose(deadline=DEADLINE)
    await asyncio.wait([borrower], timeout=2.0)
    assert time.monotonic() - started < DEADLINE + SLACK

    assert (report["target"].outcome, report["target"].forced) == ("forced", 1)
    error = borrower.exception()
    assert isinstance(error, lib.NetworkError)
    assert "'target' force-closed this request" in str(error)
    if sys.version_info >= (3, 11):
        assert borrower.cancelling() == 0  # the force-close's cancellation was taken back
    await auntil(lambda: sockets_to(port) == before)
