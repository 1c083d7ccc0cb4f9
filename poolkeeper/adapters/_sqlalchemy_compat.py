"""What the SQLAlchemy adapter needs from SQLAlchemy, per version line, resolved in one place.

Supported: :data:`SUPPORTED_RANGE`. The adapter builds on these names; all exist in every
supported release unless a line says otherwise.

=====================================================  ===========================================
name                                                   version lines
=====================================================  ===========================================
``Pool.connect`` / ``recreate`` / ``dispose``            public, 2.0 and 2.1
``Pool._do_return_conn`` (every return)                2.0, 2.1
``Pool._is_asyncio`` (async pools)                     2.0, 2.1
``Pool._invoke_creator`` (the batched cancel's         2.0, 2.1; optional: without it the cancel
side connection)                                       falls back to one request per connection,
                                                       and MySQL's ``KILL QUERY`` (_mysql_cancel)
                                                       is reported unconfirmed
``QueuePool._pool`` / ``_overflow`` / ``checkedin()``  2.0, 2.1
``_ConnectionFairy._connection_record``                2.0, 2.1
``_ConnectionFairy._checkout`` (what ``Pool.connect``    2.0, 2.1; optional: without it the guard
does; the guard calls it directly)                     calls ``Pool.connect``
``_ConnectionRecord.fairy_ref``                        2.0, 2.1
``util.queue.Queue`` (``mutex``, ``not_empty``,        2.0, 2.1
``not_full``, ``queue``, ``_empty``, ``_get``)
``util.queue.AsyncAdaptedQueue._queue``                2.0, 2.1 (made on first use)
``util.greenlet_spawn``                                2.0, 2.1
waiting inside the greenlet (:func:`queue_await`):     2.1: ``util.await_``;
                                                       2.0: each queue class's own ``await_``
                                                       (``await_only``; ``await_fallback`` for
                                                       2.0's ``FallbackAsyncAdaptedQueue``)
=====================================================  ===========================================

:func:`check_supported` runs at wrap time: a release that lacks one of them is refused then,
with :class:`~poolkeeper.UnsupportedResourceError`, never halfway through a shutdown.
"""

from __future__ import annotations

import importlib.metadata
from typing import TYPE_CHECKING, Any

import sqlalchemy.util
from sqlalchemy.pool import Pool, QueuePool
from sqlalchemy.pool.base import _ConnectionFairy, _ConnectionRecord
from sqlalchemy.util import queue as sqla_queue

from poolkeeper.errors import UnsupportedResourceError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from sqlalchemy.engine import Engine

__all__ = ["SUPPORTED_RANGE", "check_supported", "queue_await"]

#: The SQLAlchemy releases the version matrix tests (``nox -s compat``; docs/compatibility.md).
SUPPORTED_RANGE = ">=2.0.30, <2.2"

# (owner, attribute) pairs every supported release has, as listed in the module docstring.
_REQUIRED: tuple[tuple[Any, str], ...] = (
    (Pool, "connect"),
    (Pool, "recreate"),
    (Pool, "dispose"),
    (Pool, "_do_return_conn"),
    (Pool, "_is_asyncio"),
    (QueuePool, "checkedin"),
    (_ConnectionFairy, "_connection_record"),
    (_ConnectionRecord, "fairy_ref"),
    (sqla_queue, "Queue"),
    (sqla_queue, "AsyncAdaptedQueue"),
    (sqla_queue, "Empty"),
    (sqlalchemy.util, "greenlet_spawn"),
)
_REQUIRED_OF_QUEUE = ("mutex", "not_empty", "not_full", "queue", "_empty", "_get")
_REQUIRED_OF_QUEUE_POOL = ("_pool", "_overflow")


def queue_await(queue_class: type[Any]) -> Callable[[Awaitable[Any]], Any] | None:
    """The function an async queue of ``queue_class`` waits with inside SQLAlchemy's greenlet.

    SQLAlchemy 2.0 gives each async queue class its own ``await_`` (``await_only``, or
    ``await_fallback`` for ``FallbackAsyncAdaptedQueue``); 2.1 has one ``util.await_``.
    ``None`` if neither exists.
    """
    own = getattr(queue_class, "await_", None)  # 2.0
    if own is not None:
        return own  # type: ignore[no-any-return]  # a staticmethod, read through the class
    return getattr(sqlalchemy.util, "await_", None)  # 2.1


def installed_version() -> str:
    """The installed SQLAlchemy release."""
    try:
        return importlib.metadata.version("sqlalchemy")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return str(sqlalchemy.__version__)


def missing_names(engine: Engine) -> list[str]:
    """What the adapter needs and the installed SQLAlchemy (or this engine's pool) lacks."""
    missing = [f"{_name(owner)}.{attribute}" for owner, attribute in _REQUIRED if not hasattr(owner, attribute)]
    pool = engine.pool
    if isinstance(pool, QueuePool):
        missing += [f"QueuePool.{name}" for name in _REQUIRED_OF_QUEUE_POOL if not hasattr(pool, name)]
        queue = getattr(pool, "_pool", None)
        if queue is not None and hasattr(sqla_queue, "AsyncAdaptedQueue"):
            if isinstance(queue, sqla_queue.AsyncAdaptedQueue):
                if queue_await(type(queue)) is None:
                    missing.append("sqlalchemy.util.await_ (2.1) or AsyncAdaptedQueue.await_ (2.0)")
            else:
                missing += [f"Queue.{name}" for name in _REQUIRED_OF_QUEUE if not hasattr(queue, name)]
    return missing


def check_supported(engine: Engine) -> None:
    """Refuse, at wrap time, a SQLAlchemy release that lacks what the adapter needs.

    Raises:
        UnsupportedResourceError: naming the installed release, what it lacks, and the
            supported range.
    """
    missing = missing_names(engine)
    if missing:
        raise UnsupportedResourceError(
            f"poolkeeper cannot wrap this engine: SQLAlchemy {installed_version()} lacks "
            f"{', '.join(missing)}; poolkeeper supports SQLAlchemy {SUPPORTED_RANGE}"
        )


def _name(owner: Any) -> str:
    return str(getattr(owner, "__name__", owner))
