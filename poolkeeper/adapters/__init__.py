"""The adapter API: how poolkeeper drives a pool, and how a library of yours gets an adapter.

This package is public. What a third-party adapter needs is re-exported here, with stable names:

* :class:`Driver`, the contract an adapter implements (one subclass per library), and
  :class:`Borrow`, what its force-close is given;
* :func:`register_adapter` / :func:`unregister_adapter`, and the entry point group
  :data:`ENTRY_POINT_GROUP` a distribution declares its adapters in;
* :func:`run_blocking`, :func:`run_on_loop` and :func:`unsupported_version`, the helpers the
  built-in adapters use for blocking calls, foreign event loops and version checks.

The checkout protocol a driver's guards call lives on :class:`poolkeeper.Keeper`
(``admit`` / ``start_checkout`` / ``lend`` / ``end_checkout`` / ``checkin`` / ``checkin_collected`` / ``refusal``).
The guide and the contract method by method: ``docs/adapters.md``.

The modules beside this one (``poolkeeper.adapters.redis``...) are poolkeeper's own adapters, one
per wrapped library, each imported only when an object of its library is wrapped: an adapter is
found from the object's class names alone (its MRO), so choosing one never imports a library the
user does not have. Importing this package imports only the standard library.
"""

from __future__ import annotations

from typing import Any

from poolkeeper._borrowers import Borrow
from poolkeeper._concurrency import run_blocking, run_on_loop
from poolkeeper.adapters._base import Driver, unsupported_version
from poolkeeper.adapters._registration import ENTRY_POINT_GROUP, AdapterTable, DriverFactory

__all__ = [
    "ENTRY_POINT_GROUP",
    "Borrow",
    "Driver",
    "DriverFactory",
    "register_adapter",
    "run_blocking",
    "run_on_loop",
    "unregister_adapter",
    "unsupported_version",
]

# "module.Class" of every supported type -> (adapter module, what the error message calls it)
_ADAPTERS: dict[str, tuple[str, str]] = {
    "sqlalchemy.engine.base.Engine": ("poolkeeper.adapters.sqlalchemy", "SQLAlchemy Engine"),
    "sqlalchemy.ext.asyncio.engine.AsyncEngine": ("poolkeeper.adapters.sqlalchemy", "SQLAlchemy AsyncEngine"),
    "asyncpg.pool.Pool": ("poolkeeper.adapters.asyncpg", "asyncpg Pool"),
    "redis.client.Redis": ("poolkeeper.adapters.redis", "redis-py Redis"),
    "redis.asyncio.client.Redis": ("poolkeeper.adapters.redis", "redis.asyncio Redis"),
    "aiohttp.client.ClientSession": ("poolkeeper.adapters.aiohttp", "aiohttp ClientSession"),
    "psycopg_pool.pool.ConnectionPool": ("poolkeeper.adapters.psycopg_pool", "psycopg_pool ConnectionPool"),
    "psycopg_pool.pool_async.AsyncConnectionPool": (
        "poolkeeper.adapters.psycopg_pool",
        "psycopg_pool AsyncConnectionPool",
    ),
    "psycopg_pool.null_pool.NullConnectionPool": (
        "poolkeeper.adapters.psycopg_pool",
        "psycopg_pool NullConnectionPool",
    ),
    "psycopg_pool.null_pool_async.AsyncNullConnectionPool": (
        "poolkeeper.adapters.psycopg_pool",
        "psycopg_pool AsyncNullConnectionPool",
    ),
    "httpx.Client": ("poolkeeper.adapters.httpx", "httpx Client"),
    "httpx.AsyncClient": ("poolkeeper.adapters.httpx", "httpx AsyncClient"),
    "httpx2.Client": ("poolkeeper.adapters.httpx", "httpx2 Client"),
    "httpx2.AsyncClient": ("poolkeeper.adapters.httpx", "httpx2 AsyncClient"),
    "aio_pika.connection.Connection": ("poolkeeper.adapters.aio_pika", "aio-pika Connection/RobustConnection"),
    "nats.aio.client.Client": ("poolkeeper.adapters.nats", "nats-py Client"),
}

#: Human-readable names of every kind of object ``wrap()`` accepts.
SUPPORTED: tuple[str, ...] = tuple(dict.fromkeys(label for _, label in _ADAPTERS.values()))

_table = AdapterTable(_ADAPTERS)


def register_adapter(
    target: type[Any] | str,
    factory: DriverFactory,
    *,
    label: str | None = None,
    replace: bool = False,
) -> None:
    """Let ``wrap()`` manage objects of ``target`` (and its subclasses) with drivers made by ``factory``.

    Registering takes effect for the next ``wrap()``; objects already wrapped keep their driver.
    Registering the same factory for the same target again does nothing, so a module that
    registers at import may be imported twice. Along an object's MRO the most derived class with
    an adapter wins, so an adapter for a subclass of a supported class takes over for it.

    Args:
        target: the class to handle, or its qualified name ``"module.QualName"`` (matched
            against the names of each object's classes, so the library need not be imported
            to register its adapter).
        factory: called with the object passed to ``wrap()``, returns a new, unattached
            :class:`Driver`; a ``Driver`` subclass is such a factory. It may raise
            ``TypeError`` or :class:`~poolkeeper.UnsupportedResourceError` (for instance,
            from :func:`unsupported_version`) to refuse an object: ``wrap()`` then raises it.
        label: how error messages name what this adapter wraps ("in-house SocketPool");
            default: the qualified name.
        replace: replace an adapter already registered for ``target``, or poolkeeper's own
            adapter for it. Without it, either is a :class:`~poolkeeper.RegistrationError`.

    Raises:
        TypeError: ``target`` is neither a class nor a qualified name; ``factory`` is not
            callable, or is a class that is not a concrete ``Driver`` with a ``kind``.
        RegistrationError: ``target`` has an adapter already and ``replace`` is false.
    """
    _table.register(target, factory, label=label, replace=replace)


def unregister_adapter(target: type[Any] | str) -> bool:
    """Forget the adapter :func:`register_adapter` (or an entry point) registered for ``target``.

    poolkeeper's own adapters cannot be removed; one that was replaced is back afterwards.
    Objects already wrapped keep their driver.

    Returns:
        True if an adapter was registered for ``target``.

    Raises:
        TypeError: ``target`` is neither a class nor a qualified name.
    """
    return _table.unregister(target)


def driver_for(resource: Any) -> Driver:
    """A new, unattached driver for ``resource``. Internal: ``Registry.wrap()`` calls it.

    Raises:
        UnsupportedResourceError: no adapter handles the object's type, or the one an entry
            point declares for it cannot be loaded.
        RegistrationError: several installed distributions declare an adapter for its type.
        TypeError: the adapter's factory refused the object or made no usable driver.
    """
    return _table.driver_for(resource)


def prepare_adapter(resource: Any) -> None:
    """Load, ahead of ``driver_for``, the entry point adapter ``resource`` needs. Internal.

    ``Registry.wrap()`` calls it before taking its locks: loading imports a module.
    """
    _table.prepare(resource)
