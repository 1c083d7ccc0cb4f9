"""The grace budget end to end: uvicorn CLI, requests stuck in pg_sleep(60), SIGTERM; exit inside the grace period."""

from __future__ import annotations

import signal
import threading
import time
from contextlib import closing

import pytest

from tests.conftest import Server
from tests.grace_service import Service, grace_service, start_requests

GRACE_PERIOD = 8.0


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
        while len(seen) < 5 and prober.is_alive():  # the prober is probing: the 503 cannot be missed
            time.sleep(0.01)
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


@pytest.mark.parametrize("runner", ["cli", "uvicorn.run"])
def test_stuck_requests_are_forced_at_the_force_point_and_the_process_exits_inside_the_grace_period(pg_url, runner):
    """5 requests in pg_sleep(60), SIGTERM, grace 8 s: 503 within 50 ms, exit < 8 s, 5 forced, 0 backends left."""
    with (
        grace_service(
            pg_url, grace_period=GRACE_PERIOD, shutdown_delay=1.0, close_timeout=2.0, runner=runner
        ) as service,
        closing(Server(pg_url, service.application_name)) as server,
    ):
        paths = ["/slow-async?seconds=60"] * 3 + ["/slow-sync?seconds=60"] * 2
        threads, outcomes = start_requests(service, paths)
        assert server.settle(lambda: len(server.running("pg_sleep")) == 5, 10)
        seen: list[tuple[float, int]] = []
        exited, first_503 = sigterm_and_wait(service, seen)
        for thread in threads:
            thread.join(10)
        assert server.settle(lambda: not server.backends(), 2.0)
    assert exited < GRACE_PERIOD, service.output
    assert first_503 is not None, seen[-5:]
    assert first_503 < 0.050
    assert len(outcomes) == 5
    assert all(outcome != 200 for outcome in outcomes.values()), outcomes
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
    with (
        grace_service(pg_url, grace_period=GRACE_PERIOD, close_timeout=2.0) as service,
        closing(Server(pg_url, service.application_name)) as server,
    ):
        threads, outcomes = start_requests(service, ["/hang", "/slow-sync?seconds=60"])
        assert server.settle(lambda: len(server.running("pg_sleep")) == 1, 10)
        exited, _ = sigterm_and_wait(service)
        for thread in threads:
            thread.join(10)
        assert server.settle(lambda: not server.backends(), 2.0)
    assert 7.0 - 0.5 < exited < GRACE_PERIOD, "".join(service.output)  # the exit point is G - max(1, G/10) = 7 s
    assert service.record("poolkeeper_report") is not None, "".join(service.output)
    exit_records = [record for record in service.records if record.get("poolkeeper_event") == "budget-exit"]
    assert len(exit_records) == 1
    assert outcomes[1] != 200
