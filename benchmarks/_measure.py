"""Timing helpers shared by the benchmarks, and the results every suite hands to the renderer.

Overheads are measured in interleaved rounds (raw, poolkeeper, poolkeeper, raw...) so that
machine noise hits both alike, with the garbage collector paused in each timed loop, and
summarised as the median of the per-round ratios.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import statistics
import time
import timeit
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator, Sequence

    from poolkeeper import Registry

Side = TypeVar("Side")

# The sections of the report, in the order they are printed.
OVERHEAD = "Overhead against the raw libraries"
LATENCY = "Drain wake-up latency"
SCALE = "Shutdown at scale"
MEMORY = "Memory per borrow"
INSTRUCTIONS = "Instructions per checkout"

#: Goals (issue 18, issue 13 item 9): a bare checkout+return through a kept pool, tracking off
#: and on, against the raw library's; the drain's wake-up; bytes a borrow keeps while it is out.
BARE_GOAL = 1.05
TRACKED_GOAL = 1.15
WAKE_UP_GOAL_MS = 0.5
UNTRACKED_BYTES_GOAL = 256
TRACKED_BYTES_GOAL = 1024


@dataclass(frozen=True)
class Result:
    """One measured figure: a console row and a row of ``docs/performance.md``.

    Attributes:
        section: which table it belongs to (``OVERHEAD``, ``LATENCY``, ``SCALE``, ``MEMORY``).
        name: what was measured.
        unit: the unit of ``raw`` and ``wrapped`` (``"us"``, ``"ms"``, ``"B"``).
        wrapped: poolkeeper's figure (a median).
        raw: the raw library's figure, or the reference ``wrapped`` is compared with; ``None``
            when there is none.
        ratio: ``wrapped / raw`` (the median of per-round ratios where there are rounds).
        goal: the goal as text (``"<= 1.10x"``, ``"< 250 ms"``); empty when there is none.
        met: whether the goal was met; ``None`` when there is no goal.
        detail: how it was measured, spread, anything a reader needs to trust the figure.
        chart: ``(label, value in unit)`` bars, for a figure a picture explains better.
    """

    section: str
    name: str
    unit: str
    wrapped: float
    raw: float | None = None
    ratio: float | None = None
    goal: str = ""
    met: bool | None = None
    detail: str = ""
    chart: tuple[tuple[str, float], ...] = ()

    @property
    def verdict(self) -> str:
        """``"ok"``, ``"OVER GOAL"``, or empty when there is no goal."""
        if self.met is None:
            return ""
        return "ok" if self.met else "OVER GOAL"


@dataclass(frozen=True)
class CloseOutcome:
    """What one way of closing a pool did to the same in-flight work (the side-by-side table).

    Attributes:
        library: the library and the client closed.
        closer: the call that closed it.
        poolkeeper: whether that call is poolkeeper's (else the raw library's own).
        seconds: how long that call took.
        finishing: requests in flight at shutdown that would have finished by themselves.
        finishing_failed: how many of them failed.
        finishing_errors: the error types they failed with.
        stuck: what happened to the one request that never finishes by itself.
        leftovers: what the server still had open from this client once the finishing requests
            were over (after up to a second for the server to notice closed sockets).
        new_request: what a new request made while closing (or after it returned) got.
    """

    library: str
    closer: str
    poolkeeper: bool
    seconds: float
    finishing: int
    finishing_failed: int
    finishing_errors: str
    stuck: str
    leftovers: str
    new_request: str


Row = Result | CloseOutcome


def spread(values: Sequence[float], unit: str, scale: float = 1.0) -> str:
    """``"a-b unit over n runs"``: the range of ``values`` (multiplied by ``scale``)."""
    low, high = min(values) * scale, max(values) * scale
    return f"range {low:.3g}-{high:.3g} {unit} over {len(values)} runs"


@dataclass
class Comparison:
    """Per-operation times of the raw library and of poolkeeper, measured in alternating rounds."""

    name: str
    raw: list[float]
    wrapped: list[float]

    @property
    def ratio(self) -> float:
        """Median of the per-round ratios: each round pairs neighbouring raw and wrapped runs."""
        return statistics.median(w / r for r, w in zip(self.raw, self.wrapped, strict=True))

    def result(self, goal: float | None) -> Result:
        """The comparison as a :class:`Result`, in microseconds per operation."""
        ratios = [w / r for r, w in zip(self.raw, self.wrapped, strict=True)]
        return Result(
            section=OVERHEAD,
            name=self.name,
            unit="us",
            raw=statistics.median(self.raw) * 1e6,
            wrapped=statistics.median(self.wrapped) * 1e6,
            ratio=self.ratio,
            goal="" if goal is None else f"<= {goal:.2f}x",
            met=None if goal is None else self.ratio <= goal,
            detail=f"{len(ratios)} rounds, ratios {min(ratios):.3f}-{max(ratios):.3f}",
        )


def per_op(operation: Callable[[], object], count: int) -> float:
    """Seconds per call of ``operation`` over ``count`` calls, the garbage collector paused (see :func:`timed`)."""
    with timed():
        started = time.perf_counter()
        for _ in range(count):
            operation()
        return (time.perf_counter() - started) / count


@contextlib.contextmanager
def timed() -> Iterator[None]:
    """Pause the cyclic garbage collector for a timed loop, as ``timeit`` does.

    A collection starts after a count of allocations, not of operations: the wrapped loop makes
    one more small object per checkout, so collections land in its rounds at other moments than
    in the raw ones, and one landing in a round of 2,000 checkouts moves that round by several
    percent. Paused, neither side pays for one; nothing in these loops makes a reference cycle.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def compare(
    name: str, raw: Callable[[], object], wrapped: Callable[[], object], *, count: int, rounds: int
) -> Comparison:
    """Alternate raw and wrapped rounds so that machine noise hits both alike."""
    result = Comparison(name, [], [])
    per_op(raw, count // 10)  # warm up both paths
    per_op(wrapped, count // 10)
    for round_number in range(rounds):
        # Which goes first alternates: on a loaded machine the order alone moves a round by a few %.
        if round_number % 2:
            result.wrapped.append(per_op(wrapped, count))
            result.raw.append(per_op(raw, count))
        else:
            result.raw.append(per_op(raw, count))
            result.wrapped.append(per_op(wrapped, count))
    return result


async def alternate(
    name: str, measure: Callable[[Side], Awaitable[float]], raw: Side, wrapped: Side, *, rounds: int
) -> Comparison:
    """:func:`compare` for coroutines: ``rounds`` rounds of ``await measure(raw)`` and ``await measure(wrapped)``.

    ``measure(side)`` times one round of that side and returns seconds per operation; warming
    both sides up first is the caller's (what warms a side up differs from library to library).
    """
    result = Comparison(name, [], [])
    for round_number in range(rounds):
        # Which goes first alternates: on a loaded machine the order alone moves a round by a few %.
        if round_number % 2:
            result.wrapped.append(await measure(wrapped))
            result.raw.append(await measure(raw))
        else:
            result.raw.append(await measure(raw))
            result.wrapped.append(await measure(wrapped))
    return result


def compare_statement(
    name: str, statement: str, raw: dict[str, Any], wrapped: dict[str, Any], *, count: int, rounds: int
) -> Comparison:
    """:func:`compare` for one statement, compiled into the timed loop itself (``timeit``).

    No function call per operation wraps the statement, so the ratio is the library's own
    checkout against the guarded one: a call layer around both (a lambda, a helper) adds the
    same time to each side and pulls the ratio towards 1 (two Python calls are about 2.5% of a
    bare SQLAlchemy checkout). ``timeit`` pauses the garbage collector, as :func:`timed` does.
    """
    # The statement runs with a module's __name__ in its globals, as every user's line does: a
    # tracked checkout judges the borrowing frame's module by it, once per module.
    timers = {
        side: timeit.Timer(statement, globals={"__name__": __name__, **names})
        for side, names in (("raw", raw), ("wrapped", wrapped))
    }
    for timer in timers.values():  # warm up both paths: caches, lazily made objects, the first connection
        timer.timeit(count)
    result = Comparison(name, [], [])
    for round_number in range(rounds):
        order = ("wrapped", "raw") if round_number % 2 else ("raw", "wrapped")
        for side in order:
            getattr(result, side).append(timers[side].timeit(count) / count)
    return result


def latency_result(name: str, samples: list[float], goal_ms: float, closes: Sequence[float] = ()) -> Result:
    """Median and p90 of ``samples`` (seconds) against a goal in milliseconds.

    ``closes``: for each sample, the report's ``close_seconds`` (the library closing the idle
    connections, from the moment the drain was seen to end). The detail then splits the median
    into that close and the rest (the return itself, the wake-up, the report): which part is the
    library's own work and which is the keeper's.
    """
    ordered = sorted(samples)
    median_ms = statistics.median(ordered) * 1e3
    p90_ms = ordered[int(len(ordered) * 0.9) - 1] * 1e3
    detail = f"p90 {p90_ms:.3f} ms, max {ordered[-1] * 1e3:.3f} ms, {len(ordered)} samples"
    if closes:
        close_ms = statistics.median(closes) * 1e3
        rest_ms = statistics.median(total - close for total, close in zip(samples, closes, strict=True)) * 1e3
        detail += (
            f"; of the whole, closing the idle connections (the library's close) took {close_ms:.3f} ms"
            f" and the rest (the return, the wake-up, the report) {rest_ms:.3f} ms (medians)"
        )
    return Result(
        section=LATENCY,
        name=name,
        unit="ms",
        wrapped=median_ms,
        goal=f"<= {goal_ms:g} ms",
        met=median_ms <= goal_ms,
        detail=detail,
    )


def close_seconds(registry: Registry) -> float:
    """How long closing the idle connections took in ``registry``'s shutdown (its report's ``close_seconds``)."""
    report = registry.report
    assert report is not None, "the registry has not closed"
    return sum(item.close_seconds for item in report.items)


def acking_handler(messages: int) -> tuple[Callable[[Any], Awaitable[None]], asyncio.Event]:
    """A consumer callback that acks each message it gets, and the event it sets at the ``messages``-th."""
    done = asyncio.Event()
    count = 0

    async def handler(message: Any) -> None:
        nonlocal count
        await message.ack()
        count += 1
        if count == messages:
            done.set()

    return handler, done
