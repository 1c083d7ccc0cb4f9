"""SIGTERM in the middle of a stream of messages: none lost, none acked twice, none left unacked (issue 16).

A real worker (tests/programs/consumer_program.py, under poolkeeper.run()) consumes a real
RabbitMQ queue with prefetch 8; the test signals it after a random number of acks, then asks the
broker: every message was acked exactly once (the worker's "acked" lines) or is back in the
queue, ready, and a second consumer started afterwards receives exactly those.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import time
import uuid
from collections.abc import Iterator
from typing import Any

import aio_pika
import nats
import pytest

from tests.programs.child import Child

MESSAGES = 120


class Stream:
    """A queue of the test's own, filled with numbered messages, deleted at the end."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.name = f"pk-stream-{uuid.uuid4().hex[:12]}"

    async def _run(self, work: Any) -> Any:
        connection = await aio_pika.connect(self.url)
        try:
            channel = await connection.channel()
            return await work(channel)
        finally:
            await connection.close()

    def create(self, bodies: list[str]) -> None:
        async def work(channel: Any) -> None:
            await channel.declare_queue(self.name)
            for body in bodies:
                await channel.default_exchange.publish(aio_pika.Message(body.encode()), routing_key=self.name)

        asyncio.run(self._run(work))

    def counts(self) -> tuple[int, int]:
        """(messages ready, consumers), as the broker says."""

        async def work(channel: Any) -> tuple[int, int]:
            result = (await channel.declare_queue(self.name, passive=True)).declaration_result
            return result.message_count, result.consumer_count

        return asyncio.run(self._run(work))  # type: ignore[no-any-return]

    def second_consumer(self) -> list[tuple[str, bool]]:
        """What a consumer started now receives (body, redelivered), each acked, until the queue is empty."""

        async def work(channel: Any) -> list[tuple[str, bool]]:
            queue = await channel.declare_queue(self.name, passive=True)
            received: list[tuple[str, bool]] = []
            while (message := await queue.get(fail=False)) is not None:
                await message.ack()
                received.append((message.body.decode(), message.redelivered))
            return received

        return asyncio.run(self._run(work))

    def delete(self) -> None:
        async def work(channel: Any) -> None:
            await channel.queue_delete(self.name)

        asyncio.run(self._run(work))


@pytest.fixture
def stream(amqp_url: str) -> Iterator[Stream]:
    queue = Stream(amqp_url)
    yield queue
    queue.delete()


def acked(output: str) -> list[str]:
    return [line.split(" ", 1)[1] for line in output.splitlines() if line.startswith("acked ")]


def report_of(output: str) -> dict[str, Any]:
    line = next(line for line in output.splitlines() if line.startswith("report "))
    return json.loads(line.removeprefix("report "))  # type: ignore[no-any-return]


def test_sigterm_mid_stream_loses_nothing_and_acks_nothing_twice(amqp_url, stream):
    """After a SIGTERM at a random point, each message was acked exactly once or is back in the queue."""
    bodies = [f"m{i}" for i in range(MESSAGES)]
    stream.create(bodies)
    child = Child("consumer_program.py", "mixed", amqp_url, stream.name)
    try:
        child.expect("main: ready")
        for _ in range(random.randint(1, MESSAGES - 30)):  # noqa: S311 -- a random point, not security
            child.expect("acked ")
        child.send(signal.SIGTERM)
        assert child.wait(30) == 0
    finally:
        child.kill()
    done = acked(child.output)
    assert len(done) == len(set(done)), "a message was acked twice"
    assert 0 < len(done) < MESSAGES
    report = report_of(child.output)["items"][0]
    assert (report["outcome"], report["forced"]) == ("clean", 0)
    assert stream.counts() == (MESSAGES - len(done), 0)  # nothing stuck unacked, no consumer left
    rest = stream.second_consumer()
    assert sorted(body for body, _ in rest) == sorted(set(bodies) - set(done))


def test_a_handler_hanging_past_the_deadline_is_requeued_and_reported(amqp_url, stream):
    """A handler still running at the drain deadline is cancelled; its message is redelivered to the next consumer."""
    bodies = [f"m{i}" for i in range(MESSAGES)]
    hang = random.randint(0, 20)  # noqa: S311 -- a random position, not security
    bodies[hang] = "hang"
    stream.create(bodies)
    child = Child("consumer_program.py", "hang", amqp_url, stream.name)
    try:
        child.expect("main: ready")
        child.expect("hanging hang")
        for _ in range(random.randint(1, MESSAGES - 40)):  # noqa: S311
            child.expect("acked ")
        child.send(signal.SIGTERM)
        assert child.wait(30) == 1  # forced: the report is not ok
    finally:
        child.kill()
    done = acked(child.output)
    assert len(done) == len(set(done)), "a message was acked twice"
    assert "hang" not in done
    report = report_of(child.output)["items"][0]
    assert (report["outcome"], report["forced"], report["returned"]) == ("forced", 1, report["borrowed_at_start"] - 1)
    [leak] = report["leaks"]
    assert leak["detail"].startswith(f"queue {stream.name!r} delivery tag ")
    assert stream.counts() == (MESSAGES - len(done), 0)
    rest = dict(stream.second_consumer())
    assert sorted(rest) == sorted(set(bodies) - set(done))
    assert rest["hang"] is True  # redelivered: it had been delivered to the worker before


class JetStream:
    """A JetStream stream of the test's own, deleted at the end."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.name = f"PKSTREAM{uuid.uuid4().hex[:10].upper()}"
        self.subject = f"pk.{self.name}"

    async def _run(self, work: Any) -> Any:
        client = await nats.connect(self.url)
        try:
            return await work(client.jetstream())
        finally:
            await client.close()

    def create(self, bodies: list[str]) -> None:
        async def work(js: Any) -> None:
            await js.add_stream(name=self.name, subjects=[self.subject])
            for body in bodies:
                await js.publish(self.subject, body.encode())

        asyncio.run(self._run(work))

    def second_consumer(self, count: int) -> tuple[list[str], float]:
        """What a new subscriber on the worker's durable consumer receives, and how long the last took to come."""

        async def work(js: Any) -> tuple[list[str], float]:
            got: list[str] = []
            done = asyncio.Event()

            async def collect(message: Any) -> None:
                got.append(message.data.decode())
                await message.ack()
                if len(got) >= count:
                    done.set()

            started = time.monotonic()
            await js.subscribe(self.subject, durable="worker", cb=collect, manual_ack=True)
            # ack_wait is 60 s: anything left unacked by the worker would take that long to come back.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(done.wait(), 10)
            took = time.monotonic() - started
            await asyncio.sleep(0.5)  # nothing more may come: a double delivery would show here
            info = await js.consumer_info(self.name, "worker")
            assert (info.num_ack_pending, info.num_pending) == (0, 0)
            return got, took

        return asyncio.run(self._run(work))  # type: ignore[no-any-return]

    def delete(self) -> None:
        async def work(js: Any) -> None:
            await js.delete_stream(self.name)

        asyncio.run(self._run(work))


@pytest.fixture
def jetstream(nats_url: str) -> Iterator[JetStream]:
    stream = JetStream(nats_url)
    yield stream
    stream.delete()


def test_sigterm_mid_stream_loses_nothing_on_nats_jetstream(nats_url, jetstream):
    """The same with a JetStream push consumer: acked exactly once, or redelivered at once to the next consumer."""
    count = 80
    bodies = [f"m{i}" for i in range(count)]
    jetstream.create(bodies)
    child = Child("nats_consumer_program.py", nats_url, jetstream.name, jetstream.subject)
    try:
        child.expect("main: ready")
        for _ in range(random.randint(1, count - 20)):  # noqa: S311 -- a random point, not security
            child.expect("acked ")
        child.send(signal.SIGTERM)
        assert child.wait(30) == 0
    finally:
        child.kill()
    done = acked(child.output)
    assert len(done) == len(set(done)), "a message was acked twice"
    report = report_of(child.output)["items"][0]
    assert (report["outcome"], report["forced"]) == ("clean", 0)
    rest, took = jetstream.second_consumer(count - len(done))
    assert sorted(rest) == sorted(set(bodies) - set(done))
    assert took < 10  # given back (nak), not left to ack_wait (60 s)
