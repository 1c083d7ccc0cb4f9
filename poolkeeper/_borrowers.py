"""Who holds a connection: the borrow record kept per checkout and its public view.

With tracking off a borrow costs one small tuple and a clock read; with tracking on it also
records where it was borrowed (HikariCP's leak detection does the same), cheaply enough to leave
on in production: the checkout walks past the library's frames to the borrowing line and keeps
that frame's code object and instruction offset, nothing more. Its callers are read when the
borrow is looked at (a leak warning, a report, ``Keeper.borrowers()``), which is rare, from the
borrower's own stack (its thread's, or its asyncio task's) while the borrowing function is still
running there: the stuck request of a shutdown, the handler holding a connection past a leak
threshold. A borrower that moved on shows its borrowing line alone. The pytest plugin records
the callers at checkout as well (:func:`record_callers`): in a test suite, which test leaked
matters more than the cost of a checkout. Whether a module is plumbing is decided once per
module, and file names, line numbers and thread and task names are worked out only when a borrow
is looked at. Nothing is sampled: every tracked borrow knows its exact borrow site.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from poolkeeper._concurrency import current_task_of

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence
    from types import CodeType

__all__ = [
    "FORCED_BY_LABELS",
    "Borrow",
    "Borrower",
    "Entry",
    "ForcedBy",
    "Frame",
    "add_library_modules",
    "capture_stack",
    "collected",
    "record_callers",
    "tracked_entry",
]

#: What cut a keeper's drain short, so that its borrowed connections were force-closed.
#: ``drain_timeout``: the keeper's own drain timeout ran out. ``deadline``: the shutdown's
#: deadline left no more time to drain. ``budget``: the grace budget's force point (or exit
#: point) after the first SIGTERM. ``force_close``: ``registry.force_close()``, a second signal,
#: the cancellation of the task running the shutdown, or asyncpg's ``pool.terminate()``.
#: ``exit``: the process exited without closing and the exit-time net closed it.
ForcedBy = Literal["drain_timeout", "deadline", "budget", "force_close", "exit"]

#: How each :data:`ForcedBy` reads in the text report.
FORCED_BY_LABELS: dict[str, str] = {
    "drain_timeout": "its drain_timeout",
    "deadline": "the shutdown deadline",
    "budget": "the grace budget",
    "force_close": "force_close (a second signal or a cancelled shutdown)",
    "exit": "the exit-time close",
}

# Frames from these modules are plumbing, never "where the user borrowed the connection".
_PLUMBING_MODULES: tuple[str, ...] = (
    "runpy",
    "<frozen",
    "poolkeeper.",
    "sqlalchemy.",
    "asyncpg.",
    "redis.",
    "aiohttp.",
    "httpx.",
    "httpcore.",
    "httpx2.",
    "httpcore2.",
    "aio_pika.",
    "aiormq.",
    "nats.",
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
# Modules that are plumbing by their exact name (a package's __init__, a one-file library).
_PLUMBING_NAMES = frozenset({"poolkeeper", "sqlalchemy"})
_PYTEST_MAIN = (f"{os.sep}pytest{os.sep}__main__.py", f"{os.sep}_pytest{os.sep}__main__.py")


@dataclass(frozen=True)
class Frame:
    """One frame of a borrow-site stack."""

    filename: str
    lineno: int
    function: str

    def __str__(self) -> str:
        return f"{self.filename}:{self.lineno} in {self.function}"


# Whether a module is plumbing, decided once per module, keyed by its name (frame.f_globals
# ["__name__"]): a str caches its hash, and f_globals, unlike f_code, is read without raising
# an audit event (the walk reads one per frame). Cleared if it ever grows past _MAX_MODULES.
_plumbing_modules: dict[str, bool] = {}
_MAX_MODULES = 20_000

# How much of the stack a borrow-site stack shows: the borrow site (the innermost frame outside
# the libraries, however many library frames lie below it) and at most _CALLERS user frames above
# it, looked for among at most _LOOKS frames above it. A checkout made 200 frames deep (a
# recursion, a deep ASGI or pytest stack) costs no more than a shallow one, and a tracked borrow
# keeps at most 1 + _CALLERS code objects and offsets.
_CALLERS = 3
_LOOKS = 12
_SITE_LENGTH = 2  # one frame's code object and offset

# How many callers a tracked checkout records itself: none (they are read from the borrower's
# live stack when the borrow is looked at), or _CALLERS while record_callers(on=True) is in force.
_callers_at_checkout = 0


def record_callers(*, on: bool) -> bool:
    """Whether tracked checkouts record their callers too, not only the borrowing line; returns the old setting.

    Off by default: a tracked checkout keeps its borrow site alone, and the callers above it are
    read from the borrower's stack when the borrow is looked at, if the borrowing function is
    still running. On, every tracked checkout walks its callers (about 1 µs more), so that a
    borrow whose borrower moved on still shows them: the pytest plugin turns it on for the
    session, where the test that leaked matters more than the checkout's cost.
    """
    global _callers_at_checkout  # noqa: PLW0603 -- one setting for the process, read per tracked checkout
    was = bool(_callers_at_checkout)
    _callers_at_checkout = _CALLERS if on else 0
    return was


# Bound once: each is read on every tracked checkout.
_getframe = sys._getframe  # noqa: SLF001 -- the cheap way to walk the stack at checkout
_monotonic = time.monotonic
_get_ident = threading.get_ident
# current_thread() without its Python frame; threading resets this dict in place after a fork.
_threads: dict[int, threading.Thread] = threading._active  # type: ignore[attr-defined]  # noqa: SLF001 -- private, but there since Python 2
_running_loop = asyncio._get_running_loop  # noqa: SLF001 -- None without raising: current_task() raises then
_current_task = current_task_of  # the C way on 3.12+, a dict read on 3.11
#: On Python 3.10 and 3.11, the dict of the task each loop is running now (what current_task_of
#: reads): empty while no task runs anywhere, as in a process of threads alone. ``None`` on 3.12+.
_tasks_running: dict[Any, Any] | None = (
    asyncio.tasks._current_tasks  # type: ignore[attr-defined]  # noqa: SLF001 -- the C tasks' own dict, read by current_task_of on 3.11
    if sys.version_info < (3, 12)
    else None
)


class _Gone:
    """Something to hold a weak reference to that is dead at once: :data:`_seen_loop` before any loop."""


# The event loop a tracked checkout last found running, weakly: a loop the program dropped is
# freed, and asyncio's warning about one left unclosed still comes. asyncio's own
# _get_running_loop() makes a getpid() system call on Python 3.11 (to refuse a loop inherited
# over a fork); about as much as the rest of the entry on an asyncio checkout. The loop running
# in this thread is this one while it says it runs here (BaseEventLoop._thread_id: set by
# run_forever() for its run; other loops, uvloop's, have none and always ask asyncio). Forgotten
# in a forked child, which runs no loop of its parent's. One loop, so nothing grows, whatever the
# loops and threads of the process.
_NO_LOOP: weakref.ref[Any] = weakref.ref(_Gone())
_seen_loop: weakref.ref[Any] = _NO_LOOP


def _loop_here(ident: int) -> asyncio.AbstractEventLoop | None:
    """The event loop running in this thread (``ident``), or ``None``; :func:`tracked_entry`'s slow path."""
    global _seen_loop  # noqa: PLW0603 -- the one-loop cache described above
    loop = _running_loop()
    if loop is not None and getattr(loop, "_thread_id", None) == ident:
        with contextlib.suppress(TypeError):  # a loop class with __slots__ and no __weakref__: asked each time
            _seen_loop = weakref.ref(loop)
    return loop


def _forget_seen_loop() -> None:
    global _seen_loop  # noqa: PLW0603 -- see _seen_loop
    _seen_loop = _NO_LOOP


os.register_at_fork(after_in_child=_forget_seen_loop)


def _is_plumbing(frame: Any) -> bool:
    module = frame.f_globals.get("__name__", "")
    if module.startswith(_PLUMBING_MODULES) or module in _PLUMBING_NAMES:
        return True
    # `python -m pytest` runs pytest's own __main__ module: plumbing, not the user's script.
    return module == "__main__" and bool(frame.f_code.co_filename.endswith(_PYTEST_MAIN))


def add_library_modules(modules: Iterable[str]) -> None:
    """Count the frames of ``modules`` (and of their submodules) as library code from now on.

    A third-party adapter's library (``Driver.library_modules``) joins the built-in ones, so a
    borrow site is the user's line, not a line of the pool.
    """
    global _PLUMBING_MODULES, _PLUMBING_NAMES  # noqa: PLW0603 -- replaced whole: readers see one or the other
    names = frozenset(modules) - _PLUMBING_NAMES
    if names:
        _PLUMBING_NAMES = _PLUMBING_NAMES | names
        _PLUMBING_MODULES = (*_PLUMBING_MODULES, *sorted(f"{name}." for name in names))
        _plumbing_modules.clear()  # modules already judged may be among these


def _learn(frame: Any) -> bool:
    """Whether ``frame``'s module is plumbing, remembered for the next frames of that module."""
    name = frame.f_globals.get("__name__")
    if not isinstance(name, str):  # code run with globals of its own: never plumbing, never cached
        return False
    modules = _plumbing_modules
    if len(modules) >= _MAX_MODULES:
        modules.clear()
    plumbing = modules[name] = _is_plumbing(frame)
    return plumbing


def _resume(current: Any) -> tuple[Any, Any]:
    """Where the stack goes on once a greenlet's frames end: (that greenlet, its frame), or Nones.

    SQLAlchemy's asyncio layer checks out inside a greenlet whose stack ends in the library; the
    caller's frames (the task's) go on in the parent greenlet. Looked at only when greenlet is
    already imported, so nothing is imported here.
    """
    if current is None:
        greenlets = sys.modules.get("greenlet")
        if greenlets is None:
            return None, None
        current = greenlets.getcurrent()
    current = current.parent
    if current is None:
        return None, None
    return current, current.gr_frame


def _capture(frame: Any, callers: int) -> tuple[Any, ...]:  # noqa: C901, PLR0912 -- both walks inline: a call per checkout costs more
    """The borrow site from ``frame`` up and at most ``callers`` callers, as a flat ``(code, offset, code, offset...)``.

    Innermost first; empty when every frame is library code. This runs on every tracked
    checkout, so it does the least it can: per frame, one dict read (is this module plumbing?);
    per user frame kept, its code object and instruction offset. Lines come later
    (:func:`_frames`). A module seen for the first time is learnt through an exception, which
    costs nothing when nothing is raised; the end of a greenlet's stack, which SQLAlchemy's
    asyncio checkouts reach every time, is tested for.
    """
    modules = _plumbing_modules
    greenlet: Any = None
    # The borrow site: the first frame outside the libraries, however deep they go.
    while True:
        while frame is not None:
            try:
                if not modules[frame.f_globals["__name__"]]:
                    break
            except KeyError:
                if not _learn(frame):
                    break
            frame = frame.f_back
        if frame is not None:
            break
        greenlet, frame = _resume(greenlet)  # this greenlet's stack ended: on in its parent's
        if greenlet is None:
            return ()
    if not callers:
        return (frame.f_code, frame.f_lasti)
    site = [frame.f_code, frame.f_lasti]
    # Its callers, within the bounds.
    looks = _LOOKS
    while looks:
        frame = frame.f_back
        while frame is None:
            greenlet, frame = _resume(greenlet)
            if greenlet is None:
                return tuple(site)
        try:
            plumbing = modules[frame.f_globals["__name__"]]
        except KeyError:
            plumbing = _learn(frame)
        if not plumbing:
            site.append(frame.f_code)
            site.append(frame.f_lasti)
            callers -= 1
            if not callers:
                break
        looks -= 1
    return tuple(site)


def _line_of(code: CodeType, offset: int) -> int:
    """The source line of the instruction at byte ``offset`` of ``code``."""
    for start, end, line in code.co_lines():
        if start <= offset < end and line is not None:
            return line
    return code.co_firstlineno


def _frames(raw: tuple[Any, ...]) -> tuple[Frame, ...]:
    """``_capture``'s record as frames, outermost first, innermost last."""
    frames = [
        Frame(code.co_filename, _line_of(code, offset), code.co_name)
        for code, offset in zip(raw[::2], raw[1::2], strict=True)
    ]
    frames.reverse()
    return tuple(frames)


def _plumbing(frame: Any) -> bool:
    try:
        return _plumbing_modules[frame.f_globals["__name__"]]
    except KeyError:
        return _learn(frame)


def _awaiting_frames(task: asyncio.Task[Any]) -> list[Any]:
    """The frames of a suspended task, innermost first: its coroutine and what each one awaits."""
    frames: list[Any] = []
    awaitable: Any = task.get_coro()
    while awaitable is not None:
        frame = getattr(awaitable, "cr_frame", None) or getattr(awaitable, "gi_frame", None)
        if frame is None:  # finished, or an awaitable without frames (a future): the chain ends
            break
        frames.append(frame)
        awaitable = getattr(awaitable, "cr_await", None) or getattr(awaitable, "gi_yieldfrom", None)
    frames.reverse()
    return frames


class ThreadStacks:
    """Every other thread's innermost frame, read once for a batch of views.

    ``sys._current_frames()`` covers every thread of the process: read once per borrow, viewing
    the borrows of n threads (a force-close, ``Keeper.borrowers()``, a leak scan) would cost n².
    Read on first use, then shared by the views of one batch.
    """

    __slots__ = ("_frames",)

    def __init__(self) -> None:
        self._frames: dict[int, Any] | None = None

    def innermost(self, ident: int) -> Any:
        """The innermost frame of the thread ``ident`` when the batch first looked, or ``None``."""
        if self._frames is None:
            self._frames = _current_frames()
        return self._frames.get(ident)


#: Python before 3.12 may start a collection in any allocation, C code's included.
_COLLECTS_WHILE_ALLOCATING = sys.version_info < (3, 12)


def _current_frames() -> dict[int, Any]:
    """``sys._current_frames()``, with the cyclic garbage collector paused around it on Python 3.10 and 3.11.

    There, before 3.11.9 (python/cpython#106883), a collection that starts inside it deadlocks
    the process: it holds the interpreter's lock on the list of threads while it makes a frame
    object per thread, and a collection that frees a ``threading.local`` takes that lock again. A
    force-close views the borrows of many threads at once, allocating all along: it hung there.
    Python 3.12 collects only between bytecodes. Paused only if it was on (a process that turned
    it off keeps it off).
    """
    if not _COLLECTS_WHILE_ALLOCATING or not gc.isenabled():
        return sys._current_frames()  # noqa: SLF001 -- the one way to another thread's stack
    gc.disable()
    try:
        return sys._current_frames()  # noqa: SLF001
    finally:
        gc.enable()


def _live_frames(thread: threading.Thread, task: asyncio.Task[Any] | None, stacks: ThreadStacks) -> list[Any]:
    """The borrower's frames now, innermost first: its task's, or its thread's stack (from ``stacks``)."""
    if task is not None:
        loop = _running_loop()
        if loop is None or _current_task(loop) is not task:
            return _awaiting_frames(task)
        # The task is looking at its own borrow: its frames are this thread's stack.
    frames: list[Any] = []
    greenlet: Any = None
    frame: Any
    own = thread.ident == _get_ident()
    if own:
        frame = _getframe()
    elif thread.ident is not None and _threads.get(thread.ident) is thread:  # alive: an ended one's ident is reused
        frame = stacks.innermost(thread.ident)
    else:
        return frames
    while True:
        while frame is not None:
            frames.append(frame)
            frame = frame.f_back
        if not own:  # another thread's greenlets are not this one's to follow
            return frames
        greenlet, frame = _resume(greenlet)  # SQLAlchemy's asyncio layer: the caller goes on above
        if greenlet is None:
            return frames


def _live_callers(
    code: CodeType, thread: threading.Thread, task: asyncio.Task[Any] | None, stacks: ThreadStacks
) -> tuple[Any, ...]:
    """The callers above the borrow site in ``code``, read from the borrower's stack if still there.

    ``(code, offset, ...)`` as :func:`_capture` records them; empty when the borrowing function
    is no longer running (the borrower moved on, or ended).
    """
    frames = _live_frames(thread, task, stacks)
    # The innermost run of the borrowing function.
    index = next((index for index, frame in enumerate(frames) if frame.f_code is code), None)
    if index is None:
        return ()
    callers: list[Any] = []
    for frame in frames[index + 1 : index + 1 + _LOOKS]:
        if not _plumbing(frame):
            callers += (frame.f_code, frame.f_lasti)
            if len(callers) == 2 * _CALLERS:
                break
    return tuple(callers)


def _stack(entry: Entry, stacks: ThreadStacks) -> tuple[Frame, ...]:
    """The borrow-site stack of a tracked entry: what the checkout recorded, with the callers read now if it did not."""
    raw = entry[2]
    if len(raw) == _SITE_LENGTH:  # the borrow site alone: its callers, if the borrowing function still runs
        raw += _live_callers(raw[0], entry[3], entry[4], stacks)
    return _frames(raw)


def capture_stack(skip: int = 2) -> tuple[Frame, ...]:
    """The borrow site seen from the caller's stack and its callers, outermost first, innermost last."""
    return _frames(_capture(_getframe(skip), _CALLERS))


# What a keeper stores per borrowed connection: a plain tuple, the cheapest thing Python makes,
# because one is made on every checkout. An untracked entry holds the start time
# (time.monotonic()) and the holder: None, or a weakref to the object the user holds, dead once
# the garbage collector collected it (how a return by the collector is told apart). A tracked
# entry adds the raw borrow site (see _capture), the thread and the task (names are read when
# shown: reading them costs more than the rest of the entry).
Entry = tuple[Any, ...]
_UNTRACKED_LENGTH = 2


def tracked_entry(holder: Any) -> Entry:
    """The entry of a tracked borrow: who borrowed, and where.

    Called by :meth:`Keeper.lend`, itself called by an adapter's checkout hook: the walk starts
    at whatever called the hook (frame 3 from here). The usual walk, to the borrowing line past
    modules already judged, runs here inline (a call costs as much as the walk);
    :func:`_capture` takes the rest: callers to record, a new module, a greenlet's end.
    """
    frame: Any = _getframe(3)
    try:
        # Tested for, not caught: the end of a greenlet's stack (None), which SQLAlchemy's asyncio
        # checkouts reach every time. Raising and catching AttributeError there cost about 6,000
        # instructions per checkout (python -m benchmarks.instructions sqlalchemy-async).
        while frame is not None and _plumbing_modules[frame.f_globals["__name__"]]:
            frame = frame.f_back
        if frame is None or _callers_at_checkout:
            site = _capture(frame, _callers_at_checkout)
        else:
            site = (frame.f_code, frame.f_lasti)
    except KeyError:  # a module not judged yet: _capture learns it and goes on
        site = _capture(frame, _callers_at_checkout)
    ident = _get_ident()
    loop = _seen_loop()
    if loop is None or loop._thread_id != ident:  # noqa: SLF001 -- BaseEventLoop's; only a loop with one is kept (_loop_here)
        # No task runs anywhere (a process of threads alone, on 3.10/3.11): a plain call in a
        # thread, whose entry names no task, asks nothing more. Tested here rather than in
        # _loop_here, it spares every sync checkout a call (about 400 instructions).
        loop = None if _tasks_running is not None and not _tasks_running else _loop_here(ident)
    return (
        _monotonic(),
        holder,
        site,
        _threads.get(ident) or threading.current_thread(),
        None if loop is None else _current_task(loop),
    )


def collected(entry: Entry) -> bool:
    """True if the object the user held for this borrow was garbage collected."""
    holder = entry[1]
    return holder is not None and holder() is None


class Borrow:
    """One borrowed connection, as a driver's :meth:`~poolkeeper.adapters.Driver.force_close` is given it.

    Attributes:
        connection: what the adapter passed to :meth:`Keeper.lend <poolkeeper.Keeper.lend>`
            (its unit of checkout: a connection object, a request record...).
        entry: the keeper's record of the borrow; internal.

    Made only off the hot path (views, force-close).
    """

    __slots__ = ("connection", "entry")

    def __init__(self, connection: Any, entry: Entry) -> None:
        self.connection = connection
        self.entry = entry

    @property
    def started(self) -> float:
        """``time.monotonic()`` at checkout."""
        return float(self.entry[0])

    def view(
        self,
        keeper: str,
        *,
        returned_by_gc: bool = False,
        forced_by: ForcedBy | None = None,
        detail: str | None = None,
        stacks: ThreadStacks | None = None,
    ) -> Borrower:
        """The public, immutable view of this borrow (``forced_by``: why it is being force-closed).

        ``stacks``: shared by the views of one batch (see :class:`ThreadStacks`).
        """
        entry = self.entry
        held = time.monotonic() - entry[0]
        tracked = len(entry) > _UNTRACKED_LENGTH
        return Borrower(
            keeper=keeper,
            borrowed_at=time.time() - held,
            held_seconds=held,
            thread=entry[3].name if tracked else None,
            task=entry[4].get_name() if tracked and entry[4] is not None else None,
            stack=_stack(entry, stacks or ThreadStacks()) if tracked else None,
            returned_by_gc=returned_by_gc,
            forced_by=forced_by,
            detail=detail,
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
        stack: the borrow-site stack without library frames, innermost last: the borrowing
            line, and at most 3 callers when they are known (the borrowing function was still
            running when this view was taken, or :func:`record_callers` was on at checkout);
            ``None`` when borrower tracking is off.
        returned_by_gc: the connection came back only because the garbage collector
            collected it; its borrower never returned it.
        forced_by: in a shutdown report, what forced this connection closed (``"budget"``: the
            grace budget's force point; see :data:`ForcedBy`); else ``None``.
        detail: what was borrowed, when the adapter says (a message consumer: the queue and
            delivery tag of the message), else ``None``.
    """

    keeper: str
    borrowed_at: float
    held_seconds: float
    thread: str | None
    task: str | None
    stack: tuple[Frame, ...] | None
    returned_by_gc: bool = False
    forced_by: ForcedBy | None = None
    detail: str | None = None

    @property
    def site(self) -> str | None:
        """``file.py:LINE`` of the innermost user frame, or ``None`` when not tracked."""
        if not self.stack:
            return None
        frame = self.stack[-1]
        return f"{frame.filename}:{frame.lineno}"

    def format(self) -> str:
        """A readable multi-line description, stack included when tracked."""
        return self._format(f"held for {self.held_seconds:.3f}s")

    def _format(self, held: str) -> str:
        how = " (returned only by the garbage collector)" if self.returned_by_gc else ""
        who = ", ".join(
            part for part in (self.thread and f"thread {self.thread}", self.task and f"task {self.task}") if part
        )
        what = f" ({self.detail})" if self.detail else ""
        lines = [f"{self.keeper}{what}: {held}{how}" + (f" by {who}" if who else "")]
        if self.forced_by is not None:
            lines[0] += f"; forced by {FORCED_BY_LABELS.get(self.forced_by, self.forced_by)}"
        if self.stack is None:
            lines.append("  borrow site unknown: enable track_borrowers=True to record it")
        else:
            lines.append("  borrowed at (most recent call last):")
            lines.extend(f"    {frame}" for frame in self.stack)
        return "\n".join(lines)

    def _alike(self) -> tuple[Any, ...]:
        # Everything format() shows but how long it was held.
        return (self.keeper, self.detail, self.returned_by_gc, self.thread, self.task, self.forced_by, self.stack)

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
            "forced_by": self.forced_by,
            "detail": self.detail,
        }


#: How many entries the text of a shutdown report lists under its force-closed borrowers.
LISTED_BORROWERS = 20


def format_borrowers(borrowers: Sequence[Borrower], listed: int = LISTED_BORROWERS) -> list[str]:
    """The text report's entries for ``borrowers``: alike ones as one entry, at most ``listed`` entries.

    Borrowers alike in all but how long they were held (thousands of untracked ones forced at
    once, all "borrow site unknown") make one entry with their count; past ``listed`` entries
    the rest are only counted. The report's ``leaks`` (and ``to_dict()``) keep every one.
    """
    alike: dict[tuple[Any, ...], list[Borrower]] = {}
    for borrower in borrowers:
        alike.setdefault(borrower._alike(), []).append(borrower)  # noqa: SLF001 -- this module's own
    groups = list(alike.values())
    entries = []
    for group in groups[:listed]:
        if len(group) == 1:
            entries.append(group[0].format())
            continue
        seconds = [borrower.held_seconds for borrower in group]
        shortest, longest = f"{min(seconds):.3f}", f"{max(seconds):.3f}"
        held = shortest if shortest == longest else f"{shortest}-{longest}"
        entries.append(group[0]._format(f"{len(group)} borrowers, held for {held}s"))  # noqa: SLF001
    rest = groups[listed:]
    if rest:
        entries.append(
            f"... and {sum(len(group) for group in rest)} more in {len(rest)} more entries "
            "(every one is in the report's leaks and in to_dict())"
        )
    return entries
