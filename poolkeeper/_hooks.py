"""Shutdown hooks: user callables run during shutdown, ordered like keepers."""

from __future__ import annotations

import asyncio
import inspect
from typing import TYPE_CHECKING, Any

from poolkeeper._concurrency import run_blocking

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

__all__ = ["Hook"]


class Hook:
    """A callable (sync or async) that the registry runs while closing.

    Sync hooks run in a daemon thread, so they never block the event loop and one that
    hangs can be abandoned at its timeout.
    """

    kind = "hook"

    def __init__(self, name: str, fn: Callable[[], Any], *, depends_on: Sequence[str], timeout: float) -> None:
        self.name = name
        self.fn = fn
        self.depends_on: tuple[str, ...] = tuple(depends_on)
        self.timeout = timeout
        self.is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            getattr(fn, "__call__", None)  # noqa: B004 -- an object whose __call__ is async
        )

    def __repr__(self) -> str:
        return f"<Hook {self.name!r} timeout={self.timeout}>"

    async def run(self) -> None:
        """Call the hook once; an async result (coroutine) is awaited."""
        if self.is_async:
            await self.fn()
            return
        result = await run_blocking(self.fn, name=f"poolkeeper-hook-{self.name}")
        if inspect.isawaitable(result):  # a sync callable that returned an awaitable
            await asyncio.ensure_future(result)
