"""One renderer for every result: the console rows and ``docs/performance.md``."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from benchmarks import bench_shutdown
from benchmarks._measure import INSTRUCTIONS, LATENCY, MEMORY, OVERHEAD, SCALE, CloseOutcome, Result, Row

if TYPE_CHECKING:
    from collections.abc import Sequence

    from benchmarks._machine import Machine

_NAME_WIDTH = 58
_BAR_WIDTH = 50


def figure(value: float | None, unit: str) -> str:
    """``value`` with its unit, to a precision that suits the unit; ``-`` when there is none."""
    if value is None or math.isnan(value):
        return "-"
    if unit == "B":
        return f"{value:,.0f} B"
    if unit == "instructions":
        return f"{value:,.0f}"
    if unit == "ms":  # fewer decimals as the figure grows: three significant digits or more
        decimals = 0 if value >= 100 else 1 if value >= 10 else 3
        return f"{value:,.{decimals}f} ms"
    return f"{value:,.2f} {unit}"


def ratio(value: float | None) -> str:
    """``1.034x``, or ``-``."""
    return "-" if value is None else f"{value:.3f}x"


# -- console ---------------------------------------------------------------------------------------


def console_header() -> str:
    """The column titles of :func:`console_line`."""
    return f"{'measure':<{_NAME_WIDTH}} {'raw / ref':>12} {'poolkeeper':>12} {'ratio':>8}  goal"


def console_line(row: Row) -> str:
    """One result as a console line (two when its name is long)."""
    if isinstance(row, CloseOutcome):
        return (
            f"{row.library} closed by {row.closer} ({'poolkeeper' if row.poolkeeper else 'raw'}): "
            f"{row.seconds * 1e3:,.1f} ms; finishing requests failed "
            f"{row.finishing_failed}/{row.finishing}; stuck request: {row.stuck}; left on the server: "
            f"{row.leftovers}; new request: {row.new_request}"
        )
    name = row.name if len(row.name) <= _NAME_WIDTH else f"{row.name}\n{'':<{_NAME_WIDTH}}"
    goal = f"({row.goal}) {row.verdict}" if row.goal else ""
    return (
        f"{name:<{_NAME_WIDTH}} {figure(row.raw, row.unit):>12} {figure(row.wrapped, row.unit):>12} "
        f"{ratio(row.ratio):>8}  {goal}"
    ).rstrip()


# -- Markdown ---------------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines.extend("| " + " | ".join(_cell(cell) for cell in row) + " |" for row in rows)
    return lines


def _verdict(result: Result) -> str:
    return f"**{result.verdict}**" if result.met is False else result.verdict or "-"


def _chart(result: Result) -> list[str]:
    """An ASCII bar chart of ``result.chart``, in a code block."""
    if not result.chart:
        return []
    longest = max(value for _, value in result.chart) or 1.0
    label_width = max(len(label) for label, _ in result.chart)
    lines = ["```text"]
    for label, value in result.chart:
        bar = "#" * max(1, round(value / longest * _BAR_WIDTH))
        lines.append(f"{label:<{label_width}}  {bar:<{_BAR_WIDTH}}  {figure(value, result.unit)}")
    lines.append("```")
    return lines


def _overhead(results: Sequence[Result]) -> list[str]:
    return [
        "Time per operation through a wrapped pool against the same library unwrapped, measured in the same",
        "process in alternating rounds (raw, poolkeeper, poolkeeper, raw...) so that machine noise hits both",
        "alike, with the garbage collector paused in every timed loop (as `timeit` does: a collection is",
        "triggered by a count of allocations, so it lands at other moments in the two loops). The ratio is",
        "the median of the per-round ratios; the range shows how much rounds disagreed. The bare sync",
        "checkout rows time the statement itself (`timeit`), with no Python call around it: a call layer",
        "adds the same time to both sides and pulls the ratio towards 1. Rows marked *tracked* are leak",
        "detection left on (`track_borrowers=True`, or a `leak_threshold`): each checkout walks past the",
        "library's frames to the line that borrowed and keeps the code object and instruction offset of",
        "that frame, nothing more, so a deep stack costs what a shallow one does; the callers above it",
        "are read from the borrower's own stack when a borrow is shown, and file names and lines worked",
        "out then. Looking at a frame costs CPython a frame object, so the cost is the library's depth",
        "plus 1 frame. `python -m benchmarks.instructions` counts the instructions of the bare checkouts",
        "under valgrind, which load on the machine does not move; `python -m benchmarks.consume_instructions`",
        "counts those of a consumed and acked message (the aio-pika and NATS rows). The *noise floor* row",
        "times a raw pool against a second raw pool in the same way: the same code against itself, so its",
        "distance from 1.000x is what this run's machine noise alone does to a ratio.",
        "",
        *_table(
            ("measure", "raw library", "poolkeeper", "ratio", "goal", "verdict", "how measured"),
            [
                (
                    r.name,
                    figure(r.raw, r.unit),
                    figure(r.wrapped, r.unit),
                    ratio(r.ratio),
                    r.goal or "-",
                    _verdict(r),
                    r.detail,
                )
                for r in results
            ],
        ),
    ]


def _latency(results: Sequence[Result]) -> list[str]:
    return [
        "From the moment the last borrowed connection is given back to the moment `close()` / `aclose()`",
        "returns: how fast the event-driven drain notices. One keeper per sample, closed while one",
        "connection is borrowed. The whole includes the library's own work on both ends: its return (for",
        "asyncpg, a reset round trip to the server before the connection is back) and its close of the",
        "idle connections once the drain is over. The spread column splits each median into that close",
        "(the report's `close_seconds`) and the rest: the return, the wake-up and the report.",
        "",
        *_table(
            ("keeper", "median", "goal", "verdict", "spread"),
            [(r.name, figure(r.wrapped, r.unit), r.goal, _verdict(r), r.detail) for r in results],
        ),
    ]


def _scale(results: Sequence[Result]) -> list[str]:
    lines = [
        f"**Concurrency.** {bench_shutdown.KEEPERS} independent keepers (no `depends_on` between them) each lend",
        "one connection whose borrower still has work to do when shutdown starts. One `aclose()` should take",
        "about as long as the slowest keeper closed alone, not the sum of all of them.",
        "",
        "**Force-close.** Every connection is borrowed and never comes back by itself; `drain_timeout=0`",
        "sends the keeper straight to force-closing. The time is the whole `aclose()` (for SQLAlchemy, a",
        "sync service's `close()`): refusing, aborting every borrowed connection (for PostgreSQL, also",
        "cancelling each statement on the server: with eight or more, one `pg_cancel_backend` query; the",
        "connections are cut first, and asyncpg's sockets are closed once the query has answered, from a",
        "thread, not waited for) and closing the pool. The garbage collector runs just before each timed",
        "close, so that what earlier measurements left is not collected inside it.",
        f"Each figure is the median of {bench_shutdown.FORCE_ROUNDS} runs.",
        "",
        *_table(
            ("measure", "reference", "poolkeeper", "ratio", "goal", "verdict", "how measured"),
            [
                (
                    r.name,
                    figure(r.raw, r.unit),
                    figure(r.wrapped, r.unit),
                    ratio(r.ratio),
                    r.goal or "-",
                    _verdict(r),
                    r.detail,
                )
                for r in results
            ],
        ),
    ]
    for result in results:
        if result.chart:
            lines += ["", f"{result.name} (medians):", "", *_chart(result)]
    return lines


def _memory(results: Sequence[Result]) -> list[str]:
    return [
        "Bytes that poolkeeper's own code allocates per borrowed connection while it is out (the borrow",
        "record, its slot in the keeper's table, and for aiohttp the per-request record), measured with",
        "`tracemalloc` over many borrows held at once. A tracked borrow also keeps its borrow site (a code",
        "object and an offset) and its thread and task, whatever the depth of the caller's stack. The",
        "million-checkout row is what returned checkouts leave behind (resident memory, per checkout): it",
        "must stay flat.",
        "",
        *_table(
            ("borrow", "bytes per borrow", "goal", "verdict", "how measured"),
            [(r.name, figure(r.wrapped, r.unit), r.goal or "-", _verdict(r), r.detail) for r in results],
        ),
    ]


def _side_by_side(outcomes: Sequence[CloseOutcome]) -> list[str]:
    finishing, work, deadline = bench_shutdown.FINISHING, bench_shutdown.WORK, bench_shutdown.DEADLINE
    return [
        f"The same work in flight, closed two ways: {finishing} requests that finish about {work:g} s after they",
        "started, and one that never finishes by itself (a long `pg_sleep`, a `BLPOP` with no timeout, an HTTP",
        f"body that never ends). poolkeeper is given `drain_timeout={deadline:g}`, and so is asyncpg's own",
        "`Pool.close()` through `asyncio.wait_for`.",
        "",
        "- *time to close*: how long the closing call took;",
        f"- *finishing requests failed*: of the {finishing} that would have finished, how many got an error;",
        "- *the stuck request*: whether and when (from the start of the close) its caller got an error;",
        '  "no error: still waiting" means it was still blocked half a second after the close returned;',
        "- *left on the server*: what the server still held from this client once the finishing requests",
        "  were over (after up to one second for the server to notice closed sockets): backends in",
        "  `pg_stat_activity` by `application_name`, clients in `CLIENT LIST` by name, open connections",
        "  on the HTTP server (an HTTP client cannot stop the server's handler, only close the connection);",
        "  this includes any connection the new request below opened;",
        "- *a new request during close*: made right after the close began (for calls that return at once,",
        "  right after they returned).",
        "",
        *_table(
            (
                "library",
                "closed with",
                "time to close",
                "finishing requests failed",
                "the stuck request",
                "left on the server",
                "a new request during close",
            ),
            [
                (
                    o.library,
                    f"`{o.closer}` ({'poolkeeper' if o.poolkeeper else 'raw'})",
                    figure(o.seconds * 1e3, "ms"),
                    f"{o.finishing_failed} of {o.finishing}"
                    + ("" if o.finishing_errors == "-" else f" ({o.finishing_errors})"),
                    o.stuck,
                    o.leftovers,
                    o.new_request,
                )
                for o in outcomes
            ],
        ),
    ]


def _instructions(results: Sequence[Result]) -> list[str]:
    return [
        "The bare checkouts of the overhead table again, counted in instructions instead of timed: each case",
        "and mode runs in a process of its own under valgrind's callgrind, which counts only the loop of",
        "checkouts, after a warm-up (`benchmarks/instructions.py`). A count does not depend on what else the",
        "machine is doing, so these ratios come out alike from run to run (within about 1%), where the",
        "timed ones move by several percent (see the noise floor row). They are not the timed ratios: an",
        "instruction that misses a cache costs more than one that hits, and looking at a frame (tracked",
        "rows) allocates.",
        "",
        *_table(
            ("bare checkout+return", "raw library", "poolkeeper", "ratio", "how measured"),
            [(r.name, figure(r.raw, r.unit), figure(r.wrapped, r.unit), ratio(r.ratio), r.detail) for r in results],
        ),
    ]


def markdown(rows: Sequence[Row], machine: Machine) -> str:
    """The whole of ``docs/performance.md``."""
    results = [row for row in rows if isinstance(row, Result)]
    outcomes = [row for row in rows if isinstance(row, CloseOutcome)]
    goals = [result for result in results if result.met is not None]
    missed = [result for result in goals if not result.met]
    lines = [
        "<!-- Generated by `nox -s bench` (python -m benchmarks): do not edit by hand, run it again. -->",
        "",
        "# Performance",
        "",
        f"Measured on {machine.started:%Y-%m-%d}. Every figure on this page comes from one run of the benchmark",
        "suite against real servers on one machine (below). Absolute times depend on that machine; the ratios",
        "against the raw libraries, measured in the same process in alternating rounds, are what carries over.",
        "",
        f"**{len(goals) - len(missed)} of {len(goals)} goals met.**"
        + (
            ""
            if not missed
            else " Missed: "
            + "; ".join(
                f"{r.name} ({figure(r.wrapped, r.unit)}"
                + (f", {ratio(r.ratio)}" if r.ratio is not None else "")
                + f", goal {r.goal})"
                for r in missed
            )
            + "."
        ),
        "",
        "## Machine",
        "",
        *_table(("", "this run"), machine.facts()),
        "",
    ]
    sections = (
        (OVERHEAD, _overhead),
        (LATENCY, _latency),
        (SCALE, _scale),
        (MEMORY, _memory),
        (INSTRUCTIONS, _instructions),
    )
    for title, render in sections:
        chosen = [result for result in results if result.section == title]
        if chosen:
            lines += [f"## {title}", "", *render(chosen), ""]
    if outcomes:
        lines += ["## Side by side with the raw libraries' own shutdown", "", *_side_by_side(outcomes), ""]
    lines += [
        "## How to reproduce",
        "",
        "```bash",
        "nox -s bench                 # installs the project, runs every suite, rewrites this page",
        "python -m benchmarks --help  # the same without nox: --only SUITE, --no-report, --json PATH",
        "python -m benchmarks.instructions  # instructions per bare checkout, raw/wrapped/tracked (valgrind)",
        "python -m benchmarks.consume_instructions  # instructions per consumed+acked message (valgrind)",
        "```",
        "",
        "The servers are PostgreSQL and Redis on loopback by default; `POOLKEEPER_POSTGRES_URL` and",
        "`POOLKEEPER_REDIS_URL` point the run elsewhere (Redis database 9 by default: the run creates no",
        f"keys). The PostgreSQL force-close asks for {bench_shutdown.PG_FORCED} connections. When the server's",
        "`max_connections` cannot hold them and the server is a local Debian cluster this process may restart",
        "(`pg_ctlcluster`, as root or as the cluster's owner), the run raises it with `ALTER SYSTEM`, restarts",
        "the server, and afterwards puts the setting back and restarts it again",
        "(`benchmarks/_max_connections.py`). Elsewhere it uses as many as fit (keeping",
        f"{bench_shutdown.PG_HEADROOM} free for other clients); its row then says so, and shows the time at half",
        "that count too, to show the trend. Either way the row says what was done.",
        "",
    ]
    return "\n".join(lines)
