"""The example service: FastAPI with a database, optionally Redis and an upstream, kept by poolkeeper.

Run it with ``python -m poolkeeper.demo.service --port 8000``. Settings come from the environment:

- ``POOLKEEPER_DEMO_DATABASE_URL``: a SQLAlchemy URL (default: SQLite in a temporary directory);
  ``postgresql://`` URLs use psycopg.
- ``POOLKEEPER_DEMO_REDIS_URL``: when set, each request also increments a counter in Redis.
- ``POOLKEEPER_DEMO_UPSTREAM_URL``: when set, each request also GETs this URL (aiohttp).
- ``POOLKEEPER_SHUTDOWN_DELAY`` (default 1.0), ``POOLKEEPER_DRAIN_TIMEOUT`` (default 10),
  ``POOLKEEPER_CLOSE_TIMEOUT`` (default 5), ``POOLKEEPER_DEADLINE`` (default: from the timeouts).
- ``POOLKEEPER_DEMO_APPLICATION_NAME``: the PostgreSQL ``application_name`` and Redis client name
  of its connections (default ``poolkeeper-demo``), so that leftovers can be found on the servers.

Logs are JSON lines on stderr, the ``poolkeeper_*`` extra fields included; the shutdown report is
the record whose ``poolkeeper_report`` field is set.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool

import poolkeeper
from poolkeeper.fastapi import health_router, lifespan

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

__all__ = ["Settings", "create_app", "main"]

logger = logging.getLogger("poolkeeper.demo.service")


@dataclass(frozen=True)
class Settings:
    """What the service connects to and how long its shutdown may take."""

    database_url: str
    redis_url: str | None = None
    upstream_url: str | None = None
    application_name: str = "poolkeeper-demo"
    shutdown_delay: float = 1.0
    drain_timeout: float = 10.0
    close_timeout: float = 5.0
    deadline: float | None = None

    @classmethod
    def from_environment(cls) -> Settings:
        """Read the ``POOLKEEPER_*`` variables (see the module docstring)."""
        env = os.environ
        default_db = f"sqlite:///{Path(tempfile.gettempdir()) / f'poolkeeper-demo-{os.getpid()}.db'}"
        deadline = env.get("POOLKEEPER_DEADLINE")
        return cls(
            database_url=env.get("POOLKEEPER_DEMO_DATABASE_URL", default_db),
            redis_url=env.get("POOLKEEPER_DEMO_REDIS_URL") or None,
            upstream_url=env.get("POOLKEEPER_DEMO_UPSTREAM_URL") or None,
            application_name=env.get("POOLKEEPER_DEMO_APPLICATION_NAME", "poolkeeper-demo"),
            shutdown_delay=float(env.get("POOLKEEPER_SHUTDOWN_DELAY", "1.0")),
            drain_timeout=float(env.get("POOLKEEPER_DRAIN_TIMEOUT", "10")),
            close_timeout=float(env.get("POOLKEEPER_CLOSE_TIMEOUT", "5")),
            deadline=float(deadline) if deadline else None,
        )


def _engine(settings: Settings) -> sa.Engine:
    url = sa.make_url(settings.database_url)
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    if url.get_backend_name() == "postgresql":
        return sa.create_engine(url, pool_size=10, connect_args={"application_name": settings.application_name})
    return sa.create_engine(url, pool_size=10)


def _database_work(engine: sa.Engine, seconds: float) -> int:
    """Hold a connection for ``seconds`` doing what a request handler does: a query, then some work."""
    with engine.connect() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(sa.text("select pg_sleep(:s)"), {"s": seconds})
        else:
            connection.execute(sa.text("select 1"))
            time.sleep(seconds)
        return int(connection.execute(sa.text("select 1")).scalar_one())


def create_app(settings: Settings, registry: poolkeeper.Registry | None = None) -> FastAPI:
    """The service: ``GET /work?ms=N`` holds a database connection N ms (and uses Redis and the upstream)."""
    registry = registry if registry is not None else _registry(settings)
    engine = registry.wrap(_engine(settings), name="db")
    clients: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def setup(app: FastAPI) -> AsyncIterator[None]:  # noqa: ARG001 -- FastAPI's lifespan signature
        # Clients bound to the running loop are made here, inside the server's loop.
        if settings.redis_url:
            import redis.asyncio  # noqa: PLC0415 -- optional part of the example

            client = redis.asyncio.Redis.from_url(settings.redis_url, client_name=settings.application_name)
            clients["cache"] = registry.wrap(client, name="cache")
        if settings.upstream_url:
            import aiohttp  # noqa: PLC0415 -- optional part of the example

            clients["upstream"] = registry.wrap(aiohttp.ClientSession(), name="upstream")
        yield

    app = FastAPI(
        title="poolkeeper example service",
        lifespan=lifespan(registry, setup=setup, shutdown_delay=settings.shutdown_delay, deadline=settings.deadline),
    )
    app.include_router(health_router(registry))

    @app.get("/work")
    async def work(request: Request, ms: int = 50) -> dict[str, Any]:  # noqa: ARG001 -- request kept for logging hooks
        result: dict[str, Any] = {"db": await run_in_threadpool(_database_work, engine, ms / 1000)}
        if "cache" in clients:
            result["hits"] = await clients["cache"].incr(f"{settings.application_name}:hits")
        if "upstream" in clients:
            async with clients["upstream"].get(settings.upstream_url) as response:
                result["upstream"] = response.status
        return result

    return app


class JsonLines(logging.Formatter):
    """One JSON object per record, with every ``poolkeeper_*`` extra field."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        data: dict[str, Any] = {
            "time": record.created,
            "logger": record.name,
            "level": record.levelname,
            "message": record.getMessage(),
        }
        data.update({key: value for key, value in vars(record).items() if key.startswith("poolkeeper_")})
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def _prepare_process(registry: poolkeeper.Registry) -> None:
    """JSON logs on stderr, and SIGTERM's last step turned into an exit status."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)

    # uvicorn ends a graceful shutdown by restoring the handlers it found and raising the signal
    # again. Finding SIG_DFL, the process would die "killed by SIGTERM" (exit status 143) after a
    # clean shutdown; this handler turns that last step into an exit status telling how it went.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(_exit_code(registry)))


def _exit_code(registry: poolkeeper.Registry) -> int:
    report = registry.report
    return 0 if report is not None and report.ok else 1


def _registry(settings: Settings) -> poolkeeper.Registry:
    return poolkeeper.Registry(
        drain_timeout=settings.drain_timeout, close_timeout=settings.close_timeout, track_borrowers=True
    )


def gunicorn_app() -> FastAPI:
    """App factory for gunicorn with uvicorn workers: ``gunicorn 'poolkeeper.demo.service:gunicorn_app()'``."""
    settings = Settings.from_environment()
    registry = _registry(settings)
    _prepare_process(registry)  # runs in each worker, after gunicorn reset the worker's signals
    return create_app(settings, registry)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the service under uvicorn until SIGTERM/SIGINT; returns 0 after a clean shutdown."""
    import uvicorn  # noqa: PLC0415 -- only the command needs the server

    parser = argparse.ArgumentParser(prog="python -m poolkeeper.demo.service")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--timeout-graceful-shutdown",
        type=int,
        default=None,
        help="seconds uvicorn waits for requests in flight once it stops accepting (default: no limit)",
    )
    arguments = parser.parse_args(argv)
    settings = Settings.from_environment()
    registry = _registry(settings)
    _prepare_process(registry)
    app = create_app(settings, registry)
    config = uvicorn.Config(
        app,
        host=arguments.host,
        port=arguments.port,
        log_config=None,
        lifespan="on",
        timeout_graceful_shutdown=arguments.timeout_graceful_shutdown,
    )
    asyncio.run(uvicorn.Server(config).serve())
    return _exit_code(registry)


if __name__ == "__main__":
    raise SystemExit(main())
