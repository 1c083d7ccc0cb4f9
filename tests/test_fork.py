"""Keepers are per process (PRODUCT.md 4.9): a forked child's close never touches the parent's connections.

Each scenario runs in tests/programs/fork_program.py, a process of its own that forks; the
pytest process itself never forks.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from tests.conftest import Server
from tests.programs.child import PROGRAMS, ROOT


def run_scenario(scenario: str, pg_url: str, redis_url: str, application_name: str) -> dict[str, Any]:
    """Run one fork scenario and return what its parent process found."""
    completed = subprocess.run(
        [sys.executable, str(PROGRAMS / "fork_program.py"), scenario, pg_url, redis_url, application_name],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    result: dict[str, Any] = json.loads(completed.stdout.splitlines()[-1])
    result["stderr"] = completed.stderr
    return result


def test_parent_idle_connection_survives_child_close(pg_url: str, redis_url: str, application_name: str) -> None:
    """After a child does ``engine.dispose(close=False)`` and closes, the parent's idle connection still works."""
    result = run_scenario("idle", pg_url, redis_url, application_name)

    assert "parent_error" not in result, result["parent_error"]
    assert result["parent_backend"] == result["parent_after"]  # the same pooled connection, not a reconnect
    assert result["child_backend"] != result["parent_backend"]  # the child opened its own
    assert result["report"]["ok"] is True
    assert result["parent_report"]["ok"] is True


def test_parent_running_query_survives_child_close(pg_url: str, redis_url: str, application_name: str) -> None:
    """A child's close neither cancels the parent's running ``pg_sleep`` nor counts the parent's borrow."""
    result = run_scenario("running", pg_url, redis_url, application_name)

    assert "parent_error" not in result, result["parent_error"]
    assert result["slept"] == ""  # pg_sleep returned normally
    [child_item] = result["report"]["items"]
    assert (child_item["outcome"], child_item["borrowed_at_start"], child_item["forced"]) == ("clean", 0, 0)
    assert result["report"]["ok"] is True


def test_parent_blpop_survives_child_close(pg_url: str, redis_url: str, application_name: str) -> None:
    """The parent's blocked ``BLPOP`` still gets its value after a child closed the registry."""
    result = run_scenario("blpop", pg_url, redis_url, application_name)

    assert "parent_error" not in result, result["parent_error"]
    assert result["popped"] == "hello"
    [child_item] = result["report"]["items"]
    assert (child_item["outcome"], child_item["forced"]) == ("clean", 0)


def test_child_exit_net_cancels_its_own_stuck_query(pg_url: str, redis_url: str, application_name: str) -> None:
    """A child exiting with its own ``pg_sleep`` borrowed has it cancelled by its exit-time net, with the warning."""
    result = run_scenario("exit_net", pg_url, redis_url, application_name)

    assert result["child_status"] == 0
    assert result["left_running"] == 0
    assert "keepers left open at exit" in result["stderr"]
    assert "child-db" in result["stderr"]


def test_parent_async_connections_survive_child_close(pg_url: str, redis_url: str, application_name: str) -> None:
    """Forked in a running loop, the child's close leaves the parent's async connections (all four adapters) working."""
    result = run_scenario("async", pg_url, redis_url, application_name)

    assert "parent_error" not in result, result["parent_error"]
    assert result["same"] is True  # the very same backends, Redis client and HTTP connection as before the fork
    assert result["report"]["ok"] is True
    assert result["parent_report"]["ok"] is True


def test_child_registry_state_is_its_own(pg_url: str, redis_url: str, application_name: str) -> None:
    """In a child the parent's draining and closed registries are open again; keepers the parent closed stay closed."""
    result = run_scenario("state", pg_url, redis_url, application_name)

    expected = {"draining": False, "closed": False, "report": False, "keeper_state": "closed", "child_close": "skipped"}
    assert expected == {key: result[key] for key in expected}


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_multiprocessing_workers_use_and_close_their_own_connections(
    server: Server, pg_url: str, application_name: str, start_method: str
) -> None:
    """With the documented recipe, pool workers use and close their own connections and the parent's keeps working."""
    completed = subprocess.run(
        [sys.executable, str(PROGRAMS / "mp_program.py"), start_method, pg_url, application_name],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout.splitlines()[-1])
    before, after = result["parent"]
    assert before == after  # the parent's pooled connection survived its workers
    assert before not in result["worker_backends"]  # no worker used the parent's connection
    assert result["ok"] is True
    for pid in result["workers"]:  # each worker closed its own registry as it exited
        assert f"worker {pid} closed: ok=True" in completed.stderr
    assert server.settle(lambda: server.backends() == [], timeout=5), server.backends()
