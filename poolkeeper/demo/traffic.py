"""Start a service, route load to it only while it is ready, send it SIGTERM, and record what happened.

This plays the two parts of a Kubernetes shutdown that a service sees from outside: the load
balancer (which routes a request only to a backend whose last readiness probe succeeded) and the
kubelet (which sends SIGTERM and, at the end of the grace period, SIGKILL). Plain threads and
``http.client``: nothing beyond the standard library, so it runs wherever the service does.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

__all__ = ["LoadResult", "Router", "Scenario", "ScenarioResult", "ServiceProcess", "free_port", "run_scenario"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(port: int, path: str, timeout: float) -> int:
    """GET ``path`` on a fresh connection (as a load balancer opens them); returns the status."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path, headers={"Connection": "close"})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


class ServiceProcess:
    """The service as a child process, with its JSON log lines collected as they come."""

    def __init__(self, command: Sequence[str], port: int, env: Mapping[str, str] | None = None) -> None:
        self.port = port
        self.records: list[dict[str, Any]] = []
        self.other_output: list[str] = []
        self.started = time.monotonic()
        self.process = subprocess.Popen(  # noqa: S603 -- the caller's own service command
            list(command),
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, args=(self.process.stdout,), daemon=True)
        self._reader.start()

    def _read(self, stream: IO[str] | None) -> None:
        if stream is None:
            return
        for line in stream:
            try:
                record = json.loads(line)
            except ValueError:
                self.other_output.append(line.rstrip())
                continue
            if isinstance(record, dict):
                record["received"] = time.monotonic()
                self.records.append(record)
            else:
                self.other_output.append(line.rstrip())

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the readiness endpoint answers 200 (or the process died, or time ran out)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.process.poll() is not None:
                raise RuntimeError(f"the service exited with {self.process.returncode}: {self.output_tail()}")
            with contextlib.suppress(OSError):
                if _get(self.port, "/readyz", 1.0) == HTTPStatus.OK:
                    return
            time.sleep(0.05)  # the service offers no event for "listening"; probe as a kubelet does
        raise TimeoutError(f"the service was not ready within {timeout}s: {self.output_tail()}")

    def output_tail(self, lines: int = 20) -> str:
        """The last lines the service printed, for error messages."""
        tail = [json.dumps(record) for record in self.records[-lines:]] + self.other_output[-lines:]
        return "\n".join(tail)

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the service (its main process)."""
        self.process.send_signal(signum)

    def report(self) -> dict[str, Any] | None:
        """The shutdown report the service logged, if it did."""
        for record in reversed(self.records):
            if isinstance(record.get("poolkeeper_report"), dict):
                return record["poolkeeper_report"]  # type: ignore[no-any-return]  # checked just above
        return None

    def report_text(self) -> str | None:
        """``str(report)`` as the service logged it."""
        for record in reversed(self.records):
            if isinstance(record.get("poolkeeper_report"), dict):
                return str(record["message"])
        return None


class Router:
    """A readiness-respecting load balancer with a single backend: probes it every ``interval``.

    ``lag`` plays the endpoint-propagation gap: the router keeps routing for that long after
    its probe first failed, as kube-proxy and cloud load balancers do while they catch up.
    """

    def __init__(self, port: int, interval: float = 0.05, lag: float = 0.0) -> None:
        self.port = port
        self.interval = interval
        self.lag = lag
        self.probe_ready = False
        self.became_unready_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._probe, name="router-probe", daemon=True)

    @property
    def ready(self) -> bool:
        """Whether a request is routed to the backend now."""
        if self.probe_ready:
            return True
        flipped = self.became_unready_at
        return flipped is not None and time.monotonic() < flipped + self.lag

    def start(self) -> None:
        """Probe once (so that routing starts ready) and then keep probing in the background."""
        self._check()
        self._thread.start()

    def _check(self) -> None:
        try:
            ready = _get(self.port, "/readyz", 1.0) == HTTPStatus.OK
        except OSError:
            ready = False
        if self.probe_ready and not ready and self.became_unready_at is None:
            self.became_unready_at = time.monotonic()
        self.probe_ready = ready

    def _probe(self) -> None:
        while not self._stop.wait(self.interval):
            self._check()

    def stop(self) -> None:
        """Stop probing."""
        self._stop.set()
        self._thread.join()


@dataclass
class LoadResult:
    """What the clients saw: requests routed to the backend and how each ended."""

    routed: int = 0
    succeeded: int = 0
    failures: list[str] = field(default_factory=list)
    last_success_at: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, outcome: str | None) -> None:
        """Count one routed request; ``outcome`` is None for a success, else what went wrong."""
        with self._lock:
            self.routed += 1
            if outcome is None:
                self.succeeded += 1
                self.last_success_at = time.monotonic()
            else:
                self.failures.append(outcome)


def _client(router: Router, path: str, stop: threading.Event, result: LoadResult) -> None:
    while not stop.is_set():
        if not router.ready:
            stop.wait(router.interval)
            continue
        try:
            status = _get(router.port, path, 30.0)
        except OSError as error:
            result.record(f"{type(error).__name__}: {error}")
            continue
        result.record(None if status == HTTPStatus.OK else f"HTTP {status}")


@dataclass(frozen=True)
class Scenario:
    """One shutdown under load."""

    command: Sequence[str]
    port: int
    env: Mapping[str, str] = field(default_factory=dict)
    clients: int = 8
    path: str = "/work?ms=50"
    load_before_signal: float = 1.5
    grace_period: float = 30.0
    router_lag: float = 0.0


@dataclass
class ScenarioResult:
    """What happened, seen from outside the service."""

    load: LoadResult
    exit_code: int | None
    killed: bool
    signal_sent_at: float
    readiness_flipped_after: float | None
    exited_after: float | None
    records: list[dict[str, Any]]
    report: dict[str, Any] | None
    report_text: str | None
    output: str

    def timeline(self) -> list[tuple[float, str]]:
        """(seconds relative to SIGTERM, event), in order: what the service logged and what we saw."""
        events = [(0.0, "SIGTERM sent")]
        if self.readiness_flipped_after is not None:
            events.append((self.readiness_flipped_after, "readiness probe answered 503; no more routing"))
        if self.load.last_success_at is not None:
            events.append((self.load.last_success_at - self.signal_sent_at, "last routed request succeeded"))
        for record in self.records:
            if "poolkeeper_state" in record:
                at = float(record["received"]) - self.signal_sent_at
                events.append((at, f"keeper {record['poolkeeper_keeper']!r}: {record['message'].split(': ', 1)[-1]}"))
        if self.exited_after is not None:
            how = "killed at the grace period" if self.killed else f"exit status {self.exit_code}"
            events.append((self.exited_after, f"process ended: {how}"))
        return sorted(events)


def run_scenario(scenario: Scenario) -> ScenarioResult:
    """Start the service, load it through the router, SIGTERM it, SIGKILL it at the grace period."""
    service = ServiceProcess(scenario.command, scenario.port, scenario.env)
    killed = False
    try:
        service.wait_ready()
        router = Router(scenario.port, lag=scenario.router_lag)
        router.start()
        stop = threading.Event()
        result = LoadResult()
        clients = [
            threading.Thread(target=_client, args=(router, scenario.path, stop, result), daemon=True)
            for _ in range(scenario.clients)
        ]
        for client in clients:
            client.start()
        time.sleep(scenario.load_before_signal)  # let the load run: this is the scenario, not a wait
        signal_sent_at = time.monotonic()
        service.signal(signal.SIGTERM)
        try:
            service.process.wait(timeout=scenario.grace_period)
        except subprocess.TimeoutExpired:
            service.process.kill()  # the kubelet's SIGKILL
            service.process.wait()
            killed = True
        exited_at = time.monotonic()
        stop.set()
        router.stop()
        for client in clients:
            client.join(35)
        service._reader.join(5)  # noqa: SLF001 -- our own reader: all output is in once the pipe closes
    except BaseException:
        if service.process.poll() is None:
            service.process.kill()
            service.process.wait()
        raise
    return ScenarioResult(
        load=result,
        exit_code=service.process.returncode,
        killed=killed,
        signal_sent_at=signal_sent_at,
        readiness_flipped_after=None if router.became_unready_at is None else router.became_unready_at - signal_sent_at,
        exited_after=exited_at - signal_sent_at,
        records=service.records,
        report=service.report(),
        report_text=service.report_text(),
        output=service.output_tail(40),
    )


def service_command(port: int) -> list[str]:
    """The command that runs the example service on ``port`` with this interpreter."""
    return [sys.executable, "-m", "poolkeeper.demo.service", "--port", str(port)]
