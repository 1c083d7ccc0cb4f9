"""Instructions per checkout+return, raw against wrapped, counted by valgrind's callgrind.

Wall-clock ratios on a loaded machine move by several percent from run to run; the number of
instructions a checkout executes does not. This is the development tool behind the overhead
rows of ``docs/performance.md``: each case runs in its own process under callgrind, counting
only the timed loop (``--toggle-collect`` on the C function that runs it), after a warm-up.

    python -m benchmarks.instructions                    # every case, raw / wrapped / tracked
    python -m benchmarks.instructions sqlalchemy redis   # some cases
    python -m benchmarks.instructions --profile sqlalchemy:wrapped   # cProfile of one loop

Needs ``valgrind`` on the PATH and the servers the benchmarks use (PostgreSQL, Redis). The
``instructions`` suite of ``python -m benchmarks`` (:func:`run`) puts the same counts in the report.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import functools
import os
import pstats
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from benchmarks._measure import INSTRUCTIONS, Result

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

POSTGRES_URL = os.environ.get("POOLKEEPER_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("POOLKEEPER_REDIS_URL", "redis://127.0.0.1:6379/9")

MODES = ("raw", "wrapped", "tracked")
# Loops per case: enough that setup noise (a GC pass, an event loop poll) is below 0.1% of it.
COUNTS = {"sqlalchemy": 4000, "sqlalchemy-async": 2000, "redis": 8000, "redis-async": 4000, "asyncpg": 300}


def _registry(mode: str) -> Any:
    from poolkeeper import Registry  # noqa: PLC0415 -- not imported for the raw case

    return Registry(track_borrowers=mode == "tracked")


def _sqlalchemy(mode: str) -> tuple[Callable[[], object], Callable[[], object]]:
    import sqlalchemy as sa  # noqa: PLC0415

    engine = sa.create_engine(sa.make_url(POSTGRES_URL).set(drivername="postgresql+psycopg"), pool_size=2)
    if mode != "raw":
        _registry(mode).wrap(engine, name="db")

    def once() -> None:
        engine.connect().close()

    return once, engine.dispose


def _redis(mode: str) -> tuple[Callable[[], object], Callable[[], object]]:
    import redis  # noqa: PLC0415

    client = redis.Redis.from_url(REDIS_URL)
    if mode != "raw":
        _registry(mode).wrap(client, name="cache")
    pool = client.connection_pool

    def once() -> None:
        pool.release(pool.get_connection())

    return once, client.close


def _loop_case(
    make: Callable[[str], Coroutine[Any, Any, tuple[Callable[[], Coroutine[Any, Any, object]], Any]]],
) -> Callable[[str], tuple[Callable[[], object], Callable[[], object]]]:
    """An async case as a sync one: ``once`` runs one checkout on a loop kept between calls."""

    def case(mode: str) -> tuple[Callable[[], object], Callable[[], object]]:
        loop = asyncio.new_event_loop()
        once_async, close = loop.run_until_complete(make(mode))

        async def many(count: int) -> None:
            for _ in range(count):
                await once_async()

        def run(count: int = 1) -> None:
            loop.run_until_complete(many(count))

        def done() -> None:
            loop.run_until_complete(close())
            loop.close()

        run.many = True  # type: ignore[attr-defined]  # marks a loop that takes the count itself
        return run, done

    return case


async def _sqlalchemy_async(mode: str) -> tuple[Callable[[], Coroutine[Any, Any, object]], Any]:
    import sqlalchemy as sa  # noqa: PLC0415
    from sqlalchemy.ext.asyncio import create_async_engine  # noqa: PLC0415

    engine = create_async_engine(sa.make_url(POSTGRES_URL).set(drivername="postgresql+asyncpg"), pool_size=2)
    if mode != "raw":
        _registry(mode).wrap(engine, name="db")

    async def once() -> None:
        async with engine.connect():
            pass

    return once, engine.dispose


async def _redis_async(mode: str) -> tuple[Callable[[], Coroutine[Any, Any, object]], Any]:
    import redis.asyncio  # noqa: PLC0415

    client = redis.asyncio.Redis.from_url(REDIS_URL)
    if mode != "raw":
        _registry(mode).wrap(client, name="cache")
    pool = client.connection_pool

    async def once() -> None:
        await pool.release(await pool.get_connection())  # type: ignore[no-untyped-call]  # unannotated

    return once, client.aclose


async def _asyncpg(mode: str) -> tuple[Callable[[], Coroutine[Any, Any, object]], Any]:
    import asyncpg  # noqa: PLC0415

    pool = await asyncpg.create_pool(POSTGRES_URL, min_size=2, max_size=2)
    if mode != "raw":
        _registry(mode).wrap(pool, name="pg")

    async def once() -> None:
        async with pool.acquire():
            pass

    return once, pool.close


CASES: dict[str, Callable[[str], tuple[Callable[[], object], Callable[[], object]]]] = {
    "sqlalchemy": _sqlalchemy,
    "sqlalchemy-async": _loop_case(_sqlalchemy_async),
    "redis": _redis,
    "redis-async": _loop_case(_redis_async),
    "asyncpg": _loop_case(_asyncpg),
}


#: What each case times, as the report names it.
TITLES = {
    "sqlalchemy": "sqlalchemy checkout+return",
    "sqlalchemy-async": "sqlalchemy async checkout+return",
    "redis": "redis get_connection+release (no I/O)",
    "redis-async": "redis.asyncio get_connection+release (no I/O)",
    "asyncpg": "asyncpg acquire+release",
}


def run() -> list[Result]:
    """Every case, raw / wrapped / tracked, as report rows: two callgrind processes at a time.

    Counted instructions do not move with the machine's load, so these ratios come out alike run
    after run, where the timed rows of the same checkouts move by several percent.
    """
    if shutil.which("valgrind") is None:
        return [
            Result(
                section=INSTRUCTIONS,
                name="every case",
                unit="instructions",
                wrapped=float("nan"),
                detail="not measured: valgrind is not on the PATH",
            )
        ]
    jobs = [(case, mode) for case in CASES for mode in MODES]
    with ThreadPoolExecutor(max_workers=2) as pool:  # each job is a process of its own; the machine has 2 cores
        counted = dict(
            zip(jobs, pool.map(lambda job: count_instructions(job[0], job[1], COUNTS[job[0]]), jobs), strict=True)
        )
    rows = []
    for case in CASES:
        raw = counted[case, "raw"]
        for mode, suffix in (("wrapped", ""), ("tracked", ", tracked")):
            rows.append(
                Result(
                    section=INSTRUCTIONS,
                    name=TITLES[case] + suffix,
                    unit="instructions",
                    raw=raw,
                    wrapped=counted[case, mode],
                    ratio=counted[case, mode] / raw,
                    detail=f"instructions per operation over {COUNTS[case]:,} operations, under callgrind",
                )
            )
    return rows


def _timed_loop(once: Callable[..., object], count: int) -> None:
    """``count`` calls of ``once``, all inside one ``functools.reduce`` call: what callgrind counts."""
    if getattr(once, "many", False):
        functools.reduce(lambda _a, _b: once(count), range(1), None)
    else:

        def loop(_a: object, _b: object) -> None:
            for _ in range(count):
                once()

        functools.reduce(loop, range(1), None)


def child(case: str, mode: str, count: int, profile: bool) -> None:
    """Set the case up, warm it up, run the counted loop, tear down."""
    import logging  # noqa: PLC0415

    logging.getLogger("poolkeeper").setLevel(logging.ERROR)
    once, done = CASES[case](mode)
    _timed_loop(once, max(count // 10, 10))  # warm-up: caches, lazily made queues, first connects
    if profile:
        profiler = cProfile.Profile()
        profiler.enable()
        _timed_loop(once, count)
        profiler.disable()
        stats = pstats.Stats(profiler)
        stats.sort_stats("tottime").print_stats(25)
    else:
        _timed_loop(once, count)
    done()


def count_instructions(case: str, mode: str, count: int) -> float:
    """Instructions per loop iteration of ``case`` in ``mode``, under callgrind."""
    command = [
        "valgrind",
        "--tool=callgrind",
        "--collect-atstart=no",
        "--toggle-collect=functools_reduce",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        "-m",
        "benchmarks.instructions",
        "--child",
        case,
        mode,
        str(count),
    ]
    environment = {**os.environ, "PYTHONHASHSEED": "0"}  # dict layouts, so counts, alike in every run
    finished = subprocess.run(command, capture_output=True, text=True, check=False, env=environment)  # noqa: S603 -- our own command
    found = re.search(r"Collected : (\d+)", finished.stderr)
    if finished.returncode != 0 or found is None:
        raise RuntimeError(f"{case} {mode}: callgrind failed:\n{finished.stderr[-3000:]}")
    return int(found.group(1)) / count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.instructions", description=__doc__.split("\n")[0])
    parser.add_argument("cases", nargs="*", help=f"which cases (default: all): {', '.join(CASES)}")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated: raw, wrapped, tracked")
    parser.add_argument("--profile", metavar="CASE:MODE", help="print a cProfile of one loop instead")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        case, mode, count = args.child
        child(case, mode, int(count), profile=False)
        return 0
    unknown = [case for case in args.cases if case not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; expected some of {', '.join(CASES)}")
    if args.profile:
        case, mode = args.profile.split(":")
        child(case, mode, COUNTS[case], profile=True)
        return 0
    for case in args.cases or CASES:
        counts = {mode: count_instructions(case, mode, COUNTS[case]) for mode in args.modes.split(",")}
        raw = counts.get("raw")
        cells = [
            f"{mode} {value:,.0f}" + ("" if raw is None or mode == "raw" else f" ({value / raw:.3f}x)")
            for mode, value in counts.items()
        ]
        print(f"{case:18} instructions per checkout+return: {', '.join(cells)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
