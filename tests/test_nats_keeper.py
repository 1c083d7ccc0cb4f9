"""The NATS keeper on a nats-py Client with JetStream consumers, against the real nats-server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
import pytest_asyncio
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError, MsgAlreadyAckdError
from nats.js.api import ConsumerConfig

from poolkeeper import KeeperState, PoolClosedError, Registry
from tests.waiting import auntil

pytestmark = pytest.mark.asyncio


class Stream:
    """A JetStream stream of the test's own (unique name and subject), deleted afterwards."""

    def __init__(self, side: Any) -> None:
        self.side = side
        self.js = side.jetstream()
        self.name = f"PK{uuid.uuid4().hex[:12].upper()}"
        self.subject = f"pk.{self.name}"

    async def publish(self, bodies: list[str]) -> None:
        for body in bodies:
            await self.js.publish(self.subject, body.encode())

    async def collect(self, durable: str, count: int, timeout: float = 5.0) -> list[tuple[str, int]]:
        """What a new subscriber on ``durable`` receives (body, times delivered), acking each, until ``count`` came."""
        got: list[tuple[str, int]] = []
        arrived = asyncio.Event()

        async def collect(message: Msg) -> None:
            got.append((message.data.decode(), message.metadata.num_delivered))
            await message.ack()
            if len(got) >= count:
                arrived.set()

        subscription = await self.js.subscribe(self.subject, durable=durable, cb=collect, manual_ack=True)
        try:
            await asyncio.wait_for(arrived.wait(), timeout)
        finally:
            await subscription.unsubscribe()
        return got


@pytest_asyncio.fixture
async def stream(nats_url: str) -> AsyncIterator[Stream]:
    side = await nats.connect(nats_url)
    created = Stream(side)
    await created.js.add_stream(name=created.name, subjects=[created.subject])
    try:
        yield created
    finally:
        with contextlib.suppress(Exception):
            await created.js.delete_stream(created.name)
        await side.close()


@pytest_asyncio.fixture
async def client(nats_url: str) -> AsyncIterator[Any]:
    opened = await nats.connect(nats_url)
    yield opened
    if not opened.is_closed:
        await Client.close(opened)  # the library's own close, wrapped or not


async def test_wrap_returns_the_same_client(client):
    """wrap() returns the client itself, of its own class; unwrap() gives it back its class's own methods."""
    registry = Registry()
    assert registry.wrap(client, name="nats") is client
    assert type(client) is Client
    assert registry["nats"].kind == "nats"
    registry.unwrap("nats")
    assert type(client) is Client
    assert not {"subscribe", "publish", "close", "msg_class"} & set(vars(client))


async def test_buffered_messages_are_given_back_while_the_handler_finishes(client, stream):
    """Closing nacks the messages waiting behind the handler at once; another consumer gets them; the handler acks."""
    registry = Registry(drain_timeout=30)
    registry.wrap(client, name="nats")
    await stream.publish([str(i) for i in range(10)])
    holding = asyncio.Event()
    release = asyncio.Event()

    async def handler(message: Msg) -> None:
        holding.set()
        await release.wait()
        await message.ack()

    js = client.jetstream()
    config = ConsumerConfig(max_ack_pending=10)
    await js.subscribe(stream.subject, durable="w", cb=handler, manual_ack=True, config=config)
    await asyncio.wait_for(holding.wait(), 5)
    await auntil(lambda: registry["nats"].borrowed == 10)  # one in the handler, nine in the buffer
    closing = asyncio.ensure_future(registry.aclose())
    await auntil(lambda: registry["nats"].borrowed == 1)
    assert registry["nats"].state is KeeperState.DRAINING
    # Redelivered at once (ack_wait is 30 s), while the handler still holds its message.
    again = await stream.collect("w", 9, timeout=5)
    assert sorted(body for body, _ in again) == [str(i) for i in range(1, 10)]
    assert {delivered for _, delivered in again} == {2}
    release.set()
    report = await closing
    assert (report["nats"].outcome, report["nats"].returned, report["nats"].forced) == ("clean", 10, 0)
    assert client.is_closed


async def test_a_hanging_handler_is_cancelled_and_its_message_redelivered(client, stream):
    """At the deadline the handler is cancelled, its message nacked and reported with its stream and sequence."""
    registry = Registry(drain_timeout=0.5)
    registry.wrap(client, name="nats")
    await stream.publish(["hang"])
    cancelled = asyncio.Event()
    started = asyncio.Event()
    late: list[BaseException] = []

    async def handler(message: Msg) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            try:
                await message.ack()  # too late: the force-close gave it back
            except BaseException as error:
                late.append(error)
            raise

    js = client.jetstream()
    await js.subscribe(stream.subject, durable="w", cb=handler, manual_ack=True)
    await asyncio.wait_for(started.wait(), 5)
    report = await registry.aclose()
    item = report["nats"]
    assert (item.outcome, item.forced) == ("forced", 1)
    assert [leak.detail for leak in item.leaks] == [f"stream {stream.name!r} consumer 'w' sequence 1"]
    assert cancelled.is_set()
    assert len(late) == 1
    assert isinstance(late[0], MsgAlreadyAckdError)
    assert await stream.collect("w", 1) == [("hang", 2)]


async def test_a_pull_consumer_still_handling_at_the_deadline_is_cancelled(client, stream):
    """The task that fetched a message is its handler: cancelled at the deadline, the message nacked and redelivered."""
    registry = Registry(drain_timeout=0.5)
    registry.wrap(client, name="nats")
    await stream.publish(["hang"])
    pull = await client.jetstream().pull_subscribe(stream.subject, durable="p")
    started = asyncio.Event()
    late: list[BaseException] = []

    async def consume() -> None:
        for message in await pull.fetch(1, timeout=5):
            started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                try:
                    await message.ack()  # too late: the force-close gave it back
                except BaseException as error:
                    late.append(error)
                raise

    consumer = asyncio.ensure_future(consume())
    await asyncio.wait_for(started.wait(), 5)
    report = await registry.aclose()
    item = report["nats"]
    assert (item.outcome, item.forced) == ("forced", 1)
    assert [leak.detail for leak in item.leaks] == [f"stream {stream.name!r} consumer 'p' sequence 1"]
    assert consumer.cancelled()
    assert len(late) == 1
    assert isinstance(late[0], MsgAlreadyAckdError)
    again = await stream.js.pull_subscribe(stream.subject, durable="p")
    [redelivered] = await again.fetch(1, timeout=5)
    assert (redelivered.data, redelivered.metadata.num_delivered) == (b"hang", 2)
    await redelivered.ack()


async def test_closing_refuses_subscribe_and_fetch_but_not_publish(client, stream):
    """While draining: subscribe() and a pull fetch raise PoolClosedError; publishing still works."""
    registry = Registry(drain_timeout=30)
    registry.wrap(client, name="nats")
    await stream.publish(["a"])
    js = client.jetstream()
    pull = await js.pull_subscribe(stream.subject, durable="p")
    [held] = await pull.fetch(1, timeout=5)
    closing = asyncio.ensure_future(registry.aclose())
    await auntil(lambda: registry["nats"].state is KeeperState.DRAINING)
    with pytest.raises(PoolClosedError, match="'nats' is draining"):
        await client.subscribe(stream.subject + ".more", cb=lambda _: None)
    with pytest.raises(ConnectionClosedError):  # nats-py's own error for a closed connection, too
        await pull.fetch(1, timeout=1)
    await js.publish(stream.subject, b"published while draining")
    await held.ack()
    report = await closing
    assert report["nats"].outcome == "clean"
    info = await stream.js.stream_info(stream.name)
    assert info.state.messages == 2


async def test_client_close_drains_and_does_not_reconnect(client, stream):
    """``await nc.close()`` on a wrapped client waits for the handler's ack; the client stays closed."""
    registry = Registry(drain_timeout=10)
    registry.wrap(client, name="nats")
    await stream.publish(["slow"])
    done: list[str] = []

    started = asyncio.Event()

    async def handler(message: Msg) -> None:
        started.set()
        await asyncio.sleep(0.3)
        await message.ack()
        done.append(message.data.decode())

    await client.jetstream().subscribe(stream.subject, durable="w", cb=handler, manual_ack=True)
    # The handler has the message (borrowed counts it from its arrival, when closing would nak it).
    await asyncio.wait_for(started.wait(), 5)
    await client.close()
    assert done == ["slow"]
    assert registry["nats"].close_report is not None
    assert registry["nats"].close_report.outcome == "clean"
    await asyncio.sleep(0.5)
    assert client.is_closed
    assert not client.is_reconnecting


async def test_a_closed_client_is_refused_naming_the_argument(nats_url):
    """Wrapping a closed client raises ValueError naming ``resource``; nothing is registered or changed."""
    registry = Registry()
    closed = await nats.connect(nats_url)
    await closed.close()
    with pytest.raises(ValueError, match="resource: this nats Client is already closed"):
        registry.wrap(closed)
    assert len(registry) == 0
    assert type(closed) is Client


async def test_the_password_never_reaches_the_report_or_the_logs(nats_url, caplog):
    """A password in the server URL is in neither the keeper's target, the report nor the log records."""
    caplog.set_level(logging.DEBUG)
    secret = "pk-s3cret-" + uuid.uuid4().hex[:6]
    url = nats_url.replace("nats://", f"nats://pkuser:{secret}@")
    registry = Registry(drain_timeout=0)
    client = registry.wrap(await nats.connect(url), name="nats")
    report = await registry.aclose()
    assert client.is_closed
    assert report["nats"].target == nats_url.rstrip("/")
    assert secret not in str(report) + repr(report.to_dict()) + caplog.text
