"""The redis-py adapter: ``redis.Redis`` and ``redis.asyncio.Redis`` on a ``BlockingConnectionPool``.

A blocking pool, because it is the one whose checkouts wait for a free connection. The server's
view is ``CLIENT LIST``, filtered by a client name unique to the test; the long operation is
``BLPOP`` on a key nobody pushes to. A held connection is a pipeline's ``WATCH``.
"""

from __future__ import annotations

import contextlib
import uuid

import pytest
import redis
import redis.asyncio

from tests.contract.harness import SIZE, AdapterCase, Hold, Subject, TaskHold, ThreadHold

__all__ = ["CASES"]


class RedisSubject(Subject):
    """What both redis cases share: the server's view and the keys."""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        self.url: str = request.getfixturevalue("redis_url")
        self.client_name = f"pk-contract-{uuid.uuid4().hex[:12]}"
        self.key = f"pk-contract:{uuid.uuid4().hex}"
        self._side = redis.Redis.from_url(self.url, decode_responses=True)
        self.options = {"client_name": self.client_name, "max_connections": SIZE, "timeout": 30, "socket_timeout": 90}

    def _clients(self) -> list[dict[str, str]]:
        return [client for client in self._side.client_list() if client["name"] == self.client_name]

    def server_connections(self) -> int:
        return len(self._clients())

    def server_busy(self) -> int:
        return sum(client["cmd"] == "blpop" for client in self._clients())

    def _cleanup_server(self) -> None:
        for client in self._clients():
            with contextlib.suppress(redis.RedisError):
                self._side.client_kill_filter(_id=str(client["id"]))
        self._side.delete(self.key)
        self._side.close()


class SyncRedisSubject(RedisSubject):
    def __init__(self, request: pytest.FixtureRequest) -> None:
        super().__init__(request)
        self.pool = redis.BlockingConnectionPool.from_url(self.url, **self.options)
        self.client = redis.Redis(connection_pool=self.pool)
        self.resource = self.client

    def hold(self) -> Hold:
        def body(hold: ThreadHold) -> None:
            with self.client.pipeline() as pipe:
                pipe.watch(self.key)  # type: ignore[no-untyped-call]  # redis-py leaves it untyped; takes a connection and keeps it until the pipeline is reset
                hold.mark_lent()
                hold.wait_released()

        return ThreadHold(body)

    def hold_busy(self) -> Hold:
        def body(hold: ThreadHold) -> None:
            hold.mark_lent()
            self.client.blpop([self.key], timeout=60)

        return ThreadHold(body)

    def borrow_once(self) -> Hold:
        return ThreadHold(lambda _hold: self.client.ping())

    def queued(self) -> int:
        return len(self.pool.pool.not_empty._waiters)  # its queue.Queue's waiting threads

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()
            self.pool.disconnect()
        self._cleanup_server()


class AsyncRedisSubject(RedisSubject):
    def __init__(self, request: pytest.FixtureRequest) -> None:
        super().__init__(request)
        self.pool = redis.asyncio.BlockingConnectionPool.from_url(self.url, **self.options)
        self.client = redis.asyncio.Redis(connection_pool=self.pool)
        self.resource = self.client

    def hold(self) -> Hold:
        async def body(hold: TaskHold) -> None:
            async with self.client.pipeline() as pipe:
                await pipe.watch(self.key)
                hold.mark_lent()
                await hold.wait_released()

        return TaskHold(body)

    def hold_busy(self) -> Hold:
        async def body(hold: TaskHold) -> None:
            hold.mark_lent()
            await self.client.blpop([self.key], timeout=60)

        return TaskHold(body)

    def borrow_once(self) -> Hold:
        async def body(_hold: TaskHold) -> None:
            await self.client.ping()

        return TaskHold(body)

    def queued(self) -> int:
        return len(self.pool._condition._waiters)  # the tasks waiting on its asyncio.Condition

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.client.aclose()
            await self.pool.disconnect()
        self._cleanup_server()


async def make_sync(request: pytest.FixtureRequest) -> Subject:
    return SyncRedisSubject(request)


async def make_async(request: pytest.FixtureRequest) -> Subject:
    return AsyncRedisSubject(request)


CASES = [
    AdapterCase("redis-sync", "redis", redis.RedisError, make_sync),
    AdapterCase("redis-asyncio", "redis", redis.RedisError, make_async),
]
