"""An aiohttp.web server in a process of its own, for the HTTP force-close at scale.

In the benchmark's own process the server's work on each connection cut (its ``connection_lost``,
its half of the socket closes) runs on the same event loop as the client's force-close, and is
timed with it: thousands of times over, at the scale measured. Here, as in production, the
server is elsewhere.

    python -m benchmarks._endless_server     # prints "PORT <n>", serves until stdin closes

``GET /endless`` sends its headers and a first chunk, then never finishes its body.
``GET /connections`` answers how many connections the server still has open, its own included.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

if TYPE_CHECKING:
    from collections.abc import AsyncIterator


async def endless(request: web.Request) -> web.StreamResponse:
    """Headers at once; a body that never ends (until the connection is cut)."""
    response = web.StreamResponse()
    await response.prepare(request)
    await response.write(b"first")
    await asyncio.Event().wait()
    return response  # pragma: no cover -- never reached: the connection is cut first


def open_connections(runner: web.AppRunner) -> int:
    """Connections whose socket ``runner``'s server still has open (a stuck handler keeps its entry)."""
    server = runner.server
    assert server is not None
    # aiohttp keeps no public count of its connections.
    return sum(1 for transport in server._connections.values() if not transport.is_closing())


async def serve() -> None:
    """Serve on an ephemeral port of 127.0.0.1 until stdin reaches its end (the parent is done)."""
    app = web.Application()
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)

    async def connections(_request: web.Request) -> web.Response:
        return web.Response(text=str(open_connections(runner)))

    app.router.add_get("/endless", endless)
    app.router.add_get("/connections", connections)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=8192)
    await site.start()
    print(f"PORT {runner.addresses[0][1]}", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # the parent closes our stdin when done
    await runner.cleanup()


_ROOT = Path(__file__).resolve().parent.parent  # where "-m benchmarks._endless_server" is found


class EndlessServer:
    """The parent's handle on a running server: its URL, and what it still holds open."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._side = aiohttp.ClientSession()  # one kept connection: counted the same every time

    async def open_connections(self) -> int:
        """Connections the server still has open, this handle's own included."""
        async with self._side.get(f"{self.url}/connections") as response:
            return int(await response.text())

    async def close(self) -> None:
        await self._side.close()


@contextlib.asynccontextmanager
async def endless_server() -> AsyncIterator[EndlessServer]:
    """Start the server in a child process; stop it (closing its stdin) afterwards."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "benchmarks._endless_server",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=_ROOT,
    )
    assert process.stdin is not None
    assert process.stdout is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        if not line.startswith(b"PORT "):
            raise RuntimeError(f"the endless server did not start: {line!r}")
        server = EndlessServer(f"http://127.0.0.1:{int(line.split()[1])}")
        try:
            yield server
        finally:
            await server.close()
    finally:
        process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()


if __name__ == "__main__":
    asyncio.run(serve())
