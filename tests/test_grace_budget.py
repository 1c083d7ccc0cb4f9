"""The grace budget end to end: uvicorn CLI, requests stuck in pg_sleep(60), SIGTERM; exit inside the grace period."""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import threading
import time
from contextlib import closing
from pathlib import Path

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
    assert {borrower["forced_by"] for borrower in forced["poolkeeper_budget_forced"]} == {"budget"}
    report = service.record("poolkeeper_report")
    assert report is not None, "".join(service.output)
    leaks = [leak for item in report["poolkeeper_report"]["items"] for leak in item["leaks"]]
    assert len(leaks) == 5
    assert {leak["forced_by"] for leak in leaks} == {"budget"}  # the report says the budget forced them
    assert all(leak["site"] and "grace_app.py" in leak["site"] for leak in leaks)
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


def connections_by_worker(service: Service, shares: tuple[int, int]) -> list[list[http.client.HTTPConnection]]:
    """Kept-alive connections, ``shares[i]`` of them served by worker i: each connection stays with its worker.

    gunicorn's workers take connections from one shared socket, whichever accepts first; so
    connections are opened until one worker holds ``shares[0]`` of them and the other ``shares[1]``.
    """
    by_pid: dict[int, list[http.client.HTTPConnection]] = {}
    spare: list[http.client.HTTPConnection] = []
    blocked: list[http.client.HTTPConnection] = []
    try:
        for _ in range(80):
            connection = http.client.HTTPConnection("127.0.0.1", service.port, timeout=30)
            connection.request("GET", "/whoami")
            response = connection.getresponse()
            pid = json.loads(response.read())["pid"]
            by_pid.setdefault(pid, []).append(connection)
            counts = sorted((len(held) for held in by_pid.values()), reverse=True)
            if len(counts) == 2 and counts[0] >= shares[0] and counts[1] >= shares[1]:
                break
            if len(by_pid) == 1 and len(by_pid[pid]) > shares[0]:
                # On an idle machine one worker can win every accept: hold its event loop for a
                # moment, so that the next connections are accepted by the other worker.
                holder = by_pid[pid].pop()
                holder.request("GET", "/block-loop?seconds=1")
                blocked.append(holder)
        else:
            pytest.fail(f"80 connections did not reach both workers in shares {shares}: {by_pid}")
        first, second = sorted(by_pid.values(), key=len, reverse=True)
        chosen = [first[: shares[0]], second[: shares[1]]]
        spare = first[shares[0] :] + second[shares[1] :]
        return chosen
    finally:
        for connection in blocked:
            connection.getresponse().read()  # the worker's loop runs again
            connection.close()
        for connection in spare:
            connection.close()


def send_on(connection: http.client.HTTPConnection, path: str, outcomes: dict[str, object]) -> threading.Thread:
    """GET ``path`` on ``connection`` in a thread; its status (or exception name) into ``outcomes[path#n]``."""
    key = f"{path}#{len(outcomes)}"
    outcomes[key] = None

    def send() -> None:
        try:
            connection.request("GET", path)
            outcomes[key] = connection.getresponse().status
        except Exception as error:
            outcomes[key] = type(error).__name__
        finally:
            connection.close()

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def exit_times(pids: list[int], since: list[float], seen: dict[int, float]) -> None:
    """Note in ``seen`` how long after ``since[0]`` each of ``pids`` stopped running (gone or a zombie), within 15 s.

    A worker's exit is no event this test can wait on (it is gunicorn's child), so its
    /proc entry is looked at every 10 ms.
    """
    end = time.monotonic() + 15
    while len(seen) < len(pids) and time.monotonic() < end:
        for pid in pids:
            if pid in seen:
                continue
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (FileNotFoundError, ProcessLookupError):
                state = "gone"
            if state in ("Z", "X", "gone") and since:
                seen[pid] = time.monotonic() - since[0]
        time.sleep(0.01)


def report_text(stderr: str, pid: int) -> str:
    """The report gunicorn's log shows for worker ``pid`` (``worker_exit``): its lines up to the next log record."""
    start = stderr.index(f"poolkeeper: worker {pid} closed")
    lines = stderr[start:].splitlines()
    body = [lines[0]]
    for line in lines[1:]:
        if line.startswith(("[", "{")):  # the next gunicorn record, or a JSON one
            break
        body.append(line)
    return "\n".join(body)


def test_under_gunicorn_each_uvicorn_worker_forces_its_share_and_every_process_exits_inside_the_grace_period(pg_url):
    """gunicorn, 2 uvicorn workers, graceful_timeout 8, 5 requests in pg_sleep(60) spread 3/2, SIGTERM to the master.

    The workers' budget comes from graceful_timeout alone: master and workers exit before 8 s, the stuck requests
    fail, no backend is left, and each worker logs its report naming its own forced borrowers, forced by the budget.
    """
    shares = {0: ["/slow-async?seconds=60", "/slow-async?seconds=60", "/slow-sync?seconds=60"]}
    shares[1] = ["/slow-async?seconds=60", "/slow-sync?seconds=60"]
    with (
        grace_service(
            pg_url, grace_period=GRACE_PERIOD, shutdown_delay=1.0, close_timeout=2.0, runner="gunicorn"
        ) as service,
        closing(Server(pg_url, service.application_name)) as server,
    ):
        connections = connections_by_worker(service, (len(shares[0]), len(shares[1])))
        workers: list[int] = []
        for connection in (connections[0][0], connections[1][0]):
            connection.request("GET", "/whoami")
            workers.append(json.loads(connection.getresponse().read())["pid"])
        outcomes: dict[str, object] = {}
        threads = [
            send_on(connection, path, outcomes)
            for worker in (0, 1)
            for connection, path in zip(connections[worker], shares[worker], strict=True)
        ]
        assert server.settle(lambda: len(server.sleeping()) == 5, 10), server.backends()
        sent: list[float] = []
        exited: dict[int, float] = {}
        watcher = threading.Thread(target=exit_times, args=(workers, sent, exited), daemon=True)
        watcher.start()
        sent.append(time.monotonic())
        service.process.send_signal(signal.SIGTERM)
        try:
            service.process.wait(GRACE_PERIOD)
        except subprocess.TimeoutExpired:
            pytest.fail("gunicorn outlived its grace period:\n" + "".join(service.output))
        exited[service.process.pid] = time.monotonic() - sent[0]
        watcher.join(10)
        for thread in threads:
            thread.join(10)
        assert server.settle(lambda: not server.backends(), 2.0), server.backends()
    stderr = "".join(service.output)
    print(f"exits after SIGTERM: { {pid: round(seconds, 2) for pid, seconds in exited.items()} }")  # noqa: T201 -- measured
    assert service.process.returncode == 0, stderr
    assert sorted(exited) == sorted([*workers, service.process.pid]), (exited, stderr)
    assert all(seconds < GRACE_PERIOD for seconds in exited.values()), (exited, stderr)
    assert len(outcomes) == 5
    assert all(outcome != 200 for outcome in outcomes.values()), outcomes
    for worker, pid in enumerate(workers):
        share = len(shares[worker])
        reports = [record for record in service.records if "poolkeeper_report" in record and record["pid"] == pid]
        assert len(reports) == 1, stderr
        items = reports[0]["poolkeeper_report"]["items"]
        leaks = [leak for item in items for leak in item["leaks"]]
        assert len(leaks) == share, stderr
        assert {leak["forced_by"] for leak in leaks} == {"budget"}
        assert all(leak["site"] and "grace_app.py" in leak["site"] for leak in leaks), leaks
        assert {item["name"]: (item["forced"], item["forced_by"]) for item in items} == {
            "async-db": (share - 1, "budget"),
            "sync-db": (1, "budget"),
        }
        text = report_text(stderr, pid)  # the same report, as gunicorn's log shows it
        assert text.count("forced by the grace budget") == share, text
        assert text.count("grace_app.py") >= share, text
