"""The Kubernetes manifest's grace period covers the shutdown budget it documents."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

MANIFEST = Path(__file__).resolve().parent.parent / "integrations" / "kubernetes" / "deployment.yaml"


def container() -> tuple[dict[str, Any], dict[str, Any]]:
    deployment = yaml.safe_load(MANIFEST.read_text())
    pod = deployment["spec"]["template"]["spec"]
    return pod, pod["containers"][0]


def test_grace_period_exceeds_delay_plus_server_drain_plus_pool_deadline():
    """Shutdown delay + server drain + registry deadline leaves a margin inside terminationGracePeriodSeconds."""
    pod, service = container()
    env = {item["name"]: item.get("value") for item in service["env"]}
    server_drain = next(
        float(arg.split("=", 1)[1]) for arg in service["command"] if arg.startswith("--timeout-graceful-shutdown=")
    )
    delay = float(env["POOLKEEPER_SHUTDOWN_DELAY"])
    deadline = float(env["POOLKEEPER_DEADLINE"])
    assert deadline >= float(env["POOLKEEPER_DRAIN_TIMEOUT"]) + float(env["POOLKEEPER_CLOSE_TIMEOUT"])
    assert delay + server_drain + deadline + 3 <= pod["terminationGracePeriodSeconds"]


def test_probes_use_the_health_router_paths():
    """Readiness and liveness probe the paths health_router() serves by default."""
    _, service = container()
    assert service["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert service["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert "preStop" in service["lifecycle"]
