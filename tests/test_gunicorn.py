"""End to end under gunicorn --preload with 2 workers and the hooks of poolkeeper.gunicorn (gunicorn_conf.py)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import Server
from tests.programs.child import PROGRAMS

GUNICORN = Path(sys.executable).with_name("gunicorn")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def eventually(predicate: Any, timeout: float = 20.0) -> bool:
    """Re-check ``predicate`` until it holds: processes and servers offer no event to wait on here.

    The timeout is a ceiling for a loaded machine, never a wait for something to happen.
    """
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


class Gunicorn:
    """A gunicorn master serving tests/programs/gunicorn_app.py, its stderr collected."""

    def __init__(self, app: str, *options: str, env: dict[str, str]) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [str(GUNICORN), "-c", "gunicorn_conf.py", "-b", f"127.0.0.1:{self.port}", *options, "--", app],
            cwd=PROGRAMS,
            env={**os.environ, **env, "PYTHONPATH": str(PROGRAMS.parent.parent)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        assert self.process.stderr is not None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def workers(self) -> list[int]:
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        try:
            return [int(pid) for pid in children.read_text().split()]
        except FileNotFoundError:
            return []

    def get(self, path: str = "/") -> tuple[int, dict[str, Any]]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", headers={"Connection": "close"})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 -- a loopback URL
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def connections(self, pid: int) -> dict[str, int]:
        """The backend and Redis client id that worker ``pid`` reported once it was ready (gunicorn_conf.py)."""
        pattern = rf"worker pid={pid} backend=(\d+) redis=(\d+)"
        assert eventually(lambda: re.search(pattern, self.stderr) is not None), self.stderr
        found = re.search(pattern, self.stderr)
        assert found is not None
        return {"pid": pid, "backend": int(found[1]), "redis": int(found[2])}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def redis_clients(url: str, name: str) -> list[int]:
    with redis.Redis.from_url(url) as side:
        return [int(client["id"]) for client in side.client_list() if client.get("name") == name]


WORKERS = {
    "sync": ("gunicorn_app:application",),
    "gthread": ("gunicorn_app:application", "--threads", "4"),
    "uvicorn": ("gunicorn_app:asgi_application", "-k", "uvicorn_worker.UvicornWorker"),
}


@pytest.mark.parametrize("worker_class", list(WORKERS))
def test_preload_worker_and_master_shutdown(
    server: Server, pg_url: str, redis_url: str, application_name: str, worker_class: str
) -> None:
    """SIGTERM to a worker spares the master's and the other worker's connections; SIGTERM to the master leaves none."""
    env = {
        "PK_APPLICATION_NAME": application_name,
        "POOLKEEPER_POSTGRES_URL": pg_url,
        "POOLKEEPER_REDIS_URL": redis_url,
    }
    app, *options = WORKERS[worker_class]
    gunicorn = Gunicorn(app, "--preload", "-w", "2", *options, env=env)
    try:
        assert eventually(lambda: len(gunicorn.workers()) == 2 and "Booting worker" in gunicorn.stderr), gunicorn.stderr
        imported = re.search(r"import pid=(\d+) backend=(\d+) redis=(\d+)", gunicorn.stderr)
        assert imported is not None, gunicorn.stderr
        assert int(imported[1]) == gunicorn.process.pid  # preloaded: the master opened these
        master_backend, master_redis = int(imported[2]), int(imported[3])
        first, second = gunicorn.workers()
        own = {pid: gunicorn.connections(pid) for pid in (first, second)}
        # Each worker has connections of its own, none of them the master's, and serves on them.
        assert len({master_backend, own[first]["backend"], own[second]["backend"]}) == 3
        assert len({master_redis, own[first]["redis"], own[second]["redis"]}) == 3
        status, body = gunicorn.get()
        assert (status, body) == (200, own[body["pid"]])

        os.kill(first, signal.SIGTERM)
        assert eventually(lambda: first not in gunicorn.workers()), gunicorn.stderr
        assert eventually(lambda: own[first]["backend"] not in [pid for pid, _, _ in server.backends()]), (
            gunicorn.stderr
        )

        backends = [pid for pid, _, _ in server.backends()]
        assert master_backend in backends  # the master's idle connection is still open
        assert own[second]["backend"] in backends  # and so is the other worker's
        clients = redis_clients(redis_url, application_name)
        assert master_redis in clients
        assert own[second]["redis"] in clients
        assert own[first]["redis"] not in clients
        status, body = gunicorn.get()  # the other worker or the stopped one's replacement, on its own connections
        assert status == 200
        assert body["pid"] != first
        assert body == gunicorn.connections(body["pid"])
        assert gunicorn.get("/readyz")[0] == 200  # the other workers are ready

        assert eventually(lambda: len(gunicorn.workers()) == 2), gunicorn.stderr  # the stopped worker replaced
        workers = {first, *gunicorn.workers()}
        gunicorn.process.send_signal(signal.SIGTERM)
        assert gunicorn.process.wait(timeout=20) == 0
        gunicorn._reader.join(5)
    finally:
        gunicorn.stop()
    assert server.settle(lambda: server.backends() == [], timeout=5), server.backends()
    assert redis_clients(redis_url, application_name) == []
    stderr = gunicorn.stderr
    assert "keepers left open at exit" not in stderr
    assert "ResourceWarning" not in stderr
    for pid in workers:  # each worker's report, once, with its pid
        assert len(re.findall(rf"poolkeeper: worker {pid} closed", stderr)) == 1, stderr
    assert "poolkeeper: master" not in stderr  # the master closed its own pools quietly
