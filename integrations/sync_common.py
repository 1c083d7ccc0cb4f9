"""What the Flask and Django examples share: the engine they wrap, configured from the environment."""

from __future__ import annotations

import os

import sqlalchemy as sa

__all__ = ["make_engine"]


def make_engine() -> sa.Engine:
    """``POOLKEEPER_DEMO_DATABASE_URL`` (``postgresql://`` uses psycopg), tagged with the application name."""
    url = sa.make_url(os.environ.get("POOLKEEPER_DEMO_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    name = os.environ.get("POOLKEEPER_DEMO_APPLICATION_NAME", "poolkeeper-example")
    connect_args = {"application_name": name} if url.get_backend_name() == "postgresql" else {}
    return sa.create_engine(url, connect_args=connect_args)
