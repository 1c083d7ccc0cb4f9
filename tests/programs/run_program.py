"""A worker whose main is run by poolkeeper.run(), driven by tests/test_run.py.

Usage: run_program.py MODE POSTGRES_URL APPLICATION_NAME [DEADLINE]

wait    main waits forever on an async engine; a signal stops it.
force   the same, plus a task holding a connection running pg_sleep(60); drain_timeout 30 s.
error   main raises.
swallow main holds a connection and swallows every CancelledError: it never stops by itself.
budget  "force" under run(grace_period=4, shutdown_delay=0.5) with close_timeout 1 s: one SIGTERM only.
budget-swallow  "swallow" under run(grace_period=4) with close_timeout 1 s: one SIGTERM only.

DEADLINE, when given, is run()'s deadline in seconds.
"""

# ruff: noqa: T201 -- a test program talks to its test through stdout
from __future__ import annotations

import asyncio
import logging
import sys

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import poolkeeper

mode, url, application_name = sys.argv[1:4]
deadline = float(sys.argv[4]) if len(sys.argv) > 4 else None
logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
registry = poolkeeper.Registry(drain_timeout=30, close_timeout=1 if mode.startswith("budget") else 5)
holders: list[asyncio.Task[None]] = []  # a reference, so the holder task is not collected


async def hold(engine: AsyncEngine) -> None:
    try:
        async with engine.connect() as connection:
            await connection.execute(sa.text("select pg_sleep(60)"))
    except Exception as error:  # the force-close error is what the test looks for
        print(f"main: the holder got {type(error).__name__}", flush=True)


async def main() -> None:
    engine = registry.wrap(
        create_async_engine(
            sa.make_url(url).set(drivername="postgresql+asyncpg"),
            connect_args={"server_settings": {"application_name": application_name}},
        ),
        name="db",
    )
    async with engine.connect() as connection:
        await connection.execute(sa.text("select 1"))
    if mode == "error":
        raise ValueError("boom")
    if mode in ("force", "swallow", "budget", "budget-swallow"):
        holders.append(asyncio.ensure_future(hold(engine)))
    print("main: ready", flush=True)
    while mode in ("swallow", "budget-swallow"):
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            print("main: cancelled, and carrying on", flush=True)
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        print("main: cancelled", flush=True)
        raise


if mode == "budget":
    sys.exit(poolkeeper.run(main, registry=registry, grace_period=4, shutdown_delay=0.5))
if mode == "budget-swallow":
    sys.exit(poolkeeper.run(main, registry=registry, grace_period=4))
sys.exit(poolkeeper.run(main, registry=registry, deadline=deadline))
