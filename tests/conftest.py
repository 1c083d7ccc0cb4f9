"""Shared fixtures: the real PostgreSQL server, unique application names, engines that clean up."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_asyncio
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from poolkeeper import PoolClosedError
from poolkeeper._borrowers import record_callers

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
# Database 9: the suite never touches database 0, and never flushes anything it did not create.
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/9"
# MariaDB (or MySQL): root with an empty password, as on the loopback server of a developer's machine.
DEFAULT_MYSQL_URL = "mysql://root@127.0.0.1:3306/test"

# The servers come from poolkeeper's own pytest plugin (poolkeeper_postgres_url and
# poolkeeper_redis_url), which reads these variables. CI sets them and passes
# --poolkeeper-require-services; a developer's run uses the loopback servers by default. With a
# server named here, the plugin fails (never skips) the tests that need it when it is down.
os.environ.setdefault("POOLKEEPER_POSTGRES_URL", DEFAULT_POSTGRES_URL)
os.environ.setdefault("POOLKEEPER_REDIS_URL", DEFAULT_REDIS_URL)
os.environ.setdefault("POOLKEEPER_MYSQL_URL", DEFAULT_MYSQL_URL)

# A job started in the background by a non-interactive shell, or by some CI runners, inherits
# SIGINT ignored, and so would every program the signal tests start (an ignored signal stays
# ignored across exec; poolkeeper rightly leaves it alone). A Python handler here becomes the
# default action in those children, as in a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@contextlib.contextmanager
def callers_at_checkout(*, on: bool) -> Iterator[None]:
    """Tracked checkouts record their callers (as under the pytest plugin) or not (as in production), then as before."""
    was = record_callers(on=on)
    try:
        yield
    finally:
        record_callers(on=was)


def open_descriptors() -> set[int]:
    """The file descriptors this process has open now."""
    return {int(path.name) for path in Path("/proc/self/fd").iterdir()}


@contextlib.contextmanager
def descriptors_left(count: int) -> Iterator[None]:
    """Within the block, the process can open only ``count`` more file descriptors (its soft ``RLIMIT_NOFILE``).

    The lowest free descriptor numbers are the ones handed out, so the limit is set where the
    ``count``-th of them ends.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    open_now = open_descriptors()
    free = [number for number in range(max(open_now) + count + 2) if number not in open_now]
    resource.setrlimit(resource.RLIMIT_NOFILE, (free[count - 1] + 1, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def postgres_url() -> str:
    """The server the suite talks to: ``POOLKEEPER_POSTGRES_URL`` or the loopback default."""
    return os.environ.get("POOLKEEPER_POSTGRES_URL", DEFAULT_POSTGRES_URL)


@pytest.fixture(scope="session")
def pg_url(poolkeeper_postgres_url: str) -> str:
    """A libpq URL of a throwaway database of this session's own on the PostgreSQL server."""
    return poolkeeper_postgres_url


def sqlalchemy_url(url: str, driver: str, password: str | None = None) -> sa.URL:
    """``url`` for SQLAlchemy with the given driver (and a password, for the redaction tests)."""
    parsed = sa.make_url(url).set(drivername=f"postgresql+{driver}")
    if password is not None:
        parsed = parsed.set(password=password)
    return parsed


@pytest.fixture(scope="session")
def redis_url(poolkeeper_redis_url: str) -> str:
    """A URL of the Redis server naming a database of this session's own (never database 0)."""
    return poolkeeper_redis_url


@pytest.fixture(scope="session")
def mysql_url(poolkeeper_mysql_url: str) -> str:
    """A ``mysql://`` URL of a throwaway database of this session's own on the MariaDB server."""
    return poolkeeper_mysql_url


class Server:
    """A side connection to PostgreSQL that looks at what the backends of one test are doing."""

    def __init__(self, url: str, application_name: str) -> None:
        self.application_name = application_name
        self._connection = psycopg.connect(url, autocommit=True)

    def backends(self) -> list[tuple[int, str, str]]:
        """(pid, state, query) of every backend this test opened."""
        rows = self._connection.execute(
            "select pid, coalesce(state, ''), query from pg_stat_activity where application_name = %s",
            (self.application_name,),
        ).fetchall()
        return [(int(pid), str(state), str(query)) for pid, state, query in rows]

    def running(self, fragment: str) -> list[int]:
        """Pids of this test's backends actively running a query that contains ``fragment``."""
        return [pid for pid, state, query in self.backends() if state == "active" and fragment in query]

    def sleeping(self) -> list[int]:
        """Pids of this test's backends inside ``pg_sleep()``, not merely parsing a query that calls it.

        A Parse message already shows the query as ``active``, and a borrower whose statement is
        only prepared has not yet sent it: terminated then, asyncpg fails it with an
        ``AttributeError`` of its own instead of ``ConnectionDoesNotExistError``.
        """
        rows = self._connection.execute(
            "select pid from pg_stat_activity where application_name = %s and wait_event = 'PgSleep'",
            (self.application_name,),
        ).fetchall()
        return [int(pid) for (pid,) in rows]

    def settle(self, predicate: Callable[[], bool], timeout: float = 2.0) -> bool:
        """Re-check server state until ``predicate`` holds or ``timeout`` passes.

        The server offers no event for "a backend has exited", so this polls; the bound is a
        ceiling for the server's own bookkeeping, never a wait for poolkeeper to act.
        """
        end = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > end:
                return False
            time.sleep(0.01)
        return True

    def terminate_all(self) -> None:
        self._connection.execute(
            "select pg_terminate_backend(pid) from pg_stat_activity where application_name = %s",
            (self.application_name,),
        )

    def close(self) -> None:
        self._connection.close()


@pytest.fixture
def application_name() -> str:
    """A name unique to this test, set on every connection it opens."""
    return f"pk-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def server(pg_url: str, application_name: str) -> Iterator[Server]:
    """The side connection for this test; kills leftover backends at teardown."""
    side = Server(pg_url, application_name)
    yield side
    side.terminate_all()
    side.close()


@pytest.fixture
def make_engine(pg_url: str, application_name: str) -> Iterator[Callable[..., sa.Engine]]:
    """Build sync engines on the test server tagged with this test's application name."""
    engines: list[sa.Engine] = []

    def make(driver: str = "psycopg", password: str | None = None, **options: Any) -> sa.Engine:
        engine = sa.create_engine(
            sqlalchemy_url(pg_url, driver, password),
            connect_args={"application_name": application_name},
            **options,
        )
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        with contextlib.suppress(Exception):
            engine.dispose()


@pytest_asyncio.fixture
async def async_engine(pg_url: str, application_name: str) -> AsyncIterator[AsyncEngine]:
    """An AsyncEngine (asyncpg driver) on the test server tagged with this test's application name."""
    engine = create_async_engine(
        sqlalchemy_url(pg_url, "asyncpg"), connect_args={"server_settings": {"application_name": application_name}}
    )
    yield engine
    with contextlib.suppress(PoolClosedError):
        await engine.dispose()


# -- message brokers (issue 16): RabbitMQ for the aio-pika keeper ------------------------------------

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
os.environ.setdefault("POOLKEEPER_AMQP_URL", DEFAULT_AMQP_URL)


def _answers(url: str, default_port: int) -> str | None:
    """Why nothing answers at ``url``'s host and port, or None if something does."""
    import socket  # noqa: PLC0415 -- only the broker fixtures need it
    import urllib.parse  # noqa: PLC0415

    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or default_port
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as error:
        return f"nothing answers at {host}:{port} ({error})"
    return None


@pytest.fixture(scope="session")
def amqp_url(request: pytest.FixtureRequest) -> str:
    """The RabbitMQ broker (``POOLKEEPER_AMQP_URL``); fails under ``--poolkeeper-require-services`` when down."""
    from poolkeeper.pytest_plugin import _unavailable  # noqa: PLC0415 -- the plugin's own skip-or-fail rule

    url = os.environ["POOLKEEPER_AMQP_URL"]
    problem = _answers(url, 5672)
    if problem is not None:
        _unavailable(request.config, f"RabbitMQ (POOLKEEPER_AMQP_URL) is not available: {problem}")
    return url


DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
os.environ.setdefault("POOLKEEPER_NATS_URL", DEFAULT_NATS_URL)


@pytest.fixture(scope="session")
def nats_url(request: pytest.FixtureRequest) -> str:
    """NATS with JetStream (``POOLKEEPER_NATS_URL``); fails when down under ``--poolkeeper-require-services``."""
    from poolkeeper.pytest_plugin import _unavailable  # noqa: PLC0415 -- the plugin's own skip-or-fail rule

    url = os.environ["POOLKEEPER_NATS_URL"]
    problem = _answers(url, 4222)
    if problem is not None:
        _unavailable(request.config, f"NATS (POOLKEEPER_NATS_URL) is not available: {problem}")
    return url
