"""Run every benchmark and print ratios against the raw libraries, measured in the same process."""

from __future__ import annotations

import platform
import sys

from benchmarks import bench_aiohttp, bench_redis, bench_sqlalchemy


def main() -> int:
    print(f"poolkeeper benchmarks on Python {platform.python_version()}, {platform.machine()}, {sys.platform}")
    print(f"{'measure':<44} {'raw':>12} {'poolkeeper':>12} {'ratio':>8}")
    for suite in (bench_sqlalchemy, bench_redis, bench_aiohttp):
        for row in suite.run():
            print(row, flush=True)
    return 0


raise SystemExit(main())
