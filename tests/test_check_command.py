"""`poolkeeper check`: the shutdown timeline planned inside a grace period, and a failing exit when it cannot fit."""

from __future__ import annotations

import subprocess
import sys

import pytest

from poolkeeper._budget import Plan
from poolkeeper.cli import main


def test_the_default_timeouts_fit_the_default_30_s_grace_period_even_with_a_5_s_delay(capsys, monkeypatch):
    """With no option (30 s grace, drain 15, close 5) and with a 5 s delay, check exits 0 and prints the points."""
    monkeypatch.delenv("POOLKEEPER_GRACE_PERIOD", raising=False)
    assert main(["check"]) == 0
    assert main(["check", "--shutdown-delay", "5"]) == 0
    out = capsys.readouterr().out
    assert "max(0, 30 - 5 - 3) = 22s" in out
    assert "exit point = grace - margin = 27s" in out
    assert "SIGKILL" in out
    assert "The timeouts fit the grace period." in out


def test_timeouts_that_cannot_fit_exit_1_naming_the_problem(capsys):
    """Grace 8 s with a 5 s delay and close_timeout 5 s leaves requests no time: exit 1 and a warning."""
    assert main(["check", "--grace-period", "8", "--shutdown-delay", "5", "--close-timeout", "5"]) == 1
    err = capsys.readouterr().err
    assert "WARNING" in err
    assert "does not fit in the grace period of 8s" in err


def test_a_drain_timeout_the_force_point_would_cut_exits_1(capsys):
    """drain_timeout 30 s inside a 30 s grace period cannot be honoured: exit 1 naming drain_timeout."""
    assert main(["check", "--drain-timeout", "30"]) == 1
    assert "drain_timeout 30s cannot be honoured" in capsys.readouterr().err


def test_the_grace_period_comes_from_the_environment(capsys, monkeypatch):
    """Without --grace-period, $POOLKEEPER_GRACE_PERIOD is used."""
    monkeypatch.setenv("POOLKEEPER_GRACE_PERIOD", "60")
    assert main(["check"]) == 0
    assert "Grace period 60s" in capsys.readouterr().out


@pytest.mark.parametrize(("option", "value"), [("--grace-period", "-1"), ("--close-timeout", "nan")])
def test_bad_values_exit_2_naming_the_option(capsys, option, value):
    """A negative or NaN number of seconds is refused with an error naming the option."""
    assert main(["check", option, value]) == 2
    assert option.lstrip("-").replace("-", "_") in capsys.readouterr().err.replace("-", "_")


def test_the_command_runs_as_poolkeeper_check():
    """`python -m poolkeeper check` is the documented command."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "poolkeeper",
            "check",
            "--grace-period",
            "8",
            "--close-timeout",
            "2",
            "--drain-timeout",
            "3",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "max(0, 8 - 2 - 1) = 5s" in result.stdout


def test_the_force_point_leaves_close_timeout_and_margin_before_the_kill():
    """force_at + close_timeout + margin == grace period whenever the plan fits; exit_at == grace - margin."""
    for grace, delay, close in [(30, 0, 5), (30, 5, 5), (8, 1, 2), (120, 10, 10)]:
        plan = Plan(float(grace), float(delay), float(close))
        assert plan.fits
        assert plan.force_at + plan.close_timeout + plan.margin == pytest.approx(grace)
        assert plan.exit_at == pytest.approx(grace - plan.margin)
        assert plan.margin == max(1.0, grace / 10)
