"""The exceptions poolkeeper raises.

The hierarchy::

    PoolkeeperError                      base of everything poolkeeper raises
    ├── PoolClosedError                  a checkout refused: the keeper is draining or closed
    │   (each adapter raises a subclass that is also the library's own error for use after close:
    │   asyncpg.InterfaceError, redis.RedisError, RuntimeError for aiohttp; see the adapter docs)
    ├── UnsupportedResourceError         wrap() got an object it cannot manage (also a TypeError)
    └── RegistrationError                a registration the registry refuses (also a ValueError)

Bad arguments that are not about registration (a negative or NaN timeout, say) raise the
built-in ``ValueError`` or ``TypeError`` naming the argument.
"""

from __future__ import annotations

__all__ = [
    "PoolClosedError",
    "PoolkeeperError",
    "RegistrationError",
    "UnsupportedResourceError",
]


class PoolkeeperError(Exception):
    """Base class of every exception poolkeeper raises."""


class PoolClosedError(PoolkeeperError):
    """A checkout was refused because its keeper is draining or closed.

    Attributes:
        keeper: the name of the keeper that refused.
        state: the keeper's state when it refused, as a string (``"draining"``...).
    """

    def __init__(self, keeper: str, state: str) -> None:
        super().__init__(f"poolkeeper {keeper!r} is {state}: it no longer lends connections")
        self.keeper = keeper
        self.state = state

    def __reduce__(self) -> tuple[type[PoolClosedError], tuple[str, str]]:
        # Keep the two-argument constructor picklable (multiprocessing, pytest-xdist).
        return (type(self), (self.keeper, self.state))


class UnsupportedResourceError(PoolkeeperError, TypeError):
    """``wrap()`` was given an object of a type poolkeeper cannot manage."""


class RegistrationError(PoolkeeperError, ValueError):
    """A registry refused a registration: duplicate name, dependency cycle, unknown name, or closed."""
