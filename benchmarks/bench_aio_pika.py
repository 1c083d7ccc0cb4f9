"""aio-pika: per-message cost of consuming through a kept connection versus a raw one, on the local RabbitMQ."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from typing import Any

import aio_pika

from benchmarks._measure import Result, acking_handler, alternate, timed
from poolkeeper import Registry

URL = os.environ.get("POOLKEEPER_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
MESSAGES = 10_000
PREFETCH = 64
# A round of 2,000 messages moved by up to 40% with the broker's timing (its own garbage
# collections, the scheduling of two processes on two cores): rounds of 10,000 average that out.
ROUNDS = 21


async def seconds_per_message(channel: Any, queue_name: str, publisher: Any) -> float:
    """Publish ``MESSAGES`` (untimed), then time consuming and acking all of them (prefetch 64), the GC paused."""
    for _ in range(MESSAGES):
        await publisher.default_exchange.publish(aio_pika.Message(b"x"), routing_key=queue_name)
    queue = await channel.declare_queue(queue_name, passive=True)
    handler, done = acking_handler(MESSAGES)
    with timed():  # the garbage collector paused, as in every other overhead row
        started = time.perf_counter()
        tag = await queue.consume(handler)
        await done.wait()
        elapsed = time.perf_counter() - started
    await queue.cancel(tag)
    return elapsed / MESSAGES


async def consume_overhead() -> Result:
    registry = Registry()
    raw = await aio_pika.connect(URL)
    wrapped = registry.wrap(await aio_pika.connect(URL), name="broker")
    side = await aio_pika.connect(URL)
    publisher = await side.channel(publisher_confirms=False)
    channels = {}
    for label, connection in (("raw", raw), ("wrapped", wrapped)):
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=PREFETCH)
        channels[label] = channel
    name = f"pk-bench-{uuid.uuid4().hex[:8]}"
    await publisher.declare_queue(name, auto_delete=False)
    try:
        await seconds_per_message(channels["raw"], name, publisher)  # warm up both paths
        await seconds_per_message(channels["wrapped"], name, publisher)
        result = await alternate(
            "aio-pika consume + ack, per message",
            lambda channel: seconds_per_message(channel, name, publisher),
            channels["raw"],
            channels["wrapped"],
            rounds=ROUNDS,
        )
    finally:
        await publisher.queue_delete(name)
        await registry.aclose()
        await raw.close()
        await side.close()
    return result.result(1.05)


def run() -> list[Result]:
    return [asyncio.run(consume_overhead())]
