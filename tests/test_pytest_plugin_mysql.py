"""The pytest plugin's ``poolkeeper_mysql_url`` fixture, run in real pytest subprocesses (pytester)."""

from __future__ import annotations

import re
import subprocess
import sys

import pymysql
import pytest
import sqlalchemy as sa

from tests.test_pytest_plugin import INI, run

pytest_plugins = ["pytester"]

MYSQL_SERVICE = """
import pymysql
import sqlalchemy as sa


def test_mysql(poolkeeper_mysql_url):
    url = sa.make_url(poolkeeper_mysql_url)
    connection = pymysql.connect(host=url.host, port=url.port, user=url.username, password=url.password or "")
    with connection.cursor() as cursor:
        cursor.execute("select schema_name from information_schema.schemata where schema_name = %s", (url.database,))
        print("DATABASE", url.database, cursor.fetchall())
    connection.close()
"""


@pytest.fixture
def mysql_project(pytester, monkeypatch):
    """A project with one test that uses poolkeeper_mysql_url; Docker is not reachable."""
    pytester.makeini(INI)
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    pytester.makepyfile(test_services=MYSQL_SERVICE)
    return pytester


def test_the_mysql_fixture_hands_out_a_throwaway_database_dropped_at_the_end(mysql_project, mysql_url):
    """From POOLKEEPER_MYSQL_URL the session gets poolkeeper_test_<random>, there during the run, gone after."""
    result = run(mysql_project, "-s")
    result.assert_outcomes(passed=1)
    found = re.search(r"DATABASE (\S+) \(\('(\S+)',\),\)", result.stdout.str())
    assert found is not None, result.stdout.str()
    assert re.fullmatch(r"poolkeeper_test_[0-9a-f]{12}", found[1])
    assert found[2] == found[1]
    url = sa.make_url(mysql_url)
    connection = pymysql.connect(host=url.host, port=url.port or 3306, user=url.username, password=url.password or "")
    with connection.cursor() as cursor:
        cursor.execute("select count(*) from information_schema.schemata where schema_name = %s", (found[1],))
        assert cursor.fetchone() == (0,)
    connection.close()


def test_without_a_mysql_url_or_docker_the_fixture_skips_and_require_services_fails(mysql_project, monkeypatch):
    """No POOLKEEPER_MYSQL_URL, no Docker: a skip naming the variable; with --poolkeeper-require-services, an error."""
    monkeypatch.delenv("POOLKEEPER_MYSQL_URL", raising=False)

    skipped = run(mysql_project, "-rs")
    failed = run(mysql_project, "--poolkeeper-require-services")

    skipped.assert_outcomes(skipped=1)
    skipped.stdout.fnmatch_lines(
        ["SKIPPED*no MySQL/MariaDB for the tests: POOLKEEPER_MYSQL_URL is not set and Docker does not answer*"]
    )
    failed.assert_outcomes(errors=1)
    failed.stdout.fnmatch_lines(
        ["*no MySQL/MariaDB for the tests: POOLKEEPER_MYSQL_URL is not set*(--poolkeeper-require-services is set)*"]
    )


def test_a_mysql_url_that_does_not_answer_fails_without_showing_its_password(mysql_project, monkeypatch):
    """A server named in the environment but down is an error (not a skip), with the password scrubbed."""
    monkeypatch.setenv("POOLKEEPER_MYSQL_URL", "mysql://app:hunter2-secret@127.0.0.1:1/app")
    result = run(mysql_project)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["*MySQL/MariaDB at mysql://app:***@127.0.0.1:1/app (POOLKEEPER_MYSQL_URL) did not answer*"]
    )
    assert "hunter2" not in result.stdout.str() + result.stderr.str()


def test_a_url_of_another_kind_is_refused_naming_the_variable(mysql_project, monkeypatch):
    """POOLKEEPER_MYSQL_URL must be a mysql:// or mariadb:// URL; anything else fails, password scrubbed."""
    monkeypatch.setenv("POOLKEEPER_MYSQL_URL", "postgresql://app:hunter2-secret@127.0.0.1:5432/app")
    result = run(mysql_project)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*POOLKEEPER_MYSQL_URL must be a mysql:// or mariadb:// URL, got*"])
    assert "hunter2" not in result.stdout.str() + result.stderr.str()


def test_importing_the_plugin_imports_no_mysql_driver():
    """A fresh interpreter importing poolkeeper.pytest_plugin loads neither PyMySQL nor mysqlclient."""
    code = "import sys; import poolkeeper.pytest_plugin; print(sorted({'pymysql', 'MySQLdb'} & set(sys.modules)))"
    output = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert output.strip() == "[]"
