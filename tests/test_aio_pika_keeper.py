"""The aio-pika keeper on Connection and RobustConnection, against the real RabbitMQ broker."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import subprocess
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Callable
from typing import Any

import aio_pika
import pytest
import pytest_asyncio
from aio_pika.abc import AbstractIncomingMessage
from aio_pika.exceptions import ChannelInvalidStateError, MessageProcessError
from yarl import URL

from poolkeeper import KeeperState, PoolClosedError, Registry
from tests.waiting import auntil

pytestmark = pytest.mark.asyncio


class Broker:
    """A side connection of the test's own, that looks at the queues the way the broker sees them."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.connection: aio_pika.abc.AbstractConnection | None = None
        self.channel: aio_pika.abc.AbstractChannel | None = None
        self.queues: list[str] = []

    async def start(self) -> None:
        self.connection = await aio_pika.connect(self.url)
        self.channel = await self.connection.channel()

    async def queue(self, prefix: str = "pk-test") -> str:
        """A new queue with a unique name, deleted at the end of the test."""
        assert self.channel is not None
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        await self.channel.declare_queue(name)
        self.queues.append(name)
        return name

    async def publish(self, queue: str, bodies: list[str]) -> None:
        assert self.channel is not None
        for body in bodies:
            await self.channel.default_exchange.publish(aio_pika.Message(body.encode()), routing_key=queue)

    async def counts(self, queue: str) -> tuple[int, int]:
        """(messages ready in ``queue``, consumers on it), as the broker says now."""
        assert self.channel is not None
        declared = await self.channel.declare_queue(queue, passive=True)
        result = declared.declaration_result
        return result.message_count or 0, result.consumer_count or 0

    async def settled(self, queue: str, expected: tuple[int, int], timeout: float = 5.0) -> tuple[int, int]:
        """:meth:`counts` once they are ``expected``, or as they are after ``timeout`` seconds.

        RabbitMQ forgets a closed channel's consumers asynchronously (the queue learns of the
        channel's end after the close was confirmed), and offers no event for it: this polls.
        """
        end = time.monotonic() + timeout
        while (counts := await self.counts(queue)) != expected:
            if time.monotonic() > end:
                break
            await asyncio.sleep(0.01)
        return counts

    async def drain(self, queue: str) -> list[AbstractIncomingMessage]:
        """Every message ready in ``queue``, acked, in order."""
        assert self.channel is not None
        declared = await self.channel.declare_queue(queue, passive=True)
        messages = []
        while (message := await declared.get(fail=False)) is not None:
            await message.ack()
            messages.append(message)
        return messages

    async def close(self) -> None:
        if self.channel is not None and not self.channel.is_closed:
            for name in self.queues:
                await self.channel.queue_delete(name)
        if self.connection is not None:
            await self.connection.close()


@pytest_asyncio.fixture
async def broker(amqp_url: str) -> AsyncIterator[Broker]:
    side = Broker(amqp_url)
    await side.start()
    try:
        yield side
    finally:
        await side.close()


@pytest_asyncio.fixture
async def connect(amqp_url: str) -> AsyncIterator[Callable[..., Any]]:
    """Opens a (robust, by default) connection with a unique name; closes whatever is left open."""
    opened: list[aio_pika.abc.AbstractConnection] = []

    async def make(*, robust: bool = True, **query: str) -> Any:
        name = f"pk-test-{uuid.uuid4().hex[:12]}"
        factory = aio_pika.connect_robust if robust else aio_pika.connect
        # The name rides in the URL (aio-pika's own way, in every version) as client property connection_name.
        connection = await factory(str(URL(amqp_url).update_query(name=name, **query)))
        connection.test_name = name  # type: ignore[attr-defined]  # the name rabbitmqctl shows
        opened.append(connection)
        return connection

    yield make
    for connection in opened:
        if not connection.is_closed:
            await connection.close()


RABBITMQCTL = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"


def broker_connection_names() -> str:
    """What ``rabbitmqctl list_connections`` says about every client connection's properties."""
    return subprocess.run(
        [RABBITMQCTL, "list_connections", "client_properties", "-q"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout


async def test_wrap_returns_the_same_connection(connect):
    """wrap() returns the connection itself, still a RobustConnection, and wrapping twice registers it once."""
    registry = Registry()
    connection = await connect()
    assert registry.wrap(connection, name="mq") is connection
    assert registry.wrap(connection) is connection
    assert isinstance(connection, aio_pika.RobustConnection)
    assert [keeper.name for keeper in registry.keepers] == ["mq"]
    assert registry["mq"].kind == "aio-pika"
    await registry.aclose()


async def test_unwrap_gives_the_connection_its_own_class_back(connect):
    """After unwrap(), the connection is of its own class again and closes as aio-pika closes it."""
    registry = Registry()
    connection = await connect(robust=False)
    registry.wrap(connection, name="mq")
    registry.unwrap("mq")
    assert type(connection) is aio_pika.Connection
    await connection.close()
    assert connection.is_closed


async def test_handlers_finish_and_ack_while_draining(connect, broker):
    """Handlers in progress when closing starts finish and ack; the report is clean and nothing is left unacked."""
    registry = Registry(drain_timeout=10)
    connection = registry.wrap(await connect(), name="mq")
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=4)
    name = await broker.queue()
    await broker.publish(name, [str(i) for i in range(4)])
    started = asyncio.Event()
    release = asyncio.Event()
    acked: list[bytes] = []

    async def handler(message: AbstractIncomingMessage) -> None:
        async with message.process():
            if len(acked) == 0:
                started.set()
            await release.wait()
            acked.append(message.body)

    queue = await channel.declare_queue(name, passive=True)
    await queue.consume(handler)
    await asyncio.wait_for(started.wait(), 5)
    await auntil(lambda: registry["mq"].borrowed == 4)
    closing = asyncio.ensure_future(registry.aclose())
    await auntil(lambda: registry["mq"].state is KeeperState.DRAINING)
    release.set()
    report = await closing
    assert report["mq"].outcome == "clean"
    assert report["mq"].borrowed_at_start == 4
    assert sorted(acked) == [b"0", b"1", b"2", b"3"]
    assert await broker.settled(name, (0, 0)) == (0, 0)


async def test_messages_waiting_and_arriving_later_are_all_borrowed_until_acked(connect, broker):
    """Messages already in the queue when consume() starts and ones published after it are borrows alike.

    The first ones can reach the client before consume() has returned (right behind the broker's
    ConsumeOk); the later ones come once it has. Each is out until its handler acks, the drain
    waits for all of them, and each is acked exactly once.
    """
    registry = Registry(drain_timeout=10)
    connection = registry.wrap(await connect(), name="mq")
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=100)
    name = await broker.queue()
    await broker.publish(name, [f"early-{i}" for i in range(50)])
    release = asyncio.Event()
    acked: list[bytes] = []

    async def handler(message: AbstractIncomingMessage) -> None:
        await release.wait()
        await message.ack()
        acked.append(message.body)

    queue = await channel.declare_queue(name, passive=True)
    await queue.consume(handler)
    await broker.publish(name, [f"late-{i}" for i in range(50)])
    await auntil(lambda: registry["mq"].borrowed == 100)
    closing = asyncio.ensure_future(registry.aclose())
    await auntil(lambda: registry["mq"].state is KeeperState.DRAINING)
    assert not closing.done()
    release.set()
    report = await closing
    assert (report["mq"].outcome, report["mq"].borrowed_at_start, report["mq"].returned) == ("clean", 100, 100)
    assert sorted(acked) == sorted(
        [f"early-{i}".encode() for i in range(50)] + [f"late-{i}".encode() for i in range(50)]
    )
    assert await broker.settled(name, (0, 0)) == (0, 0)


async def test_a_no_ack_message_is_a_borrow_until_its_handler_returns(connect, broker):
    """With no_ack=True there is nothing to acknowledge: the drain waits for the handlers to return."""
    registry = Registry(drain_timeout=10)
    connection = registry.wrap(await connect(), name="mq")
    channel = await connection.channel()
    name = await broker.queue()
    await broker.publish(name, ["a", "b", "c"])
    release = asyncio.Event()
    handled: list[bytes] = []

    async def handler(message: AbstractIncomingMessage) -> None:
        await release.wait()
        handled.append(message.body)

    queue = await channel.declare_queue(name, passive=True)
    await queue.consume(handler, no_ack=True)
    await auntil(lambda: registry["mq"].borrowed == 3)
    closing = asyncio.ensure_future(registry.aclose())
    await auntil(lambda: registry["mq"].state is KeeperState.DRAINING)
    assert registry["mq"].borrowed == 3
    release.set()
    report = await closing
    assert (report["mq"].outcome, report["mq"].returned, report["mq"].forced) == ("clean", 3, 0)
    assert sorted(handled) == [b"a", b"b", b"c"]
    assert await broker.settled(name, (0, 0)) == (0, 0)  # consumed for good: nothing was requeued


async def test_a_plain_function_callback_works_as_aio_pika_runs_it(connect, broker, caplog):
    """A plain (non-async) callback, which aio-pika still accepts, is called as aio-pika calls it, without errors."""
    registry = Registry(drain_timeout=10)
    connection = registry.wrap(await connect(), name="mq")
    channel = await connection.channel()
    name = await broker.queue()
    await broker.publish(name, ["a", "b"])
    handled: list[bytes] = []

    def handler(message: AbstractIncomingMessage) -> None:
        handled.append(message.body)

    queue = await channel.declare_queue(name, passive=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # aio-pika's own, as for an unwrapped one
        await queue.consume(handler, no_ack=True)
    await auntil(lambda: len(handled) == 2)
    await auntil(lambda: registry["mq"].borrowed == 0)
    report = await registry.aclose()
    assert (report["mq"].outcome, report["mq"].borrowed_at_start) == ("clean", 0)
    assert handled == [b"a", b"b"]
    assert await broker.settled(name, (0, 0)) == (0, 0)
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR] == []


async def test_closing_cancels_consumers_and_refuses_channels_and_consumes(connect, broker):
    """Once closing starts the broker has no consumer left, channel() and consume() are refused, publishing works."""
    registry = Registry(drain_timeout=10)
    connection = registry.wrap(await connect(), name="mq")
    channel = await connection.channel()
    name = await broker.queue()
    other = await broker.queue()
    await broker.publish(name, ["hold"])
    holding = asyncio.Event()
    release = asyncio.Event()

    async def handler(message: AbstractIncomingMessage) -> None:
        async with message.process():
            holding.set()
            await release.wait()
            # A handler publishes its result while the keeper drains.
            await channel.default_exchange.publish(aio_pika.Message(b"result"), routing_key=other)

    queue = await channel.declare_queue(name, passive=True)
    await queue.consume(handler)
    await asyncio.wait_for(holding.wait(), 5)
    assert (await broker.counts(name))[1] == 1
    closing = asyncio.ensure_future(registry.aclose())
    await auntil(lambda: registry["mq"].state is KeeperState.DRAINING)

    async def consumers() -> int:
        return int((await broker.counts(name))[1])

    for _ in range(250):  # the basic.cancel is one round trip away
        if await consumers() == 0:
            break
        await asyncio.sleep(0.02)
    assert await consumers() == 0
    with pytest.raises(PoolClosedError, match="'mq' is draining"):
        connection.channel()
    with pytest.raises(ChannelInvalidStateError):  # aio-pika's own error for a closed channel, too
        await queue.consume(handler)
    release.set()
    report = await closing
    assert report["mq"].outcome == "clean"
    assert [message.body for message in await broker.drain(other)] == [b"result"]


async def test_publishing_is_refused_once_closed(connect, broker):
    """After the close, publishing on a channel of the wrapped connection raises PoolClosedError."""
    registry = Registry()
    connection = registry.wrap(await connect(), name="mq")
    channel = await connection.channel()
    name = await broker.queue()
    await registry.aclose()
    with pytest.raises(PoolClosedError, match="'mq' is closed"):
        await channel.default_exchange.publish(aio_pika.Message(b"late"), routing_key=name)
    assert await broker.settled(name, (0, 0)) == (0, 0)


async def test_prefetched_messages_are_given_back_at_once(connect, broker):
    """Messages waiting in a queue iterator's buffer are requeued as closing starts, not after the drain."""
    registry = Registry(drain_timeout=30)
    connection = registry.wrap(await connect(), name="mq")
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=10)
    name = await broker.queue()
    await broker.publish(name, [str(i) for i in range(10)])
    queue = await channel.declare_queue(name, passive=True)
    iterator = queue.iterator()
    got = asyncio.Event()
    release = asyncio.Event()

    async def handle_one() -> None:
        async for message in iterator:
            async with message.process():
                got.set()
                await release.wait()

    handler = asyncio.ensure_future(handle_one())
    await asyncio.wait_for(got.wait(), 5)
    await auntil(lambda: registry["mq"].borrowed == 10)  # all ten delivered: one handled, nine buffered
    assert await broker.counts(name) == (0, 1)
    closing = asyncio.ensure_future(registry.aclose())
    # While the handler still holds its message, the nine it never got are back in the queue.
    assert await broker.settled(name, (9, 0)) == (9, 0)
    assert registry["mq"].state is KeeperState.DRAINING
    assert registry["mq"].borrowed == 1
    release.set()
    report = await closing
    await handler
    assert report["mq"].outcome == "clean"
    assert (report["mq"].returned, report["mq"].forced) == (10, 0)
    assert sorted(message.body for message in await broker.drain(name)) == [str(i).encode() for i in range(1, 10)]


async def test_an_idle_queue_iterator_loop_ends_when_closing_starts(connect, broker):
    """``async for`` over an empty queue.iterator() ends as closing starts, while another handler still drains.

    aio-pika 9.x waits for a next message forever once its consumer is cancelled: without the
    keeper's end marker, the iterating task never finished.
    """
    registry = Registry(drain_timeout=30)
    connection = registry.wrap(await connect(), name="mq")
    channel = await connection.channel()
    idle_name, busy_name = await broker.queue(), await broker.queue()
    iterated: list[bytes] = []

    async def iterate() -> str:
        async with (await channel.declare_queue(idle_name, passive=True)).iterator() as iterator:
            async for message in iterator:
                iterated.append(message.body)
                await message.ack()
        return "ended"

    release = asyncio.Event()
    holding = asyncio.Event()

    async def hold(message: AbstractIncomingMessage) -> None:
        async with message.process():
            holding.set()
            await release.wait()

    loop_task = asyncio.ensure_future(iterate())
    await (await channel.declare_queue(busy_name, passive=True)).consume(hold)
    await broker.publish(idle_name, ["one"])
    await broker.publish(busy_name, ["held"])
    await asyncio.wait_for(holding.wait(), 5)
    await auntil(lambda: iterated == [b"one"] and registry["mq"].borrowed == 1)
    closing = asyncio.ensure_future(registry.aclose())
    assert await asyncio.wait_for(loop_task, 5) == "ended"
    assert registry["mq"].state is KeeperState.DRAINING  # the loop ended before the drain did
    release.set()
    report = await closing
    assert (report["mq"].outcome, report["mq"].borrowed_at_start, report["mq"].forced) == ("clean", 1, 0)
    assert await broker.settled(idle_name, (0, 0)) == (0, 0)
    assert await broker.settled(busy_name, (0, 0)) == (0, 0)


async def test_a_hanging_handler_is_cancelled_and_its_message_requeued(connect, broker):
    """At the drain deadline a handler still running is cancelled, its message requeued and reported with its tag."""
    registry = Registry(drain_timeout=0.5)
    connection = registry.wrap(await connect(), name="mq")
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=5)
    name = await broker.queue()
    await broker.publish(name, ["quick", "hang"])
    cancelled = asyncio.Event()
    tags: dict[bytes, int | None] = {}

    async def handler(message: AbstractIncomingMessage) -> None:
        tags[message.body] = message.delivery_tag
        # process() rejects WITHOUT requeue when the block raises (CancelledError included):
        # the keeper must still requeue the message, not let the reject drop it.
        async with message.process():
            if message.body == b"hang":
                try:
                    await asyncio.Event().wait()
                except asyncio.CancelledError:
                    cancelled.set()
                    raise

    queue = await channel.declare_queue(name, passive=True)
    await queue.consume(handler)
    await auntil(lambda: len(tags) == 2 and registry["mq"].borrowed == 1)
    report = await registry.aclose()
    item = report["mq"]
    assert (item.outcome, item.forced, item.returned, item.borrowed_at_start) == ("forced", 1, 0, 1)
    assert [leak.detail for leak in item.leaks] == [f"queue {name!r} delivery tag {tags[b'hang']}"]
    assert f"delivery tag {tags[b'hang']}" in str(report)
    assert item.to_dict()["leaks"][0]["detail"] == f"queue {name!r} delivery tag {tags[b'hang']}"
    assert cancelled.is_set()
    assert connection.is_closed
    redelivered = await broker.drain(name)
    assert [(message.body, message.redelivered) for message in redelivered] == [(b"hang", True)]


async def test_a_late_ack_after_the_force_close_is_refused(connect, broker):
    """A handler that swallows its cancellation and acks later gets MessageProcessError; the message stays requeued."""
    registry = Registry(drain_timeout=0.3)
    connection = registry.wrap(await connect(), name="mq")
    channel = await connection.channel()
    name = await broker.queue()
    await broker.publish(name, ["stubborn"])
    outcome: list[BaseException] = []
    finished = asyncio.Event()

    async def handler(message: AbstractIncomingMessage) -> None:
        with contextlib.suppress(asyncio.CancelledError):  # swallowed: carries on as if nothing happened
            await asyncio.Event().wait()
        try:
            await message.ack()
        except BaseException as error:
            outcome.append(error)
        finished.set()

    queue = await channel.declare_queue(name, passive=True)
    await queue.consume(handler)
    await auntil(lambda: registry["mq"].borrowed == 1)
    report = await registry.aclose()
    await asyncio.wait_for(finished.wait(), 5)
    assert report["mq"].forced == 1
    assert len(outcome) == 1
    assert isinstance(outcome[0], MessageProcessError)
    assert "requeued this message at the drain deadline" in str(outcome[0])
    assert [message.body for message in await broker.drain(name)] == [b"stubborn"]


async def test_connection_close_drains_like_the_registry(connect, broker):
    """Leaving ``async with connection`` on a wrapped connection lets the handler finish and ack first."""
    registry = Registry(drain_timeout=10)
    connection = registry.wrap(await connect(), name="mq")
    name = await broker.queue()
    await broker.publish(name, ["slow"])
    holding = asyncio.Event()
    release = asyncio.Event()
    done: list[bytes] = []

    async def handler(message: AbstractIncomingMessage) -> None:
        async with message.process():
            holding.set()
            await release.wait()
            done.append(message.body)

    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(name, passive=True)
        await queue.consume(handler)
        await asyncio.wait_for(holding.wait(), 5)
        asyncio.get_running_loop().call_later(0.2, release.set)
    assert done == [b"slow"]
    assert registry["mq"].state is KeeperState.CLOSED
    assert registry["mq"].close_report is not None
    assert registry["mq"].close_report.outcome == "clean"
    assert await broker.settled(name, (0, 0)) == (0, 0)
    report = await registry.aclose()
    assert report["mq"].outcome == "clean"


async def test_a_robust_connection_does_not_reconnect_after_close(connect, broker):
    """After the keeper closed a RobustConnection the broker lists no connection of it, reconnect interval or not."""
    registry = Registry()
    connection = registry.wrap(await connect(reconnect_interval="0.2"), name="mq")
    channel = await connection.channel()
    name = await broker.queue()
    queue = await channel.declare_queue(name, passive=True)
    await queue.consume(lambda message: message.ack())
    assert connection.test_name in broker_connection_names()
    await registry.aclose()
    assert connection.is_closed
    await asyncio.sleep(1.0)  # five reconnect intervals: a reconnect would have happened by now
    assert connection.is_closed
    assert not connection.reconnecting
    assert connection.test_name not in broker_connection_names()


async def test_the_password_never_reaches_the_report(amqp_url):
    """The broker URL's password is neither in the keeper's target nor in the report."""
    registry = Registry()
    connection = registry.wrap(await aio_pika.connect_robust(amqp_url), name="mq")
    report = await registry.aclose()
    assert connection.is_closed
    text = str(report) + repr(report.to_dict())
    assert report["mq"].target is not None
    assert "guest:" not in text
    assert report["mq"].target.startswith("amqp://127.0.0.1")


async def test_a_closed_connection_is_refused_naming_the_argument(connect):
    """Wrapping a closed connection raises ValueError naming ``resource``; nothing is registered or changed."""
    registry = Registry()
    connection = await connect(robust=False)
    await connection.close()
    with pytest.raises(ValueError, match="resource: this aio-pika connection is already closed"):
        registry.wrap(connection)
    assert len(registry) == 0
    assert type(connection) is aio_pika.Connection
