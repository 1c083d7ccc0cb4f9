"""Shutdown hooks: user callables run during shutdown, ordered like keepers."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
from typing import TYPE_CHECKING, Any

from poolkeeper._concurrency import run_blocking

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

__all__ = ["Hook", "HookEscapeError"]


class HookEscapeError(Exception):
    """An async hook raised ``SystemExit`` or ``KeyboardInterrupt``; the original is ``__cause__``.

    Left as they are, these two escape the hook's task and stop the event loop that runs the
    whole shutdown (asyncio re-raises them out of the loop). Wrapped, the hook is reported as
    failed like any other, the rest still close, and the registry re-raises the original once
    the shutdown has finished (issue 13, item 4).
    """


#: While a hook runs: (the registry running it, the hook's name). Lets the registry refuse to be
#: closed from one of its own hooks, which would wait for the very shutdown the hook is part of.
running_hook: contextvars.ContextVar[tuple[object, str] | None] = contextvars.ContextVar(
    "poolkeeper_running_hook", default=None
)


def check_hook(argument: str, fn: object) -> None:
    """Raise ``TypeError`` naming ``argument`` unless ``fn`` can be called with no arguments as a hook."""
    if not callable(fn):
        raise TypeError(f"{argument} must be a callable, got {fn!r}")
    if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
        raise TypeError(f"{argument} must be a function or coroutine function, not a generator function: {fn!r}")
    try:
        inspect.signature(fn).bind()
    except TypeError as error:
        raise TypeError(f"{argument} must be callable with no arguments: {fn!r} needs some ({error})") from None
    except ValueError:  # a builtin without a signature: nothing to check
        pass


class Hook:
    """A callable (sync or async) that the registry runs while closing.

    Sync hooks run in a daemon thread, so they never block the event loop and one that
    hangs can be abandoned at its timeout.
    """

    kind = "hook"

    def __init__(
        self, name: str, fn: Callable[[], Any], *, depends_on: Sequence[str], timeout: float, owner: object = None
    ) -> None:
        self.name = name
        self.owner = owner  # the registry that runs it
        self.fn = fn
        self.depends_on: tuple[str, ...] = tuple(depends_on)
        self.timeout = timeout
        #: ``SystemExit`` / ``KeyboardInterrupt`` the async hook raised, re-raised after the shutdown.
        self.escaped: BaseException | None = None
        self.is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            getattr(fn, "__call__", None)  # noqa: B004 -- an object whose __call__ is async
        )

    def __repr__(self) -> str:
        return f"<Hook {self.name!r} timeout={self.timeout}>"

    async def run(self) -> None:
        """Call the hook once; an async result (coroutine) is awaited."""
        # Runs in a task of its own: the marker stays in this task (and the hook's thread).
        running_hook.set((self.owner, self.name))
        if self.is_async:
            try:
                await self.fn()
            except (SystemExit, KeyboardInterrupt) as error:
                self.escaped = error
                raise HookEscapeError(f"{type(error).__name__} raised in hook {self.name!r}") from error
            return
        context = contextvars.copy_context()
        result = await run_blocking(lambda: context.run(self.fn), name=f"poolkeeper-hook-{self.name}")
        if inspect.isawaitable(result):  # a sync callable that returned an awaitable
            await asyncio.ensure_future(result)
