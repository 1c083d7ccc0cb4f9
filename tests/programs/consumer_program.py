"""A worker consuming a RabbitMQ queue under poolkeeper.run(), driven by tests/test_consumer_shutdown.py.

Usage: consumer_program.py MODE AMQP_URL QUEUE

mixed   prefetch 8, handlers of varying duration (5 to 120 ms) acking through message.process();
        drain_timeout 20 s, so every handler in progress at SIGTERM finishes.
hang    the same, but the message whose body starts with "hang" never finishes; drain_timeout
        1 s, so it is cancelled at the deadline and requeued. main uses ``async with connection``.

Prints "acked BODY" right after each ack (no await between the two: nothing can cut in), and the
shutdown report as JSON ("report {...}") before exiting with run()'s exit code.
"""

# ruff: noqa: T201 -- a test program talks to its test through stdout
from __future__ import annotations

import asyncio
import json
import logging
import random
import sys

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

import poolkeeper

mode, url, queue_name = sys.argv[1:4]
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
registry = poolkeeper.Registry(drain_timeout=1 if mode == "hang" else 20, close_timeout=2)


async def handle(message: AbstractIncomingMessage) -> None:
    body = message.body.decode()
    async with message.process():
        if body.startswith("hang"):
            print(f"hanging {body}", flush=True)
            await asyncio.Event().wait()
        await asyncio.sleep(random.uniform(0.005, 0.12))  # noqa: S311 -- timing jitter, not security
    print(f"acked {body}", flush=True)


async def main() -> None:
    connection = registry.wrap(
        await aio_pika.connect_robust(url, reconnect_interval=0.2, client_properties={"connection_name": queue_name}),
        name="broker",
    )
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=8)
    queue = await channel.declare_queue(queue_name, passive=True)
    if mode == "hang":
        async with connection:  # leaving it (main cancelled by SIGTERM) runs the keeper's close
            await queue.consume(handle)
            print("main: ready", flush=True)
            await asyncio.Event().wait()
    await queue.consume(handle)
    print("main: ready", flush=True)
    await asyncio.Event().wait()


code = poolkeeper.run(main, registry=registry)
assert registry.report is not None
print("report " + json.dumps(registry.report.to_dict()), flush=True)
sys.exit(code)
