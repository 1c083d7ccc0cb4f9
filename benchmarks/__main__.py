"""Run the benchmarks, print every figure, and write ``docs/performance.md`` from this one run.

``python -m benchmarks`` runs every suite and rewrites the report; ``--only SUITE`` runs some
(and writes no report unless ``--report`` names one: a partial run is not the page).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks import (
    bench_aio_pika,
    bench_aiohttp,
    bench_asyncpg,
    bench_httpx,
    bench_nats,
    bench_psycopg_pool,
    bench_redis,
    bench_shutdown,
    bench_sqlalchemy,
    instructions,
)
from benchmarks._machine import Machine
from benchmarks._report import console_header, console_line, markdown

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from benchmarks._measure import Row

DEFAULT_REPORT = Path(__file__).resolve().parent.parent / "docs" / "performance.md"

SUITES: dict[str, Callable[[], Sequence[Row]]] = {
    "sqlalchemy": bench_sqlalchemy.run,
    "asyncpg": bench_asyncpg.run,
    "redis": bench_redis.run,
    "aiohttp": bench_aiohttp.run,
    "psycopg_pool": bench_psycopg_pool.run,
    "httpx": bench_httpx.run,
    "aio-pika": bench_aio_pika.run,
    "nats": bench_nats.run,
    "shutdown": bench_shutdown.run,
    "instructions": instructions.run,  # last: several minutes of valgrind, with nothing else timed meanwhile
}


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="poolkeeper's performance suite against real PostgreSQL, Redis and aiohttp servers.",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=list(SUITES),
        metavar="SUITE",
        help=f"run only this suite (repeatable): {', '.join(SUITES)}",
    )
    parser.add_argument(
        "--report",
        type=Path,
        help=f"write the Markdown report here (default when every suite runs: {DEFAULT_REPORT})",
    )
    parser.add_argument("--no-report", action="store_true", help="write no Markdown report")
    parser.add_argument("--json", type=Path, help="also write every figure and the machine facts as JSON")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    report = None if args.no_report else args.report or (None if args.only else DEFAULT_REPORT)
    # Forced closes are what these benchmarks do on purpose: their warnings are not news here.
    logging.getLogger("poolkeeper").setLevel(logging.ERROR)

    machine = Machine()
    started = time.perf_counter()
    print(f"poolkeeper benchmarks: {', '.join(args.only or SUITES)}", flush=True)
    print(console_header(), flush=True)
    rows: list[Row] = []
    for name in args.only or SUITES:
        for row in SUITES[name]():
            print(console_line(row), flush=True)
            rows.append(row)
    machine.finish(time.perf_counter() - started)

    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(markdown(rows, machine), encoding="utf-8")
        print(f"report written to {report}")
    if args.json is not None:
        data = {
            "machine": dict(machine.facts()),
            "rows": [{"type": type(row).__name__, **dataclasses.asdict(row)} for row in rows],
        }
        args.json.write_text(json.dumps(data, indent=2), encoding="utf-8")
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
