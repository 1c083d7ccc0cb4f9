"""psycopg_pool: ``ConnectionPool``, ``NullConnectionPool`` and their async twins, on the real PostgreSQL.

The server's view comes from ``pg_stat_activity``, filtered by this test's ``application_name``.
Each pool's conninfo carries a password: the loopback server trusts everyone, so it is a secret
the report must not show, not a credential.
"""

from __future__ import annotations

import contextlib
import urllib.parse
from typing import Any

import psycopg_pool
import pytest

from tests.contract.cases.postgres import SECRET, SELECT_ONE, SLEEP, PostgresSubject
from tests.contract.harness import SIZE, AdapterCase, Hold, Subject, TaskHold, ThreadHold

__all__ = ["CASES"]


def _conninfo(pg_url: str, application_name: str) -> str:
    parts = urllib.parse.urlsplit(pg_url)
    netloc = f"{parts.username or 'postgres'}:{SECRET}@{parts.hostname}:{parts.port or 5432}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, f"application_name={application_name}", ""))


class SyncPoolSubject(PostgresSubject):
    def __init__(self, request: pytest.FixtureRequest, pool_class: type[Any]) -> None:
        super().__init__(request)
        self.pool = pool_class(
            _conninfo(self.pg_url, self.application_name), min_size=0, max_size=SIZE, timeout=30, open=True
        )
        self.resource = self.pool

    def hold(self) -> Hold:
        def body(hold: ThreadHold) -> None:
            with self.pool.connection() as connection:
                connection.execute(SELECT_ONE)
                hold.mark_lent()
                hold.wait_released()

        return ThreadHold(body)

    def hold_busy(self) -> Hold:
        def body(hold: ThreadHold) -> None:
            with self.pool.connection() as connection:
                hold.mark_lent()
                connection.execute(SLEEP)

        return ThreadHold(body)

    def borrow_once(self) -> Hold:
        def body(_hold: ThreadHold) -> None:
            with self.pool.connection() as connection:
                connection.execute(SELECT_ONE)

        return ThreadHold(body)

    def queued(self) -> int:
        return len(self.pool._waiting)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.pool.close(timeout=1)


class AsyncPoolSubject(PostgresSubject):
    pool: Any

    def __init__(self, request: pytest.FixtureRequest, pool_class: type[Any]) -> None:
        super().__init__(request)
        self.pool_class = pool_class

    async def start(self) -> AsyncPoolSubject:
        self.pool = self.pool_class(
            _conninfo(self.pg_url, self.application_name), min_size=0, max_size=SIZE, timeout=30, open=False
        )
        await self.pool.open()
        self.resource = self.pool
        return self

    def hold(self) -> Hold:
        async def body(hold: TaskHold) -> None:
            async with self.pool.connection() as connection:
                await connection.execute(SELECT_ONE)
                hold.mark_lent()
                await hold.wait_released()

        return TaskHold(body)

    def hold_busy(self) -> Hold:
        async def body(hold: TaskHold) -> None:
            async with self.pool.connection() as connection:
                hold.mark_lent()
                await connection.execute(SLEEP)

        return TaskHold(body)

    def borrow_once(self) -> Hold:
        async def body(_hold: TaskHold) -> None:
            async with self.pool.connection() as connection:
                await connection.execute(SELECT_ONE)

        return TaskHold(body)

    def queued(self) -> int:
        return len(self.pool._waiting)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.pool.close(timeout=1)


async def make_pool(request: pytest.FixtureRequest) -> Subject:
    return SyncPoolSubject(request, psycopg_pool.ConnectionPool)


async def make_null_pool(request: pytest.FixtureRequest) -> Subject:
    return SyncPoolSubject(request, psycopg_pool.NullConnectionPool)


async def make_async_pool(request: pytest.FixtureRequest) -> Subject:
    return await AsyncPoolSubject(request, psycopg_pool.AsyncConnectionPool).start()


async def make_async_null_pool(request: pytest.FixtureRequest) -> Subject:
    return await AsyncPoolSubject(request, psycopg_pool.AsyncNullConnectionPool).start()


CASES = [
    AdapterCase("psycopg-pool", "psycopg_pool", psycopg_pool.PoolClosed, make_pool),
    AdapterCase("psycopg-pool-null", "psycopg_pool", psycopg_pool.PoolClosed, make_null_pool),
    AdapterCase("psycopg-pool-async", "psycopg_pool", psycopg_pool.PoolClosed, make_async_pool),
    AdapterCase("psycopg-pool-async-null", "psycopg_pool", psycopg_pool.PoolClosed, make_async_null_pool),
]
