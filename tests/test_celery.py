"""Celery prefork with a wrapped engine and the recipe of docs/processes.md (tests/programs/celery_app.py)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import celery  # a dev dependency: missing, the run fails at collection rather than skip

from tests.conftest import Server
from tests.programs.child import PROGRAMS, ROOT

CELERY = Path(sys.executable).with_name("celery")


def test_prefork_children_use_and_close_their_own_connections(
    server: Server, pg_url: str, redis_url: str, application_name: str
) -> None:
    """Tasks use the children's own connections; SIGTERM: exit 0, every registry closed ok, 0 backends left."""
    env = {
        **os.environ,
        "PK_APPLICATION_NAME": application_name,
        "POOLKEEPER_POSTGRES_URL": pg_url,
        "POOLKEEPER_REDIS_URL": redis_url,
        "PYTHONPATH": str(ROOT),
    }
    worker = subprocess.Popen(
        [str(CELERY), "-A", "celery_app", "worker", "--pool", "prefork", "-c", "2", "--without-heartbeat",
         "--without-gossip", "--without-mingle", "-Q", application_name, "--loglevel", "INFO"],
        cwd=PROGRAMS, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert worker.stderr is not None
        for line in worker.stderr:
            lines.append(line)
            if " ready." in line:
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    client = celery.Celery(broker=redis_url, backend=redis_url)
    try:
        assert ready.wait(30), "".join(lines)
        main_backends = [pid for pid, _, _ in server.backends()]  # the main process's own connection
        results = [client.send_task("celery_app.backend", queue=application_name) for _ in range(10)]
        served = [tuple(result.get(timeout=20)) for result in results]
        assert not {backend for _, backend in served} & set(main_backends)  # never the main process's connection
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0, "".join(lines)
        reader.join(5)
    finally:
        client.close()
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    output = "".join(lines)
    children = {pid for pid, _ in served}
    for pid in children:
        assert f"celery child {pid} closed: ok=True" in output, output
    assert re.search(r"celery main \d+ closed: ok=True same_backend=True", output), output
    assert "keepers left open at exit" not in output
    assert server.settle(lambda: server.backends() == [], timeout=5), server.backends()
