"""What every adapter implements: the driver that does one library's I/O for its keeper.

The keeper (``poolkeeper._keeper``) decides; the driver acts. A driver installs its guards
on the wrapped object (``attach``), wakes the library's own queued waiters when refusal
starts (``refuse``), aborts borrowed connections (``force_close``) and closes the physical
connections (``close_connections``). The last two are coroutines for every library: sync
libraries run their blocking calls in daemon threads (``run_blocking``), so a call stuck on a
dead peer can be abandoned at the deadline without holding up the process's exit.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, ClassVar

from poolkeeper._concurrency import run_blocking, run_on_loop
from poolkeeper.errors import PoolClosedError, UnsupportedResourceError

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Awaitable, Sequence

    from poolkeeper._borrowers import Borrow
    from poolkeeper._keeper import Keeper

__all__ = ["Driver", "run_blocking", "run_on_loop", "unsupported_version"]


class Driver(abc.ABC):
    """The I/O half of a keeper, one subclass per wrapped library."""

    #: Short name of the library, shown as the keeper's ``kind``.
    kind: ClassVar[str]
    #: What a refused checkout raises: a :class:`PoolClosedError` that is also the library's own
    #: error for use after close, so that the application's existing ``except`` clauses catch it.
    refusal_class: ClassVar[type[PoolClosedError]] = PoolClosedError

    def __init__(self, resource: Any) -> None:
        self.resource = resource
        self._keeper: Keeper | None = None

    @property
    def keeper(self) -> Keeper:
        """The keeper this driver serves (set by :meth:`attach`)."""
        if self._keeper is None:
            raise RuntimeError("driver used before attach()")
        return self._keeper

    @property
    def managed_object(self) -> Any:
        """The object the guards go on; two resources sharing it are one keeper's.

        A redis client's connection pool, an ``AsyncEngine``'s sync engine; by default the
        wrapped resource itself.
        """
        return self.resource

    @property
    def home_loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the connections live on; ``None`` for thread-based libraries."""
        return None

    def attach(self, keeper: Keeper) -> None:
        """Install the guards on the resource. Must undo itself if it fails halfway."""
        self._keeper = keeper

    def detach(self) -> None:  # noqa: B027 -- adapters with guards override it
        """Remove the guards :meth:`attach` installed: registration failed halfway, or ``unwrap()``.

        The library's own classes and methods come back; a closed resource stays closed.
        """

    @abc.abstractmethod
    def refuse(self) -> None:
        """Wake checkouts queued inside the library so they fail with the refusal at once.

        Called once, from any thread, right after the keeper starts draining. Must not block.
        """

    @abc.abstractmethod
    def force_close(self, borrows: Sequence[Borrow], timeout: float) -> Awaitable[None]:
        """Abort the borrowed connections: cancel their work on the server, then cut the socket."""

    @abc.abstractmethod
    def close_connections(self) -> Awaitable[None]:
        """Close every physical connection the pool still has (the caller bounds the time)."""

    #: Whether :meth:`ping` checks anything; readiness reports "not checked" when it does not.
    can_ping: ClassVar[bool] = False

    async def ping(self) -> None:  # noqa: B027 -- optional: a library without a cheap ping is "not checked"
        """Check cheaply that the server answers (``SELECT 1``, ``PING``); raise if it does not.

        Readiness probes call this (opt-in, cached, with a timeout). It must never take a pool
        connection a request could use: it talks over a side connection of its own. The
        default does nothing, and :attr:`can_ping` says so.
        """

    def idle_count(self) -> int | None:
        """How many physical connections sit idle in the pool now; ``None`` when the library does not say.

        Read at metrics scrape time, from any thread: no I/O, no waiting on the library's loop.
        """
        return None

    def forget_inherited(self, borrowed: Sequence[Any]) -> None:  # noqa: B027 -- every adapter of a pool overrides it
        """In a forked child, right after the fork: leave every connection that exists now to the parent.

        From then on nothing this driver does in the child (force-close, close, a late return)
        may cancel, terminate, say goodbye on or shut down a connection the parent opened: the
        socket is shared with the parent. Such connections are dropped, never closed; only the
        connections the child opens itself are closed. ``borrowed`` are the keys of the parent's
        borrows, which the keeper has just forgotten. Called while no other thread exists.

        The default does nothing: an adapter whose resource holds connections must override it.
        """

    def describe_borrow(self, connection: Any) -> str | None:  # noqa: ARG002 -- adapters that can say override it
        """What one borrow is, for the report's force-closed list (a message's queue and delivery tag); no secret."""
        return None

    def returned_after_close(self) -> None:  # noqa: B027 -- optional hook, a no-op by default
        """A connection came back after the keeper closed (a forced borrower, late): close it."""

    def describe(self) -> str:
        """What the resource points at, with no secret in it."""
        return type(self.resource).__name__

    def secrets(self) -> tuple[str, ...]:
        """Literal secrets (passwords, tokens) that must be scrubbed from any text shown."""
        return ()


def unsupported_version(
    library: str, installed: str, supported: str, missing: Sequence[str]
) -> UnsupportedResourceError:
    """The error ``wrap()`` raises when the installed ``library`` lacks internals the adapter needs.

    Raised at wrap time, so that nothing in a shutdown ever meets a missing name.
    """
    return UnsupportedResourceError(
        f"poolkeeper cannot wrap this {library} object: the installed {library} {installed} lacks "
        f"{', '.join(missing)}; poolkeeper supports {library} {supported}"
    )
