"""What the shared behaviour suite needs from an adapter: how to make its pool, borrow, and see the server.

A case (:class:`AdapterCase`) makes, for each test, a :class:`Subject`: a pool of at most
:data:`SIZE` connections on a real server, not wrapped yet, and the server-side view of it.
Borrowers are threads (sync libraries) or tasks (async ones); either way the test sees them as a
:class:`Hold` whose progress it awaits on its event loop.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

__all__ = ["SIZE", "AdapterCase", "Hold", "Subject", "TaskHold", "ThreadHold", "settle"]

#: How many connections each subject's pool may open: the wake test exhausts it.
SIZE = 2
# The ceiling of any wait inside a borrower; far beyond what any test waits for.
_CEILING = 60.0


def _resolve(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


class Hold(abc.ABC):
    """One borrower, seen from the test's loop.

    Attributes:
        lent: resolved once the borrower has its connection (and made its first round trip).
        done: resolved when the borrower has finished: with ``None`` if it gave its connection
            back normally, with the exception it got otherwise.
    """

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.lent: asyncio.Future[None] = loop.create_future()
        self.done: asyncio.Future[BaseException | None] = loop.create_future()

    @abc.abstractmethod
    def release(self) -> None:
        """Tell the borrower to give its connection back (a :meth:`Subject.hold` borrower)."""

    async def wait_lent(self, timeout: float = 10.0) -> None:
        """Wait until the borrower has its connection; fail if it finished (or timed out) first."""
        await asyncio.wait((self.lent, self.done), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if not self.lent.done():
            outcome = self.done.result() if self.done.done() else "nothing within the timeout"
            raise AssertionError(f"the borrower never got its connection: {outcome!r}")

    async def outcome(self, timeout: float = 10.0) -> BaseException | None:
        """What the borrower ended with (``None``: a normal return), waiting up to ``timeout``."""
        return await asyncio.wait_for(asyncio.shield(self.done), timeout)


class ThreadHold(Hold):
    """A borrower running ``body(hold)`` in a daemon thread (sync libraries)."""

    def __init__(self, body: Callable[[ThreadHold], object]) -> None:
        super().__init__()
        self._loop = asyncio.get_running_loop()
        self._released = threading.Event()
        threading.Thread(target=self._run, args=(body,), daemon=True, name="contract-borrower").start()

    def _run(self, body: Callable[[ThreadHold], object]) -> None:
        outcome: BaseException | None = None
        try:
            body(self)
        except BaseException as error:  # handed to the test as the borrower's outcome
            outcome = error
        with contextlib.suppress(RuntimeError):  # the test's loop is gone: nobody waits any more
            self._loop.call_soon_threadsafe(_resolve, self.done, outcome)

    def mark_lent(self) -> None:
        """Called by the body once it has its connection."""
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(_resolve, self.lent, None)

    def wait_released(self) -> None:
        """Called by the body: block until :meth:`release` (bounded)."""
        if not self._released.wait(_CEILING):
            raise TimeoutError("never released")

    def release(self) -> None:
        """Let the body go on and give its connection back."""
        self._released.set()


class TaskHold(Hold):
    """A borrower running ``await body(hold)`` as a task on the test's loop (async libraries)."""

    def __init__(self, body: Callable[[TaskHold], Awaitable[object]]) -> None:
        super().__init__()
        self._released = asyncio.Event()
        self.task = asyncio.ensure_future(self._run(body))

    async def _run(self, body: Callable[[TaskHold], Awaitable[object]]) -> None:
        outcome: BaseException | None = None
        try:
            await body(self)
        except BaseException as error:  # handed to the test as the borrower's outcome
            outcome = error
        _resolve(self.done, outcome)

    def mark_lent(self) -> None:
        """Called by the body once it has its connection."""
        _resolve(self.lent, None)

    async def wait_released(self) -> None:
        """Awaited by the body: until :meth:`release` (bounded)."""
        await asyncio.wait_for(self._released.wait(), _CEILING)

    def release(self) -> None:
        """Let the body go on and give its connection back."""
        self._released.set()


class Subject(abc.ABC):
    """One test's pool, on a real server, and what the server sees of it.

    Attributes:
        resource: what the test passes to ``wrap()``: at most :data:`SIZE` connections, a
            checkout waits (inside the library) when all are out.
        secret: a secret (password, token) in the resource's configuration, which must never
            show in a report or a log; ``None`` when the case has none to offer.
    """

    resource: Any
    secret: str | None = None

    @abc.abstractmethod
    def hold(self) -> Hold:
        """A borrower that checks out, makes a round trip, and keeps the connection until released."""

    @abc.abstractmethod
    def hold_busy(self) -> Hold:
        """A borrower whose connection runs a server-side operation lasting longer than any test.

        It marks itself lent as it starts that operation (the test then waits until
        :meth:`server_busy` counts it); only a force-close ends it.
        """

    @abc.abstractmethod
    def borrow_once(self) -> Hold:
        """A borrower that checks out, makes a round trip and gives the connection back at once.

        With every connection out, it waits inside the library (:meth:`queued` counts it).
        """

    @abc.abstractmethod
    def queued(self) -> int:
        """Borrowers waiting inside the library for a free connection, now (in-process state)."""

    @abc.abstractmethod
    def server_connections(self) -> int:
        """Connections of this subject the server has open now."""

    @abc.abstractmethod
    def server_busy(self) -> int:
        """Operations (:meth:`hold_busy`) of this subject the server is running now."""

    async def close(self) -> None:  # noqa: B027 -- most subjects clean up through their fixtures
        """Clean up after the test, whatever state it left (the pool may be wrapped and closed)."""


@dataclass(frozen=True)
class AdapterCase:
    """One adapter under the shared suite.

    Attributes:
        name: the test id (``"redis-asyncio"``).
        kind: the keeper's ``kind`` its driver reports.
        library_error: the library's own error for use after close, which a refusal must also be.
        make: builds a fresh :class:`Subject` for one test, reading pytest fixtures from ``request``.
        queued_are_refused: whether a borrower waiting inside the library is woken with the
            refusal (pools); ``False`` where such a borrower was admitted before closing and is
            drained like any borrow (an HTTP request queued in aiohttp's connector).
        cancels_server_work: whether the force-close stops the operation on the server
            (PostgreSQL's cancel, Redis dropping a blocked client, ``CANCEL``); ``False`` where
            the protocol has none and the server's handler outlives the cut socket (HTTP).
        register: for an adapter that is not built in, registers it (called before each test);
            ``unregister`` forgets it afterwards.
    """

    name: str
    kind: str
    library_error: type[BaseException]
    make: Callable[[pytest.FixtureRequest], Awaitable[Subject]]
    queued_are_refused: bool = True
    cancels_server_work: bool = True
    register: Callable[[], object] | None = field(default=None, repr=False)
    unregister: Callable[[], object] | None = field(default=None, repr=False)

    def __str__(self) -> str:
        return self.name


async def settle(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Re-check server state until ``predicate`` holds; False after ``timeout``.

    Servers offer no event for "a connection has gone", so this polls; the bound is a ceiling
    for the server's own bookkeeping, never a wait for poolkeeper to act.
    """
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            return False
        await asyncio.sleep(0.01)
    return True
