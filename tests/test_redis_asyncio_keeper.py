"""The redis-py keeper on ``redis.asyncio.Redis``, against the real Redis server (database 9)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import pytest_asyncio
import redis
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from poolkeeper import KeeperState, PoolClosedError, Registry
from tests.test_redis_keeper import CHECKOUT_ARGS, RedisServer, client_name, key, redis_server
from tests.waiting import auntil

# redis-py before 6.0 retries a command only on the errors named in retry_on_error; 6.0+ adds them to retry's.
RETRIED = [redis.ConnectionError, redis.TimeoutError]

__all__ = ["client_name", "key", "redis_server"]  # fixtures shared with the sync tests

pytestmark = pytest.mark.asyncio

BORROWS = ["command", "pipeline", "pubsub", "blocking command"]


@pytest_asyncio.fixture
async def make_client(redis_url: str, client_name: str) -> AsyncIterator[Callable[..., redis.asyncio.Redis]]:
    """Build asyncio clients on database 9, tagged with this test's client name, closed at teardown."""
    clients: list[redis.asyncio.Redis] = []

    def make(
        pool_class: type[redis.asyncio.ConnectionPool] = redis.asyncio.ConnectionPool,
        *,
        single_connection_client: bool = False,
        **pool_options: Any,
    ) -> redis.asyncio.Redis:
        pool_options.setdefault("socket_timeout", 30)  # redis-py 8 defaults to 5 s, shorter than the tests' holds
        pool = pool_class.from_url(redis_url, client_name=client_name, **pool_options)
        client = redis.asyncio.Redis(connection_pool=pool, single_connection_client=single_connection_client)
        client.auto_close_connection_pool = True  # client.aclose() at teardown closes the pool too
        clients.append(client)
        return client

    yield make
    for client in clients:
        with contextlib.suppress(Exception):
            await client.aclose()


async def use(client: redis.asyncio.Redis, how: str, key: str) -> None:
    """Borrow a connection the way ``how`` names, and give it back."""
    if how == "command":
        await client.get(key)
    elif how == "pipeline":
        async with client.pipeline() as pipeline:
            pipeline.set(key, "1")
            pipeline.get(key)
            await pipeline.execute()
    elif how == "pubsub":
        async with client.pubsub() as pubsub:
            await pubsub.subscribe(key)
    elif how == "blocking command":
        await client.blpop([key], 0.1)
    else:
        raise ValueError(how)


async def failure_time(awaitable: Any) -> tuple[float, BaseException]:
    """When ``awaitable`` failed, and with what; fails the test if it succeeds."""
    try:
        await awaitable
    except Exception as error:
        return time.monotonic(), error
    raise AssertionError("the borrower was not interrupted")


async def test_wrap_returns_the_same_client_still_usable(make_client, key):
    """wrap() returns the very asyncio client it was given, and it keeps working."""
    client = make_client()
    registry = Registry()
    assert registry.wrap(client, name="cache") is client
    await client.set(key, "42")
    assert await client.get(key) == b"42"
    keeper = registry["cache"]
    assert (keeper.kind, keeper.borrowed) == ("redis", 0)
    assert keeper.driver.home_loop is asyncio.get_running_loop()
    assert (await registry.aclose())["cache"].outcome == "clean"


async def test_ping_answers_until_the_keeper_closes(make_client):
    """The readiness ping is a real PING: it passes while open and fails with PoolClosedError once closed."""
    client = make_client()
    registry = Registry()
    registry.wrap(client, name="cache")
    driver = registry["cache"].driver
    await driver.ping()
    await registry.aclose()
    with pytest.raises(PoolClosedError):
        await driver.ping()


async def test_borrows_are_counted_while_held(make_client, key):
    """A pubsub holds its connection until closed, a pipeline from WATCH to reset: both are borrows."""
    client = make_client()
    registry = Registry()
    registry.wrap(client, name="cache")
    keeper = registry["cache"]

    pubsub = client.pubsub()
    await pubsub.subscribe(key)
    assert keeper.borrowed == 1
    pipeline = client.pipeline()
    await pipeline.watch(key)
    assert keeper.borrowed == 2
    await client.ping()
    assert keeper.borrowed == 2
    await pipeline.reset()
    assert keeper.borrowed == 1
    await pubsub.aclose()
    assert keeper.borrowed == 0
    await registry.aclose()


@pytest.mark.parametrize("how", BORROWS)
async def test_new_borrows_are_refused_while_draining(make_client, redis_server: RedisServer, key, how):
    """Once closing starts, commands, pipelines, pubsubs and BLPOP raise PoolClosedError and open nothing."""
    client = make_client()
    registry = Registry(drain_timeout=10)
    registry.wrap(client, name="cache")
    holder = client.pubsub()
    await holder.subscribe(key)  # one borrowed connection keeps the keeper draining
    closing = asyncio.ensure_future(registry.aclose())
    await auntil(lambda: registry["cache"].state is KeeperState.DRAINING)

    started = time.monotonic()
    with pytest.raises(PoolClosedError, match="'cache' is draining"):
        await use(client, how, key)
    assert time.monotonic() - started < 0.5
    assert redis_server.commands() == ["subscribe"]

    await holder.aclose()
    assert (await asyncio.wait_for(closing, 10))["cache"].outcome == "clean"


async def test_a_task_waiting_in_a_blocking_pool_is_woken_at_once(make_client, key):
    """A task queued in an asyncio BlockingConnectionPool gets PoolClosedError as closing starts, not at its timeout."""
    client = make_client(redis.asyncio.BlockingConnectionPool, max_connections=1, timeout=30)
    registry = Registry(drain_timeout=10)
    registry.wrap(client, name="cache")
    holder = client.pubsub()
    await holder.subscribe(key)
    waiter = asyncio.ensure_future(failure_time(client.ping()))
    condition = client.connection_pool._condition
    await auntil(lambda: len(condition._waiters) == 1)

    started = time.monotonic()
    closing = asyncio.ensure_future(registry.aclose())
    failed_at, error = await asyncio.wait_for(waiter, 5)
    assert isinstance(error, PoolClosedError)
    assert failed_at - started < 0.5

    await holder.aclose()  # the returned connection still goes back and ends the drain
    assert (await asyncio.wait_for(closing, 10))["cache"].outcome == "clean"


async def test_clean_drain_wakes_on_the_last_return(make_client, redis_server: RedisServer, key):
    """aclose() returns right after a BLPOP in flight gets its value and gives its connection back."""
    client = make_client()
    registry = Registry(drain_timeout=20)
    registry.wrap(client, name="cache")
    borrower = asyncio.ensure_future(client.blpop([key], 0))
    assert await redis_server.asettle(lambda: redis_server.commands() == ["blpop"])
    closing = asyncio.ensure_future(registry.aclose())
    await asyncio.sleep(0.2)
    assert not closing.done()

    pushed = time.monotonic()
    redis_server.push(key, "done")
    report = await asyncio.wait_for(closing, 10)
    assert time.monotonic() - pushed < 0.3
    assert await borrower == (key.encode(), b"done")
    item = report["cache"]
    assert (item.outcome, item.borrowed_at_start, item.returned, item.forced) == ("clean", 1, 1, 0)


async def test_force_close_errors_a_blocked_blpop_promptly_and_leaves_no_client(
    make_client, redis_server: RedisServer, key
):
    """At the deadline a BLPOP 0 errors within 1.5 s, the server drops the client, and nothing reconnects."""
    client = make_client()
    registry = Registry(drain_timeout=0.3, close_timeout=5, track_borrowers=True)
    registry.wrap(client, name="cache")
    borrower = asyncio.ensure_future(failure_time(client.blpop([key], 0)))
    assert await redis_server.asettle(lambda: redis_server.commands() == ["blpop"])

    started = time.monotonic()
    report = await registry.aclose()
    failed_at, error = await asyncio.wait_for(borrower, 5)
    assert failed_at - started < 1.5
    assert isinstance(error, redis.ConnectionError)  # from_url clients do not retry
    item = report["cache"]
    assert (item.outcome, item.forced) == ("forced", 1)
    assert item.leaks[0].task == borrower.get_name()
    assert await redis_server.asettle(lambda: redis_server.clients() == []), redis_server.clients()
    with pytest.raises(PoolClosedError, match="'cache' is closed"):
        await client.blpop([key], 0)
    assert redis_server.clients() == []


async def test_a_thousand_forced_borrowers_coming_back_after_the_close_leave_the_loop_quiet_soon(
    make_client, redis_server: RedisServer, key
):
    """1,000 forced BLPOPs give their connections back after aclose(): the loop is idle again within seconds.

    Each late return used to start a sweep over every connection of the pool: 1,000 returns made half a
    million disconnect tasks (5,000 ran a benchmark out of 24 GB of memory).
    """
    borrowers = 1000
    client = make_client(max_connections=borrowers)  # redis-py 8 allows 100 by default
    registry = Registry(drain_timeout=0)
    registry.wrap(client, name="cache")
    tasks = [asyncio.ensure_future(failure_time(client.blpop([key], 0))) for _ in range(borrowers)]
    assert await redis_server.asettle(lambda: redis_server.commands().count("blpop") == borrowers, timeout=60)

    started = time.monotonic()
    report = await registry.aclose()
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    # Every borrower has its error; what is left to run is the closing of what they gave back.
    await auntil(lambda: asyncio.all_tasks() == {asyncio.current_task()}, timeout=60)
    quiet_after = time.monotonic() - started
    assert report["cache"].forced == borrowers
    assert quiet_after < 5.0, f"the loop was busy for {quiet_after:.1f} s after the close began"
    assert await redis_server.asettle(lambda: redis_server.clients() == []), len(redis_server.clients())


class SweepSignallingConnection(redis.asyncio.Connection):
    """A redis.asyncio connection class that awaits ``on_disconnect`` (once) as its disconnect begins."""

    on_disconnect: Callable[[], Awaitable[None]] | None = None

    async def disconnect(self, *args: Any, **options: Any) -> None:
        hook, self.on_disconnect = self.on_disconnect, None
        if hook is not None:
            await hook()
        await super().disconnect(*args, **options)


async def test_a_connection_given_back_while_the_idle_ones_are_being_closed_is_closed_too(
    make_client, redis_server: RedisServer
):
    """A forced connection given back behind the closer's sweep of the idle ones is disconnected, not left open.

    It comes back from inside the sweep, as the sweep disconnects the idle connection: after
    the sweep listed the idle connections, before the keeper is closed.
    """
    client = make_client(connection_class=SweepSignallingConnection)
    registry = Registry(drain_timeout=0.05)
    registry.wrap(client, name="cache")
    pool = client.connection_pool
    borrowed, idle = await pool.get_connection(*CHECKOUT_ARGS), await pool.get_connection(*CHECKOUT_ARGS)
    for connection in (borrowed, idle):
        await connection.connect()  # as a command would
    await pool.release(idle)
    given_back = asyncio.Event()

    async def give_back() -> None:
        await pool.release(borrowed)
        given_back.set()

    idle.on_disconnect = give_back
    report = await registry.aclose()

    assert given_back.is_set()
    assert (report["cache"].outcome, report["cache"].forced) == ("forced", 1)
    await auntil(lambda: not borrowed.is_connected)  # disconnected by the return: its socket closed here too
    assert await redis_server.asettle(lambda: redis_server.clients() == []), redis_server.clients()


async def test_a_client_that_retries_for_ever_gets_the_refusal_not_a_reconnect(
    make_client, redis_server: RedisServer, key
):
    """A forced BLPOP on a client retrying for ever raises PoolClosedError promptly instead of reconnecting."""
    client = make_client(retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), -1), retry_on_error=RETRIED)
    registry = Registry(drain_timeout=0.3, close_timeout=5)
    registry.wrap(client, name="cache")
    borrower = asyncio.ensure_future(failure_time(client.blpop([key], 0)))
    assert await redis_server.asettle(lambda: redis_server.commands() == ["blpop"])

    started = time.monotonic()
    report = await registry.aclose()
    failed_at, error = await asyncio.wait_for(borrower, 5)
    assert failed_at - started < 1.5
    assert isinstance(error, PoolClosedError)
    assert report["cache"].outcome == "forced"
    assert await redis_server.asettle(lambda: redis_server.clients() == []), redis_server.clients()


async def test_a_forced_pubsub_listener_errors_and_does_not_resubscribe(make_client, redis_server: RedisServer, key):
    """A task listening on a pubsub errors promptly at the deadline and its subscription is not replayed."""
    client = make_client(retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), 5), retry_on_error=RETRIED)
    registry = Registry(drain_timeout=0.3)
    registry.wrap(client, name="cache")
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(key)

    async def listen() -> Any:
        async for message in pubsub.listen():
            return message
        return None

    listener = asyncio.ensure_future(failure_time(listen()))
    assert await redis_server.asettle(lambda: redis_server.commands() == ["subscribe"])

    started = time.monotonic()
    report = await registry.aclose()
    failed_at, error = await asyncio.wait_for(listener, 5)
    assert failed_at - started < 1.5
    assert isinstance(error, PoolClosedError)
    assert report["cache"].forced == 1
    assert await redis_server.asettle(lambda: redis_server.clients() == []), redis_server.clients()
    await pubsub.aclose()
    assert registry["cache"].borrowed == 0


async def test_after_close_nothing_reconnects(make_client, redis_server: RedisServer, key):
    """After close, commands are refused even after ConnectionPool.disconnect(), and no connection is opened."""
    client = make_client()
    registry = Registry()
    registry.wrap(client, name="cache")
    await use(client, "pubsub", key)  # closing a pubsub disconnects its connection...
    await use(client, "pipeline", key)  # ...this one stays open, idle in the pool
    assert len(redis_server.clients()) == 1
    assert (await registry.aclose())["cache"].outcome == "clean"
    assert await redis_server.asettle(lambda: redis_server.clients() == []), redis_server.clients()

    await client.connection_pool.disconnect()  # raw redis-py would reconnect on the next command
    for how in BORROWS:
        with pytest.raises(PoolClosedError, match="'cache' is closed"):
            await use(client, how, key)
    assert redis_server.clients() == []


async def test_a_single_connection_client_is_borrowed_until_closed(make_client, redis_server: RedisServer):
    """The pinned connection of a single_connection_client counts as a borrow, and is refused once closed."""
    client = make_client(single_connection_client=True)
    registry = Registry(drain_timeout=0.2)
    registry.wrap(client, name="cache")
    assert await client.ping() is True
    assert registry["cache"].borrowed == 1

    report = await registry.aclose()
    assert (report["cache"].outcome, report["cache"].forced) == ("forced", 1)
    assert await redis_server.asettle(lambda: redis_server.clients() == []), redis_server.clients()
    with pytest.raises(PoolClosedError, match="'cache' is closed"):
        await client.ping()
    assert redis_server.clients() == []


async def test_sync_close_from_the_clients_own_loop_says_to_use_aclose(make_client):
    """registry.close() inside the loop an asyncio client lives on raises instead of deadlocking."""
    client = make_client()
    registry = Registry()
    registry.wrap(client, name="cache")
    await client.ping()
    with pytest.raises(RuntimeError, match="aclose"):
        registry.close()
    assert (await registry.aclose())["cache"].outcome == "clean"


async def test_sync_close_from_another_thread_closes_on_the_clients_loop(make_client, redis_server: RedisServer):
    """registry.close() from a worker thread disconnects an asyncio client on the loop that owns it."""
    client = make_client()
    registry = Registry()
    registry.wrap(client, name="cache")
    await client.ping()
    assert len(redis_server.clients()) == 1
    report = await asyncio.to_thread(registry.close)
    assert report["cache"].outcome == "clean"
    assert await redis_server.asettle(lambda: redis_server.clients() == []), redis_server.clients()
