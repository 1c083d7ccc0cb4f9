"""``nox -s peer``: run part of each wrapped library's own test suite twice, plain and wrapped, and compare.

For each library (asyncpg, redis-py, SQLAlchemy, aiohttp) this downloads the sdist of the *installed*
version, unpacks it, and runs the chosen tests twice with the same arguments: once as the library
ships them, once with ``-p poolkeeper_peer_wrap`` (every pool and client the tests build is wrapped by
poolkeeper). The files of the tests whose outcome differs are run again in both modes; a difference
that holds on the rerun fails the session and is printed with the wrapped run's error. Tests that cannot run
on this machine (no managed cluster, no TLS server...) fail or skip in both runs, which is no
difference; the few that are unsafe on a shared server or flaky by themselves are deselected below,
each with its reason.

Usage: ``python tests/peer/compare.py [--cache DIR] [LIBRARY ...]``; exit status 1 when any library differs.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/9"  # the project's test default (tests/conftest.py)
TEST_TIMEOUT = 60  # seconds; a test hung longer fails (pytest-timeout), as it would unwrapped
MAX_ABORTS = 5  # a run that dies in a test is resumed after it, this many times at most
POSTGRES_ENV = {"PGHOST": "127.0.0.1", "PGPORT": "5432", "PGUSER": "postgres", "PGDATABASE": "postgres"}


@dataclasses.dataclass(frozen=True)
class Library:
    """One library's subset of its own suite, and how to run it against the installed version."""

    dist: str
    """Distribution name, as ``pip download`` and ``importlib.metadata`` know it."""
    tests: tuple[str, ...]
    """Test files, relative to the sdist root."""
    source: str | None
    """The sdist's copy of the package, removed so the tests import the installed (compiled) one."""
    options: tuple[str, ...] = ()
    deselect: tuple[tuple[str, str], ...] = ()
    """(test id prefix, reason): tests left out of both runs."""
    python_flags: tuple[str, ...] = ()
    test_dir: str = "tests"
    """Where the suite's tests live; ``supplements/<dist>_contract.py`` goes there as ``test_peer_contract.py``."""


def _libraries(redis_url: str) -> dict[str, Library]:
    return {
        "asyncpg": Library(
            dist="asyncpg",
            # The pool tests, and the adversity tests (pools behind a slow/fuzzing proxy). The suite
            # uses the running server when PGHOST is set (asyncpg/_testbase: RunningCluster) and skips
            # what needs a cluster of its own (standby, HBA edits, recovery mode).
            tests=("tests/test_pool.py", "tests/test_adversity.py", "tests/test_peer_contract.py"),
            source="asyncpg",
        ),
        "redis": Library(
            dist="redis",
            tests=(
                "tests/test_connection_pool.py",
                "tests/test_connection.py",
                "tests/test_pubsub.py",
                "tests/test_pipeline.py",
                "tests/test_asyncio/test_connection_pool.py",
                "tests/test_asyncio/test_connection.py",
                "tests/test_asyncio/test_pubsub.py",
                "tests/test_asyncio/test_pipeline.py",
            ),
            source="redis",
            options=(f"--redis-url={redis_url}", "-p", "no:cacheprovider"),
            deselect=(
                (
                    "tests/test_asyncio/test_connection_pool.py::TestMultiConnectionClient",
                    "its fixture runs FLUSHALL, which empties every database of the shared server",
                ),
                (
                    "tests/test_asyncio/test_connection_pool.py::TestHealthCheck",
                    "its fixture runs FLUSHALL, which empties every database of the shared server",
                ),
            ),
        ),
        "sqlalchemy": Library(
            dist="SQLAlchemy",
            # SQLite (the suite's default database): the pool, reconnect, execute and transaction tests.
            tests=(
                "test/engine/test_pool.py",
                "test/engine/test_reconnect.py",
                "test/engine/test_execute.py",
                "test/engine/test_transaction.py",
            ),
            # lib/ stays: test/conftest.py reads the testing plugin's bootstrap from it; python -s stops
            # the conftest from putting lib/ first on sys.path, so the installed SQLAlchemy is tested.
            source=None,
            python_flags=("-s",),
        ),
        "aiohttp": Library(
            dist="aiohttp",
            tests=("tests/test_client_session.py", "tests/test_client_functional.py"),
            source="aiohttp",
            # pytest.ini's addopts turn on xdist, coverage and doctests of the source tree: keep only
            # its marker selection. aiohttp's own plugin runs the async tests, not pytest-asyncio.
            options=(
                "-o",
                "addopts=",
                "--strict-markers",
                "-m",
                "not dev_mode and not autobahn and not internal",
                "-p",
                "no:asyncio",
            ),
        ),
    }


@dataclasses.dataclass
class Outcome:
    """A test's outcome in one run, and the end of its error when it failed."""

    outcome: str
    detail: str
    seconds: float = 0.0


def _sdist(dist: str, version: str, cache: Path) -> Path:
    """The unpacked sdist of ``dist==version``, downloaded once into ``cache``."""
    unpacked = cache / f"{dist.lower()}-{version}"
    if unpacked.is_dir():
        return unpacked
    downloads = cache / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps"]
    subprocess.run([*pip, "--dest", str(downloads), f"{dist}=={version}"], check=True)
    archive = next(p for p in downloads.glob("*.tar.gz") if p.name.lower().startswith(f"{dist.lower()}-{version}"))
    with tempfile.TemporaryDirectory(dir=cache) as tmp, tarfile.open(archive) as tar:
        tar.extractall(tmp, filter="data")
        (root,) = Path(tmp).iterdir()
        root.rename(unpacked)
    return unpacked


def _prepare(library: Library, version: str, cache: Path) -> Path:
    """A fresh copy of the sdist to run in, without the package source it would otherwise import."""
    work = cache / "runs" / f"{library.dist.lower()}-{version}"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(_sdist(library.dist, version, cache), work)
    if library.source is not None:
        shutil.rmtree(work / library.source)
    # Our own tests of documented behaviour the library's suite does not assert, in its own style. Named
    # without test_ here so that poolkeeper's own test run does not collect them.
    supplement = HERE / "supplements" / f"{library.dist.lower()}_contract.py"
    if supplement.exists():
        shutil.copy(supplement, work / library.test_dir / "test_peer_contract.py")
    return work


def _run(
    library: Library, work: Path, *, wrapped: bool, selection: list[str], log: Path, redis_db: int
) -> dict[str, Outcome]:
    """Run ``selection`` in one mode; a run that dies in a test is resumed after it, that test marked aborted."""
    env = {
        **os.environ,
        **POSTGRES_ENV,
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "POOLKEEPER_PEER_REDIS_DB": str(redis_db),
    }
    command = [sys.executable, *library.python_flags, "-m", "pytest", "-p", "no:poolkeeper", "-p", "no:randomly"]
    command += ["-p", "poolkeeper_peer_results", f"--timeout={TEST_TIMEOUT}", "--durations=10", *library.options]
    if wrapped:
        command += ["-p", "poolkeeper_peer_wrap"]
    command += [f"--deselect={test_id}" for test_id, _ in library.deselect]
    outcomes: dict[str, Outcome] = {}
    for attempt in range(MAX_ABORTS + 1):
        attempt_log = log if attempt == 0 else log.with_name(f"{log.stem}-resumed{attempt}{log.suffix}")
        results = attempt_log.with_suffix(".jsonl")
        done = [f"--deselect={test_id}" for test_id in outcomes]
        with attempt_log.open("w", encoding="utf-8") as out:
            subprocess.run(
                [*command, *done, *selection],
                cwd=work,
                env={**env, "POOLKEEPER_PEER_RESULTS": str(results)},
                stdout=out,
                stderr=subprocess.STDOUT,
                check=False,
            )
        running, complete = _read_results(results, outcomes)
        if complete:
            return outcomes
        if running is None:
            sys.exit(f"pytest ran no test of {library.dist} ({'wrapped' if wrapped else 'plain'}); see {attempt_log}")
        outcomes[running] = Outcome("aborted", f"the test run died in this test; see {attempt_log}")
    return outcomes


def _read_results(path: Path, outcomes: dict[str, Outcome]) -> tuple[str | None, bool]:
    """Add the outcomes recorded in ``path``; return the test still running when it ends, and if it completed."""
    running: str | None = None
    if not path.exists():
        return None, False
    for line in path.read_text(encoding="utf-8").splitlines():
        event = json.loads(line)
        if "start" in event:
            running = event["start"]
        elif "id" in event:
            test_id = event.pop("id")
            outcomes[test_id] = Outcome(**event)
            running = None
        elif event.get("complete"):
            return None, True
    return running, False


def _differences(plain: dict[str, Outcome], wrapped: dict[str, Outcome]) -> list[str]:
    missing = Outcome("not run", "")
    return sorted(
        t for t in plain.keys() | wrapped.keys() if plain.get(t, missing).outcome != wrapped.get(t, missing).outcome
    )


def _compare(name: str, library: Library, cache: Path, redis_db: int) -> bool:
    """Run one library plain and wrapped; print and return whether they agree."""
    version = importlib.metadata.version(library.dist)
    started = time.monotonic()
    work = _prepare(library, version, cache)
    logs = cache / "logs"
    logs.mkdir(exist_ok=True)
    stem = f"{name}-{version}"
    runs: dict[str, dict[str, Outcome]] = {}
    for wrapped in (False, True):
        mode = "wrapped" if wrapped else "plain"
        runs[mode] = _run(
            library,
            work,
            wrapped=wrapped,
            selection=list(library.tests),
            log=logs / f"{stem}-{mode}.log",
            redis_db=redis_db,
        )
    differing = _differences(runs["plain"], runs["wrapped"])
    confirmed: list[str] = []
    flaky: list[str] = []
    if differing:
        # A difference counts only if it shows again when its test files run again in both modes: that
        # rules out timing flakes under load, and keeps the order within a file, since a wrapped test
        # that breaks can leave state behind that makes later tests of its file fail.
        files = sorted({test_id.split("::", 1)[0] for test_id in differing})
        again = {
            mode: _run(
                library,
                work,
                wrapped=mode == "wrapped",
                selection=files,
                log=logs / f"{stem}-{mode}-rerun.log",
                redis_db=redis_db,
            )
            for mode in ("plain", "wrapped")
        }
        still = set(_differences(again["plain"], again["wrapped"]))
        for test_id in differing:
            (confirmed if test_id in still else flaky).append(test_id)
    elapsed = time.monotonic() - started
    counts = {mode: len(outcomes) for mode, outcomes in runs.items()}
    passed = sum(o.outcome == "passed" for o in runs["plain"].values())
    print(
        f"\n== {name} {version}: {counts['plain']} tests ({passed} pass unwrapped), "
        f"{len(confirmed)} differ, {len(flaky)} flaky; {elapsed:.0f}s (logs: {logs})"
    )
    missing = Outcome("not run", "")
    for test_id in confirmed:
        before, after = runs["plain"].get(test_id, missing), runs["wrapped"].get(test_id, missing)
        print(f"DIFFERS {test_id}: {before.outcome} unwrapped, {after.outcome} wrapped")
        detail = after.detail or before.detail
        if detail:
            print("    " + detail.replace("\n", "\n    "))
    for test_id in flaky:
        print(f"flaky (differed once, agreed when rerun; not counted): {test_id}")
    return not confirmed


def main() -> int:
    """Compare every library named on the command line (all four by default)."""
    redis_url = os.environ.get("POOLKEEPER_REDIS_URL", DEFAULT_REDIS_URL)
    redis_db = int(urlsplit(redis_url).path.strip("/") or 0)
    libraries = _libraries(redis_url)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("libraries", nargs="*", metavar="LIBRARY", help=f"any of {', '.join(libraries)} (default: all)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "poolkeeper-peer")
    args = parser.parse_args()
    unknown = [name for name in args.libraries if name not in libraries]
    if unknown:
        parser.error(f"unknown library {', '.join(unknown)}; choose from {', '.join(libraries)}")
    if redis_db == 0 and (not args.libraries or "redis" in args.libraries):
        parser.error("POOLKEEPER_REDIS_URL names Redis database 0; the redis suite flushes its database")
    args.cache.mkdir(parents=True, exist_ok=True)
    agree = [_compare(name, libraries[name], args.cache.resolve(), redis_db) for name in args.libraries or libraries]
    return 0 if all(agree) else 1


if __name__ == "__main__":
    sys.exit(main())
