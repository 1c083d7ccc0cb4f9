"""The Flask and Django examples under gunicorn with poolkeeper.gunicorn's hooks, stopped by SIGTERM under load."""

from __future__ import annotations

import importlib
import re
import sys
import uuid
from pathlib import Path

import pytest

from integrations.simulator import inspect_servers
from poolkeeper.demo.traffic import Scenario, free_port, run_scenario

ROOT = Path(__file__).resolve().parent.parent
APPS = {
    "flask": "integrations.flask_app.app:app",
    "django": "integrations.django_app.app:application",
    "django-pool": "integrations.django_app.app:application",  # Django's psycopg_pool pool, wrapped
}
EXTRA_ENV = {"django-pool": {"POOLKEEPER_DJANGO_POOL": "1"}}


@pytest.mark.parametrize("framework", list(APPS))
def test_sigterm_under_load_fails_no_routed_request(framework: str, pg_url: str) -> None:
    """SIGTERM under load: 0 failed routed requests, exit 0, each worker's report ok, 0 backends left."""
    importlib.import_module(framework.partition("-")[0])  # a dev dependency: missing, the test fails rather than skip
    port = free_port()
    application_name = f"pk-{framework}-{uuid.uuid4().hex[:10]}"
    command = [
        sys.executable, "-m", "gunicorn",
        "-c", str(ROOT / "integrations" / "gunicorn_conf.py"),
        "--chdir", str(ROOT),
        "-b", f"127.0.0.1:{port}",
        APPS[framework],
    ]  # fmt: skip
    env = {
        "POOLKEEPER_DEMO_DATABASE_URL": pg_url,
        "POOLKEEPER_DEMO_APPLICATION_NAME": application_name,
        # Longer than the router's probe can take: a sync worker answers the probe only after
        # the requests queued before it (the probe's own timeout is 1 s), so on a busy machine
        # a 1 s delay can end before the router has seen readiness fail.
        "POOLKEEPER_SHUTDOWN_DELAY": "2.0",
        **EXTRA_ENV.get(framework, {}),
    }
    result = run_scenario(Scenario(command=command, port=port, env=env, clients=8, path="/work?ms=50"))

    output = result.output
    assert result.load.failures == [], output
    assert result.load.succeeded > 0
    assert result.readiness_flipped_after is not None, output  # the router stopped on readiness, not on errors
    assert (result.exit_code, result.killed) == (0, False), output
    reports = re.findall(r"poolkeeper: worker \d+ closed within [\d.]+s:\npoolkeeper shutdown (\w+)", output)
    assert reports == ["ok", "ok"], output
    if framework == "django-pool":  # what each worker closed is Django's own psycopg_pool pool
        assert len(re.findall(r"^db +psycopg_pool +clean", output, re.MULTILINE)) == 2, output
    assert inspect_servers(pg_url, None, application_name).postgres_backends == 0
