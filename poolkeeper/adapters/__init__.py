"""One adapter module per wrapped library, imported only when an object of that library is wrapped.

``driver_for`` finds the adapter from the object's class names alone (its MRO), so choosing
an adapter never imports a library the user does not have.
"""

from __future__ import annotations

import importlib
from typing import Any

from poolkeeper._grammar import with_article
from poolkeeper.adapters._base import Driver
from poolkeeper.errors import UnsupportedResourceError

__all__ = ["SUPPORTED", "Driver", "driver_for"]

# "module.Class" of every supported type -> (adapter module, what the error message calls it)
_ADAPTERS: dict[str, tuple[str, str]] = {
    "sqlalchemy.engine.base.Engine": ("poolkeeper.adapters.sqlalchemy", "SQLAlchemy Engine"),
    "sqlalchemy.ext.asyncio.engine.AsyncEngine": ("poolkeeper.adapters.sqlalchemy", "SQLAlchemy AsyncEngine"),
    "asyncpg.pool.Pool": ("poolkeeper.adapters.asyncpg", "asyncpg Pool"),
    "redis.client.Redis": ("poolkeeper.adapters.redis", "redis-py Redis"),
    "redis.asyncio.client.Redis": ("poolkeeper.adapters.redis", "redis.asyncio Redis"),
    "aiohttp.client.ClientSession": ("poolkeeper.adapters.aiohttp", "aiohttp ClientSession"),
    "aio_pika.connection.Connection": ("poolkeeper.adapters.aio_pika", "aio-pika Connection/RobustConnection"),
    "nats.aio.client.Client": ("poolkeeper.adapters.nats", "nats-py Client"),
}

#: Human-readable names of every kind of object ``wrap()`` accepts.
SUPPORTED: tuple[str, ...] = tuple(dict.fromkeys(label for _, label in _ADAPTERS.values()))


def driver_for(resource: Any) -> Driver:
    """A new, unattached driver for ``resource``.

    Raises:
        UnsupportedResourceError: no adapter handles the object's type.
    """
    for cls in type(resource).__mro__:
        entry = _ADAPTERS.get(f"{cls.__module__}.{cls.__qualname__}")
        if entry is not None:
            module = importlib.import_module(entry[0])
            return module.make_driver(resource)  # type: ignore[no-any-return]  # each adapter returns a Driver
    raise UnsupportedResourceError(
        f"poolkeeper cannot wrap {with_article(f'{type(resource).__module__}.{type(resource).__qualname__}')}; "
        f"it can wrap: {', '.join(SUPPORTED)}"
    )
