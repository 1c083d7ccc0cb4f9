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
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = _parser()
    arguments = parser.parse_args(argv)
    if arguments.command is None:
        parser.print_help()
        return 0
    return 0  # pragma: no cover -- no subcommand exists yet; argparse rejects unknown ones
