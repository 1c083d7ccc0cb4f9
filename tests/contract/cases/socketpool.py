"""The third-party adapter of ``integrations/socketpool``, registered by call, on its real TCP server."""

from __future__ import annotations

import pytest

from integrations.socketpool.adapter import SocketPoolDriver
from integrations.socketpool.pool import ClosedPoolError, SocketPool
from integrations.socketpool.server import LineServer
from poolkeeper.adapters import register_adapter, unregister_adapter
from tests.contract.harness import SIZE, AdapterCase, Hold, Subject, ThreadHold

__all__ = ["CASES"]


class SocketPoolSubject(Subject):
    secret = "pk-contract-line-secret"

    def __init__(self) -> None:
        self.server = LineServer(password=self.secret).start()
        self.pool = SocketPool(*self.server.address, size=SIZE, password=self.secret)
        self.resource = self.pool

    def hold(self) -> Hold:
        def body(hold: ThreadHold) -> None:
            with self.pool.connection() as connection:
                connection.call("PING")
                hold.mark_lent()
                hold.wait_released()

        return ThreadHold(body)

    def hold_busy(self) -> Hold:
        def body(hold: ThreadHold) -> None:
            with self.pool.connection() as connection:
                hold.mark_lent()
                connection.call("SLEEP 60")

        return ThreadHold(body)

    def borrow_once(self) -> Hold:
        def body(_hold: ThreadHold) -> None:
            with self.pool.connection() as connection:
                connection.call("PING")

        return ThreadHold(body)

    def queued(self) -> int:
        return len(self.pool._cond._waiters)  # type: ignore[attr-defined]  # the threads waiting in acquire()

    def server_connections(self) -> int:
        return self.server.open_connections()

    def server_busy(self) -> int:
        return self.server.running()

    async def close(self) -> None:
        self.pool.close()
        self.server.stop()


async def make(_request: pytest.FixtureRequest) -> Subject:
    return SocketPoolSubject()


CASES = [
    AdapterCase(
        name="socketpool",
        kind="socketpool",
        library_error=ClosedPoolError,
        make=make,
        register=lambda: register_adapter(SocketPool, SocketPoolDriver, label="in-house SocketPool"),
        unregister=lambda: unregister_adapter(SocketPool),
    )
]
