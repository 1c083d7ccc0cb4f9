"""At interpreter exit: force-close the keepers left open, and say so with a ``ResourceWarning``.

A process that ends without closing its registry (a script that returns, an uncaught
exception) would otherwise leave PostgreSQL backends running the queries of connections still
borrowed. The ``atexit`` hook is registered when the first resource is wrapped; it warns, naming
the keepers left open, then force-closes them within a short deadline, in daemon threads joined
with a timeout so that exit is never held up for long.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import warnings
import weakref
from typing import TYPE_CHECKING

from poolkeeper._keeper import KeeperState

if TYPE_CHECKING:
    from poolkeeper._registry import Registry

__all__ = ["EXIT_DEADLINE", "forget_inherited", "track"]

logger = logging.getLogger("poolkeeper.exit")

#: Seconds the force-close at exit may take (hooks included); exit waits at most one more.
EXIT_DEADLINE = 2.0
_JOIN_MARGIN = 1.0
# How many names the warning lists; the log record's extra carries them all.
_NAMES_SHOWN = 10

_registries: weakref.WeakSet[Registry] = weakref.WeakSet()
_lock = threading.Lock()
_armed_in: int | None = None  # the pid that registered the atexit hook


def track(registry: Registry) -> None:
    """Watch ``registry`` at exit (called when it wraps a resource)."""
    global _armed_in  # noqa: PLW0603 -- one atexit registration per process
    with _lock:
        _registries.add(registry)
        if _armed_in is None:
            atexit.register(_close_left_open)
            _armed_in = os.getpid()


def forget_inherited() -> None:
    """In a forked child: the inherited ``atexit`` hook now serves this process (PRODUCT.md 4.9).

    The keepers have forgotten the parent's connections by then, so what the net force-closes
    at the child's exit is the child's own. (A multiprocessing child ends with ``os._exit()``,
    which runs no ``atexit`` hook: close the registry in the child explicitly.)
    """
    global _armed_in, _lock  # noqa: PLW0603 -- per process state
    _lock = threading.Lock()
    if _armed_in is not None:
        _armed_in = os.getpid()


def _left_open(registry: Registry) -> list[str]:
    if registry.closed:
        return []
    return [keeper.name for keeper in registry.keepers if keeper.state is not KeeperState.CLOSED]


def _force_close(registry: Registry) -> None:
    try:
        for keeper in registry.keepers:
            keeper.request_force("exit")  # no drain wait; hooks still run, within the deadline
        registry.close(deadline=EXIT_DEADLINE)
    except Exception:
        logger.warning("poolkeeper: force-closing at exit failed", exc_info=True)


def _summary(names: list[str]) -> str:
    """The first few names and how many more: a service with thousands of keepers gets one short line."""
    shown = ", ".join(map(repr, names[:_NAMES_SHOWN]))
    more = len(names) - _NAMES_SHOWN
    return f"{shown} and {more} more ({len(names)} in all)" if more > 0 else shown


def _close_left_open() -> None:
    if _armed_in != os.getpid():
        return  # not armed in this process (forget_inherited() re-arms it in a forked child)
    with _lock:
        registries = list(_registries)
    left = [(registry, names) for registry in registries if (names := _left_open(registry))]
    if not left:
        return
    open_names = [name for _, names in left for name in names]
    message = (
        f"poolkeeper: keepers left open at exit: {_summary(open_names)}; force-closing them "
        "(close the registry before the process ends: registry.close(), aclose() or poolkeeper.run())"
    )
    warnings.warn(message, ResourceWarning, stacklevel=1)
    logger.warning(message, extra={"poolkeeper_left_open": open_names})
    threads = [
        threading.Thread(target=_force_close, args=(registry,), name="poolkeeper-exit", daemon=True)
        for registry, _ in left
    ]
    for thread in threads:
        thread.start()
    end = time.monotonic() + EXIT_DEADLINE + _JOIN_MARGIN
    for thread in threads:
        thread.join(max(0.0, end - time.monotonic()))
