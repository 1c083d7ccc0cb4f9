"""``poolkeeper demo``: run the example service, load it, SIGTERM it, print the timeline and report."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from poolkeeper.demo.traffic import Scenario, ScenarioResult, free_port, run_scenario, service_command

__all__ = ["run_demo"]


def _print_result(result: ScenarioResult) -> None:
    print("\nTimeline (seconds after SIGTERM):")
    for at, event in result.timeline():
        print(f"  {at:+7.3f}s  {event}")
    load = result.load
    print(f"\nRequests routed: {load.routed}, succeeded: {load.succeeded}, failed: {len(load.failures)}")
    for failure in sorted(set(load.failures))[:5]:
        print(f"  failure: {failure}")
    print("\nShutdown report logged by the service:")
    print(result.report_text or "  (none: the service did not log a report)")
    if result.killed:
        print("\nThe service was killed at the end of the grace period.")


def run_demo(*, clients: int = 8, shutdown_delay: float = 1.0, grace_period: float = 30.0) -> int:
    """Run the demo; returns 0 when the shutdown was clean and no routed request failed."""
    try:
        import fastapi  # noqa: F401, PLC0415 -- only to give a clear message when the extra is missing
        import sqlalchemy  # noqa: F401, PLC0415
        import uvicorn  # noqa: F401, PLC0415
    except ImportError as error:
        print(f"poolkeeper demo needs the example service's libraries ({error.name} is missing):")
        print('  pip install ".[fastapi,sqlalchemy]"   (at the top of a poolkeeper clone)')
        return 2
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="poolkeeper-demo-") as directory:
        env = {
            "POOLKEEPER_DEMO_DATABASE_URL": os.environ.get(
                "POOLKEEPER_DEMO_DATABASE_URL", f"sqlite:///{Path(directory) / 'demo.db'}"
            ),
            "POOLKEEPER_SHUTDOWN_DELAY": str(shutdown_delay),
        }
        print(f"Starting the example service on 127.0.0.1:{port} (database: {env['POOLKEEPER_DEMO_DATABASE_URL']})")
        print(f"{clients} clients send requests through a readiness-respecting router; SIGTERM follows.")
        result = run_scenario(
            Scenario(command=service_command(port), port=port, env=env, clients=clients, grace_period=grace_period)
        )
    _print_result(result)
    report = result.report
    clean = (
        result.exit_code == 0 and not result.killed and report is not None and report["ok"] and not result.load.failures
    )
    print("\nClean shutdown." if clean else "\nThe shutdown was NOT clean.")
    return 0 if clean else 1
