"""What the benchmarks ran on: the machine, the interpreter, the libraries and the servers."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import timeit
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import psycopg
import redis

from benchmarks.bench_shutdown import PG_URL, REDIS_URL

LIBRARIES = ("poolkeeper", "SQLAlchemy", "psycopg", "asyncpg", "redis", "hiredis", "aiohttp", "httpx", "httpcore")


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or "unknown"


def _memory() -> str:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    return "unknown"


def _load() -> str:
    try:
        return " / ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "unknown"


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _postgres() -> str:
    try:
        with psycopg.connect(PG_URL, autocommit=True, connect_timeout=5) as connection:
            version = connection.execute("show server_version").fetchone()
            limit = connection.execute("show max_connections").fetchone()
    except psycopg.Error as error:
        return f"unreachable ({type(error).__name__})"
    assert version is not None
    assert limit is not None
    return f"{version[0]}, max_connections {limit[0]}"


def _redis() -> str:
    try:
        with redis.Redis.from_url(REDIS_URL, socket_connect_timeout=5) as client:
            info = client.info("server")
    except redis.RedisError as error:
        return f"unreachable ({type(error).__name__})"
    return f"{info['redis_version']}"


def _server_address(url: str) -> str:
    """``host:port`` of a server URL: never its credentials."""
    host_port = url.split("://", 1)[-1].rsplit("@", 1)[-1]
    return host_port.split("/", 1)[0].split("?", 1)[0]


def _speed() -> str:
    """A fixed pure-Python loop, best of 5: how fast this interpreter ran at that moment.

    Absolute times on this page scale with it (a busy or throttled host runs it slower), so two
    runs of the report can be compared by it; the ratios against the raw libraries do not need it.
    """
    loops = 2000
    best = min(timeit.repeat("sum(range(1000))", number=loops, repeat=5))
    return f"sum(range(1000)) in {best / loops * 1e6:.1f} us"


@dataclass
class Machine:
    """The facts printed at the top of the report."""

    started: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))
    load_at_start: str = field(default_factory=_load)
    speed_at_start: str = field(default_factory=_speed)
    load_at_end: str = ""
    speed_at_end: str = ""
    seconds: float = 0.0

    def facts(self) -> list[tuple[str, str]]:
        """(label, value) rows: CPU, memory, OS, Python, library and server versions, load."""
        cpus = os.cpu_count() or 0
        rows = [
            ("date", self.started.strftime("%Y-%m-%d %H:%M UTC")),
            ("CPU", f"{_cpu_model()}, {cpus} logical CPU{'s' if cpus != 1 else ''}"),
            ("memory", _memory()),
            ("OS", f"{platform.system()} {platform.release()} ({platform.machine()})"),
            ("Python", f"{platform.python_implementation()} {platform.python_version()}"),
        ]
        rows.extend((name, version) for name in LIBRARIES if (version := _version(name)) is not None)
        rows.append(("PostgreSQL", f"{_postgres()} at {_server_address(PG_URL)}"))
        rows.append(("Redis", f"{_redis()} at {_server_address(REDIS_URL)}"))
        rows.append(("load average (1/5/15 min)", f"{self.load_at_start} at the start, {self.load_at_end} at the end"))
        rows.append(("interpreter speed", f"{self.speed_at_start} at the start, {self.speed_at_end} at the end"))
        rows.append(("run time", f"{self.seconds:.0f} s"))
        return rows

    def finish(self, seconds: float) -> None:
        """Note the end of the run."""
        self.load_at_end = _load()
        self.speed_at_end = _speed()
        self.seconds = seconds
