"""The grace-budget test service (tests/programs/grace_app.py) under the uvicorn CLI, uvicorn.run() or gunicorn."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from poolkeeper.demo.traffic import free_port

PROGRAMS = Path(__file__).resolve().parent / "programs"
GUNICORN = Path(sys.executable).with_name("gunicorn")


@dataclass
class Service:
    """A running service: its process, port, PostgreSQL application_name and JSON log records."""

    process: subprocess.Popen[str]
    port: int
    application_name: str
    records: list[dict[str, Any]] = field(default_factory=list)
    output: list[str] = field(default_factory=list)

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, dict[str, Any]]:
        """GET ``path`` on a fresh connection; (status, JSON body)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, json.loads(response.read() or b"{}")
        finally:
            connection.close()

    def record(self, key: str) -> dict[str, Any] | None:
        """The first log record carrying the ``key`` extra field."""
        return next((record for record in self.records if key in record), None)


def _read(service: Service) -> None:
    assert service.process.stderr is not None
    for line in service.process.stderr:
        service.output.append(line)
        if line.startswith("{"):
            with suppress(ValueError):
                service.records.append(json.loads(line))


@contextmanager
def grace_service(
    pg_url: str, *, grace_period: float, shutdown_delay: float = 0.0, close_timeout: float = 2.0, runner: str = "cli"
) -> Iterator[Service]:
    """The app under the uvicorn CLI, ``uvicorn.run()`` or gunicorn with 2 uvicorn workers, by ``runner``.

    ``"cli"``: ``uvicorn grace_app:app`` (no --timeout-graceful-shutdown); ``"uvicorn.run"``;
    ``"gunicorn"``: tests/programs/grace_gunicorn_conf.py, where the grace period is given as
    ``graceful_timeout`` only, never as ``$POOLKEEPER_GRACE_PERIOD``: the workers' budget must come
    from it. Yields once it is ready; kills it (and, for gunicorn, its workers) at exit if it still runs.
    """
    port = free_port()
    name = f"pk-grace-{uuid.uuid4().hex[:10]}"
    env = {
        **os.environ,
        "PK_DATABASE_URL": pg_url,
        "PK_APPLICATION_NAME": name,
        "POOLKEEPER_GRACE_PERIOD": str(grace_period),
        "PK_SHUTDOWN_DELAY": str(shutdown_delay),
        "PK_CLOSE_TIMEOUT": str(close_timeout),
    }
    if runner == "cli":
        command = [sys.executable, "-m", "uvicorn", "grace_app:app", "--app-dir", str(PROGRAMS)]
        command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    elif runner == "gunicorn":
        command = [str(GUNICORN), "-c", "grace_gunicorn_conf.py", "-b", f"127.0.0.1:{port}", "grace_app:app"]
        del env["POOLKEEPER_GRACE_PERIOD"]
        env["PK_GRACEFUL_TIMEOUT"] = f"{grace_period:g}"
    else:
        command = [sys.executable, str(PROGRAMS / "grace_app.py"), str(port)]
    process = subprocess.Popen(
        command,
        env=env,
        cwd=PROGRAMS,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # its own process group: gunicorn's workers are ended with it
    )
    service = Service(process, port, name)
    reader = threading.Thread(target=_read, args=(service,), daemon=True)
    reader.start()
    try:
        end = time.monotonic() + 30
        while True:
            assert process.poll() is None, "".join(service.output)
            # Under gunicorn every worker must be serving: one still booting takes no connection.
            started = sum("Application startup complete" in line for line in list(service.output))
            try:
                if service.get("/readyz", timeout=1)[0] == 200 and (runner != "gunicorn" or started == 2):
                    break
            except OSError:
                pass
            assert time.monotonic() < end, "the service did not become ready"
            time.sleep(0.05)
        yield service
    finally:
        if process.poll() is None:  # not reaped yet: the group is still the one this test started
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # gunicorn's workers included
        process.wait()
        reader.join(5)


def start_requests(service: Service, paths: list[str]) -> tuple[list[threading.Thread], dict[int, object]]:
    """Send each of ``paths`` on its own connection, in a thread; outcomes (status or exception name) by index."""
    outcomes: dict[int, object] = {}

    def send(index: int, path: str) -> None:
        try:
            outcomes[index] = service.get(path, timeout=30)[0]
        except Exception as error:
            outcomes[index] = type(error).__name__

    threads = [threading.Thread(target=send, args=(i, path), daemon=True) for i, path in enumerate(paths)]
    for thread in threads:
        thread.start()
    return threads, outcomes
