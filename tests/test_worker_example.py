"""integrations/worker: the queue worker stops on SIGTERM with every order recorded once or back in the queue."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import Iterator

import aio_pika
import asyncpg
import pytest

from tests.programs.child import ROOT, Child

ORDERS = 60


@pytest.fixture
def names(amqp_url: str, pg_url: str) -> Iterator[tuple[str, str]]:
    """A durable queue and a table of the test's own, both removed afterwards."""
    suffix = uuid.uuid4().hex[:12]
    queue, table = f"pk-orders-{suffix}", f"pk_orders_{suffix}"
    yield queue, table

    async def clean() -> None:
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(queue)
        db = await asyncpg.connect(pg_url)
        try:
            await db.execute(f"drop table if exists {table}")
        finally:
            await db.close()

    asyncio.run(clean())


def test_the_worker_records_each_order_once_and_requeues_the_rest(amqp_url, pg_url, names, monkeypatch):
    """SIGTERM mid-stream: exit 0; the orders in the table are exactly those acked; the rest are back in the queue."""
    queue, table = names

    async def publish() -> None:
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            await channel.declare_queue(queue, durable=True)
            for i in range(ORDERS):
                await channel.default_exchange.publish(aio_pika.Message(f"o{i}".encode()), routing_key=queue)

    asyncio.run(publish())
    monkeypatch.setenv("POOLKEEPER_WORKER_AMQP_URL", amqp_url)
    monkeypatch.setenv("POOLKEEPER_WORKER_DATABASE_URL", pg_url)
    monkeypatch.setenv("POOLKEEPER_WORKER_QUEUE", queue)
    monkeypatch.setenv("POOLKEEPER_WORKER_TABLE", table)
    monkeypatch.setenv("POOLKEEPER_WORKER_PREFETCH", "8")
    child = Child(str(ROOT / "integrations" / "worker" / "worker.py"))
    try:
        child.expect("worker: ready")
        for _ in range(10):
            child.expect("processed ")
        child.send(signal.SIGTERM)
        assert child.wait(30) == 0
    finally:
        child.kill()
    processed = [line.split()[1] for line in child.output.splitlines() if line.startswith("processed ")]
    assert "poolkeeper shutdown ok" in child.errors

    async def state() -> tuple[list[str], int]:
        db = await asyncpg.connect(pg_url)
        try:
            rows = [row["order_id"] for row in await db.fetch(f"select order_id from {table}")]
        finally:
            await db.close()
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            declared = await channel.declare_queue(queue, durable=True, passive=True)
        return rows, declared.declaration_result.message_count or 0

    rows, ready = asyncio.run(state())
    assert sorted(rows) == sorted(processed)
    assert len(processed) == len(set(processed))
    assert ready == ORDERS - len(processed)
    # The broker closed before the database: the report lists them in that order of closing.
    assert child.errors.index("'broker': draining -> closed") < child.errors.index("'db': draining -> closed")
