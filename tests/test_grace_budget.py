"""The grace budget end to end: uvicorn CLI, requests stuck in pg_sleep(60), SIGTERM; exit inside the grace period."""

from __future__ import annotations

import signal
import threading
import time

import psycopg
import pytest

from tests.grace_service import Service, grace_service, start_requests

GRACE_PERIOD = 8.0


def backends(pg_url: str, application_name: str, *, sleeping: bool = False) -> int:
    """How many backends of the service PostgreSQL has (only those in pg_sleep with ``sleeping``)."""
    query = "select count(*) from pg_stat_activity where application_name = %s"
    if sleeping:
        query += " and state = 'active' and query like '%%pg_sleep%%'"
    with psycopg.connect(pg_url, autocommit=True) as connection:
        row = connection.execute(query, (application_name,)).fetchone()
    return int(row[0]) if row else 0


def settle(predicate, timeout: float) -> bool:
    """Re-read server state until ``predicate`` holds (PostgreSQL offers no event for it)."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


def watch_readiness(service: Service, stop: threading.Event, seen: list[tuple[float, int]]) -> None:
    """Probe /readyz back to back, recording (time, status) until ``stop`` or the server is gone."""
    while not stop.is_set():
        try:
            seen.append((time.monotonic(), service.get("/readyz", timeout=1)[0]))
        except OSError:
            return


def sigterm_and_wait(service: Service, seen: list[tuple[float, int]] | None = None) -> tuple[float, float | None]:
    """SIGTERM the service, wait for it (killing it at the grace period); seconds to exit, to the first 503."""
    stop = threading.Event()
    prober = None
    if seen is not None:
        prober = threading.Thread(target=watch_readiness, args=(service, stop, seen), daemon=True)
        prober.start()
        settle(lambda: len(seen) > 5, 5)
    sent = time.monotonic()
    service.process.send_signal(signal.SIGTERM)
    try:
        service.process.wait(GRACE_PERIOD)
    except Exception:
        service.process.kill()
        service.process.wait()
        pytest.fail("the service outlived its grace period:\n" + "".join(service.output))
    exited = time.monotonic() - sent
    stop.set()
    if prober is not None:
        prober.join(5)
    first_503 = next((at - sent for at, status in (seen or []) if at >= sent and status == 503), None)
    return exited, first_503


def test_stuck_requests_are_forced_at_the_force_point_and_the_process_exits_inside_the_grace_period(pg_url):
    """5 requests in pg_sleep(60), SIGTERM, grace 8 s: 503 within 50 ms, exit < 8 s, 5 forced, 0 backends left."""
    with grace_service(pg_url, grace_period=GRACE_PERIOD, shutdown_delay=1.0, close_timeout=2.0) as service:
        paths = ["/slow-async?seconds=60"] * 3 + ["/slow-sync?seconds=60"] * 2
        threads, outcomes = start_requests(service, paths)
        assert settle(lambda: backends(pg_url, service.application_name, sleeping=True) == 5, 10)
        seen: list[tuple[float, int]] = []
        exited, first_503 = sigterm_and_wait(service, seen)
        for thread in threads:
            thread.join(10)
    assert exited < GRACE_PERIOD, service.output
    assert first_503 is not None, seen[-5:]
    assert first_503 < 0.050
    assert len(outcomes) == 5
    assert all(outcome != 200 for outcome in outcomes.values()), outcomes
    assert settle(lambda: backends(pg_url, service.application_name) == 0, 2.0)
    forced = service.record("poolkeeper_budget_forced")
    assert forced is not None, "".join(service.output)
    assert len(forced["poolkeeper_budget_forced"]) == 5
    assert all(
        borrower["site"] and "grace_app.py" in borrower["site"] for borrower in forced["poolkeeper_budget_forced"]
    )
    report = service.record("poolkeeper_report")
    assert report is not None, "".join(service.output)
    leaks = [leak for item in report["poolkeeper_report"]["items"] for leak in item["leaks"]]
    assert len(leaks) == 5
    assert {item["name"]: item["forced"] for item in report["poolkeeper_report"]["items"]} == {
        "sync-db": 2,
        "async-db": 3,
    }
    print(f"exit after {exited:.2f}s; first 503 after {first_503 * 1000:.1f} ms")  # noqa: T201 -- the measured numbers


def test_a_server_whose_drain_never_ends_is_asked_to_exit_at_the_exit_point_with_the_report_logged(pg_url):
    """A request hanging with no connection keeps uvicorn draining: at G - margin it is made to exit, report logged."""
    with grace_service(pg_url, grace_period=GRACE_PERIOD, close_timeout=2.0) as service:
        threads, outcomes = start_requests(service, ["/hang", "/slow-sync?seconds=60"])
        assert settle(lambda: backends(pg_url, service.application_name, sleeping=True) == 1, 10)
        exited, _ = sigterm_and_wait(service)
        for thread in threads:
            thread.join(10)
    assert 7.0 - 0.5 < exited < GRACE_PERIOD, "".join(service.output)  # the exit point is G - max(1, G/10) = 7 s
    assert service.record("poolkeeper_report") is not None, "".join(service.output)
    exit_records = [record for record in service.records if record.get("poolkeeper_event") == "budget-exit"]
    assert len(exit_records) == 1
    assert settle(lambda: backends(pg_url, service.application_name) == 0, 2.0)
    assert outcomes[1] != 200
