"""What a shutdown did: one ``ResourceReport`` per keeper and hook, gathered in a ``ShutdownReport``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from poolkeeper._borrowers import format_borrowers

if TYPE_CHECKING:
    from collections.abc import Iterator

    from poolkeeper._borrowers import Borrower, ForcedBy

__all__ = ["Outcome", "ResourceReport", "ShutdownReport"]

#: ``clean``: drained in time and closed without error. ``forced``: connections were still
#: borrowed at the drain deadline and were force-closed. ``failed``: an error or a timeout while
#: closing (a hook that raised or overran counts here). ``skipped``: nothing had to be done.
Outcome = Literal["clean", "forced", "failed", "skipped"]


@dataclass(frozen=True)
class ResourceReport:
    """What shutdown did to one keeper or hook.

    ``borrowed_at_start == returned + forced`` always holds.
    """

    name: str
    kind: str
    outcome: Outcome
    borrowed_at_start: int = 0
    returned: int = 0
    forced: int = 0
    drain_seconds: float = 0.0
    close_seconds: float = 0.0
    error: str | None = None
    leaks: tuple[Borrower, ...] = ()
    target: str | None = None
    #: What forced the ``leaks`` closed (``"budget"``: the grace budget; see
    #: ``poolkeeper._borrowers.ForcedBy``); ``None`` when nothing was forced.
    forced_by: ForcedBy | None = None

    @property
    def ok(self) -> bool:
        """True when this item drained in time and closed without error."""
        return self.outcome in ("clean", "skipped")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dictionary."""
        return {
            "name": self.name,
            "kind": self.kind,
            "target": self.target,
            "outcome": self.outcome,
            "borrowed_at_start": self.borrowed_at_start,
            "returned": self.returned,
            "forced": self.forced,
            "forced_by": self.forced_by,
            "drain_seconds": round(self.drain_seconds, 6),
            "close_seconds": round(self.close_seconds, 6),
            "error": self.error,
            "leaks": [leak.to_dict() for leak in self.leaks],
        }


@dataclass(frozen=True)
class ShutdownReport:
    """What a registry's shutdown did, item by item.

    ``str(report)`` is a table for humans; :meth:`to_dict` is for logs and health endpoints.
    """

    items: tuple[ResourceReport, ...]
    duration: float
    deadline: float | None = None
    _by_name: dict[str, ResourceReport] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {item.name: item for item in self.items})

    @property
    def ok(self) -> bool:
        """True when everything drained in time and closed without error."""
        return all(item.ok for item in self.items)

    def __getitem__(self, name: str) -> ResourceReport:
        return self._by_name[name]

    def __iter__(self) -> Iterator[ResourceReport]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dictionary."""
        return {
            "ok": self.ok,
            "duration": round(self.duration, 6),
            "deadline": self.deadline,
            "items": [item.to_dict() for item in self.items],
        }

    def __str__(self) -> str:
        # The "forced by" column only when something was forced: a clean report keeps its shape.
        by = any(item.forced_by for item in self.items)
        headers = (
            "name",
            "kind",
            "outcome",
            "borrowed",
            "returned",
            "forced",
            *(("forced by",) if by else ()),
            "drain s",
            "close s",
            "error",
        )
        rows = [
            (
                item.name,
                item.kind,
                item.outcome,
                str(item.borrowed_at_start),
                str(item.returned),
                str(item.forced),
                *((item.forced_by or "",) if by else ()),
                f"{item.drain_seconds:.3f}",
                f"{item.close_seconds:.3f}",
                item.error or "",
            )
            for item in self.items
        ]
        widths = [max([len(header), *(len(row[i]) for row in rows)]) for i, header in enumerate(headers)]

        def line(cells: tuple[str, ...]) -> str:
            return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=False)).rstrip()

        status = "ok" if self.ok else "NOT ok"
        out = [
            f"poolkeeper shutdown {status} in {self.duration:.3f}s",
            line(headers),
            line(tuple("-" * w for w in widths)),
        ]
        out.extend(line(row) for row in rows)
        if not rows:
            out.append("(nothing to close)")
        leaks = [leak for item in self.items for leak in item.leaks]
        if leaks:
            out.append("")
            out.append("force-closed borrowers:")
            out.extend(format_borrowers(leaks))
        return "\n".join(out)
