"""aiohttp: GET overhead against a raw ClientSession, and drain wake-up latency, on a local aiohttp.web server."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from benchmarks._measure import (
    BARE_GOAL,
    TRACKED_GOAL,
    WAKE_UP_GOAL_MS,
    Comparison,
    Result,
    alternate,
    close_seconds,
    latency_result,
    timed,
)
from poolkeeper import Registry

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

LARGE_BODY = b"x" * (256 * 1024)  # not complete when the headers arrive: returned through the release callback


@contextlib.asynccontextmanager
async def local_server() -> AsyncIterator[str]:
    """An aiohttp.web server on 127.0.0.1 (ephemeral port); yields its base URL."""
    finish = asyncio.Event()

    async def small(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def large(_request: web.Request) -> web.Response:
        return web.Response(body=LARGE_BODY)

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"first")
        await finish.wait()
        return response

    app = web.Application()
    app.router.add_get("/small", small)
    app.router.add_get("/large", large)
    app.router.add_get("/endless", endless)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        finish.set()
        await runner.cleanup()


async def get_seconds(session: aiohttp.ClientSession, url: str, count: int) -> float:
    """Seconds per GET of ``url`` (body read, response released) over ``count`` requests."""
    with timed():
        started = time.perf_counter()
        for _ in range(count):
            async with session.get(url) as response:
                await response.read()
        return (time.perf_counter() - started) / count


async def compare_get(name: str, url: str, *, count: int, rounds: int, track: bool = False) -> Comparison:
    """Alternate raw and wrapped rounds of GETs so that machine noise hits both alike."""
    registry = Registry(track_borrowers=track)
    raw = aiohttp.ClientSession()
    wrapped = registry.wrap(aiohttp.ClientSession(), name="http")
    await get_seconds(raw, url, count // 5)  # warm up both: connections, caches
    await get_seconds(wrapped, url, count // 5)
    result = await alternate(name, lambda session: get_seconds(session, url, count), raw, wrapped, rounds=rounds)
    await registry.aclose()
    await raw.close()
    return result


async def drain_latency(base: str, samples: int = 50) -> Result:
    """Time from the release of the last response to ``aclose()`` returning."""
    latencies = []
    closes: list[float] = []
    for _ in range(samples):
        registry = Registry(drain_timeout=10)
        session = registry.wrap(aiohttp.ClientSession(), name="http")
        response = await session.get(f"{base}/endless")  # its body never ends: borrowed until released
        closing = asyncio.ensure_future(registry.aclose())
        await asyncio.sleep(0.01)
        assert not closing.done()
        released_at = time.perf_counter()
        response.release()
        await closing
        latencies.append(time.perf_counter() - released_at)
        closes.append(close_seconds(registry))
    return latency_result("aiohttp drain wake-up", latencies, WAKE_UP_GOAL_MS, closes)


async def run_all() -> list[Result]:
    async with local_server() as base:
        small = await compare_get("aiohttp GET, small body", f"{base}/small", count=300, rounds=21)
        tracked = await compare_get(
            "aiohttp GET, small body, tracked", f"{base}/small", count=300, rounds=21, track=True
        )
        large = await compare_get("aiohttp GET, 256 KiB body read after return", f"{base}/large", count=60, rounds=21)
        return [
            small.result(BARE_GOAL),
            tracked.result(TRACKED_GOAL),
            large.result(BARE_GOAL),
            await drain_latency(base),
        ]


def run() -> list[Result]:
    return asyncio.run(run_all())
