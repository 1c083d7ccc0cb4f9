"""httpx: GET overhead against a raw Client / AsyncClient, and drain wake-up latency, on a local aiohttp.web server.

The server runs its event loop in a thread of its own, so that the sync Client (blocking the
main thread) and the AsyncClient talk to the same real server.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import TYPE_CHECKING, Any

import httpx
from aiohttp import web

from benchmarks._measure import Comparison, Result, close_seconds, compare, latency_result
from poolkeeper import Registry

if TYPE_CHECKING:
    from collections.abc import Iterator


@contextlib.contextmanager
def local_server() -> Iterator[tuple[str, threading.Event]]:
    """An aiohttp.web server on 127.0.0.1 (ephemeral port) in a thread; yields its base URL and its "finish" event.

    ``/endless`` sends its headers and a first chunk, then the rest once "finish" is set.
    """
    loop = asyncio.new_event_loop()
    finish = threading.Event()

    async def small(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"first")
        await asyncio.to_thread(finish.wait, 10)
        return response

    app = web.Application()
    app.router.add_get("/small", small)
    app.router.add_get("/endless", endless)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)

    async def start() -> str:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    thread = threading.Thread(target=loop.run_forever, name="bench-http-server", daemon=True)
    thread.start()
    try:
        yield asyncio.run_coroutine_threadsafe(start(), loop).result(10), finish
    finally:
        finish.set()
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def compare_sync_get(url: str, *, count: int, rounds: int) -> Comparison:
    """Raw and wrapped ``Client.get`` in alternating rounds."""
    registry = Registry()
    raw = httpx.Client()
    wrapped = registry.wrap(httpx.Client(), name="http")
    try:
        return compare(
            "httpx Client GET, small body", lambda: raw.get(url), lambda: wrapped.get(url), count=count, rounds=rounds
        )
    finally:
        registry.close()
        raw.close()


async def async_get_seconds(client: httpx.AsyncClient, url: str, count: int) -> float:
    """Seconds per ``AsyncClient.get`` of ``url`` over ``count`` requests."""
    started = time.perf_counter()
    for _ in range(count):
        await client.get(url)
    return (time.perf_counter() - started) / count


async def compare_async_get(url: str, *, count: int, rounds: int) -> Comparison:
    """Raw and wrapped ``AsyncClient.get`` in alternating rounds."""
    registry = Registry()
    raw = httpx.AsyncClient()
    wrapped = registry.wrap(httpx.AsyncClient(), name="http")
    result = Comparison("httpx AsyncClient GET, small body", [], [])
    await async_get_seconds(raw, url, count // 5)  # warm up both: connections, caches
    await async_get_seconds(wrapped, url, count // 5)
    for _ in range(rounds):
        result.raw.append(await async_get_seconds(raw, url, count))
        result.wrapped.append(await async_get_seconds(wrapped, url, count))
    await registry.aclose()
    await raw.aclose()
    return result


async def drain_latency(base: str, samples: int = 50) -> Result:
    """Time from closing the last streamed response to ``aclose()`` returning."""
    latencies = []
    closes: list[float] = []
    for _ in range(samples):
        registry = Registry(drain_timeout=10)
        client: Any = registry.wrap(httpx.AsyncClient(), name="http")
        response = await client.send(client.build_request("GET", f"{base}/endless"), stream=True)
        closing = asyncio.ensure_future(registry.aclose())
        await asyncio.sleep(0.01)
        assert not closing.done()
        closed_at = time.perf_counter()
        await response.aclose()
        await closing
        latencies.append(time.perf_counter() - closed_at)
        closes.append(close_seconds(registry))
    return latency_result("httpx drain wake-up", latencies, 2.0, closes)


def run() -> list[Result]:
    with local_server() as (base, _finish):
        sync_get = compare_sync_get(f"{base}/small", count=300, rounds=21)
        async_get = asyncio.run(compare_async_get(f"{base}/small", count=300, rounds=21))
        latency = asyncio.run(drain_latency(base))
    return [sync_get.result(1.05), async_get.result(1.05), latency]
