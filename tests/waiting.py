"""Waiting for in-process state that offers no event to wait on (a thread parked in a pool queue).

Bounded polls: the bound is a ceiling that fails the test, never a wait for poolkeeper to act.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Block until in-process ``predicate`` holds, failing after ``timeout``."""
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition never held"
        time.sleep(0.002)


async def auntil(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """:func:`until` for async tests: the event loop keeps running between checks."""
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition never held"
        await asyncio.sleep(0.002)
