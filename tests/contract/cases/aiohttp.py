"""The aiohttp adapter: a ``ClientSession`` (connection limit 2) against a real ``aiohttp.web`` server on loopback.

A held request is a streamed response whose last chunk the server sends only when the borrower
is released; the long operation is a request the server never answers. HTTP has no way to
cancel a handler's work: after a force-close the server only sees the connection gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools

import aiohttp
import pytest
from aiohttp import web

from tests.contract.harness import SIZE, AdapterCase, Hold, Subject, TaskHold

__all__ = ["CASES"]

SECRET = "pk-contract-http-secret"


class HttpSubject(Subject):
    secret = SECRET

    def __init__(self) -> None:
        self._ids = itertools.count()
        self._finish: dict[int, asyncio.Event] = {}
        self._running = 0
        self.runner: web.AppRunner | None = None
        self.session: aiohttp.ClientSession | None = None
        self.url = ""

    async def start(self) -> HttpSubject:
        app = web.Application()
        app.router.add_get("/fast", self._fast)
        app.router.add_get("/stream/{id}", self._stream)
        app.router.add_get("/never", self._never)
        self.runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=SIZE), headers={"Authorization": f"Bearer {SECRET}"}
        )
        self.resource = self.session
        return self

    # -- the server ----------------------------------------------------------------------------

    async def _fast(self, _request: web.Request) -> web.Response:
        return web.Response(text="fast")

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        """Headers and a first chunk at once; the rest once the borrower is released."""
        finish = self._finish.setdefault(int(request.match_info["id"]), asyncio.Event())
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"first;")
        await finish.wait()
        with contextlib.suppress(ConnectionError):
            await response.write(b"last")
            await response.write_eof()
        return response

    async def _never(self, _request: web.Request) -> web.Response:
        """Never answers (until the test ends)."""
        self._running += 1
        try:
            await asyncio.Event().wait()
        finally:
            self._running -= 1
        raise AssertionError("unreachable")

    # -- borrowers -----------------------------------------------------------------------------

    def hold(self) -> Hold:
        assert self.session is not None
        session = self.session

        async def body(hold: TaskHold) -> None:
            request_id = next(self._ids)
            finish = self._finish.setdefault(request_id, asyncio.Event())
            async with session.get(f"{self.url}/stream/{request_id}") as response:
                await response.content.readexactly(len(b"first;"))
                hold.mark_lent()  # the response is open: its connection stays borrowed until released
                await hold.wait_released()
                finish.set()
                assert await response.read() == b"last"

        return TaskHold(body)

    def hold_busy(self) -> Hold:
        assert self.session is not None
        session = self.session

        async def body(hold: TaskHold) -> None:
            hold.mark_lent()
            async with session.get(f"{self.url}/never") as response:
                await response.read()

        return TaskHold(body)

    def borrow_once(self) -> Hold:
        assert self.session is not None
        session = self.session

        async def body(_hold: TaskHold) -> None:
            async with session.get(f"{self.url}/fast") as response:
                assert await response.text() == "fast"

        return TaskHold(body)

    def queued(self) -> int:
        assert self.session is not None
        connector = self.session.connector
        assert connector is not None
        return sum(len(waiters) for waiters in connector._waiters.values())

    # -- the server's view ---------------------------------------------------------------------

    def server_connections(self) -> int:
        assert self.runner is not None
        assert self.runner.server is not None
        return sum(handler.transport is not None for handler in self.runner.server.connections)

    def server_busy(self) -> int:
        return self._running

    async def close(self) -> None:
        for finish in self._finish.values():
            finish.set()
        if self.session is not None:
            vars(self.session).pop("_request", None)  # a refusing guard must not stop the cleanup
            await self.session.close()
        if self.runner is not None:
            await self.runner.cleanup()


async def make(_request: pytest.FixtureRequest) -> Subject:
    return await HttpSubject().start()


CASES = [
    # A request waiting for a connection in the connector was admitted before closing began:
    # it is drained, not refused. HTTP cannot cancel the server's work, only cut the connection.
    AdapterCase("aiohttp", "aiohttp", RuntimeError, make, queued_are_refused=False, cancels_server_work=False),
]
