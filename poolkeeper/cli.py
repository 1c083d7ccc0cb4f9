"""The ``poolkeeper`` command."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

import poolkeeper
from poolkeeper._budget import DEFAULT_GRACE_PERIOD, GRACE_PERIOD_ENV, Plan, grace_period_or_default
from poolkeeper._timeouts import DEFAULT_CLOSE_TIMEOUT, DEFAULT_DRAIN_TIMEOUT, check_timeout

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="poolkeeper",
        description="Shut connection pools down the way production needs.",
    )
    parser.add_argument("--version", action="version", version=f"poolkeeper {poolkeeper.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="run an example service under load, SIGTERM it, and show the shutdown",
        description="Run the example service (SQLite, no server needed) under load, send it SIGTERM "
        "and print the shutdown timeline and report. Exits 0 when the shutdown was clean.",
    )
    demo.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    demo.add_argument(
        "--shutdown-delay", type=float, default=1.0, help="seconds to keep serving after SIGTERM (default 1)"
    )
    check = commands.add_parser(
        "check",
        help="print the shutdown timeline planned inside a grace period; exit 1 when the timeouts do not fit",
        description="Print when each shutdown phase starts, in seconds after the first SIGTERM, for the "
        "given grace period and timeouts. Exits 1, naming the problem, when they cannot fit.",
    )
    check.add_argument(
        "--grace-period",
        type=float,
        default=None,
        help=f"terminationGracePeriodSeconds (default: ${GRACE_PERIOD_ENV}, else {DEFAULT_GRACE_PERIOD:g})",
    )
    check.add_argument("--shutdown-delay", type=float, default=0.0, help="seconds to keep serving (default 0)")
    check.add_argument(
        "--drain-timeout",
        type=float,
        default=DEFAULT_DRAIN_TIMEOUT,
        help=f"the registry's drain_timeout (default {DEFAULT_DRAIN_TIMEOUT:g})",
    )
    check.add_argument(
        "--close-timeout",
        type=float,
        default=DEFAULT_CLOSE_TIMEOUT,
        help=f"the registry's close_timeout (default {DEFAULT_CLOSE_TIMEOUT:g})",
    )
    return parser


def _check(arguments: argparse.Namespace) -> int:
    try:
        plan = Plan(
            grace_period_or_default(arguments.grace_period),
            check_timeout("--shutdown-delay", arguments.shutdown_delay, allow_none=False) or 0.0,
            check_timeout("--close-timeout", arguments.close_timeout, allow_none=False) or 0.0,
            check_timeout("--drain-timeout", arguments.drain_timeout, allow_none=False) or 0.0,
        )
    except (TypeError, ValueError) as error:
        print(f"poolkeeper check: error: {error}", file=sys.stderr)
        return 2
    print(
        f"Grace period {plan.grace_period:g}s, shutdown delay {plan.shutdown_delay:g}s, "
        f"drain_timeout {plan.drain_timeout:g}s, close_timeout {plan.close_timeout:g}s, margin {plan.margin:g}s"
    )
    print(
        f"Force point = max(shutdown delay, grace - close_timeout - margin) = max({plan.shutdown_delay:g}, "
        f"{plan.grace_period:g} - {plan.close_timeout:g} - {plan.margin:g}) = {plan.force_at:g}s; "
        f"exit point = grace - margin = {plan.exit_at:g}s"
    )
    print("Timeline (seconds after the first SIGTERM):")
    for at, what in plan.timeline():
        print(f"  {at:6.1f}s  {what}")
    problems = plan.problems()
    for problem in problems:
        print(f"WARNING: {problem}", file=sys.stderr)
    if not problems:
        print("The timeouts fit the grace period.")
    return 1 if problems else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = _parser()
    arguments = parser.parse_args(argv)
    if arguments.command == "demo":
        from poolkeeper.demo.command import run_demo  # noqa: PLC0415 -- keeps `poolkeeper --help` light

        return run_demo(clients=arguments.clients, shutdown_delay=arguments.shutdown_delay)
    if arguments.command == "check":
        return _check(arguments)
    parser.print_help()
    return 0
