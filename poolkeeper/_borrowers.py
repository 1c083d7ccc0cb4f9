"""Who holds a connection: the borrow record kept per checkout and its public view.

With tracking off a borrow costs one small tuple and a clock read; with tracking on it also
records the borrow-site stack (HikariCP's leak detection does the same), cheaply enough to leave
on in production: the checkout only walks the frames and keeps each user frame's code object and
instruction offset. Whether a code object is plumbing is decided once per code object, and file
names, line numbers and thread and task names are worked out only when a borrow is looked at (a
leak warning, a report, ``Keeper.borrowers()``), which is rare. Nothing is sampled: every
tracked borrow knows its exact borrow site.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from types import CodeType

__all__ = ["Borrow", "Borrower", "Entry", "Frame", "capture_stack", "collected", "tracked_entry", "untracked_entry"]

# Frames from these modules are plumbing, never "where the user borrowed the connection".
_PLUMBING_MODULES = (
    "runpy",
    "<frozen",
    "poolkeeper.",
    "sqlalchemy.",
    "asyncpg.",
    "redis.",
    "aiohttp.",
    "asyncio.",
    "greenlet",
    "contextlib",
    "threading",
    "concurrent.",
    "anyio.",
    "starlette.",
    "fastapi.",
    "_pytest.",
    "pluggy.",
    "pytest_asyncio.",
)
_MAX_FRAMES = 40
_PYTEST_MAIN = (f"{os.sep}pytest{os.sep}__main__.py", f"{os.sep}_pytest{os.sep}__main__.py")


@dataclass(frozen=True)
class Frame:
    """One frame of a borrow-site stack."""

    filename: str
    lineno: int
    function: str

    def __str__(self) -> str:
        return f"{self.filename}:{self.lineno} in {self.function}"


# Whether a source file is plumbing, decided once per file from its module's name. Keyed by
# file name because a str caches its hash and a code object does not (hashing one per frame
# cost more than the rest of the walk). Cleared if it ever grows past _MAX_FILES.
_plumbing_files: dict[str, bool] = {}
_MAX_FILES = 20_000


def _is_plumbing(frame: Any) -> bool:
    module = frame.f_globals.get("__name__", "")
    if module.startswith(_PLUMBING_MODULES) or module in ("poolkeeper", "sqlalchemy"):
        return True
    # `python -m pytest` runs pytest's own __main__ module: plumbing, not the user's script.
    return module == "__main__" and bool(frame.f_code.co_filename.endswith(_PYTEST_MAIN))


def _capture(skip: int) -> list[Any]:
    """The user frames of the caller's stack, innermost first, as ``[code, offset, code, offset...]``.

    This runs on every tracked checkout, so it does the least it can: per frame, one dict read
    (is this file plumbing?) and, for user frames, two appends. Lines come later (:func:`_frames`).
    """
    raw: list[Any] = []
    frame: Any = sys._getframe(skip)  # noqa: SLF001 -- the cheap way to walk the stack at checkout
    files = _plumbing_files
    kept = 0
    # SQLAlchemy's asyncio layer checks out inside a greenlet whose stack ends in the library;
    # the caller's frames (the task's) go on in the parent greenlet. Looked at only when greenlet
    # is already imported, so nothing is imported here.
    current: Any = None
    while True:
        if frame is None:
            if current is None:
                greenlets = sys.modules.get("greenlet")
                current = greenlets.getcurrent() if greenlets is not None else None
            current = getattr(current, "parent", None)
            if current is None:
                break
            frame = current.gr_frame
            continue
        code = frame.f_code
        plumbing = files.get(code.co_filename)
        if plumbing is None:
            if len(files) >= _MAX_FILES:
                files.clear()
            plumbing = files[code.co_filename] = _is_plumbing(frame)
        if not plumbing:
            raw.append(code)
            raw.append(frame.f_lasti)
            kept += 1
            if kept == _MAX_FRAMES:
                break
        frame = frame.f_back
    return raw


def _line_of(code: CodeType, offset: int) -> int:
    """The source line of the instruction at byte ``offset`` of ``code``."""
    for start, end, line in code.co_lines():
        if start <= offset < end and line is not None:
            return line
    return code.co_firstlineno


def _frames(raw: list[Any]) -> tuple[Frame, ...]:
    """``_capture``'s record as frames, outermost first, innermost last."""
    frames = [
        Frame(code.co_filename, _line_of(code, offset), code.co_name)
        for code, offset in zip(raw[::2], raw[1::2], strict=True)
    ]
    frames.reverse()
    return tuple(frames)


def capture_stack(skip: int = 2) -> tuple[Frame, ...]:
    """The caller's stack without library frames, outermost first, innermost last."""
    return _frames(_capture(skip + 1))


def _current_task() -> asyncio.Task[Any] | None:
    loop = asyncio._get_running_loop()  # noqa: SLF001 -- None without raising: current_task() raises then
    return None if loop is None else asyncio.current_task(loop)


# What a keeper stores per borrowed connection: a plain tuple, the cheapest thing Python makes,
# because one is made on every checkout. An untracked entry holds the start time
# (time.monotonic()) and the holder: None, or a weakref to the object the user holds, dead once
# the garbage collector collected it (how a return by the collector is told apart). A tracked
# entry adds the raw borrow-site stack (see _capture), the thread and the task (names are read
# when shown: reading them costs more than the rest of the entry).
Entry = tuple[Any, ...]
_UNTRACKED_LENGTH = 2


def untracked_entry(holder: Any) -> Entry:
    """The entry of an untracked borrow."""
    return (time.monotonic(), holder)


def tracked_entry(holder: Any) -> Entry:
    """The entry of a tracked borrow: who borrowed, and where."""
    return (time.monotonic(), holder, _capture(3), threading.current_thread(), _current_task())


def collected(entry: Entry) -> bool:
    """True if the object the user held for this borrow was garbage collected."""
    holder = entry[1]
    return holder is not None and holder() is None


class Borrow:
    """One borrowed connection and its entry, made only off the hot path (views, force-close)."""

    __slots__ = ("connection", "entry")

    def __init__(self, connection: Any, entry: Entry) -> None:
        self.connection = connection
        self.entry = entry

    @property
    def started(self) -> float:
        """``time.monotonic()`` at checkout."""
        return float(self.entry[0])

    def view(self, keeper: str, *, returned_by_gc: bool = False) -> Borrower:
        """The public, immutable view of this borrow."""
        entry = self.entry
        held = time.monotonic() - entry[0]
        tracked = len(entry) > _UNTRACKED_LENGTH
        return Borrower(
            keeper=keeper,
            borrowed_at=time.time() - held,
            held_seconds=held,
            thread=entry[3].name if tracked else None,
            task=entry[4].get_name() if tracked and entry[4] is not None else None,
            stack=_frames(entry[2]) if tracked else None,
            returned_by_gc=returned_by_gc,
        )


@dataclass(frozen=True)
class Borrower:
    """Who holds (or held) a connection, since when, and where it was borrowed.

    Attributes:
        keeper: name of the keeper the connection belongs to.
        borrowed_at: wall-clock time of the checkout (``time.time()``).
        held_seconds: how long the connection had been out when this view was taken.
        thread: name of the borrowing thread (tracked keepers only).
        task: name of the borrowing asyncio task, if any (tracked keepers only).
        stack: the borrow-site stack without library frames, innermost last, or ``None``
            when borrower tracking is off.
        returned_by_gc: the connection came back only because the garbage collector
            collected it; its borrower never returned it.
    """

    keeper: str
    borrowed_at: float
    held_seconds: float
    thread: str | None
    task: str | None
    stack: tuple[Frame, ...] | None
    returned_by_gc: bool = False

    @property
    def site(self) -> str | None:
        """``file.py:LINE`` of the innermost user frame, or ``None`` when not tracked."""
        if not self.stack:
            return None
        frame = self.stack[-1]
        return f"{frame.filename}:{frame.lineno}"

    def format(self) -> str:
        """A readable multi-line description, stack included when tracked."""
        how = " (returned only by the garbage collector)" if self.returned_by_gc else ""
        who = ", ".join(
            part for part in (self.thread and f"thread {self.thread}", self.task and f"task {self.task}") if part
        )
        lines = [f"{self.keeper}: held for {self.held_seconds:.3f}s{how}" + (f" by {who}" if who else "")]
        if self.stack is None:
            lines.append("  borrow site unknown: enable track_borrowers=True to record it")
        else:
            lines.append("  borrowed at (most recent call last):")
            lines.extend(f"    {frame}" for frame in self.stack)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dictionary."""
        return {
            "keeper": self.keeper,
            "borrowed_at": self.borrowed_at,
            "held_seconds": round(self.held_seconds, 6),
            "thread": self.thread,
            "task": self.task,
            "site": self.site,
            "stack": None if self.stack is None else [str(frame) for frame in self.stack],
            "returned_by_gc": self.returned_by_gc,
        }
