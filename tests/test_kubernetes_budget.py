"""The Kubernetes manifest's probes and timeouts fit the grace budget poolkeeper plans inside its grace period."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from poolkeeper._budget import GRACE_PERIOD_ENV, Plan
from poolkeeper.cli import main

MANIFEST = Path(__file__).resolve().parent.parent / "integrations" / "kubernetes" / "deployment.yaml"


def container() -> tuple[dict[str, Any], dict[str, Any]]:
    deployment = yaml.safe_load(MANIFEST.read_text())
    pod = deployment["spec"]["template"]["spec"]
    return pod, pod["containers"][0]


def settings() -> dict[str, float]:
    _, service = container()
    return {item["name"]: float(item["value"]) for item in service["env"] if "value" in item}


def plan() -> Plan:
    env = settings()
    return Plan(
        env[GRACE_PERIOD_ENV],
        env["POOLKEEPER_SHUTDOWN_DELAY"],
        env["POOLKEEPER_CLOSE_TIMEOUT"],
        env["POOLKEEPER_DRAIN_TIMEOUT"],
    )


def test_poolkeeper_is_told_the_pods_grace_period():
    """POOLKEEPER_GRACE_PERIOD equals terminationGracePeriodSeconds, so the budget ends at the kill."""
    pod, _ = container()
    assert settings()[GRACE_PERIOD_ENV] == pod["terminationGracePeriodSeconds"]


def test_delay_drain_force_close_and_margin_fit_the_grace_period():
    """Shutdown delay + drain_timeout fit before the force point; force point + close_timeout + margin = grace."""
    budget = plan()
    assert budget.problems() == []
    assert budget.shutdown_delay + budget.drain_timeout <= budget.force_at
    assert budget.force_at + budget.close_timeout + budget.margin == budget.grace_period
    assert budget.exit_at < budget.grace_period


def test_poolkeeper_check_agrees_with_the_manifest(capsys):
    """`poolkeeper check` with the manifest's numbers exits 0."""
    budget = plan()
    arguments = ["check", "--grace-period", str(budget.grace_period), "--shutdown-delay", str(budget.shutdown_delay)]
    arguments += ["--drain-timeout", str(budget.drain_timeout), "--close-timeout", str(budget.close_timeout)]
    assert main(arguments) == 0, capsys.readouterr().err


def test_the_server_drain_is_bounded_by_poolkeeper_not_by_a_server_timeout_that_could_overrun():
    """No --timeout-graceful-shutdown: the force point ends stuck requests, inside the grace period."""
    _, service = container()
    assert not any(arg.startswith("--timeout-graceful-shutdown") for arg in service["command"])


def test_readiness_survives_a_spike_and_liveness_cannot_kill_a_shutdown_in_progress():
    """Readiness needs 3 failures (>= 10 s) to drop the pod; liveness failures cannot add up within the grace period."""
    pod, service = container()
    readiness, liveness = service["readinessProbe"], service["livenessProbe"]
    assert readiness["failureThreshold"] >= 3
    assert readiness["periodSeconds"] * readiness["failureThreshold"] >= 10
    assert readiness["timeoutSeconds"] >= 1
    # From the moment uvicorn stops accepting (after the shutdown delay), liveness probes fail;
    # they must not reach their threshold before the grace period ends the pod anyway.
    budget = plan()
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= pod["terminationGracePeriodSeconds"] - (
        budget.shutdown_delay
    )


def test_probes_use_the_health_router_paths():
    """Readiness and liveness probe the paths health_router() serves by default."""
    _, service = container()
    assert service["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert service["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert "preStop" in service["lifecycle"]
