"""Instructions per consumed and acked message, raw against wrapped, counted by valgrind's callgrind.

The per-message rows of ``docs/performance.md`` (aio-pika, NATS JetStream) are wall-clock
figures from a client sharing two cores with its broker, which move by several percent from run
to run. What the keeper adds per message does not move: this counts it. Each count is a whole
consumer process under callgrind, consuming and acking ``N`` messages that this process
published beforehand (not counted); the difference between ``N = 3000`` and ``N = 1000``,
divided by 2000, is the cost of one message, start-up and connection set-up cancelled out.

    python -m benchmarks.consume_instructions               # aio-pika and nats, raw / wrapped
    python -m benchmarks.consume_instructions nats          # one case

Needs ``valgrind`` on the PATH and the brokers the benchmarks use (RabbitMQ, NATS with JetStream).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import re
import subprocess
import sys
import uuid
from typing import TYPE_CHECKING, Any

from benchmarks._measure import acking_handler

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine

AMQP_URL = os.environ.get("POOLKEEPER_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
NATS_URL = os.environ.get("POOLKEEPER_NATS_URL", "nats://127.0.0.1:4222")
SMALL, LARGE = 1000, 3000
PREFETCH = 64  # aio-pika's prefetch; NATS's max_ack_pending


async def _consume(n: int, subscribe: Callable[[Callable[[Any], Awaitable[None]]], Awaitable[object]]) -> None:
    """Subscribe with a handler that acks each message; return once ``n`` were acked."""
    handler, done = acking_handler(n)
    await subscribe(handler)
    await done.wait()


async def _aio_pika_child(mode: str, name: str, n: int) -> None:
    import aio_pika  # noqa: PLC0415 -- imported in the child only

    from poolkeeper import Registry  # noqa: PLC0415

    registry = Registry()
    connection = await aio_pika.connect(AMQP_URL)
    if mode == "wrapped":
        registry.wrap(connection, name="broker")
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=PREFETCH)
    queue = await channel.declare_queue(name, passive=True)
    await _consume(n, queue.consume)
    await registry.aclose()
    await connection.close()


async def _nats_child(mode: str, name: str, n: int) -> None:
    import nats  # noqa: PLC0415 -- imported in the child only
    from nats.js.api import ConsumerConfig, DeliverPolicy  # noqa: PLC0415

    from poolkeeper import Registry  # noqa: PLC0415

    registry = Registry()
    client = await nats.connect(NATS_URL)
    if mode == "wrapped":
        registry.wrap(client, name="nats")
    config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL, max_ack_pending=PREFETCH)

    async def subscribe(handler: Callable[[Any], Awaitable[None]]) -> object:
        return await client.jetstream().subscribe(f"pk.instr.{name}", cb=handler, manual_ack=True, config=config)

    await _consume(n, subscribe)
    await registry.aclose()
    await client.close()


async def _aio_pika_fill(name: str, n: int) -> None:
    import aio_pika  # noqa: PLC0415

    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel(publisher_confirms=False)
    if n:
        await channel.declare_queue(name, auto_delete=False)
        for _ in range(n):
            await channel.default_exchange.publish(aio_pika.Message(b"x"), routing_key=name)
    else:
        await channel.queue_delete(name)
    await connection.close()


async def _nats_fill(name: str, n: int) -> None:
    import nats  # noqa: PLC0415

    client = await nats.connect(NATS_URL)
    stream = client.jetstream()
    if n:
        await stream.add_stream(name=name, subjects=[f"pk.instr.{name}"])
        for _ in range(n):
            await stream.publish(f"pk.instr.{name}", b"x")
    else:
        await stream.delete_stream(name)
    await client.close()


#: case: (the consumer run under callgrind, what publishes n messages (n = 0: deletes them all))
CASES: dict[
    str, tuple[Callable[[str, str, int], Coroutine[Any, Any, None]], Callable[[str, int], Coroutine[Any, Any, None]]]
] = {
    "aio-pika": (_aio_pika_child, _aio_pika_fill),
    "nats": (_nats_child, _nats_fill),
}


def count_instructions(case: str, mode: str, n: int) -> int:
    """Instructions of a whole consumer process consuming and acking ``n`` messages, under callgrind."""
    name = f"PKINSTR{uuid.uuid4().hex[:10].upper()}"
    fill = CASES[case][1]
    asyncio.run(fill(name, n))
    try:
        command = [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            "-m",
            "benchmarks.consume_instructions",
            "--child",
            case,
            mode,
            name,
            str(n),
        ]
        completed = subprocess.run(command, capture_output=True, text=True, check=True, timeout=1800)  # noqa: S603 -- our own command line
    finally:
        asyncio.run(fill(name, 0))
    found = re.search(r"Collected : (\d+)", completed.stderr)
    if found is None:
        raise RuntimeError(f"callgrind printed no total:\n{completed.stderr[-2000:]}")
    return int(found.group(1))


def per_message(case: str, mode: str) -> float:
    """Instructions per consumed and acked message: the difference between two runs."""
    return (count_instructions(case, mode, LARGE) - count_instructions(case, mode, SMALL)) / (LARGE - SMALL)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.consume_instructions", description=__doc__.splitlines()[0]
    )
    parser.add_argument("cases", nargs="*", help=f"the cases to count, of {', '.join(CASES)} (default: all)")
    parser.add_argument("--child", nargs=4, metavar=("CASE", "MODE", "NAME", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        case, mode, name, n = args.child
        gc.disable()  # as in the timed benchmarks: no collection lands in one count and not the other
        asyncio.run(CASES[case][0](mode, name, int(n)))
        return
    unknown = [case for case in args.cases if case not in CASES]
    if unknown:
        parser.error(f"cases: unknown {', '.join(unknown)}; expected some of {', '.join(CASES)}")
    for case in args.cases or list(CASES):
        raw, wrapped = per_message(case, "raw"), per_message(case, "wrapped")
        print(
            f"{case:<10} instructions per consumed+acked message: raw {raw:,.0f}, wrapped {wrapped:,.0f} "
            f"({wrapped / raw:.3f}x)",
            flush=True,
        )


if __name__ == "__main__":
    main()
