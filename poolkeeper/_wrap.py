"""``poolkeeper.wrap``: put a pool or client under the default (or a given) registry."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from poolkeeper._registry import Registry, get_registry

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = ["wrap"]

T = TypeVar("T")


def wrap(
    resource: T,
    *,
    name: str | None = None,
    registry: Registry | None = None,
    drain_timeout: float | None = None,
    close_timeout: float | None = None,
    depends_on: Iterable[str] = (),
    track_borrowers: bool | None = None,
    leak_threshold: float | None = None,
) -> T:
    """Manage ``resource``'s shutdown and return it (the same object where the library allows).

    Args:
        resource: a SQLAlchemy ``Engine``/``AsyncEngine``, asyncpg ``Pool``, redis-py
            ``Redis`` (sync or asyncio), aiohttp ``ClientSession``, aio-pika
            ``Connection``/``RobustConnection`` or nats-py ``Client``.
        name: unique name in the registry; defaults to the library's name.
        registry: where to register it; default :func:`poolkeeper.get_registry`.
        drain_timeout: seconds to wait for borrowed connections (default: the registry's).
        close_timeout: seconds to force-close and close connections (default: the registry's).
        depends_on: names of items this one uses; they close after it.
        track_borrowers: record borrow-site stacks (default: the registry's).
        leak_threshold: warn, with the borrow site, about a connection held longer than this.

    Raises:
        UnsupportedResourceError: ``resource`` is of no supported type (built in, or given an
            adapter by :func:`poolkeeper.register_adapter` or an entry point).
        RegistrationError: duplicate name, dependency cycle, or the registry is closed.
        ValueError: a timeout is negative, NaN or infinite.
    """
    if registry is not None and not isinstance(registry, Registry):
        raise TypeError(f"registry must be a poolkeeper.Registry or None, got {registry!r}")
    return (registry if registry is not None else get_registry()).wrap(
        resource,
        name=name,
        drain_timeout=drain_timeout,
        close_timeout=close_timeout,
        depends_on=depends_on,
        track_borrowers=track_borrowers,
        leak_threshold=leak_threshold,
    )
