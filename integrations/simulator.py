r"""The shutdown simulator: plays the kubelet and the load balancer for the example service, on one machine.

It starts the service (uvicorn, or gunicorn with uvicorn workers), routes load to it only while
its readiness probe succeeds, sends SIGTERM, SIGKILLs at the grace period, then reports the
requests sent and failed, how the process ended, and the connections it left on the servers.

    python -m integrations.simulator --database-url postgresql://postgres@127.0.0.1/postgres \\
        --redis-url redis://127.0.0.1:6379/9 --clients 30 --server gunicorn

The end-to-end tests drive :func:`simulate`. Not shipped in the wheel.
"""

from __future__ import annotations

import argparse
import http.server
import json
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from poolkeeper.demo.traffic import Scenario, ScenarioResult, free_port, run_scenario, service_command

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

__all__ = ["Leftovers", "Simulation", "simulate", "upstream_server"]


@dataclass
class Leftovers:
    """Connections the service still had on the servers after it ended."""

    postgres_backends: int | None = None
    redis_clients: int | None = None

    @property
    def none(self) -> bool:
        """True when no server shows a connection of the service."""
        return not self.postgres_backends and not self.redis_clients


@dataclass
class Simulation:
    """The scenario's result, the leftovers on the servers, and the budget it was held to."""

    result: ScenarioResult
    leftovers: Leftovers
    application_name: str

    @property
    def clean(self) -> bool:
        """No routed request failed, the process exited 0 by itself, its report is ok, nothing left."""
        report = self.result.report
        return (
            not self.result.load.failures
            and self.result.exit_code == 0
            and not self.result.killed
            and report is not None
            and bool(report["ok"])
            and self.leftovers.none
        )


def gunicorn_command(port: int, workers: int) -> list[str]:
    """A gunicorn command line with ``workers`` uvicorn workers serving the example service."""
    return [
        sys.executable,
        "-m",
        "gunicorn",
        "--workers",
        str(workers),
        "--worker-class",
        "uvicorn_worker.UvicornWorker",
        "--bind",
        f"127.0.0.1:{port}",
        "--graceful-timeout",
        "30",
        "--log-level",
        "warning",
        "poolkeeper.demo.service:gunicorn_app()",
    ]


def _postgres_backends(url: str, application_name: str) -> int:
    import psycopg  # noqa: PLC0415 -- only when a PostgreSQL URL is given

    with psycopg.connect(url, autocommit=True) as connection:
        row = connection.execute(
            "select count(*) from pg_stat_activity where application_name = %s", (application_name,)
        ).fetchone()
    return int(row[0]) if row else 0


def _redis_clients(url: str, application_name: str) -> int:
    import redis  # noqa: PLC0415 -- only when a Redis URL is given

    client = redis.Redis.from_url(url)
    try:
        return sum(1 for entry in client.client_list() if entry.get("name") == application_name)
    finally:
        client.close()


def inspect_servers(database_url: str | None, redis_url: str | None, application_name: str) -> Leftovers:
    """Count the service's connections on PostgreSQL and Redis, waiting briefly for them to go.

    A server notices a closed connection a moment after the client closed it; there is no
    event to wait for, so this re-reads the server's own view for up to two seconds.
    """
    end = time.monotonic() + 2.0
    while True:
        leftovers = Leftovers(
            postgres_backends=_postgres_backends(database_url, application_name)
            if database_url and database_url.startswith("postgresql")
            else None,
            redis_clients=_redis_clients(redis_url, application_name) if redis_url else None,
        )
        if leftovers.none or time.monotonic() > end:
            return leftovers
        time.sleep(0.05)


@contextmanager
def upstream_server() -> Iterator[str]:
    """A tiny HTTP upstream on 127.0.0.1 for the service's outgoing calls; yields its URL."""

    class Upstream(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b'{"upstream": "ok"}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 -- the base class's name
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def simulate(
    *,
    server: str = "uvicorn",
    workers: int = 2,
    clients: int = 30,
    database_url: str | None = None,
    redis_url: str | None = None,
    upstream_url: str | None = None,
    shutdown_delay: float = 1.0,
    drain_timeout: float = 10.0,
    grace_period: float = 30.0,
    path: str = "/work?ms=100",
    router_lag: float = 0.0,
) -> Simulation:
    """Run one shutdown under load and inspect the servers afterwards."""
    port = free_port()
    application_name = f"pk-sim-{uuid.uuid4().hex[:10]}"
    env = {
        "POOLKEEPER_DEMO_APPLICATION_NAME": application_name,
        "POOLKEEPER_SHUTDOWN_DELAY": str(shutdown_delay),
        "POOLKEEPER_DRAIN_TIMEOUT": str(drain_timeout),
    }
    if database_url:
        env["POOLKEEPER_DEMO_DATABASE_URL"] = database_url
    if redis_url:
        env["POOLKEEPER_DEMO_REDIS_URL"] = redis_url
    if upstream_url:
        env["POOLKEEPER_DEMO_UPSTREAM_URL"] = upstream_url
    command = gunicorn_command(port, workers) if server == "gunicorn" else service_command(port)
    result = run_scenario(
        Scenario(
            command=command,
            port=port,
            env=env,
            clients=clients,
            path=path,
            grace_period=grace_period,
            router_lag=router_lag,
        )
    )
    return Simulation(result, inspect_servers(database_url, redis_url, application_name), application_name)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the simulator from the command line; exit 0 when the shutdown was clean."""
    parser = argparse.ArgumentParser(prog="python -m integrations.simulator", description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", choices=["uvicorn", "gunicorn"], default="uvicorn")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--clients", type=int, default=30)
    parser.add_argument("--database-url")
    parser.add_argument("--redis-url")
    parser.add_argument("--with-upstream", action="store_true", help="start a local HTTP upstream for the service")
    parser.add_argument("--shutdown-delay", type=float, default=1.0)
    parser.add_argument("--grace-period", type=float, default=30.0)
    parser.add_argument(
        "--router-lag", type=float, default=0.0, help="seconds the router keeps routing after readiness fails"
    )
    arguments = parser.parse_args(argv)

    def run(upstream_url: str | None) -> Simulation:
        return simulate(
            server=arguments.server,
            workers=arguments.workers,
            clients=arguments.clients,
            database_url=arguments.database_url,
            redis_url=arguments.redis_url,
            upstream_url=upstream_url,
            shutdown_delay=arguments.shutdown_delay,
            grace_period=arguments.grace_period,
            router_lag=arguments.router_lag,
        )

    if arguments.with_upstream:
        with upstream_server() as url:
            simulation = run(url)
    else:
        simulation = run(None)
    result = simulation.result
    summary = {
        "requests_routed": result.load.routed,
        "requests_failed": len(result.load.failures),
        "failures": sorted(set(result.load.failures))[:10],
        "readiness_503_after_s": result.readiness_flipped_after,
        "exit_code": result.exit_code,
        "killed_at_grace_period": result.killed,
        "exited_after_s": result.exited_after,
        "report_ok": None if result.report is None else result.report["ok"],
        "postgres_backends_left": simulation.leftovers.postgres_backends,
        "redis_clients_left": simulation.leftovers.redis_clients,
    }
    print(json.dumps(summary, indent=2))
    return 0 if simulation.clean else 1


if __name__ == "__main__":
    raise SystemExit(main())
