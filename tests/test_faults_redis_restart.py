"""Fault: the Redis server restarts in the middle of the drain.

The test runs a Redis of its own on a spare port (``redis-server`` as a subprocess, no
persistence, killed at teardown), so that it can kill and restart it, and so that the
server's connection counter belongs to this test alone. While the server is down and after it is
back, a refused checkout must stay a refusal (``PoolClosedError``, never a reconnect), the
borrower's own retries must stay within its ``Retry`` policy, and once the keeper is closed not
one connection may be attempted again.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.asyncio

from poolkeeper import KeeperState, PoolClosedError, Registry
from tests.faults import auntil, redis_default_backoff

pytestmark = pytest.mark.asyncio

DRAIN = 1.0
# redis-py's default Retry: 10 retries, exponential backoff with jitter from 10 ms to 1 s.
DEFAULT_RETRIES = 10


class RedisProcess:
    """A redis-server of this test's own on a spare loopback port, that the test can kill and restart."""

    def __init__(self) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.process: subprocess.Popen[bytes] | None = None
        self.side: redis.Redis | None = None

    def start(self) -> None:
        """Start the server (again) on the same port and wait until it answers PING."""
        binary = shutil.which("redis-server")
        assert binary is not None, "redis-server is not installed"
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ],
            stdout=subprocess.DEVNULL,
        )
        # One side connection per server life, opened by the first PING that succeeds: the
        # server's connection counter then holds it and this test's clients, nothing else.
        self.side = redis.Redis(port=self.port, db=9, socket_connect_timeout=1, decode_responses=True)
        end = time.monotonic() + 10
        while True:  # the server offers no "ready" event to a parent process; its PING is the check
            with contextlib.suppress(redis.ConnectionError):
                self.side.ping()
                return
            assert time.monotonic() < end, "redis-server did not start"
            time.sleep(0.01)

    def kill(self) -> None:
        """Kill the server outright (SIGKILL): its clients see their connections reset."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        if self.side is not None:
            self.side.close()

    def connections_received(self) -> int:
        """``total_connections_received`` of the server now running, the side connection included."""
        assert self.side is not None
        return int(self.side.info("stats")["total_connections_received"])

    def client_names(self) -> list[str]:
        assert self.side is not None
        return [str(client["name"]) for client in self.side.client_list()]


@pytest.fixture
def redis_process() -> Iterator[RedisProcess]:
    server = RedisProcess()
    server.start()
    yield server
    server.kill()


class Attempts:
    """Every TCP connect the client's connections attempted (successful or not), and by which connection."""

    def __init__(self) -> None:
        self.made: list[tuple[float, int]] = []  # (when, id of the connection object)
        self._lock = threading.Lock()

    def note(self, connection: object) -> None:
        with self._lock:
            self.made.append((time.monotonic(), id(connection)))

    def since(self, moment: float, *, by: object = None, not_by: object = None) -> int:
        return sum(
            1
            for at, who in self.made
            if at >= moment and (by is None or who == id(by)) and (not_by is None or who != id(not_by))
        )


def counting_sync_client(port: int, attempts: Attempts, name: str) -> redis.Redis:
    """A redis.Redis with redis-py's default Retry whose connections count their connect attempts."""

    class Counting(redis.Connection):
        def _connect(self) -> Any:
            attempts.note(self)
            return super()._connect()  # type: ignore[no-untyped-call]  # redis-py leaves _connect unannotated

    client = redis.Redis(port=port, db=9, socket_timeout=30, client_name=name)
    client.connection_pool.connection_class = Counting
    return client


def counting_async_client(port: int, attempts: Attempts, name: str) -> redis.asyncio.Redis:
    """A redis.asyncio.Redis with redis-py's default Retry whose connections count their connect attempts."""

    class Counting(redis.asyncio.Connection):
        async def _connect(self) -> None:
            attempts.note(self)
            await super()._connect()  # type: ignore[no-untyped-call]  # redis-py leaves _connect unannotated

    client = redis.asyncio.Redis(port=port, db=9, socket_timeout=30, client_name=name)
    client.connection_pool.connection_class = Counting
    return client


class BlockedCache:
    """A wrapped client of the test's Redis, one of whose connections is blocked in ``BLPOP key 0``."""

    def __init__(self, flavour: str, registry: Registry, port: int, attempts: Attempts) -> None:
        self.name = f"pk-test-{uuid.uuid4().hex[:12]}"
        self.key = f"pk-test:never-pushed:{uuid.uuid4().hex}"
        self.errors: list[BaseException] = []
        self.borrower: asyncio.Task[None] | threading.Thread
        if flavour == "sync":
            self.client: Any = registry.wrap(counting_sync_client(port, attempts, self.name), name="cache")
            self.borrower = threading.Thread(target=self._block, daemon=True)
            self.borrower.start()
        else:
            self.client = registry.wrap(counting_async_client(port, attempts, self.name), name="cache")
            self.borrower = asyncio.ensure_future(self._block_async())
        self.is_async = flavour != "sync"

    def _block(self) -> None:
        try:
            self.client.blpop([self.key], 0)
        except Exception as error:
            self.errors.append(error)

    async def _block_async(self) -> None:
        try:
            await self.client.blpop([self.key], 0)
        except Exception as error:
            self.errors.append(error)

    async def command(self) -> None:
        """A new command (``GET``): it needs a connection of its own."""
        if self.is_async:
            await self.client.get(self.key)
        else:
            await asyncio.to_thread(self.client.get, self.key)


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
async def test_a_restart_during_the_drain_causes_no_reconnect_storm_and_refusal_stays_refusal(
    flavour, redis_process: RedisProcess
):
    """Redis killed and restarted mid-drain: refusals never connect, retries stay bounded, nothing reconnects after."""
    attempts = Attempts()
    registry = Registry(drain_timeout=DRAIN)
    cache = BlockedCache(flavour, registry, redis_process.port, attempts)
    name, command, borrower_error = cache.name, cache.command, cache.errors
    await auntil(lambda: registry["cache"].borrowed == 1)
    [borrowed] = list(registry["cache"]._borrows)
    assert await asyncio.to_thread(lambda: _settle(lambda: name in redis_process.client_names()))
    started = time.monotonic()
    closing = asyncio.ensure_future(registry.aclose())
    await auntil(lambda: registry["cache"].state is KeeperState.DRAINING)

    redis_process.kill()
    down = time.monotonic()
    refused_while_down = await refusals(command, 20)
    await asyncio.to_thread(redis_process.start)
    refused_while_back = await refusals(command, 20)
    report = await closing
    elapsed = time.monotonic() - started
    await auntil(lambda: bool(borrower_error), timeout=2.0 + redis_default_backoff())  # its Retry's sleep first

    closed = time.monotonic()
    refused_after_close = await refusals(command, 20)

    assert (refused_while_down, refused_while_back, refused_after_close) == (20, 20, 20)
    assert attempts.since(down, not_by=borrowed) == 0  # no refused command ever tried to connect
    # Only the borrower's own Retry reconnects during the drain, once per retry at most; then none.
    assert attempts.since(down, by=borrowed) <= DEFAULT_RETRIES + 1
    assert attempts.since(closed) == 0
    item = report["cache"]
    assert (item.borrowed_at_start, item.returned + item.forced) == (1, 1)
    assert item.outcome in ("clean", "forced")  # the borrower gave up within the drain, or was forced
    assert elapsed < DRAIN + 1.0
    assert name not in redis_process.client_names()
    # The restarted server saw the side connection and at most the borrower's one reconnect.
    assert redis_process.connections_received() <= 2


async def refusals(command: Any, count: int) -> int:
    """How many of ``count`` calls of ``command`` were refused with PoolClosedError, each within 0.5 s."""
    refused = 0
    for _ in range(count):
        started = time.monotonic()
        with contextlib.suppress(PoolClosedError):
            await command()
            continue
        assert time.monotonic() - started < 0.5
        refused += 1
    return refused


def _settle(predicate: Any, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True
