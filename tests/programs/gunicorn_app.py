"""A WSGI app for tests/test_gunicorn.py: one SQLAlchemy engine and one redis client, wrapped at import.

Under ``--preload`` the import happens in the master, which also runs a query and a PING
there (the trap: the master's connections exist before the fork). Each request answers
``{"pid", "backend", "redis"}``: the worker, its PostgreSQL backend and its Redis client id.
``/readyz`` and ``/livez`` come from poolkeeper.health.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import redis
import sqlalchemy as sa

import poolkeeper
from poolkeeper.health import HealthMiddleware, liveness, readiness

APPLICATION_NAME = os.environ["PK_APPLICATION_NAME"]

engine = poolkeeper.wrap(
    sa.create_engine(
        sa.make_url(os.environ["POOLKEEPER_POSTGRES_URL"]).set(drivername="postgresql+psycopg"),
        connect_args={"application_name": APPLICATION_NAME},
    ),
    name="db",
)
cache = poolkeeper.wrap(
    redis.Redis.from_url(os.environ["POOLKEEPER_REDIS_URL"], client_name=APPLICATION_NAME), name="cache"
)

with engine.connect() as connection:  # at import: in the master, under --preload
    master_backend = connection.exec_driver_sql("select pg_backend_pid()").scalar()
print(f"import pid={os.getpid()} backend={master_backend} redis={cache.client_id()}", file=sys.stderr, flush=True)  # noqa: T201 -- read by the test


def served() -> dict[str, Any]:
    """Which worker, backend and Redis client served this request."""
    with engine.connect() as connection:
        backend = connection.exec_driver_sql("select pg_backend_pid()").scalar()
    return {"pid": os.getpid(), "backend": backend, "redis": cache.client_id()}


def identities(environ: dict[str, Any], start_response: Any) -> list[bytes]:  # noqa: ARG001 -- WSGI's signature
    """The WSGI view."""
    body = json.dumps(served()).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


application = HealthMiddleware(identities)


async def asgi_application(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The same app for uvicorn workers, in plain ASGI (blocking calls are fine for this test)."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    checks = {"/readyz": readiness, "/livez": liveness}
    status, body = checks[scope["path"]]() if scope["path"] in checks else (200, served())
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})
