"""The ``poolkeeper`` command."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

import poolkeeper

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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = _parser()
    arguments = parser.parse_args(argv)
    if arguments.command == "demo":
        from poolkeeper.demo.command import run_demo  # noqa: PLC0415 -- keeps `poolkeeper --help` light

        return run_demo(clients=arguments.clients, shutdown_delay=arguments.shutdown_delay)
    parser.print_help()
    return 0
