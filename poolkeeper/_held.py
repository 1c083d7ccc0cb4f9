"""How a registry holds its keepers: weakly, so that a dropped resource is freed with its keeper.

A wrapped object owns its keeper (its guards reference it: a pool's ``_pk_driver``, an asyncpg
pool's class, a session's guarded ``_request``), and the keeper's driver references the object.
If the registry held the keeper strongly, every object ever wrapped would live as long as the
registry, and the libraries' own safety nets (the "unclosed" ``ResourceWarning`` of an asyncpg
connection or an aiohttp session, redis-py closing the sockets of a collected connection) would
never run. So the registry holds a :class:`HeldKeeper`: the keeper's name, dependencies and a
weak reference. When the object and its keeper are collected, the entry is queued for removal
(the registry removes it under its lock on its next use: a garbage-collector callback may run
in the middle of the registry's own code) and a log line says what happened: a warning when the
keeper was still open (neither closed nor unwrapped), since its idle connections were then left
to the library's own finalizers.

A borrowed connection keeps its pool, and so its keeper, alive: a keeper is only ever collected
with nothing borrowed.

A runner that closes the registry at its end (``poolkeeper.run()`` while ``main`` runs, the
FastAPI lifespan once shutdown begins, the pytest fixture's registry for its test) *pins* the
registry's keepers: each entry then also holds its keeper strongly until the keeper closes or is
unwrapped. An object wrapped inside ``main`` (the app's own lifespan, the test) is dropped when
that ends, and lives on only in a reference cycle with its keeper: the collector could free it
just before the registry closes, and the close would miss it. Pinned, it is closed like the rest.
"""

from __future__ import annotations

import logging
import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import collections

    from poolkeeper._keeper import Keeper

__all__ = ["HeldKeeper"]

logger = logging.getLogger("poolkeeper.registry")


class HeldKeeper:
    """A registry's entry for one keeper: everything the registry needs without keeping it alive."""

    __slots__ = ("closed", "depends_on", "dropped", "kind", "name", "pinned", "ref", "released")

    def __init__(self, keeper: Keeper, dropped: collections.deque[HeldKeeper]) -> None:
        self.name = keeper.name
        self.kind = keeper.kind
        self.depends_on = keeper.depends_on
        #: The keeper closed (by the registry, or by the library's own close on a wrapped asyncpg pool).
        self.closed = False
        #: ``unwrap()`` let it go: its collection is nobody's business any more.
        self.released = False
        self.dropped = dropped
        #: The keeper itself while a runner pins the registry (see the module docstring), else None.
        self.pinned: Keeper | None = None
        self.ref = weakref.ref(keeper, self._collected)
        keeper.on_closed = self._mark_closed

    def pin(self) -> None:
        """Hold the keeper strongly until it closes (or :meth:`unpin`); a closed one is not pinned."""
        if not self.closed:
            self.pinned = self.ref()

    def unpin(self) -> None:
        """Hold the keeper weakly again."""
        self.pinned = None

    def _mark_closed(self) -> None:
        self.closed = True
        self.pinned = None  # a closed keeper keeps nothing alive

    def _collected(self, _ref: weakref.ref[Keeper]) -> None:
        # A garbage-collector callback: no lock is taken here (the thread it interrupts may hold
        # the registry's), only an atomic deque append and a log line.
        if self.released:
            return
        self.dropped.append(self)
        if self.closed:
            logger.debug(
                "poolkeeper %r: its closed %s object was garbage collected; no longer listed",
                self.name,
                self.kind,
                extra={"poolkeeper_keeper": self.name, "poolkeeper_event": "collected"},
            )
            return
        logger.warning(
            "poolkeeper %r: its %s object was garbage collected while still open (neither closed nor "
            "unwrapped); it is no longer managed, and its idle connections were left to the library's own "
            "finalizers. Close it, or call registry.unwrap() on it, before dropping it",
            self.name,
            self.kind,
            extra={"poolkeeper_keeper": self.name, "poolkeeper_event": "collected_unclosed"},
        )

    def keeper(self) -> Keeper | None:
        """The keeper, or ``None`` once it was collected."""
        return self.ref()
