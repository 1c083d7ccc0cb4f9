"""The redis-py keeper on a sync ``redis.Redis``, against the real Redis server (database 9)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from poolkeeper import KeeperState, PoolClosedError, RegistrationError, Registry
from poolkeeper.adapters.redis import RedisDriver
from tests.waiting import until

# redis-py before 5.3 requires a command name, which later releases deprecate.
CHECKOUT_ARGS = () if tuple(int(part) for part in redis.__version__.split(".")[:2]) >= (5, 3) else ("PING",)

# redis-py before 6.0 retries a command only on the errors named in retry_on_error; 6.0+ adds them to retry's.
RETRIED = [redis.ConnectionError, redis.TimeoutError]


class RedisServer:
    """A side connection to Redis that looks at the clients of one test (by their client name)."""

    def __init__(self, url: str, client_name: str) -> None:
        self.client_name = client_name
        self.keys: list[str] = []  # the keys this test created, deleted by cleanup()
        self._side = redis.Redis.from_url(url, decode_responses=True)

    def clients(self) -> list[dict[str, Any]]:
        """The ``CLIENT LIST`` entries of the connections this test's clients opened."""
        return [client for client in self._side.client_list() if client["name"] == self.client_name]

    def commands(self) -> list[str]:
        """The last command of each of this test's connections (``blpop``, ``subscribe``...)."""
        return [str(client["cmd"]) for client in self.clients()]

    def settle(self, predicate: Callable[[], bool], timeout: float = 2.0) -> bool:
        """Re-check server state until ``predicate`` holds or ``timeout`` passes.

        The server offers no event for "a client has left", so this polls; the bound is a
        ceiling for the server's own bookkeeping, never a wait for poolkeeper to act.
        """
        end = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > end:
                return False
            time.sleep(0.01)
        return True

    async def asettle(self, predicate: Callable[[], bool], timeout: float = 2.0) -> bool:
        """:meth:`settle` for async tests: the event loop keeps running between polls."""
        end = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > end:
                return False
            await asyncio.sleep(0.01)
        return True

    def push(self, key: str, value: str) -> None:
        """``LPUSH`` from the side connection (wakes a ``BLPOP``)."""
        self._side.lpush(key, value)

    def cleanup(self) -> None:
        """Kill this test's leftover connections and delete the keys it created."""
        for client in self.clients():
            with contextlib.suppress(redis.RedisError):
                self._side.client_kill_filter(_id=client["id"])
        if self.keys:
            self._side.delete(*self.keys)
        self._side.close()


@pytest.fixture
def client_name() -> str:
    """A client name unique to this test, set on every connection it opens."""
    return f"pk-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def key(redis_server: RedisServer) -> str:
    """A key unique to this test (deleted at teardown)."""
    name = f"pk-test:{uuid.uuid4().hex}"
    redis_server.keys.append(name)
    return name


@pytest.fixture
def redis_server(redis_url: str, client_name: str) -> Iterator[RedisServer]:
    """The side connection for this test; kills leftover connections and deletes keys at teardown."""
    side = RedisServer(redis_url, client_name)
    yield side
    side.cleanup()


@pytest.fixture
def make_client(redis_url: str, client_name: str) -> Iterator[Callable[..., redis.Redis]]:
    """Build sync clients on database 9, tagged with this test's client name, closed at teardown."""
    clients: list[redis.Redis] = []

    def make(
        pool_class: type[redis.ConnectionPool] = redis.ConnectionPool,
        *,
        single_connection_client: bool = False,
        **pool_options: Any,
    ) -> redis.Redis:
        pool_options.setdefault("socket_timeout", 30)  # redis-py 8 defaults to 5 s, shorter than the tests' holds
        pool = pool_class.from_url(redis_url, client_name=client_name, **pool_options)
        client = redis.Redis(connection_pool=pool, single_connection_client=single_connection_client)
        client.auto_close_connection_pool = True  # client.close() at teardown closes the pool too
        clients.append(client)
        return client

    yield make
    for client in clients:
        with contextlib.suppress(Exception):
            client.close()


class Borrower(threading.Thread):
    """A thread that runs ``action`` and records its result or its error, and when."""

    def __init__(self, action: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.action = action
        self.result: Any = None
        self.error: BaseException | None = None
        self.finished_at: float | None = None

    def run(self) -> None:
        try:
            self.result = self.action()
        except BaseException as error:
            self.error = error
        finally:
            self.finished_at = time.monotonic()


def close_in_thread(registry: Registry, **kwargs: Any) -> tuple[threading.Thread, list[Any]]:
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(registry.close(**kwargs)), daemon=True)
    thread.start()
    return thread, result


def use(client: redis.Redis, how: str, key: str) -> None:
    """Borrow a connection the way ``how`` names, and give it back."""
    if how == "command":
        client.get(key)
    elif how == "pipeline":
        pipeline = client.pipeline()
        pipeline.set(key, "1")
        pipeline.get(key)
        pipeline.execute()
    elif how == "pubsub":
        with client.pubsub() as pubsub:  # type: ignore[no-untyped-call]  # redis-py leaves pubsub() unannotated
            pubsub.subscribe(key)
    elif how == "blocking command":
        client.blpop(key, 0.1)
    else:
        raise ValueError(how)


BORROWS = ["command", "pipeline", "pubsub", "blocking command"]


def test_wrap_returns_the_same_client_still_usable(make_client, key):
    """wrap() returns the very client it was given, and it keeps working."""
    client = make_client()
    registry = Registry()
    assert registry.wrap(client, name="cache") is client
    client.set(key, "42")
    assert client.get(key) == b"42"
    keeper = registry["cache"]
    assert (keeper.kind, keeper.borrowed) == ("redis", 0)
    assert isinstance(client.connection_pool, redis.ConnectionPool)
    assert registry.close()["cache"].outcome == "clean"


def test_a_second_client_on_the_same_pool_is_not_managed_twice(make_client):
    """Another client of an already managed pool is returned without a second keeper; both refuse after close."""
    first = make_client()
    second = redis.Redis(connection_pool=first.connection_pool)
    registry, other = Registry(), Registry()
    registry.wrap(first, name="cache")
    assert registry.wrap(first) is first
    assert registry.wrap(second) is second
    assert registry.wrap(second, name="cache") is second

    with pytest.raises(RegistrationError, match=r"already managed here as 'cache'.*sharing its pool"):
        registry.wrap(second, name="cache-2")
    with pytest.raises(RegistrationError, match="another registry as 'cache'"):
        other.wrap(second, name="cache-2")
    assert [keeper.name for keeper in registry.keepers] == ["cache"]
    assert len(other) == 0

    registry.close()
    for client in (first, second):
        with pytest.raises(PoolClosedError, match="'cache' is closed"):
            client.ping()


def test_ping_answers_until_the_keeper_closes(make_client):
    """The readiness ping is a real PING: it passes while open and fails with PoolClosedError once closed."""
    client = make_client()
    registry = Registry()
    registry.wrap(client, name="cache")
    driver = registry["cache"].driver
    asyncio.run(driver.ping())
    registry.close()
    with pytest.raises(PoolClosedError):
        asyncio.run(driver.ping())


def test_borrows_are_counted_while_held(make_client, key):
    """A pubsub holds its connection until closed, a pipeline from WATCH to reset: both are borrows."""
    client = make_client()
    registry = Registry()
    registry.wrap(client, name="cache")
    keeper = registry["cache"]

    pubsub = client.pubsub()
    pubsub.subscribe(key)
    assert keeper.borrowed == 1
    pipeline = client.pipeline()
    pipeline.watch(key)
    assert keeper.borrowed == 2
    client.ping()
    assert keeper.borrowed == 2
    pipeline.reset()
    assert keeper.borrowed == 1
    pubsub.close()
    assert keeper.borrowed == 0
    registry.close()


@pytest.mark.parametrize("how", BORROWS)
def test_new_borrows_are_refused_while_draining(make_client, redis_server, key, how):
    """Once closing starts, commands, pipelines, pubsubs and BLPOP raise PoolClosedError and open nothing."""
    client = make_client()
    registry = Registry(drain_timeout=10)
    registry.wrap(client, name="cache")
    holder = client.pubsub()
    holder.subscribe(key)  # one borrowed connection keeps the keeper draining
    closer, result = close_in_thread(registry)
    until(lambda: registry["cache"].state is KeeperState.DRAINING)

    started = time.monotonic()
    with pytest.raises(PoolClosedError, match="'cache' is draining") as caught:
        use(client, how, key)
    assert time.monotonic() - started < 0.5
    assert (caught.value.keeper, caught.value.state) == ("cache", "draining")
    assert redis_server.commands() == ["subscribe"]

    holder.close()
    closer.join(10)
    assert result[0]["cache"].outcome == "clean"


def test_a_thread_waiting_in_a_blocking_pool_is_woken_at_once(make_client, key):
    """A thread queued in a BlockingConnectionPool gets PoolClosedError when closing starts, not at its timeout."""
    client = make_client(pool_class=redis.BlockingConnectionPool, max_connections=1, timeout=30)
    registry = Registry(drain_timeout=10)
    registry.wrap(client, name="cache")
    holder = client.pubsub()
    holder.subscribe(key)
    waiter = Borrower(client.ping)
    waiter.start()
    queued = client.connection_pool.pool
    until(lambda: len(queued.not_empty._waiters) == 1)

    started = time.monotonic()
    closer, result = close_in_thread(registry)
    waiter.join(5)
    assert isinstance(waiter.error, PoolClosedError)
    assert waiter.finished_at is not None
    assert waiter.finished_at - started < 0.5

    holder.close()  # the returned connection still goes back and ends the drain
    closer.join(10)
    assert result[0]["cache"].outcome == "clean"


def test_clean_drain_wakes_on_the_last_return(make_client, redis_server, key):
    """close() returns right after a BLPOP in flight gets its value and gives its connection back."""
    client = make_client()
    registry = Registry(drain_timeout=20)
    registry.wrap(client, name="cache")
    borrower = Borrower(lambda: client.blpop(key, 0))
    borrower.start()
    assert redis_server.settle(lambda: redis_server.commands() == ["blpop"])
    closer, result = close_in_thread(registry)
    until(lambda: registry["cache"].state is KeeperState.DRAINING)
    closer.join(0.2)
    assert closer.is_alive()

    pushed = time.monotonic()
    redis_server.push(key, "done")
    closer.join(10)
    assert time.monotonic() - pushed < 0.3
    assert borrower.result == (key.encode(), b"done")
    item = result[0]["cache"]
    assert (item.outcome, item.borrowed_at_start, item.returned, item.forced) == ("clean", 1, 1, 0)


def test_force_close_errors_a_blocked_blpop_promptly_and_leaves_no_client(make_client, redis_server, key):
    """At the deadline a BLPOP 0 errors within 1.5 s, the server drops the client, and nothing reconnects."""
    client = make_client()
    registry = Registry(drain_timeout=0.3, close_timeout=5, track_borrowers=True)
    registry.wrap(client, name="cache")
    borrower = Borrower(lambda: client.blpop(key, 0))
    borrower.start()
    assert redis_server.settle(lambda: redis_server.commands() == ["blpop"])

    started = time.monotonic()
    report = registry.close()
    borrower.join(5)
    assert borrower.finished_at is not None
    assert borrower.finished_at - started < 1.5
    assert isinstance(borrower.error, redis.ConnectionError)  # from_url clients do not retry
    item = report["cache"]
    assert (item.outcome, item.forced) == ("forced", 1)
    assert item.leaks[0].thread == borrower.name
    assert redis_server.settle(lambda: redis_server.clients() == []), redis_server.clients()
    with pytest.raises(PoolClosedError, match="'cache' is closed"):
        client.blpop(key, 0)
    assert redis_server.clients() == []


def test_a_thousand_forced_connections_given_back_after_the_close_are_each_closed_at_once(make_client, redis_server):
    """1,000 connections forced at close() and given back afterwards, one after another: each is closed, quickly.

    Each late return used to sweep every connection of the pool: a thousand returns, a million
    connections looked at (5.2 s in this test), all in the returning thread.
    """
    borrowers = 1000
    client = make_client(max_connections=borrowers)
    registry = Registry(drain_timeout=0)
    registry.wrap(client, name="cache")
    pool = client.connection_pool
    connections = [pool.get_connection(*CHECKOUT_ARGS) for _ in range(borrowers)]
    for connection in connections:
        connection.connect()  # as a command would
    assert redis_server.settle(lambda: len(redis_server.clients()) == borrowers, timeout=30)
    report = registry.close()
    assert report["cache"].forced == borrowers

    started = time.monotonic()
    for connection in connections:
        pool.release(connection)
    took = time.monotonic() - started
    assert all(connection._sock is None for connection in connections)  # disconnected, on every redis-py
    assert took < 2.0, f"giving back {borrowers} forced connections took {took:.1f} s"
    assert redis_server.settle(lambda: redis_server.clients() == []), len(redis_server.clients())


class SweepSignallingConnection(redis.Connection):
    """A redis-py connection class that runs ``on_disconnect`` (once) as its disconnect begins."""

    on_disconnect: Callable[[], None] | None = None

    def disconnect(self, *args: Any) -> None:
        hook, self.on_disconnect = self.on_disconnect, None
        if hook is not None:
            hook()
        super().disconnect(*args)  # type: ignore[no-untyped-call]  # redis-py leaves disconnect() unannotated


def test_a_connection_given_back_while_the_idle_ones_are_being_closed_is_closed_too(make_client, redis_server):
    """A forced connection given back behind the closer's sweep of the idle ones is disconnected, not left open.

    It comes back from inside the sweep, as the sweep disconnects the idle connection: after
    the sweep listed the idle connections, before the keeper is closed.
    """
    client = make_client(connection_class=SweepSignallingConnection)
    registry = Registry(drain_timeout=0.05)
    registry.wrap(client, name="cache")
    pool = client.connection_pool
    borrowed, idle = pool.get_connection(*CHECKOUT_ARGS), pool.get_connection(*CHECKOUT_ARGS)
    for connection in (borrowed, idle):
        connection.connect()  # as a command would
    pool.release(idle)
    given_back = threading.Event()

    def give_back() -> None:
        pool.release(borrowed)
        given_back.set()

    idle.on_disconnect = give_back
    report = registry.close()

    assert given_back.is_set()
    assert (report["cache"].outcome, report["cache"].forced) == ("forced", 1)
    assert borrowed._sock is None  # disconnected: its socket closed on this side too
    assert redis_server.settle(lambda: redis_server.clients() == []), redis_server.clients()


def test_a_client_that_retries_for_ever_gets_the_refusal_not_a_reconnect(make_client, redis_server, key):
    """A forced BLPOP on a client retrying for ever raises PoolClosedError promptly instead of reconnecting."""
    client = make_client(retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), -1), retry_on_error=RETRIED)
    registry = Registry(drain_timeout=0.3, close_timeout=5)
    registry.wrap(client, name="cache")
    borrower = Borrower(lambda: client.blpop(key, 0))
    borrower.start()
    assert redis_server.settle(lambda: redis_server.commands() == ["blpop"])

    started = time.monotonic()
    report = registry.close()
    borrower.join(5)
    assert borrower.finished_at is not None
    assert borrower.finished_at - started < 1.5
    assert isinstance(borrower.error, PoolClosedError)
    assert report["cache"].outcome == "forced"
    assert redis_server.settle(lambda: redis_server.clients() == []), redis_server.clients()


def test_a_forced_pubsub_listener_errors_and_does_not_resubscribe(make_client, redis_server, key):
    """A thread listening on a pubsub errors promptly at the deadline and its subscription is not replayed."""
    client = make_client(retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), 5), retry_on_error=RETRIED)
    registry = Registry(drain_timeout=0.3)
    registry.wrap(client, name="cache")
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(key)
    listener = Borrower(lambda: next(iter(pubsub.listen())))
    listener.start()
    assert redis_server.settle(lambda: redis_server.commands() == ["subscribe"])

    started = time.monotonic()
    report = registry.close()
    listener.join(5)
    assert listener.finished_at is not None
    assert listener.finished_at - started < 1.5
    assert isinstance(listener.error, PoolClosedError)
    assert report["cache"].forced == 1
    assert redis_server.settle(lambda: redis_server.clients() == []), redis_server.clients()
    pubsub.close()
    assert registry["cache"].borrowed == 0


def test_after_close_nothing_reconnects(make_client, redis_server, key):
    """After close, commands are refused even after ConnectionPool.disconnect(), and no connection is opened."""
    client = make_client()
    registry = Registry()
    registry.wrap(client, name="cache")
    use(client, "pubsub", key)  # closing a pubsub disconnects its connection...
    use(client, "pipeline", key)  # ...this one stays open, idle in the pool
    assert len(redis_server.clients()) == 1
    assert registry.close()["cache"].outcome == "clean"
    assert redis_server.settle(lambda: redis_server.clients() == []), redis_server.clients()

    client.connection_pool.disconnect()  # raw redis-py would reconnect on the next command
    for how in BORROWS:
        with pytest.raises(PoolClosedError, match="'cache' is closed"):
            use(client, how, key)
    assert redis_server.clients() == []


def test_a_single_connection_client_is_borrowed_until_closed(make_client, redis_server):
    """The pinned connection of a single_connection_client counts as a borrow, and is refused once closed."""
    client = make_client(single_connection_client=True)
    registry = Registry(drain_timeout=0.2)
    registry.wrap(client, name="cache")
    assert registry["cache"].borrowed == 1
    assert client.ping() is True

    report = registry.close()
    assert (report["cache"].outcome, report["cache"].forced) == ("forced", 1)
    assert redis_server.settle(lambda: redis_server.clients() == []), redis_server.clients()
    with pytest.raises(PoolClosedError, match="'cache' is closed"):
        client.ping()
    assert redis_server.clients() == []


@pytest.mark.parametrize(
    ("url", "target"),
    [
        ("redis://user:pk-S3cret-pw@127.0.0.1:6379/9", "redis://127.0.0.1:6379/9"),
        ("rediss://:pk-S3cret-pw@cache.internal:6380/2", "rediss://cache.internal:6380/2"),
        ("unix://:pk-S3cret-pw@/run/redis.sock?db=3", "unix:///run/redis.sock?db=3"),
    ],
)
def test_the_password_never_appears_in_reports_logs_or_reprs(url, target, caplog):
    """A keeper on a URL with a password describes host:port/db only and shows the password nowhere."""
    client = redis.Redis.from_url(url)  # never connects: the test server has no password
    registry = Registry()
    with caplog.at_level(logging.DEBUG, logger="poolkeeper"):
        registry.wrap(client, name="cache", leak_threshold=1)
        driver = registry["cache"].driver
        assert isinstance(driver, RedisDriver)
        assert driver.secrets() == ("pk-S3cret-pw",)
        report = registry.close()

    assert report["cache"].target == target
    shown = [
        str(report),
        json.dumps(report.to_dict()),
        repr(report),
        repr(registry),
        repr(registry["cache"]),
        caplog.text,
        *(str(record.__dict__) for record in caplog.records),
    ]
    for text in shown:
        assert "pk-S3cret-pw" not in text


def test_wrapping_warns_when_the_client_would_retry_the_refusal(make_client, caplog):
    """A client whose retry_on_error covers PoolClosedError is named in a warning; a default client is not."""
    with caplog.at_level(logging.WARNING, logger="poolkeeper"):
        registry = Registry()
        registry.wrap(make_client(retry=Retry(ExponentialBackoff(), 3)), name="plain")
        assert caplog.records == []
        registry.wrap(make_client(retry_on_error=[Exception]), name="greedy")
    assert [record.poolkeeper_keeper for record in caplog.records] == ["greedy"]
    assert "retries Exception" in caplog.text
    registry.close()


class ListQueue:
    """A queue_class that is not a queue.Queue: BlockingConnectionPool accepts it, poolkeeper cannot guard it."""

    def __init__(self, maxsize: int) -> None:
        self.items: list[Any] = []
        self.maxsize = maxsize

    def put_nowait(self, item: Any) -> None:
        if len(self.items) >= self.maxsize:
            raise queue.Full
        self.items.append(item)

    def get(self, block: bool = True, timeout: float | None = None) -> Any:  # noqa: ARG002 -- the signature queue.Queue.get has
        return self.items.pop()


def test_an_unguardable_pool_is_not_half_registered(redis_url):
    """A BlockingConnectionPool with a foreign queue_class raises TypeError and is left untouched."""
    pool = redis.BlockingConnectionPool.from_url(redis_url, queue_class=ListQueue, max_connections=2)
    client = redis.Redis(connection_pool=pool)
    registry = Registry()
    with pytest.raises(TypeError, match="queue_class is ListQueue"):
        registry.wrap(client, name="cache")
    assert len(registry) == 0
    assert type(pool) is redis.BlockingConnectionPool
    assert client.ping() is True
    pool.disconnect()
