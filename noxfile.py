"""Project automation: tests, lint, typecheck and benchmarks (``nox -l`` lists them)."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "tests", "docs", "compat(floor)", "compat(latest)"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite against the real PostgreSQL and Redis (see README for the URLs)."""
    session.install("-e", ".[all,dev]")
    # The servers must answer: a missing one fails the run instead of skipping its tests.
    session.run("pytest", "--poolkeeper-require-services", *session.posargs)


# The version matrix (docs/compatibility.md). Each set pins every library an adapter or the
# FastAPI integration builds on; "floor" is exactly the lower bounds of pyproject.toml's extras,
# "previous" the newest release of each library's previous minor line, and "latest" upgrades
# every one of them to its newest release, unpinned, so that it tracks new releases.
COMPAT_LIBRARIES = (
    "sqlalchemy",
    "greenlet",
    "asyncpg",
    "redis",
    "aiohttp",
    "httpx",
    "httpcore",
    "psycopg",
    "psycopg-pool",
    "fastapi",
    "starlette",
    "uvicorn",
    "pymysql",
    "mysqlclient",
    "aiomysql",
    "asyncmy",
    "aio-pika",
    "aiormq",
    "nats-py",
)
COMPAT_SETS: dict[str, tuple[str, ...]] = {
    "floor": (
        "sqlalchemy==2.0.30",
        "greenlet==3.0.0",
        "asyncpg==0.29.0",
        "redis==5.0.8",
        "aiohttp==3.9.5",
        "psycopg[binary]==3.1.20",
        "psycopg-pool==3.2.0",
        "fastapi==0.110.0",
        "starlette==0.36.3",
        "uvicorn==0.29.0",
        "httpx==0.27.2",  # Starlette 0.36's TestClient passes app= to httpx.Client, gone in httpx 0.28
        "pymysql==1.1.0",
        "mysqlclient==2.2.0",
        "aiomysql==0.2.0",
        "asyncmy==0.2.9",
        "httpcore==1.0.5",
        "aio-pika==9.4.0",  # its aiormq (6.8.x) comes with it
        "nats-py==2.7.0",
    ),
    "previous": (
        "sqlalchemy==2.0.58",
        "greenlet==3.4.0",
        "asyncpg==0.30.0",
        "redis==6.4.0",
        "aiohttp==3.12.15",
        "httpx==0.27.2",
        "psycopg[binary]==3.2.13",
        "psycopg-pool==3.2.8",
        "fastapi==0.164.0",
        "starlette==1.9.0",
        "uvicorn==0.53.0",
        "pymysql==1.1.3",
        "mysqlclient==2.2.8",
        "aiomysql==0.2.0",  # aiomysql's previous minor line (0.2) has one release
        "asyncmy==0.2.17",  # asyncmy has one minor line (0.2): the release before the newest
        "aio-pika==10.1.2",
        "nats-py==2.15.0",
    ),
    "latest": (),
}
# The tests that depend on those libraries' versions: adapters, orchestration, FastAPI and the
# pytest plugin. Left out: what no library version changes (bad input, imports, docs, the
# README, properties, signals, exit codes, metrics exporters, Kubernetes) and the slow
# process-level suites (end_to_end, the other faults_*), which the "tests" session runs.
COMPAT_TESTS = (
    "tests/test_sqlalchemy_sync.py",
    "tests/test_sqlalchemy_async.py",
    "tests/test_sqlalchemy_mysql.py",
    "tests/test_asyncpg_keeper.py",
    "tests/test_redis_keeper.py",
    "tests/test_redis_asyncio_keeper.py",
    "tests/test_aiohttp_keeper.py",
    "tests/test_psycopg_pool_keeper.py",
    "tests/test_httpx_keeper.py",
    "tests/test_compat.py",
    "tests/test_registration.py",
    "tests/contract",  # the shared behaviour suite: every adapter, same tests
    "tests/test_shutdown_order.py",
    "tests/test_cancellation.py",
    "tests/test_faults_blackhole.py",  # never hang on a silent server, at every driver version (psycopg 3.1's cancel)
    "tests/test_report.py",
    "tests/test_secrets.py",
    "tests/test_run.py",
    "tests/test_hooks.py",
    "tests/test_fastapi.py",
    "tests/test_pytest_plugin.py",
    "tests/test_aio_pika_keeper.py",
    "tests/test_consumer_shutdown.py",
    "tests/test_nats_keeper.py",
)

_PRINT_VERSIONS = """
import importlib.metadata
for name in {names!r}:
    try:
        print(name, importlib.metadata.version(name))
    except importlib.metadata.PackageNotFoundError:
        print(name, "(not installed)")
"""


@nox.session
@nox.parametrize("libraries", list(COMPAT_SETS.values()), ids=list(COMPAT_SETS))
def compat(session: nox.Session, libraries: tuple[str, ...]) -> None:
    """The version-dependent tests against one set of library versions (``nox -s "compat(floor)"``)."""
    session.install("-e", ".[all,dev]")
    if libraries:  # installed after poolkeeper's own requirements, so that the pins win
        session.install(*libraries)
    else:
        session.install("--upgrade", "--upgrade-strategy", "eager", *COMPAT_LIBRARIES, "httpx2")
    session.run("python", "-c", _PRINT_VERSIONS.format(names=(*COMPAT_LIBRARIES, "httpx", "httpx2")))
    # Test paths given after "--" replace COMPAT_TESTS; other arguments go to pytest as they are.
    paths = [arg for arg in session.posargs if arg.startswith("tests")]
    options = [arg for arg in session.posargs if arg not in paths]
    session.run("pytest", "--poolkeeper-require-services", *options, *(paths or COMPAT_TESTS))


@nox.session
def lint(session: nox.Session) -> None:
    """Ruff, lint and format check."""
    session.install("ruff>=0.5")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """Mypy --strict over the library, the integrations (examples), the tests and the benchmarks."""
    session.install("-e", ".[all,dev]", "nox")
    session.run("mypy")


@nox.session
def bench(session: nox.Session) -> None:
    """The performance suite; rewrites docs/performance.md from this one run (about 1.5 minutes)."""
    session.install("-e", ".[all,dev]")
    session.run("python", "-m", "benchmarks", *session.posargs)


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation site with ``mkdocs build --strict``: a broken link or reference fails it."""
    session.install("-e", ".[all,docs]")
    session.run("mkdocs", "build", "--strict", "--site-dir", f"{session.create_tmp()}/site", *session.posargs)


# What the libraries' own test suites import beyond pytest (see tests/peer/compare.py for the subsets).
PEER_TEST_DEPS = (
    "pytest>=8",
    "pytest-asyncio>=1.0",
    "pytest-timeout",
    "packaging",
    "pytest-mock",
    "freezegun",
    "trustme",
    "blockbuster",
    "proxy.py",
    "isal",
    "zlib-ng",
    "coverage",  # aiohttp's pytest.ini names a coverage warning class in its filters
)


@nox.session
def peer(session: nox.Session) -> None:
    """Run part of each wrapped library's own test suite, plain and with every pool wrapped; any difference fails.

    ``nox -s peer -- redis`` runs one library (asyncpg, redis, sqlalchemy, aiohttp); see docs/peer-tests.md.
    """
    session.install("-e", ".[all]", *PEER_TEST_DEPS)
    session.run(
        "python", "tests/peer/compare.py", "--cache", f"{session.virtualenv.location}/peer-sdists", *session.posargs
    )
