"""The pytest plugin: the per-test registry, the leak check and its controls, the service fixtures.

Each test writes a small test suite and runs it in a fresh pytest process (``pytester``), so the
default registry, the loaded modules and the environment of one run never leak into another.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
import pytest
import redis

pytest_plugins = ["pytester"]

INI = """
[pytest]
asyncio_default_fixture_loop_scope = function
"""

# Imports and engines every inner test file starts with; PK_TEST_PG_URL is this session's database.
PRELUDE = """
import os

import pytest
import sqlalchemy as sa

import poolkeeper

PG_URL = os.environ["PK_TEST_PG_URL"]
SYNC_URL = PG_URL.replace("postgresql://", "postgresql+psycopg://", 1)
ASYNC_URL = PG_URL.replace("postgresql://", "postgresql+asyncpg://", 1)
KEPT = []  # what a test keeps here is neither returned nor garbage collected: still borrowed at its end
"""


@pytest.fixture
def suite(pytester, pg_url, monkeypatch):
    """A pytester with the project-independent ini and this session's database in the environment."""
    pytester.makeini(INI)
    monkeypatch.setenv("PK_TEST_PG_URL", pg_url)
    return pytester


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    # The hypothesis plugin has no business here, and its import at the end of a run trips a
    # CPython 3.11.7 bug when a collected leaked connection's finalizer runs during compile().
    return pytester.runpytest_subprocess("-p", "no:hypothesispytest", "-p", "no:cacheprovider", *args, timeout=120)


def write(pytester: pytest.Pytester, name: str, body: str) -> Path:
    """Write ``tests/<name>.py`` with the prelude and return it."""
    return pytester.makepyfile(**{name: PRELUDE + body})


def line_of(path: Path, marker: str) -> int:
    """The number of the line of ``path`` that carries ``marker``."""
    return next(number for number, line in enumerate(path.read_text().splitlines(), 1) if marker in line)


# -- the leak check --------------------------------------------------------------------------------


def test_a_sync_test_that_leaves_a_connection_borrowed_fails_at_teardown_naming_the_line(suite):
    """The test itself passes, its teardown errors with the keeper, the time held and file:line of the borrow."""
    path = write(
        suite,
        "test_leak",
        """
def open_report_connection(engine):
    return engine.connect()  # BORROW


def test_leaks(poolkeeper_registry):
    engine = poolkeeper_registry.wrap(sa.create_engine(SYNC_URL), name="db")
    KEPT.append(open_report_connection(engine))  # CALLER
""",
    )
    result = run(suite)
    result.assert_outcomes(passed=1, errors=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    borrow, caller = line_of(path, "# BORROW"), line_of(path, "# CALLER")
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_leaks*",
            "poolkeeper: this test leaked 1 connection*",
            (
                "[[]1] keeper 'db' (sqlalchemy, poolkeeper_registry): "
                "still borrowed when the test ended, held for *s by thread MainThread"
            ),
            f"  borrowed at test_leak.py:{borrow} in open_report_connection",
            "  borrow-site stack (most recent call last):",
            f"    test_leak.py:{caller} in test_leaks",
            f"    test_leak.py:{borrow} in open_report_connection",
        ]
    )
    assert re.search(r"held for \d+\.\d{3}s", result.stdout.str())


def test_a_connection_only_the_garbage_collector_gave_back_counts_as_a_leak(suite):
    """A dropped Connection (a reference cycle) is collected by the check and reported as a GC return."""
    path = write(
        suite,
        "test_gc_leak",
        """
def test_drops_its_connection(poolkeeper_registry):
    engine = poolkeeper_registry.wrap(sa.create_engine(SYNC_URL), name="db")
    connection = engine.connect()  # BORROW
    connection.execute(sa.text("select 1"))
""",
    )
    result = run(suite)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            (
                "[[]1] keeper 'db' (sqlalchemy, poolkeeper_registry): "
                "given back only by the garbage collector, after *s, borrowed by thread MainThread"
            ),
            f"  borrowed at test_gc_leak.py:{line_of(path, '# BORROW')} in test_drops_its_connection",
        ]
    )


def test_clean_sync_and_async_tests_pass_and_their_registries_are_closed_cleanly(suite):
    """Tests that give every connection back pass; the fixture closes each registry, on the test's own loop.

    Each test's engine is local to it, so the collector may free it before the teardown: here it
    runs right then, and the teardown still closes and reports every engine.
    """
    suite.makeconftest(
        """
import gc

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item):
    gc.collect()  # before the fixtures' teardown: what the test dropped is freed if nothing holds it
"""
    )
    write(
        suite,
        "test_clean",
        """
import asyncio

import asyncpg
from sqlalchemy.ext.asyncio import create_async_engine

REGISTRIES = {}


def test_sync(poolkeeper_registry):
    engine = poolkeeper_registry.wrap(sa.create_engine(SYNC_URL), name="db")
    with engine.connect() as connection:
        assert connection.execute(sa.text("select 1")).scalar() == 1
    REGISTRIES["sync"] = poolkeeper_registry


@pytest.mark.asyncio
async def test_async_engine(poolkeeper_registry):
    engine = poolkeeper_registry.wrap(create_async_engine(ASYNC_URL), name="db")
    async with engine.connect() as connection:
        assert (await connection.execute(sa.text("select 1"))).scalar() == 1
    REGISTRIES["asyncio"] = poolkeeper_registry


@pytest.mark.asyncio(loop_scope="module")
async def test_async_engine_on_a_module_loop(poolkeeper_registry):
    engine = poolkeeper_registry.wrap(create_async_engine(ASYNC_URL), name="db")
    async with engine.connect() as connection:
        assert (await connection.execute(sa.text("select 1"))).scalar() == 1
    REGISTRIES["asyncio-module-loop"] = poolkeeper_registry


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_asyncpg_under_anyio(poolkeeper_registry):
    pool = poolkeeper_registry.wrap(await asyncpg.create_pool(PG_URL, min_size=1, max_size=2), name="pg")
    async with pool.acquire() as connection:
        assert await connection.fetchval("select 1") == 1
    REGISTRIES["anyio"] = poolkeeper_registry


@pytest.mark.asyncio
async def test_closes_its_registry_itself(poolkeeper_registry):
    engine = poolkeeper_registry.wrap(create_async_engine(ASYNC_URL), name="db")
    async with engine.connect() as connection:
        await connection.execute(sa.text("select 1"))
    assert (await poolkeeper_registry.aclose()).ok
    REGISTRIES["closed-by-the-test"] = poolkeeper_registry


def test_every_registry_was_closed_cleanly_at_teardown():
    assert sorted(REGISTRIES) == ["anyio", "asyncio", "asyncio-module-loop", "closed-by-the-test", "sync"]
    for registry in REGISTRIES.values():
        assert registry.closed
        assert [item.outcome for item in registry.report.items] == ["clean"]
""",
    )
    result = run(suite, "-W", "error::poolkeeper.pytest_plugin.PoolkeeperWarning")
    result.assert_outcomes(passed=6)
    assert "leaked" not in result.stdout.str()


def test_an_asyncpg_leak_in_an_async_test_fails_naming_the_line(suite):
    """An asyncpg connection acquired and never released in a pytest-asyncio test fails it at teardown."""
    path = write(
        suite,
        "test_asyncpg_leak",
        """
import asyncpg


@pytest.mark.asyncio
async def test_acquires_and_forgets(poolkeeper_registry):
    pool = poolkeeper_registry.wrap(await asyncpg.create_pool(PG_URL, min_size=1, max_size=2), name="pg")
    connection = await pool.acquire()  # BORROW
    assert await connection.fetchval("select 1") == 1
""",
    )
    result = run(suite)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            (
                "[[]1] keeper 'pg' (asyncpg, poolkeeper_registry): "
                "still borrowed when the test ended, held for *s by thread MainThread, task *"
            ),
            f"  borrowed at test_asyncpg_leak.py:{line_of(path, '# BORROW')} in test_acquires_and_forgets",
        ]
    )


def test_an_async_engine_leak_in_an_async_test_fails_naming_the_line(suite):
    """A SQLAlchemy AsyncEngine (asyncpg driver) connection kept past the test's end names its line."""
    path = write(
        suite,
        "test_async_engine_leak",
        """
from sqlalchemy.ext.asyncio import create_async_engine


@pytest.mark.asyncio
async def test_keeps_a_connection(poolkeeper_registry):
    engine = poolkeeper_registry.wrap(create_async_engine(ASYNC_URL), name="db")
    KEPT.append(await engine.connect())  # BORROW
""",
    )
    result = run(suite)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "[[]1] keeper 'db' (sqlalchemy, poolkeeper_registry): still borrowed when the test ended, held for *s*",
            f"  borrowed at test_async_engine_leak.py:{line_of(path, '# BORROW')} in test_keeps_a_connection",
        ]
    )


def test_a_leak_from_the_default_registry_is_caught_with_its_line(suite):
    """poolkeeper.wrap() keepers get borrower tracking from the plugin, so their leaks name the line too."""
    path = write(
        suite,
        "test_default_registry",
        """
def test_leaks_through_the_default_registry():
    engine = poolkeeper.wrap(sa.create_engine(SYNC_URL), name="app-db")
    KEPT.append(engine.connect())  # BORROW
""",
    )
    result = run(suite)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            (
                "[[]1] keeper 'app-db' (sqlalchemy, default registry): "
                "still borrowed when the test ended, held for *s by thread MainThread"
            ),
            (
                f"  borrowed at test_default_registry.py:{line_of(path, '# BORROW')} "
                "in test_leaks_through_the_default_registry"
            ),
        ]
    )


def test_an_untracked_keepers_leak_is_reported_without_a_stack_and_says_how_to_track(suite):
    """A keeper wrapped with track_borrowers=False still fails the test, and the message says how to get the line."""
    write(
        suite,
        "test_untracked",
        """
def test_leaks_untracked():
    engine = poolkeeper.wrap(sa.create_engine(SYNC_URL), name="untracked", track_borrowers=False)
    KEPT.append(engine.connect())
""",
    )
    result = run(suite)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "[[]1] keeper 'untracked' (sqlalchemy, default registry): still borrowed when the test ended, held for *s",
            "  borrow site not recorded: this keeper does not track borrowers. Wrap it with track_borrowers=True*",
        ]
    )


def test_a_leak_never_blames_the_tests_that_follow(suite):
    """After a leaking test, the next tests pass although the connection is still out (and later collected)."""
    write(
        suite,
        "test_order",
        """
import gc

ENGINE = poolkeeper.wrap(sa.create_engine(SYNC_URL), name="shared")


def test_first_leaks():
    KEPT.append(ENGINE.connect())
    connection = ENGINE.connect()
    connection.execute(sa.text("select 1"))
    KEPT.append(connection)


def test_second_drops_the_first_tests_connections_and_is_not_blamed():
    assert ENGINE.pool.checkedout() == 2
    KEPT.clear()
    gc.collect()
    assert ENGINE.pool.checkedout() == 0


def test_third_is_clean():
    with ENGINE.connect() as connection:
        connection.execute(sa.text("select 1"))
""",
    )
    result = run(suite)
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(
        ["*ERROR at teardown of test_first_leaks*", "poolkeeper: this test leaked 2 connections*"]
    )


def test_when_a_fixture_teardown_fails_its_error_is_kept_and_the_leaks_become_warnings(suite):
    """A teardown that already failed reports its own error; the test's leaks still show, as warnings."""
    path = write(
        suite,
        "test_broken_teardown",
        """
@pytest.fixture
def broken():
    yield
    raise RuntimeError("teardown broke")


def test_leaks_and_breaks(broken):
    KEPT.append(poolkeeper.wrap(sa.create_engine(SYNC_URL), name="app-db").connect())  # BORROW
""",
    )
    result = run(suite)
    result.assert_outcomes(passed=1, errors=1, warnings=1)
    result.stdout.fnmatch_lines(
        [
            "*RuntimeError: teardown broke",
            (
                f"*test_broken_teardown.py:{line_of(path, '# BORROW')}: PoolkeeperLeakWarning: "
                "poolkeeper: this test leaked 1 connection"
            ),
        ]
    )


def test_a_registry_that_fails_to_close_errors_only_its_own_test_and_the_next_tests_run(suite):
    """An exception while the plugin closes a test's registry errors that test with the message; the rest still run."""
    write(
        suite,
        "test_close_breaks",
        """
def fail():
    raise AttributeError("'Session' object has no attribute '_private_of_another_version'")


def break_close(registry):
    # A shutdown reports an adapter step that fails instead of raising; what is left to raise
    # is a fault of the close itself, simulated here on this one registry.
    registry.wrap(sa.create_engine("sqlite://"), name="db")

    def close(deadline=None):
        fail()

    async def aclose(deadline=None):
        fail()

    registry.close, registry.aclose = close, aclose


def test_sync_close_breaks(poolkeeper_registry):
    break_close(poolkeeper_registry)


@pytest.mark.asyncio
async def test_async_close_breaks(poolkeeper_registry):
    break_close(poolkeeper_registry)


def test_next_runs(poolkeeper_registry):
    with poolkeeper_registry.wrap(sa.create_engine("sqlite://"), name="db").connect():
        pass
""",
    )
    result = run(suite)
    result.assert_outcomes(passed=3, errors=2)
    assert "INTERNALERROR" not in result.stdout.str()
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_sync_close_breaks*",
            "poolkeeper_registry could not be closed at teardown: AttributeError: *_private_of_another_version*",
            "*ERROR at teardown of test_async_close_breaks*",
            "poolkeeper_registry could not be closed at teardown: AttributeError: *_private_of_another_version*",
        ]
    )


@pytest.mark.parametrize("scope", ["module", "session"])
def test_a_fixture_teardown_that_borrows_and_keeps_is_blamed_by_name_not_the_last_test(suite, scope):
    """A longer-lived fixture borrowing in its teardown is named with its location; the last test is not blamed."""
    path = write(
        suite,
        "test_teardown_borrows",
        f"""
ENGINE = poolkeeper.wrap(sa.create_engine(SYNC_URL), name="shared")
KEPT = []


@pytest.fixture(scope="{scope}")  # FIXTURE
def audit_log():
    yield
    KEPT.append(ENGINE.connect())  # TEARDOWN BORROW


def test_first(audit_log):
    pass


def test_last_never_touches_the_database():
    pass
""",
    )
    result = run(suite, "-p", "no:randomly")
    result.assert_outcomes(passed=2, errors=1)
    fixture_line = line_of(path, "# FIXTURE")
    result.stdout.fnmatch_lines(
        [
            f"*the teardown of {scope}-scoped fixture 'audit_log' (test_teardown_borrows.py:{fixture_line})*",
            f"*borrowed at test_teardown_borrows.py:{line_of(path, '# TEARDOWN BORROW')} in audit_log*",
        ]
    )
    result.stdout.no_fnmatch_line("*this test leaked*")


def test_an_xfail_or_skipped_test_that_leaks_counts_once_and_its_leak_shows_as_a_warning(suite):
    """An xfail test and a pytest.skip() holding a connection count once each; each leak is a warning."""
    path = write(
        suite,
        "test_stopped_half_way",
        """
ENGINE = poolkeeper.wrap(sa.create_engine(SYNC_URL), name="shared")
KEPT = []


@pytest.mark.xfail(reason="known bug")
def test_expected_to_fail():
    KEPT.append(ENGINE.connect())  # XFAIL BORROW
    assert False


def test_skipped_half_way():
    KEPT.append(ENGINE.connect())  # SKIP BORROW
    pytest.skip("no server today")
""",
    )
    result = run(suite, "-p", "no:randomly")
    result.assert_outcomes(xfailed=1, skipped=1)
    result.stdout.fnmatch_lines(
        [
            f"*test_stopped_half_way.py:{line_of(path, '# XFAIL BORROW')}: PoolkeeperLeakWarning*",
            f"*test_stopped_half_way.py:{line_of(path, '# SKIP BORROW')}: PoolkeeperLeakWarning*",
        ],
        consecutive=False,
    )


def test_connections_held_by_longer_lived_fixtures_are_not_leaks(suite):
    """A session- or module-scoped fixture's connection, opened during some test's setup, blames no test."""
    write(
        suite,
        "test_scoped_fixtures",
        """
ENGINE = poolkeeper.wrap(sa.create_engine(SYNC_URL), name="shared")


@pytest.fixture(scope="session")
def session_connection():
    with ENGINE.connect() as connection:
        yield connection


@pytest.fixture(scope="module")
def module_connection():
    connection = ENGINE.connect()
    yield connection
    connection.close()


@pytest.fixture
def function_connection():
    with ENGINE.connect() as connection:
        yield connection


def test_uses_them_all(session_connection, module_connection, function_connection):
    assert ENGINE.pool.checkedout() == 3


def test_uses_the_session_one_again(session_connection):
    assert ENGINE.pool.checkedout() == 2
""",
    )
    result = run(suite)
    result.assert_outcomes(passed=2)


# -- controls: marker, ini, command line --------------------------------------------------------------

MARKED = """
@pytest.fixture
def engine(poolkeeper_registry):
    return poolkeeper_registry.wrap(sa.create_engine(SYNC_URL), name="db")


@pytest.mark.poolkeeper(leak_check="off")
def test_off(engine):
    KEPT.append(engine.connect())


@pytest.mark.poolkeeper(leak_check="warn")
def test_warn(engine):
    KEPT.append(engine.connect())  # WARNED


@pytest.mark.poolkeeper(leak_check="error")
def test_error(engine):
    KEPT.append(engine.connect())


def test_unmarked(engine):
    KEPT.append(engine.connect())
"""


def test_the_marker_turns_the_check_off_or_into_a_filterable_warning(suite):
    """leak_check="off" passes silently, "warn" passes with a PoolkeeperLeakWarning at the borrow line."""
    path = write(suite, "test_marked", MARKED)
    result = run(suite, "-rA")
    result.assert_outcomes(passed=4, errors=2, warnings=1)
    assert re.findall(r"ERROR at teardown of (\w+)", result.stdout.str()) == ["test_error", "test_unmarked"]
    result.stdout.fnmatch_lines(
        [
            "*warnings summary*",
            "test_marked.py::test_warn",
            (
                f"  *test_marked.py:{line_of(path, '# WARNED')}: PoolkeeperLeakWarning: "
                "poolkeeper: this test leaked 1 connection"
            ),
        ]
    )

    as_error = run(suite, "-W", "error::poolkeeper.pytest_plugin.PoolkeeperLeakWarning")
    as_error.assert_outcomes(passed=4, errors=3)


def test_the_ini_option_and_the_command_line_choose_the_default_and_the_marker_still_wins(suite):
    """The ini value sets the default, --poolkeeper-leak-check replaces it, and a marker wins over both."""
    write(suite, "test_marked", MARKED)
    suite.makeini(INI + "poolkeeper_leak_check = warn\n")

    from_ini = run(suite)
    from_ini.assert_outcomes(passed=4, errors=1, warnings=2)
    assert re.findall(r"ERROR at teardown of (\w+)", from_ini.stdout.str()) == ["test_error"]

    from_command_line = run(suite, "--poolkeeper-leak-check=off")
    from_command_line.assert_outcomes(passed=4, errors=1, warnings=1)
    assert re.findall(r"ERROR at teardown of (\w+)", from_command_line.stdout.str()) == ["test_error"]


def test_a_module_marker_applies_to_every_test_in_the_module(suite):
    """A module's pytestmark = pytest.mark.poolkeeper(leak_check="off") silences the check for all its tests."""
    write(
        suite,
        "test_module_marker",
        """
pytestmark = pytest.mark.poolkeeper(leak_check="off")


def test_one(poolkeeper_registry):
    KEPT.append(poolkeeper_registry.wrap(sa.create_engine(SYNC_URL), name="db").connect())


def test_two():
    KEPT.append(poolkeeper.wrap(sa.create_engine(SYNC_URL), name="app-db").connect())
""",
    )
    run(suite).assert_outcomes(passed=2)


def test_bad_settings_are_refused_with_a_message_naming_them(suite):
    """A wrong ini value stops the run; a wrong marker argument errors that test's setup."""
    write(
        suite,
        "test_bad_marker",
        """
@pytest.mark.poolkeeper(leak_check="loud")
def test_bad():
    pass
""",
    )
    result = run(suite)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["*@pytest.mark.poolkeeper(leak_check=...) must be one of 'error', 'warn', 'off', got 'loud'*"]
    )

    suite.makeini(INI + "poolkeeper_leak_check = sometimes\n")
    result = run(suite)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*poolkeeper_leak_check must be one of error, warn, off, got 'sometimes'*"])

    suite.makeini(INI)
    result = run(suite, "--poolkeeper-leak-check=sometimes")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--poolkeeper-leak-check: invalid choice: 'sometimes'*"])


def test_disabling_the_plugin_removes_its_fixtures_and_its_check(suite):
    """With -p no:poolkeeper the fixtures are unknown and a leaking test simply passes."""
    write(
        suite,
        "test_disabled",
        """
def test_wants_the_fixture(poolkeeper_registry):
    pass


def test_leaks():
    KEPT.append(poolkeeper.wrap(sa.create_engine(SYNC_URL), name="app-db").connect())
""",
    )
    result = run(suite, "-p", "no:poolkeeper")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*fixture 'poolkeeper_registry' not found*"])
    assert "leaked" not in result.stdout.str()


def test_importing_the_plugin_imports_no_driver_and_no_testcontainers():
    """A fresh interpreter importing poolkeeper.pytest_plugin loads none of the drivers or testcontainers."""
    libraries = ["sqlalchemy", "asyncpg", "redis", "psycopg", "psycopg2", "aiohttp", "testcontainers", "pytest_asyncio"]
    code = (
        "import json, sys; import poolkeeper.pytest_plugin; "
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({libraries!r}))))"
    )
    output = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert json.loads(output) == []


# -- service fixtures ---------------------------------------------------------------------------------

SERVICES = """
import os

import psycopg
import redis


def test_postgres(poolkeeper_postgres_url):
    with psycopg.connect(poolkeeper_postgres_url) as connection:
        print("DATABASE", connection.execute("select current_database()").fetchone()[0])


def test_redis(poolkeeper_redis_url):
    client = redis.Redis.from_url(poolkeeper_redis_url)
    print("REDIS", poolkeeper_redis_url, client.ping())
    client.close()
"""


@pytest.fixture
def no_services(pytester, monkeypatch):
    """No service URL in the environment and a Docker endpoint that does not exist."""
    pytester.makeini(INI)
    monkeypatch.delenv("POOLKEEPER_POSTGRES_URL", raising=False)
    monkeypatch.delenv("POOLKEEPER_REDIS_URL", raising=False)
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    pytester.makepyfile(test_services=SERVICES)
    return pytester


def test_without_a_url_or_docker_the_service_fixtures_skip_saying_how_to_provide_one(no_services):
    """No POOLKEEPER_*_URL and no Docker: both tests are skipped with a message naming the variable."""
    result = run(no_services, "-rs")
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(
        [
            (
                "SKIPPED*no PostgreSQL for the tests: POOLKEEPER_POSTGRES_URL is not set and Docker does not answer "
                "at unix:///nonexistent/docker.sock*set POOLKEEPER_POSTGRES_URL to the URL of a PostgreSQL server*"
            ),
            "SKIPPED*no Redis for the tests: POOLKEEPER_REDIS_URL is not set and Docker does not answer*",
        ]
    )


def test_require_services_turns_the_skip_into_a_failure(no_services):
    """--poolkeeper-require-services makes a missing server an error, never a skip."""
    result = run(no_services, "--poolkeeper-require-services")
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(
        ["*no PostgreSQL for the tests: POOLKEEPER_POSTGRES_URL is not set*(--poolkeeper-require-services is set)*"]
    )


def test_when_docker_answers_but_testcontainers_is_missing_the_skip_says_to_install_it(no_services, monkeypatch):
    """A Docker socket that answers, with testcontainers not importable: the message says to install it."""
    # A short directory: a unix socket path is limited to about 100 bytes.
    directory = Path(tempfile.mkdtemp(prefix="pk-docker-"))
    docker_socket = directory / "docker.sock"
    shadow = directory / "shadow" / "testcontainers"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('testcontainers is hidden by this test')\n")
    monkeypatch.setenv("DOCKER_HOST", f"unix://{docker_socket}")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(shadow.parent), os.environ.get("PYTHONPATH")])))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(docker_socket))
        listener.listen(8)
        result = run(no_services, "-rs", "-k", "postgres")
    shutil.rmtree(directory)
    result.assert_outcomes(skipped=1, deselected=1)
    result.stdout.fnmatch_lines(
        [
            (
                "SKIPPED*no PostgreSQL for the tests: POOLKEEPER_POSTGRES_URL is not set and testcontainers cannot be "
                "imported (testcontainers is hidden by this test*); set POOLKEEPER_POSTGRES_URL*, "
                "or `pip install testcontainers`*"
            )
        ]
    )


def test_the_postgres_fixture_hands_out_a_throwaway_database_dropped_at_the_end(pytester):
    """From POOLKEEPER_POSTGRES_URL the session gets poolkeeper_test_<random>, which is gone after the run."""
    base = os.environ["POOLKEEPER_POSTGRES_URL"]
    pytester.makeini(INI)
    pytester.makepyfile(test_services=SERVICES)
    result = run(pytester, "-s", "-k", "postgres")
    result.assert_outcomes(passed=1, deselected=1)
    database = re.search(r"DATABASE (\S+)", result.stdout.str())
    assert database is not None
    assert re.fullmatch(r"poolkeeper_test_[0-9a-f]{12}", database[1])
    with psycopg.connect(base) as connection:
        left = connection.execute("select count(*) from pg_database where datname = %s", (database[1],)).fetchone()
    assert left == (0,)


def test_a_role_that_may_not_create_databases_shares_the_named_one_with_a_warning(pytester, monkeypatch, pg_url):
    """Without CREATEDB the session uses the database in the URL as it is, and says so in a PoolkeeperWarning."""
    role = f"pk_nocreatedb_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute(f"create role {role} login nocreatedb")
    try:
        url = re.sub(r"^postgresql://[^@/]*@", f"postgresql://{role}@", pg_url)
        monkeypatch.setenv("POOLKEEPER_POSTGRES_URL", url)
        pytester.makeini(INI)
        pytester.makepyfile(test_services=SERVICES)
        result = run(pytester, "-s", "-k", "postgres")
    finally:
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute(f"drop role {role}")
    result.assert_outcomes(passed=1, deselected=1, warnings=1)
    result.stdout.fnmatch_lines(
        [
            f"*DATABASE {pg_url.rsplit('/', 1)[1]}",
            "*PoolkeeperWarning: could not create a throwaway database (InsufficientPrivilege: permission denied*",
        ]
    )


def test_a_postgres_url_that_does_not_answer_fails_without_showing_its_password(no_services, monkeypatch):
    """A server named in the environment but down is a failure (not a skip), with the password scrubbed."""
    monkeypatch.setenv("POOLKEEPER_POSTGRES_URL", "postgresql://app:hunter2-secret@127.0.0.1:1/app")
    result = run(no_services, "-k", "postgres")
    result.assert_outcomes(errors=1, deselected=1)
    result.stdout.fnmatch_lines(
        ["*PostgreSQL at postgresql://app:***@127.0.0.1:1/app (POOLKEEPER_POSTGRES_URL) did not answer*"]
    )
    assert "hunter2" not in result.stdout.str() + result.stderr.str()


def test_a_redis_url_naming_a_database_is_used_as_it_is(pytester, monkeypatch):
    """POOLKEEPER_REDIS_URL with a database index other than 0 is handed out unchanged."""
    # The session run here is no xdist worker, even when this test runs in one (whose worker
    # gets that database + N): it would inherit PYTEST_XDIST_WORKER.
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    pytester.makeini(INI)
    pytester.makepyfile(test_services=SERVICES)
    result = run(pytester, "-s", "-k", "redis")
    result.assert_outcomes(passed=1, deselected=1)
    result.stdout.fnmatch_lines([f"*REDIS {os.environ['POOLKEEPER_REDIS_URL']} True"])


@pytest.fixture
def private_redis(tmp_path):
    """A redis-server of this test's own on a free loopback port (its databases are ours to claim)."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server is not installed; .ci/run installs and starts it")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [
            server,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}"
    client = redis.Redis.from_url(url)
    try:
        deadline = time.monotonic() + 10
        while True:  # no event tells that a server started listening: a bounded poll of the server itself
            with contextlib.suppress(redis.ConnectionError):
                if client.ping():
                    break
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.02)
        yield url
    finally:
        client.close()
        process.terminate()
        process.wait(10)


def test_a_redis_url_without_a_database_gets_an_empty_one_claimed_for_the_session(pytester, monkeypatch, private_redis):
    """Database 0 is never handed out: the first empty unclaimed database is claimed, and released at the end."""
    other_session = redis.Redis.from_url(private_redis, db=1)
    other_session.set("poolkeeper:pytest-session", "another session")
    somebody = redis.Redis.from_url(private_redis, db=2)
    somebody.set("application-data", "keep me")
    monkeypatch.setenv("POOLKEEPER_REDIS_URL", private_redis)
    pytester.makeini(INI)
    pytester.makepyfile(test_services=SERVICES)
    try:
        result = run(pytester, "-s", "-k", "redis")
        result.assert_outcomes(passed=1, deselected=1)
        result.stdout.fnmatch_lines([f"*REDIS {private_redis}/3 True"])
        third = redis.Redis.from_url(private_redis, db=3)
        assert (third.dbsize(), other_session.get("poolkeeper:pytest-session")) == (0, b"another session")
        assert somebody.get("application-data") == b"keep me"
        third.close()
    finally:
        other_session.close()
        somebody.close()


def test_a_claimed_redis_database_is_left_empty_and_claimed_again_next_time(pytester, monkeypatch, private_redis):
    """A session that writes keys in its claimed database leaves it empty: the database is claimed again next time."""
    monkeypatch.setenv("POOLKEEPER_REDIS_URL", private_redis)
    pytester.makeini(INI)
    pytester.makepyfile(
        test_writes="""
import redis

def test_writes(poolkeeper_redis_url):
    client = redis.Redis.from_url(poolkeeper_redis_url)
    client.set("session-data", "x")
    print("REDIS", poolkeeper_redis_url)
    client.close()
"""
    )
    for _ in range(2):  # the same database each time: sessions never use the 15 up
        result = run(pytester, "-s")
        result.assert_outcomes(passed=1)
        result.stdout.fnmatch_lines([f"*REDIS {private_redis}/1"])
    first = redis.Redis.from_url(private_redis, db=1)
    try:
        assert first.dbsize() == 0
    finally:
        first.close()


def test_xdist_workers_given_a_named_redis_database_never_share_it(pytester, monkeypatch):
    """Under pytest-xdist, worker gwN gets the named database + N, and a worker past database 15 fails clearly."""
    base = os.environ["POOLKEEPER_REDIS_URL"].rsplit("/", 1)[0]
    pytester.makeini(INI)
    pytester.makepyfile(test_services=SERVICES)
    monkeypatch.setenv("POOLKEEPER_REDIS_URL", f"{base}/10")
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw2")
    result = run(pytester, "-s", "-k", "redis")
    result.assert_outcomes(passed=1, deselected=1)
    result.stdout.fnmatch_lines([f"*REDIS {base}/12 True"])
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw6")
    result = run(pytester, "-s", "-k", "redis")
    result.assert_outcomes(errors=1, deselected=1)
    result.stdout.fnmatch_lines(["*pytest-xdist worker gw6 would use 16, past 15*"])


XDIST_SERVICES = """
import os
from pathlib import Path

import pytest
import redis


@pytest.mark.parametrize("n", range(4))
def test_redis(poolkeeper_redis_url, n):
    client = redis.Redis.from_url(poolkeeper_redis_url)
    assert client.ping()
    client.close()
    worker = os.environ["PYTEST_XDIST_WORKER"]
    with (Path(os.environ["PK_XDIST_OUT"]) / f"{worker}-{n}").open("w") as out:
        out.write(poolkeeper_redis_url)
"""


def test_two_real_xdist_workers_given_a_named_redis_database_get_one_each(pytester, monkeypatch, tmp_path):
    """Under a real `pytest -n 2` with POOLKEEPER_REDIS_URL naming a database, each worker gets its own database."""
    base = os.environ["POOLKEEPER_REDIS_URL"].rsplit("/", 1)[0]
    pytester.makeini(INI)
    pytester.makepyfile(test_services=XDIST_SERVICES)
    monkeypatch.setenv("POOLKEEPER_REDIS_URL", f"{base}/10")
    monkeypatch.setenv("PK_XDIST_OUT", str(tmp_path))
    result = run(pytester, "-n", "2")  # pytest-xdist is a dev dependency
    result.assert_outcomes(passed=4)
    used: dict[str, set[str]] = {}
    for record in tmp_path.iterdir():
        used.setdefault(record.name.split("-")[0], set()).add(record.read_text())
    assert sorted(used) == ["gw0", "gw1"]
    assert used == {"gw0": {f"{base}/10"}, "gw1": {f"{base}/11"}}


def test_a_redis_url_that_does_not_answer_fails(no_services, monkeypatch):
    """A Redis named in the environment but down is a failure, not a skip."""
    monkeypatch.setenv("POOLKEEPER_REDIS_URL", "redis://:s3cret-token@127.0.0.1:1/5")
    result = run(no_services, "-k", "redis")
    result.assert_outcomes(errors=1, deselected=1)
    result.stdout.fnmatch_lines(["*Redis at redis://:***@127.0.0.1:1/5 (POOLKEEPER_REDIS_URL) did not answer*"])
    assert "s3cret" not in result.stdout.str()
