"""What the Flask and Django examples share: the engine they wrap (configured from the environment), and their work."""

from __future__ import annotations

import os
import time

import sqlalchemy as sa

import poolkeeper

__all__ = ["hold_connection", "make_engine", "wrapped_engine"]


def make_engine() -> sa.Engine:
    """``POOLKEEPER_DEMO_DATABASE_URL`` (``postgresql://`` uses psycopg), tagged with the application name."""
    url = sa.make_url(os.environ.get("POOLKEEPER_DEMO_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    name = os.environ.get("POOLKEEPER_DEMO_APPLICATION_NAME", "poolkeeper-example")
    connect_args = {"application_name": name} if url.get_backend_name() == "postgresql" else {}
    return sa.create_engine(url, connect_args=connect_args)


def wrapped_engine() -> sa.Engine:
    """:func:`make_engine`, wrapped as ``db`` in the default registry (``POOLKEEPER_DRAIN_TIMEOUT``, default 10 s)."""
    return poolkeeper.wrap(
        make_engine(), name="db", drain_timeout=float(os.environ.get("POOLKEEPER_DRAIN_TIMEOUT", "10"))
    )


def hold_connection(engine: sa.Engine, seconds: float) -> None:
    """What a request does: hold a connection for ``seconds`` (``pg_sleep`` on PostgreSQL)."""
    with engine.connect() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(sa.text("select pg_sleep(:seconds)"), {"seconds": seconds})
        else:
            connection.execute(sa.text("select 1"))
            time.sleep(seconds)
