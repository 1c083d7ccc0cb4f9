"""End to end: the example service under a real server, loaded through a readiness-respecting router, SIGTERMed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from integrations.simulator import Simulation, simulate, upstream_server

# The budget the example service is held to: shutdown delay 1 s + request drain + pool drain
# (10 s at most) + force-close, well inside the 30 s grace period the simulator enforces.
GRACE_PERIOD = 30.0


def assert_clean(simulation: Simulation) -> None:
    result = simulation.result
    assert result.load.failures == [], result.output
    assert result.load.routed > 30, "the load never really ran"
    assert result.readiness_flipped_after is not None
    assert result.readiness_flipped_after < 0.3
    assert (result.exit_code, result.killed) == (0, False), result.output
    assert result.exited_after is not None
    assert result.exited_after < GRACE_PERIOD
    assert result.report is not None, result.output
    assert result.report["ok"], result.report_text
    assert {item["name"] for item in result.report["items"]} >= {"db", "cache", "upstream"}
    assert simulation.leftovers.postgres_backends == 0
    assert simulation.leftovers.redis_clients == 0


@pytest.mark.parametrize("server", ["uvicorn", "gunicorn"])
def test_sigterm_under_load_loses_no_request_and_leaves_nothing_open(server, pg_url, redis_url):
    """30 clients, SIGTERM mid-load: readiness 503 at once, no routed request fails, exit 0, nothing left."""
    with upstream_server() as upstream:
        simulation = simulate(
            server=server,
            workers=2,
            clients=30,
            database_url=pg_url,
            redis_url=redis_url,
            upstream_url=upstream,
            shutdown_delay=1.0,
            grace_period=GRACE_PERIOD,
        )
    assert_clean(simulation)
    logged_states = [record.get("poolkeeper_state") for record in simulation.result.records]
    assert "closed" in logged_states


def test_the_shutdown_delay_serves_requests_routed_during_the_propagation_gap(pg_url):
    """A router still routing 0.5 s after readiness failed loses nothing with a 1 s shutdown delay."""
    simulation = simulate(clients=10, database_url=pg_url, shutdown_delay=1.0, router_lag=0.5)
    result = simulation.result
    assert result.load.failures == [], result.output
    assert result.load.last_success_at is not None
    assert result.readiness_flipped_after is not None
    # Requests kept arriving, and succeeding, after readiness had already failed.
    assert result.load.last_success_at - result.signal_sent_at > result.readiness_flipped_after + 0.3
    assert (result.exit_code, simulation.leftovers.postgres_backends) == (0, 0)


def test_without_a_shutdown_delay_the_propagation_gap_loses_requests(pg_url):
    """The control: with no delay, requests routed in the gap meet a server that stopped accepting."""
    simulation = simulate(clients=10, database_url=pg_url, shutdown_delay=0.0, router_lag=1.0)
    assert simulation.result.load.failures, "the gap did not show: the control proves nothing"


def test_poolkeeper_demo_exits_0_with_no_server_configured(tmp_path):
    """`poolkeeper demo` runs on its embedded SQLite default and reports a clean shutdown."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("POOLKEEPER_")}
    result = subprocess.run(
        [sys.executable, "-m", "poolkeeper", "demo", "--clients", "4"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Clean shutdown." in result.stdout
    assert "poolkeeper shutdown ok" in result.stdout
    assert "SIGTERM sent" in result.stdout
