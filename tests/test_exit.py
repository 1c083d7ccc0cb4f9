"""At process exit, keepers left open are force-closed, with a ResourceWarning naming them."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from poolkeeper._exit import EXIT_DEADLINE
from tests.programs.child import Child


@pytest.fixture
def spawn(pg_url: str, application_name: str) -> Iterator[Callable[[str], Child]]:
    """Start tests/programs/exit_program.py in a mode, showing every ResourceWarning."""
    children: list[Child] = []

    def start(mode: str) -> Child:
        child = Child(
            "exit_program.py", mode, pg_url, application_name, python_options=("-W", "always::ResourceWarning")
        )
        children.append(child)
        return child

    yield start
    for child in children:
        child.kill()


def test_a_process_ending_with_a_borrowed_connection_cancels_its_query(spawn, server):
    """The exit hook warns naming the keeper and force-closes it: no backend keeps running the query."""
    child = spawn("leak")
    child.expect("main: ready")
    assert server.settle(lambda: bool(server.running("pg_sleep")))
    child.write("\n")
    assert child.wait(10) == 0
    assert "ResourceWarning: poolkeeper: keepers left open at exit: 'db'" in child.errors
    assert "forced" in child.errors  # the report, logged through logging's last-resort handler
    assert server.settle(lambda: not server.backends())


def test_exit_is_never_held_up_by_a_hanging_hook(spawn, server):
    """A shutdown hook that never returns delays exit by the exit deadline at most."""
    child = spawn("hang")
    child.expect("main: ready")
    assert server.settle(lambda: bool(server.running("pg_sleep")))
    started = time.monotonic()
    child.write("\n")
    assert child.wait(10) == 0
    assert time.monotonic() - started < EXIT_DEADLINE + 1.5
    assert "'hangs'" in child.errors
    assert server.settle(lambda: not server.backends())


def test_a_process_that_closed_its_registry_exits_without_a_warning(spawn, server):
    """No ResourceWarning and nothing left on the server when the registry was closed before exit."""
    child = spawn("closed")
    child.expect("main: ready")
    child.write("\n")
    assert child.wait(10) == 0
    child.expect("main: exiting", timeout=1)
    assert "ResourceWarning" not in child.errors
    assert "left open" not in child.errors
    assert server.settle(lambda: not server.backends())
