"""The PostgreSQL adapters: SQLAlchemy ``Engine`` (psycopg), ``AsyncEngine`` (asyncpg) and asyncpg ``Pool``.

The server's view comes from ``pg_stat_activity``, filtered by this test's ``application_name``
(``tests/conftest.py``'s ``server`` fixture). Each pool is made with a password in its URL: the
loopback server trusts everyone, so it is a secret the report must not show, not a credential.
"""

from __future__ import annotations

import contextlib
from typing import Any

import asyncpg
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from poolkeeper import PoolClosedError
from tests.conftest import Server, sqlalchemy_url
from tests.contract.harness import SIZE, AdapterCase, Hold, Subject, TaskHold, ThreadHold

__all__ = ["CASES"]

SECRET = "pk-contract-pg-secret"
SELECT_ONE = "select 1"
SLEEP = "select pg_sleep(60)"


class PostgresSubject(Subject):
    """What the three PostgreSQL cases share: the server's view."""

    secret = SECRET

    def __init__(self, request: pytest.FixtureRequest) -> None:
        self.server: Server = request.getfixturevalue("server")
        self.pg_url: str = request.getfixturevalue("pg_url")
        self.application_name: str = request.getfixturevalue("application_name")

    def server_connections(self) -> int:
        return len(self.server.backends())

    def server_busy(self) -> int:
        return len(self.server.sleeping())


class EngineSubject(PostgresSubject):
    def __init__(self, request: pytest.FixtureRequest) -> None:
        super().__init__(request)
        self.engine = sa.create_engine(
            sqlalchemy_url(self.pg_url, "psycopg", password=SECRET),
            connect_args={"application_name": self.application_name},
            pool_size=SIZE,
            max_overflow=0,
            pool_timeout=30,
        )
        self.resource = self.engine

    def hold(self) -> Hold:
        def body(hold: ThreadHold) -> None:
            with self.engine.connect() as connection:
                connection.execute(sa.text(SELECT_ONE))
                hold.mark_lent()
                hold.wait_released()

        return ThreadHold(body)

    def hold_busy(self) -> Hold:
        def body(hold: ThreadHold) -> None:
            with self.engine.connect() as connection:
                hold.mark_lent()
                connection.execute(sa.text(SLEEP))

        return ThreadHold(body)

    def borrow_once(self) -> Hold:
        def body(_hold: ThreadHold) -> None:
            with self.engine.connect() as connection:
                connection.execute(sa.text(SELECT_ONE))

        return ThreadHold(body)

    def queued(self) -> int:
        return len(self.engine.pool._pool.not_empty._waiters)  # type: ignore[attr-defined]  # QueuePool's queue

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.engine.dispose()


class AsyncEngineSubject(PostgresSubject):
    def __init__(self, request: pytest.FixtureRequest) -> None:
        super().__init__(request)
        self.engine = create_async_engine(
            sqlalchemy_url(self.pg_url, "asyncpg", password=SECRET),
            connect_args={"server_settings": {"application_name": self.application_name}},
            pool_size=SIZE,
            max_overflow=0,
            pool_timeout=30,
        )
        self.resource = self.engine

    def hold(self) -> Hold:
        async def body(hold: TaskHold) -> None:
            async with self.engine.connect() as connection:
                await connection.execute(sa.text(SELECT_ONE))
                hold.mark_lent()
                await hold.wait_released()

        return TaskHold(body)

    def hold_busy(self) -> Hold:
        async def body(hold: TaskHold) -> None:
            async with self.engine.connect() as connection:
                hold.mark_lent()
                await connection.execute(sa.text(SLEEP))

        return TaskHold(body)

    def borrow_once(self) -> Hold:
        async def body(_hold: TaskHold) -> None:
            async with self.engine.connect() as connection:
                await connection.execute(sa.text(SELECT_ONE))

        return TaskHold(body)

    def queued(self) -> int:
        # The adapter's own record of the tasks waiting in AsyncAdaptedQueuePool's queue.
        waiters: set[Any] = getattr(self.engine.sync_engine.pool._pool, "_pk_waiters", set())  # type: ignore[attr-defined]
        return len(waiters)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.engine.dispose()


class AsyncpgSubject(PostgresSubject):
    pool: Any  # asyncpg.Pool: asyncpg ships no types

    async def start(self) -> AsyncpgSubject:
        dsn = sa.make_url(self.pg_url).set(password=SECRET).render_as_string(hide_password=False)
        self.pool = await asyncpg.create_pool(
            dsn, min_size=0, max_size=SIZE, server_settings={"application_name": self.application_name}
        )
        self.resource = self.pool
        return self

    def hold(self) -> Hold:
        async def body(hold: TaskHold) -> None:
            async with self.pool.acquire() as connection:
                await connection.fetchval(SELECT_ONE)
                hold.mark_lent()
                await hold.wait_released()

        return TaskHold(body)

    def hold_busy(self) -> Hold:
        async def body(hold: TaskHold) -> None:
            async with self.pool.acquire() as connection:
                hold.mark_lent()
                await connection.fetchval(SLEEP)

        return TaskHold(body)

    def borrow_once(self) -> Hold:
        async def body(_hold: TaskHold) -> None:
            async with self.pool.acquire() as connection:
                await connection.fetchval(SELECT_ONE)

        return TaskHold(body)

    def queued(self) -> int:
        return len(self.pool._queue._getters)

    async def close(self) -> None:
        self.pool.terminate()


async def make_engine(request: pytest.FixtureRequest) -> Subject:
    return EngineSubject(request)


async def make_async_engine(request: pytest.FixtureRequest) -> Subject:
    return AsyncEngineSubject(request)


async def make_asyncpg(request: pytest.FixtureRequest) -> Subject:
    return await AsyncpgSubject(request).start()


CASES = [
    # SQLAlchemy has no error of its own for a closed pool: the refusal is poolkeeper's.
    AdapterCase("sqlalchemy-sync", "sqlalchemy", PoolClosedError, make_engine),
    AdapterCase("sqlalchemy-async", "sqlalchemy", PoolClosedError, make_async_engine),
    AdapterCase("asyncpg", "asyncpg", asyncpg.InterfaceError, make_asyncpg),
]
