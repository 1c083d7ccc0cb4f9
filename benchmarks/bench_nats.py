"""NATS JetStream: per-message cost of consuming through a kept client versus a raw one, on the local nats-server."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from typing import Any

import nats
from nats.js.api import ConsumerConfig, DeliverPolicy

from benchmarks._measure import Result, acking_handler, alternate, timed
from poolkeeper import Registry

URL = os.environ.get("POOLKEEPER_NATS_URL", "nats://127.0.0.1:4222")
MESSAGES = 2000
PENDING = 64  # max_ack_pending: the JetStream counterpart of a prefetch


async def seconds_per_message(client: Any, publisher: Any, subject: str) -> float:
    """Publish ``MESSAGES`` (untimed), then time a push consumer receiving and acking all of them, the GC paused."""
    first = None
    for _ in range(MESSAGES):
        ack = await publisher.publish(subject, b"x")
        first = ack.seq if first is None else first
    handler, done = acking_handler(MESSAGES)

    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=first, max_ack_pending=PENDING
    )
    with timed():
        started = time.perf_counter()
        subscription = await client.jetstream().subscribe(subject, cb=handler, manual_ack=True, config=config)
        await done.wait()
        elapsed = time.perf_counter() - started
    await subscription.unsubscribe()
    return elapsed / MESSAGES


async def consume_overhead() -> Result:
    registry = Registry()
    raw = await nats.connect(URL)
    wrapped = registry.wrap(await nats.connect(URL), name="nats")
    side = await nats.connect(URL)
    publisher = side.jetstream()
    stream = f"PKBENCH{uuid.uuid4().hex[:8].upper()}"
    subject = f"pk.bench.{stream}"
    await publisher.add_stream(name=stream, subjects=[subject])
    try:
        await seconds_per_message(raw, publisher, subject)  # warm up both paths
        await seconds_per_message(wrapped, publisher, subject)
        result = await alternate(
            "NATS JetStream consume + ack, per message",
            lambda client: seconds_per_message(client, publisher, subject),
            raw,
            wrapped,
            rounds=21,
        )
    finally:
        await publisher.delete_stream(stream)
        await registry.aclose()
        await raw.close()
        await side.close()
    return result.result(1.05)


def run() -> list[Result]:
    return [asyncio.run(consume_overhead())]
