"""Version seams: a library release lacking what an adapter needs is refused at wrap time, never mid-shutdown.

A release without some private name is simulated by removing that name from the installed
library for one test (``monkeypatch``); ``nox -s compat`` runs the real releases.
"""

from __future__ import annotations

import time

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import Pool
from sqlalchemy.util import queue as sqla_queue

import poolkeeper
from poolkeeper import Registry, UnsupportedResourceError
from poolkeeper.adapters import _sqlalchemy_compat
from tests.conftest import Server, sqlalchemy_url
from tests.test_cancellation import borrow_in_thread


def test_a_sqlalchemy_release_lacking_a_needed_name_is_refused_at_wrap_time(make_engine, monkeypatch):
    """wrap() names SQLAlchemy, its version, what it lacks and the supported range; the engine is untouched."""
    engine = make_engine()
    monkeypatch.delattr(Pool, "_do_return_conn")
    registry = Registry()

    with pytest.raises(UnsupportedResourceError) as refused:
        registry.wrap(engine, name="db")

    message = str(refused.value)
    assert f"SQLAlchemy {sa.__version__} lacks Pool._do_return_conn" in message
    assert f"supports SQLAlchemy {_sqlalchemy_compat.SUPPORTED_RANGE}" in message
    assert "db" not in registry
    assert type(engine.pool) is sa.pool.QueuePool  # not guarded: the engine works as before
    assert registry.close().ok


def test_an_async_engine_without_any_greenlet_await_is_refused_at_wrap_time(pg_url, monkeypatch):
    """With neither 2.1's util.await_ nor 2.0's AsyncAdaptedQueue.await_, wrapping an AsyncEngine is refused."""
    engine = create_async_engine(sqlalchemy_url(pg_url, "asyncpg"))  # never connects
    removed = 0
    for owner in (sa.util, sqla_queue.AsyncAdaptedQueue):  # 2.1 has the first, 2.0 the second
        if "await_" in vars(owner):
            monkeypatch.delattr(owner, "await_")
            removed += 1
    assert removed == 1

    with pytest.raises(UnsupportedResourceError, match=r"lacks sqlalchemy\.util\.await_ \(2\.1\)"):
        poolkeeper.wrap(engine, registry=Registry())


def test_a_psycopg_without_cancel_safe_still_cancels_the_query_at_the_deadline(
    make_engine, server: Server, monkeypatch
):
    """Without cancel_safe (psycopg 3.1), force-close still cancels the borrowed statement with cancel()."""
    for cls in psycopg.Connection.__mro__:  # psycopg >= 3.2 defines it; 3.1 (the floor) never had it
        if "cancel_safe" in vars(cls):
            monkeypatch.delattr(cls, "cancel_safe")
    assert not hasattr(psycopg.Connection, "cancel_safe")
    engine = make_engine()
    registry = Registry(drain_timeout=0.1)
    registry.wrap(engine, name="db")
    borrower, errors = borrow_in_thread(engine)
    assert server.settle(lambda: len(server.running("pg_sleep")) == 1)

    started = time.monotonic()
    report = registry.close()
    borrower.join(5)

    assert report["db"].outcome == "forced"
    assert report["db"].error is None
    assert time.monotonic() - started < 2.0
    assert len(errors) == 1
    assert server.settle(lambda: server.running("pg_sleep") == []), "the query went on running on the server"
