"""A FastAPI app for the grace-budget end-to-end tests.

Run with ``uvicorn grace_app:app --app-dir tests/programs`` (the CLI), ``python grace_app.py PORT``
(``uvicorn.run()``) or ``gunicorn -c grace_gunicorn_conf.py grace_app:app`` (2 uvicorn workers).

Settings from the environment: ``PK_DATABASE_URL`` (libpq URL), ``PK_APPLICATION_NAME``,
``POOLKEEPER_GRACE_PERIOD``, ``PK_SHUTDOWN_DELAY``, ``PK_CLOSE_TIMEOUT``. Logs are JSON lines on
stderr, each with the process id (``pid``). ``/slow-async`` holds an AsyncEngine (asyncpg)
connection in ``pg_sleep``, ``/slow-sync`` a sync Engine (psycopg) connection, ``/hang`` holds no
connection and never finishes, ``/whoami`` answers the serving process's id. The engines are in
the default registry, the one ``poolkeeper.gunicorn``'s hooks close.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time

import sqlalchemy as sa
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import create_async_engine

import poolkeeper
from poolkeeper.demo.service import JsonLines
from poolkeeper.fastapi import health_router, lifespan


class JsonLinesWithPid(JsonLines):
    """JSON lines that say which process wrote them (two gunicorn workers share one stderr)."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON, with ``pid``."""
        return json.dumps({**json.loads(super().format(record)), "pid": record.process})


handler = logging.StreamHandler(sys.stderr)
handler.setFormatter(JsonLinesWithPid())
logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)

url = sa.make_url(os.environ["PK_DATABASE_URL"])
name = os.environ["PK_APPLICATION_NAME"]
registry = poolkeeper.get_registry()
close_timeout = float(os.environ.get("PK_CLOSE_TIMEOUT", "2"))
sync_engine = registry.wrap(
    sa.create_engine(
        url.set(drivername="postgresql+psycopg"),
        pool_size=15,
        max_overflow=0,
        connect_args={"application_name": name},
    ),
    name="sync-db",
    close_timeout=close_timeout,
    track_borrowers=True,
)
async_engine = registry.wrap(
    create_async_engine(
        url.set(drivername="postgresql+asyncpg"),
        pool_size=15,
        max_overflow=0,
        connect_args={"server_settings": {"application_name": name}},
    ),
    name="async-db",
    close_timeout=close_timeout,
    track_borrowers=True,
)
app = FastAPI(lifespan=lifespan(registry, shutdown_delay=float(os.environ.get("PK_SHUTDOWN_DELAY", "0"))))
app.include_router(health_router(registry))


@app.get("/slow-async")
async def slow_async(seconds: float = 60) -> dict[str, str]:
    """Hold an asyncpg connection in pg_sleep."""
    async with async_engine.connect() as connection:
        await connection.execute(sa.text("select pg_sleep(:s)"), {"s": seconds})
    return {"slept": "async"}


@app.get("/slow-sync")
def slow_sync(seconds: float = 60) -> dict[str, str]:
    """Hold a psycopg connection in pg_sleep (in the threadpool)."""
    with sync_engine.connect() as connection:
        connection.execute(sa.text("select pg_sleep(:s)"), {"s": seconds})
    return {"slept": "sync"}


@app.get("/whoami")
async def whoami() -> dict[str, int]:
    """Which process serves this connection."""
    return {"pid": os.getpid()}


@app.get("/block-loop")
async def block_loop(seconds: float = 1.0) -> dict[str, int]:
    """Hold this worker's event loop (blocking on purpose): the test steers new connections to the other worker."""
    time.sleep(seconds)  # noqa: ASYNC251 -- blocking the event loop is the point
    return {"pid": os.getpid()}


@app.get("/hang")
async def hang() -> dict[str, str]:
    """Never finish, holding no connection: only the exit point ends the server's drain."""
    await asyncio.sleep(3600)
    return {}


if __name__ == "__main__":  # `python grace_app.py PORT`: uvicorn.run() instead of the uvicorn CLI
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", log_config=None)
