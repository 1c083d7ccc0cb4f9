"""A worker consuming a JetStream stream under poolkeeper.run(), driven by tests/test_consumer_shutdown.py.

Usage: nats_consumer_program.py NATS_URL STREAM SUBJECT

A durable push consumer ("worker", max_ack_pending 8) with a callback: handlers of varying
duration (5 to 60 ms) ack each message; drain_timeout 20 s. Prints "acked BODY" right after each
ack (nothing can cut in between) and the shutdown report as JSON before exiting with run()'s code.
"""

# ruff: noqa: T201 -- a test program talks to its test through stdout
from __future__ import annotations

import asyncio
import json
import logging
import random
import sys

import nats
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig

import poolkeeper

url, stream, subject = sys.argv[1:4]
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
registry = poolkeeper.Registry(drain_timeout=20, close_timeout=2)


async def handle(message: Msg) -> None:
    await asyncio.sleep(random.uniform(0.005, 0.06))  # noqa: S311 -- timing jitter, not security
    await message.ack()
    print(f"acked {message.data.decode()}", flush=True)


async def main() -> None:
    client = registry.wrap(await nats.connect(url), name="nats")
    config = ConsumerConfig(max_ack_pending=8, ack_wait=60)
    await client.jetstream().subscribe(subject, durable="worker", cb=handle, manual_ack=True, config=config)
    print("main: ready", flush=True)
    await asyncio.Event().wait()


code = poolkeeper.run(main, registry=registry)
assert registry.report is not None
print("report " + json.dumps(registry.report.to_dict()), flush=True)
sys.exit(code)
