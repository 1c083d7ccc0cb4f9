"""A queue worker kept by poolkeeper: RabbitMQ in, PostgreSQL out, stopped by SIGTERM without losing a message.

Each message on the queue is an order id; the handler records it in PostgreSQL, idempotently
(``insert ... on conflict do nothing``: a message redelivered after a forced shutdown or a crash
changes nothing), then acks. ``poolkeeper.run()`` runs ``main``; on SIGTERM it cancels ``main``,
and the registry closes the broker connection first (consumers cancelled, prefetched messages
requeued, handlers drained, stragglers requeued at the deadline), then the database, which the
handlers still use while they finish: the broker's keeper ``depends_on`` the database's.

Run it (environment, all optional)::

    python -m integrations.worker.worker

Prints ``worker: ready`` once consuming and ``processed ORDER`` after each ack.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from typing import TYPE_CHECKING

import aio_pika
import asyncpg

import poolkeeper

if TYPE_CHECKING:
    from aio_pika.abc import AbstractIncomingMessage

AMQP_URL = os.environ.get("POOLKEEPER_WORKER_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
DATABASE_URL = os.environ.get("POOLKEEPER_WORKER_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
QUEUE = os.environ.get("POOLKEEPER_WORKER_QUEUE", "orders")
TABLE = os.environ.get("POOLKEEPER_WORKER_TABLE", "processed_orders")
PREFETCH = int(os.environ.get("POOLKEEPER_WORKER_PREFETCH", "16"))

registry = poolkeeper.Registry(
    drain_timeout=float(os.environ.get("POOLKEEPER_DRAIN_TIMEOUT", "20")),
    close_timeout=float(os.environ.get("POOLKEEPER_CLOSE_TIMEOUT", "5")),
)


async def main() -> None:
    """Open the database and the broker, consume until cancelled (run() does that on SIGTERM)."""
    db = registry.wrap(await asyncpg.create_pool(DATABASE_URL, min_size=1, max_size=4), name="db")
    await db.execute(
        f"create table if not exists {TABLE} (order_id text primary key, done_at timestamptz default now())"
    )
    broker = registry.wrap(await aio_pika.connect_robust(AMQP_URL), name="broker", depends_on=["db"])
    channel = await broker.channel()
    await channel.set_qos(prefetch_count=PREFETCH)
    queue = await channel.declare_queue(QUEUE, durable=True)

    async def handle(message: AbstractIncomingMessage) -> None:
        order = message.body.decode()
        async with message.process():  # acks when the block ends; a forced cancel is requeued
            await db.execute(f"insert into {TABLE} (order_id) values ($1) on conflict do nothing", order)  # noqa: S608 -- the table name is configuration
            await asyncio.sleep(0.02)  # the rest of the work
        print(f"processed {order}", flush=True)

    await queue.consume(handle)
    print("worker: ready", flush=True)
    await asyncio.Event().wait()  # until SIGTERM; the handlers go on while the broker drains


if __name__ == "__main__":
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
    sys.exit(poolkeeper.run(main, registry=registry))
