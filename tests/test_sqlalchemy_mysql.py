"""The SQLAlchemy keeper on MySQL/MariaDB: PyMySQL, mysqlclient, aiomysql and asyncmy, against the real MariaDB.

Each test records the server's id of every connection its engine opens (a pool ``connect``
listener reading the driver's ``thread_id()``), and looks at those sessions alone in
``information_schema.PROCESSLIST``, so that parallel runs never see each other's.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pymysql
import pytest
import pytest_asyncio
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from poolkeeper import KeeperState, PoolClosedError, Registry
from poolkeeper.adapters._abort import MAX_CANCEL_WAIT
from poolkeeper.adapters._mysql_cancel import MAX_KILL_WAIT, _connect_side
from tests.faults import BlackholeProxy, ThreadWatch, auntil, sockets_to

pytestmark = pytest.mark.asyncio

SYNC_DRIVERS = ["pymysql", "mysqldb"]
ASYNC_DRIVERS = ["aiomysql", "asyncmy"]
DRIVERS = SYNC_DRIVERS + ASYNC_DRIVERS

# A shutdown's deadline when the server is blackholed, and what aclose(deadline=D) may overrun it
# by on a loaded two-core machine (as in tests/test_faults_blackhole.py).
DEADLINE = 1.0
SLACK = 0.6


class MariaDB:
    """A side connection (PyMySQL) that watches the sessions one test opened, by their ids."""

    def __init__(self, url: str) -> None:
        parsed = sa.make_url(url)
        self.options: dict[str, Any] = {
            "host": parsed.host or "127.0.0.1",
            "port": parsed.port or 3306,
            "user": parsed.username or "root",
            "password": parsed.password or "",
            "database": parsed.database,
        }
        self.ids: set[int] = set()
        self._lock = threading.Lock()
        self._connection = pymysql.connect(**self.options, autocommit=True)

    def record(self, _dbapi_connection: Any, record: Any) -> None:
        """Pool ``connect`` listener: remember the id of every connection the engine under test opens."""
        self.ids.add(int(record.driver_connection.thread_id()))

    def _query(self, sql: str, arguments: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock, self._connection.cursor() as cursor:
            cursor.execute(sql, arguments or None)
            return list(cursor.fetchall())

    def sessions(self) -> list[tuple[int, str, str]]:
        """(id, command, statement) of every session of this test still on the server."""
        rows = self._query("select ID, COMMAND, coalesce(INFO, '') from information_schema.PROCESSLIST")
        return [(int(row[0]), str(row[1]), str(row[2])) for row in rows if int(row[0]) in self.ids]

    def sleeping(self) -> list[int]:
        """Ids of this test's sessions running ``SLEEP(``."""
        return [sid for sid, command, info in self.sessions() if command == "Query" and "sleep(" in info.lower()]

    def settle(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        """Re-check the server's view until ``predicate`` holds (no event exists for "the session ended")."""
        end = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > end:
                return False
            time.sleep(0.01)
        return True

    def kill_all(self) -> None:
        for sid, _, _ in self.sessions():
            with contextlib.suppress(pymysql.MySQLError):
                self._query(f"KILL {sid}")

    def close(self) -> None:
        self._connection.close()


@pytest.fixture
def mariadb(mysql_url: str) -> Iterator[MariaDB]:
    """The side view of this test's sessions; kills what is left at teardown."""
    side = MariaDB(mysql_url)
    yield side
    side.kill_all()
    side.close()


@dataclass
class Borrow:
    """One borrower (a thread or a task) holding a connection, and what it got."""

    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    failed_at: float | None = None

    def failed(self, error: BaseException) -> None:
        self.error, self.failed_at = error, time.monotonic()


class Client:
    """An engine of one driver, sync or async, used the same way by every test."""

    def __init__(self, engine: sa.Engine | AsyncEngine, driver: str) -> None:
        self.engine = engine
        self.driver = driver
        self.is_async = isinstance(engine, AsyncEngine)
        self.tasks: list[asyncio.Task[None]] = []

    async def run(self, sql: str = "select 1") -> Any:
        """Check a connection out, run ``sql``, give the connection back; the first value."""
        if isinstance(self.engine, AsyncEngine):
            async with self.engine.connect() as connection:
                return (await connection.execute(sa.text(sql))).scalar()
        engine = self.engine

        def run_sync() -> Any:
            with engine.connect() as connection:
                return connection.execute(sa.text(sql)).scalar()

        return await asyncio.to_thread(run_sync)

    def start(self, sql: str) -> Borrow:
        """A borrower running ``sql`` on a connection of its own, in a thread or a task."""
        borrow = Borrow()

        async def in_task() -> None:
            try:
                await self.run(sql)
            except BaseException as error:
                borrow.failed(error)
            finally:
                borrow.done.set()

        if self.is_async:
            self.tasks.append(asyncio.ensure_future(in_task()))
            return borrow
        engine = self.engine
        assert isinstance(engine, sa.Engine)

        def in_thread() -> None:
            try:
                with engine.connect() as connection:
                    connection.execute(sa.text(sql))
            except BaseException as error:
                borrow.failed(error)
            finally:
                borrow.done.set()

        threading.Thread(target=in_thread, daemon=True).start()
        return borrow

    async def dispose(self) -> None:
        for task in self.tasks:
            if not task.done():
                task.cancel()
        with contextlib.suppress(Exception):
            if isinstance(self.engine, AsyncEngine):
                await self.engine.dispose()
            else:
                self.engine.dispose()


@pytest_asyncio.fixture
async def make_client(mysql_url: str, mariadb: MariaDB) -> AsyncIterator[Callable[..., Client]]:
    """Build engines of a given driver on the test database, their connections recorded by ``mariadb``."""
    clients: list[Client] = []

    def make(driver: str, *, url: sa.URL | None = None, **options: Any) -> Client:
        target = (url or sa.make_url(mysql_url)).set(drivername=f"mysql+{driver}")
        engine: sa.Engine | AsyncEngine
        if driver in ASYNC_DRIVERS:
            engine = create_async_engine(target, **options)
            sa.event.listen(engine.sync_engine, "connect", mariadb.record)
        else:
            engine = sa.create_engine(target, **options)
            sa.event.listen(engine, "connect", mariadb.record)
        client = Client(engine, driver)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.dispose()


async def settled(mariadb: MariaDB, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    return await asyncio.to_thread(mariadb.settle, predicate, timeout)


# -- refusal, waking, draining -------------------------------------------------------------------


@pytest.mark.parametrize("driver", DRIVERS)
async def test_checkouts_are_refused_from_the_start_of_closing(driver, make_client, mariadb):
    """While one borrower drains, a new checkout raises PoolClosedError at once; after close it still does."""
    client = make_client(driver)
    registry = Registry(drain_timeout=30, close_timeout=10)
    registry.wrap(client.engine, name="db")
    assert await client.run("select 1") == 1
    borrower = client.start("select sleep(0.5)")
    assert await settled(mariadb, lambda: len(mariadb.sleeping()) == 1)
    closing = asyncio.ensure_future(registry.aclose())
    await auntil(lambda: registry["db"].state is KeeperState.DRAINING)

    started = time.monotonic()
    with pytest.raises(PoolClosedError, match="db"):
        await client.run("select 1")
    assert time.monotonic() - started < 0.5
    report = await closing
    await auntil(borrower.done.is_set)

    assert (report["db"].outcome, report["db"].returned) == ("clean", 1)
    assert borrower.error is None
    with pytest.raises(PoolClosedError):
        await client.run("select 1")


@pytest.mark.parametrize("driver", DRIVERS)
async def test_checkouts_queued_for_a_connection_are_woken_with_the_refusal(driver, make_client, mariadb):
    """A checkout waiting in the full pool (pool_timeout 30 s) fails with PoolClosedError as soon as closing starts."""
    client = make_client(driver, pool_size=1, max_overflow=0, pool_timeout=30)
    registry = Registry(drain_timeout=30, close_timeout=10)
    registry.wrap(client.engine, name="db")
    holder = client.start("select sleep(60)")
    assert await settled(mariadb, lambda: len(mariadb.sleeping()) == 1)
    waiter = client.start("select 1")
    await asyncio.sleep(0.2)  # the waiter parks in the pool's queue; nothing signals that it has
    assert not waiter.done.is_set()

    started = time.monotonic()
    closing = asyncio.ensure_future(registry.aclose(deadline=5.0))
    await auntil(waiter.done.is_set, timeout=2.0)
    assert isinstance(waiter.error, PoolClosedError)
    assert waiter.failed_at is not None
    assert waiter.failed_at - started < 1.0
    registry.force_close()
    await closing
    await auntil(holder.done.is_set)


@pytest.mark.parametrize("driver", DRIVERS)
async def test_borrowers_that_finish_in_time_drain_cleanly_and_no_session_is_left(driver, make_client, mariadb):
    """Statements that end within drain_timeout finish normally; then every connection, idle ones too, is closed."""
    client = make_client(driver)
    registry = Registry(drain_timeout=10, close_timeout=10)
    registry.wrap(client.engine, name="db")
    borrowers = [client.start("select sleep(0.4)") for _ in range(3)]
    assert await settled(mariadb, lambda: len(mariadb.sleeping()) == 3)

    report = await registry.aclose()
    item = report["db"]

    assert (item.outcome, item.borrowed_at_start, item.returned, item.forced) == ("clean", 3, 3, 0)
    assert report.ok
    assert [borrower.error for borrower in borrowers] == [None, None, None]
    assert len(mariadb.ids) == 3
    assert await settled(mariadb, lambda: mariadb.sessions() == [])


# -- force-close ---------------------------------------------------------------------------------


@pytest.mark.parametrize("driver", DRIVERS)
async def test_force_close_stops_every_running_statement_and_leaves_no_session(driver, make_client, mariadb):
    """Four borrowers in SELECT SLEEP(60): at the drain deadline KILL QUERY stops them, and the processlist empties."""
    client = make_client(driver)
    registry = Registry(drain_timeout=0.3, close_timeout=10)
    registry.wrap(client.engine, name="db")
    borrowers = [client.start("select sleep(60)") for _ in range(4)]
    assert await settled(mariadb, lambda: len(mariadb.sleeping()) == 4)

    started = time.monotonic()
    report = await registry.aclose()
    closed_in = time.monotonic() - started
    for borrower in borrowers:
        await auntil(borrower.done.is_set, timeout=2.0)

    item = report["db"]
    assert (item.outcome, item.error, item.forced) == ("forced", None, 4), item.error
    assert closed_in < 0.3 + MAX_KILL_WAIT + SLACK
    assert all(borrower.error is not None for borrower in borrowers)
    # Promptly: stopped by its KILL QUERY, or at the latest by the cut after MAX_CANCEL_WAIT.
    assert max(borrower.failed_at or 0 for borrower in borrowers) - started < 0.3 + MAX_CANCEL_WAIT + SLACK
    # The server's own view: no statement runs on, no session of the engine is left.
    assert await settled(mariadb, lambda: mariadb.sessions() == [], timeout=2.0), mariadb.sessions()


@pytest.mark.parametrize("driver", DRIVERS)
async def test_connections_opened_before_wrap_are_stopped_too(driver, make_client, mariadb):
    """An idle connection the pool made before wrap() and later borrowed is still killed and cut."""
    client = make_client(driver)
    assert await client.run("select 1") == 1  # one idle connection in the pool, made before wrap()
    registry = Registry(drain_timeout=0.2, close_timeout=10)
    registry.wrap(client.engine, name="db")
    borrower = client.start("select sleep(60)")
    assert await settled(mariadb, lambda: len(mariadb.sleeping()) == 1)

    report = await registry.aclose()
    await auntil(borrower.done.is_set, timeout=2.0)

    assert (report["db"].outcome, report["db"].error, len(mariadb.ids)) == ("forced", None, 1), report["db"].error
    assert await settled(mariadb, lambda: mariadb.sessions() == [], timeout=2.0), mariadb.sessions()


# -- a blackholed server ---------------------------------------------------------------------------


@pytest.fixture
def proxy(mysql_url: str) -> Iterator[BlackholeProxy]:
    """A TCP proxy to the MariaDB server that the test can silence."""
    with BlackholeProxy("127.0.0.1", sa.make_url(mysql_url).port or 3306) as started:
        yield started


def not_ours(thread: threading.Thread) -> bool:
    """Threads that are not the client's: asyncio's default executor (asyncio.to_thread) keeps its workers."""
    return thread.name.startswith("asyncio_")


@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_blackholed_server_is_force_closed_within_the_deadline_and_the_cancel_reported_unconfirmed(
    driver, make_client, mariadb, proxy
):
    """No answer to KILL QUERY: the borrower fails in time, nothing stays open, the report says the query may run."""
    url = sa.make_url(mariadb_url_of(mariadb)).set(host=proxy.host, port=proxy.port)
    client = make_client(driver, url=url)
    registry = Registry(drain_timeout=30, close_timeout=10)
    registry.wrap(client.engine, name="db")
    borrower = client.start("select sleep(60)")
    assert await settled(mariadb, lambda: len(mariadb.sleeping()) == 1)
    watch = ThreadWatch()
    proxy.blackhole()

    started = time.monotonic()
    report = await registry.aclose(deadline=DEADLINE)
    elapsed = time.monotonic() - started
    await auntil(borrower.done.is_set, timeout=2.0)

    item = report["db"]
    assert (item.outcome, item.forced, report.ok) == ("failed", 1, False)
    assert "the server did not confirm the cancel of 1 of 1 running statement(s)" in (item.error or "")
    assert elapsed < DEADLINE + SLACK
    assert borrower.failed_at is not None
    assert borrower.failed_at - started < DEADLINE + SLACK
    assert len(mariadb.sleeping()) == 1  # the server's view: the statement indeed still runs
    # The side connection's thread (sync drivers) ends by its own timeouts, its socket closed.
    await asyncio.to_thread(watch.wait_all_ended, 3.0, ignore=not_ours)
    gc.collect()
    assert sockets_to(proxy.port) == 0


def mariadb_url_of(mariadb: MariaDB) -> str:
    options = mariadb.options
    return f"mysql://{options['user']}@{options['host']}:{options['port']}/{options['database']}"


# -- bad input, secrets, unwrap ------------------------------------------------------------------


@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_rejected_wrap_leaves_the_engine_unmanaged(driver, make_client):
    """Bad timeouts raise ValueError naming the argument; no keeper, no listener, the engine works as before."""
    client = make_client(driver)
    registry = Registry()
    sync_engine = getattr(client.engine, "sync_engine", client.engine)

    with pytest.raises(ValueError, match="drain_timeout"):
        registry.wrap(client.engine, name="db", drain_timeout=-1)

    assert list(registry.keepers) == []
    assert not sa.event.contains(sync_engine, "do_connect", _connect_side)
    assert await client.run("select 2") == 2


@pytest.mark.parametrize("driver", DRIVERS)
async def test_unwrap_removes_the_listeners(driver, make_client):
    """After unwrap() the engine carries none of poolkeeper's listeners, and closing the registry leaves it usable."""
    client = make_client(driver)
    registry = Registry()
    sync_engine = getattr(client.engine, "sync_engine", client.engine)
    registry.wrap(client.engine, name="db")
    assert sa.event.contains(sync_engine, "do_connect", _connect_side) is (driver in SYNC_DRIVERS)

    registry.unwrap("db")
    await registry.aclose()

    assert not sa.event.contains(sync_engine, "do_connect", _connect_side)
    assert await client.run("select 3") == 3


@pytest.fixture
def user_with_password(mariadb: MariaDB) -> Iterator[tuple[str, str]]:
    """A MariaDB user of this test's own with a password: the secret that must never be shown."""
    name, password = f"pk_{uuid.uuid4().hex[:10]}", f"hunter2-{uuid.uuid4().hex[:8]}"
    database = mariadb.options["database"]
    mariadb._query(f"CREATE USER '{name}'@'%' IDENTIFIED BY '{password}'")
    mariadb._query(f"GRANT ALL ON `{database}`.* TO '{name}'@'%'")
    yield name, password
    mariadb._query(f"DROP USER IF EXISTS '{name}'@'%'")


@pytest.mark.parametrize("blackholed", [False, True], ids=["reachable", "blackholed"])
@pytest.mark.parametrize("driver", DRIVERS)
async def test_the_password_never_reaches_the_report_or_the_logs(  # noqa: PLR0917 -- pytest passes fixtures by position
    driver, blackholed, make_client, mariadb, proxy, user_with_password, caplog
):
    """With a password in the URL, a forced close (confirmed or not) shows it nowhere: report, dict, logs."""
    name, password = user_with_password
    url = sa.make_url(mariadb_url_of(mariadb)).set(username=name, password=password)
    client = make_client(driver, url=url.set(host=proxy.host, port=proxy.port))
    registry = Registry(drain_timeout=0.2, close_timeout=10)
    registry.wrap(client.engine, name="db")
    borrower = client.start("select sleep(60)")
    assert await settled(mariadb, lambda: len(mariadb.sleeping()) == 1)
    if blackholed:
        proxy.blackhole()

    with caplog.at_level(logging.DEBUG):
        report = await registry.aclose(deadline=DEADLINE + 1)
    await auntil(borrower.done.is_set, timeout=2.0)

    assert report["db"].outcome == ("failed" if blackholed else "forced")
    shown = "\n".join([str(report), json.dumps(report.to_dict()), caplog.text, registry["db"].driver.describe()])
    assert name in (report["db"].target or "")  # the URL is there, its password masked
    assert password not in shown
