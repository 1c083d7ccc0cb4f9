"""poolkeeper.run: a signal stops main, the registry closes, the exit code tells how it went."""

from __future__ import annotations

import asyncio
import gc
import signal
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import psycopg_pool
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

import poolkeeper
from poolkeeper import KeeperState, RegistrationError, Registry
from tests.conftest import sqlalchemy_url
from tests.programs.child import Child


@pytest.fixture
def spawn(pg_url: str, application_name: str) -> Iterator[Callable[..., Child]]:
    """Start tests/programs/run_program.py in a mode; kills what is left at teardown."""
    children: list[Child] = []

    def start(mode: str, *deadline: str) -> Child:
        child = Child("run_program.py", mode, pg_url, application_name, *deadline)
        children.append(child)
        return child

    yield start
    for child in children:
        child.kill()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_cancels_main_and_the_worker_exits_cleanly(spawn, signum):
    """SIGTERM or SIGINT cancels main, the registry closes on main's loop, and the exit code is 0."""
    child = spawn("wait")
    child.expect("main: ready")
    child.send(signum)
    child.expect("main: cancelled")
    assert child.wait(10) == 0
    assert "poolkeeper shutdown ok" in child.output
    assert "KeyboardInterrupt" not in child.errors


def test_a_second_signal_during_the_close_forces_it(spawn, server):
    """A second SIGTERM while the close waits for a borrowed connection force-closes it; exit code 1."""
    child = spawn("force")
    child.expect("main: ready")
    assert server.settle(lambda: bool(server.running("pg_sleep")))
    child.send(signal.SIGTERM)
    child.expect("main: cancelled")
    child.send(signal.SIGTERM)
    assert child.wait(10) == 1
    assert "forced" in child.output
    assert server.settle(lambda: not server.backends())


def test_the_grace_budget_forces_a_stuck_borrower_and_the_worker_exits_inside_the_grace_period(spawn, server):
    """One SIGTERM, grace 4 s: main is cancelled after the 0.5 s delay, the stuck borrower forced at 2 s, exit < 4 s."""
    child = spawn("budget")
    child.expect("main: ready")
    assert server.settle(lambda: bool(server.running("pg_sleep")))
    sent = time.monotonic()
    child.send(signal.SIGTERM)
    cancelled = child.expect("main: cancelled")
    assert child.wait(4) == 1
    exited = time.monotonic() - sent
    assert cancelled - sent >= 0.5
    assert 2.0 <= exited < 4.0
    assert "grace budget: force point 2s" in child.output
    assert "force-closed borrowers:\ndb: held for" in child.output  # the report names the forced borrower
    assert server.settle(lambda: not server.backends())


def test_main_raising_gives_exit_code_1_and_the_registry_still_closes(spawn):
    """An exception from main is logged with its traceback, the registry closes, and the exit code is 1."""
    child = spawn("error")
    assert child.wait(10) == 1
    assert "ValueError: boom" in child.output
    assert "poolkeeper shutdown ok" in child.output


def test_run_returns_0_and_closes_async_keepers_on_mains_loop(pg_url, application_name, server):
    """run() closes main's AsyncEngine on the loop it lives on, even once main dropped it: no backend is left.

    The engine, local to main, and its keeper reference each other; once main has ended, only the
    collector frees them. Here it runs in the gap between main's end and the registry's close.
    """
    registry = Registry()
    engines: list[weakref.ref[object]] = []

    async def main() -> None:
        engine = registry.wrap(
            create_async_engine(
                sqlalchemy_url(pg_url, "asyncpg"),
                connect_args={"server_settings": {"application_name": application_name}},
            ),
            name="db",
        )
        engines.append(weakref.ref(engine))
        async with engine.connect() as connection:
            assert (await connection.execute(sa.text("select 1"))).scalar() == 1
        task = asyncio.current_task()
        assert task is not None
        task.add_done_callback(lambda _: gc.collect())  # main's frame is gone by then

    assert poolkeeper.run(main, registry=registry, signals=()) == 0
    assert registry.report is not None
    assert registry.report.ok
    assert registry.report["db"].outcome == "clean"
    assert registry["db"].state is KeeperState.CLOSED
    assert server.settle(lambda: not server.backends())
    gc.collect()
    assert engines[0]() is None  # closed, its registry no longer keeps it


def test_run_lets_go_of_what_main_unwraps_or_closes(pg_url):
    """What run() holds while main runs still goes once unwrapped, or closed by the library's own close."""
    registry = Registry()

    async def main() -> None:
        engine = registry.wrap(sa.create_engine("sqlite://"), name="unwrapped")
        registry.unwrap(engine)
        pool = registry.wrap(psycopg_pool.AsyncConnectionPool(pg_url, min_size=1, open=False), name="closed")
        await pool.open()
        await pool.close()  # the library's own close closes the keeper too
        refs: list[weakref.ref[Any]] = [weakref.ref(engine), weakref.ref(pool), weakref.ref(registry["closed"])]
        del engine, pool
        gc.collect()
        assert [ref() for ref in refs] == [None, None, None]

    assert poolkeeper.run(main, registry=registry, signals=()) == 0
    assert list(registry) == []


def test_a_report_that_is_not_ok_gives_exit_code_1():
    """A failing shutdown hook makes the report not ok, and run() returns 1."""
    registry = Registry()

    @registry.on_shutdown(name="broken")
    def broken() -> None:
        raise RuntimeError("metrics backend down")

    async def main() -> None:
        await asyncio.sleep(0)

    assert poolkeeper.run(main, registry=registry, signals=()) == 1
    assert registry.report is not None
    assert registry.report["broken"].error == "RuntimeError: metrics backend down"


def test_system_exit_from_main_propagates_after_the_close():
    """sys.exit() in main still closes the registry before SystemExit leaves run()."""
    registry = Registry()
    ran: list[str] = []
    registry.on_shutdown(lambda: ran.append("hook"), name="hook")

    async def main() -> None:
        raise SystemExit(3)

    with pytest.raises(SystemExit) as raised:
        poolkeeper.run(main, registry=registry, signals=())
    assert raised.value.code == 3
    assert ran == ["hook"]
    assert registry.closed


def test_run_checks_the_registrations_before_starting_main():
    """An unknown depends_on name makes run() raise before main is even called."""
    registry = Registry()
    registry.on_shutdown(lambda: None, name="flush", depends_on=["nowhere"])
    called: list[bool] = []

    async def main() -> None:
        called.append(True)

    with pytest.raises(RegistrationError, match="'flush' depends on unknown 'nowhere'"):
        poolkeeper.run(main, registry=registry, signals=())
    assert called == []
    assert not registry.closed


def test_run_restores_the_signal_handlers_it_replaced():
    """After run() returns, SIGTERM and SIGINT have their previous handlers again."""
    before = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))

    async def main() -> None:
        assert signal.getsignal(signal.SIGTERM) is not before[0]

    assert poolkeeper.run(main, registry=Registry()) == 0
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"deadline": -1}, ValueError, "deadline"),
        ({"signals": ["SIGTERM"]}, TypeError, "signals"),
        ({"registry": object()}, TypeError, "registry"),
    ],
)
def test_bad_arguments_are_refused_naming_them(arguments, error, message):
    """Each bad argument raises an error naming it before main runs."""

    async def main() -> None:
        raise AssertionError("main must not run")

    with pytest.raises(error, match=message):
        poolkeeper.run(main, **arguments)


def test_a_second_signal_ends_a_main_that_swallows_cancellation(spawn, server):
    """A main that swallows CancelledError cannot hold the process: the second SIGTERM ends it, report logged."""
    child = spawn("swallow")
    child.expect("main: ready")
    assert server.settle(lambda: bool(server.running("pg_sleep")))
    child.send(signal.SIGTERM)
    child.expect("main: cancelled, and carrying on")
    child.send(signal.SIGTERM)
    assert child.wait(10) == 128 + signal.SIGTERM
    assert "poolkeeper shutdown NOT ok" in child.output  # the report, logged before the end
    assert "forced" in child.output
    assert "did not stop on a second SIGTERM" in child.output + child.errors
    assert server.settle(lambda: not server.backends())


def test_the_deadline_ends_a_main_that_swallows_cancellation_after_one_signal(spawn, server):
    """With a deadline, one SIGTERM is enough: main that swallows CancelledError is cut off when it ends."""
    child = spawn("swallow", "1.5")
    child.expect("main: ready")
    assert server.settle(lambda: bool(server.running("pg_sleep")))
    signalled = time.monotonic()
    child.send(signal.SIGTERM)
    child.expect("main: cancelled, and carrying on")
    assert child.wait(15) == 128 + signal.SIGTERM
    # The deadline, then at most the 2 s main is given after the force-close, plus start-up slack.
    assert time.monotonic() - signalled < 8
    assert "poolkeeper shutdown NOT ok" in child.output
    assert "did not stop within the 1.5s deadline after SIGTERM" in child.output + child.errors


def test_at_the_exit_point_a_main_that_swallows_cancellation_is_ended_inside_the_grace_period(spawn, server):
    """One SIGTERM, grace 4 s, main swallowing CancelledError: the exit point (3 s) ends it before 4 s, report out."""
    child = spawn("budget-swallow")
    child.expect("main: ready")
    assert server.settle(lambda: bool(server.running("pg_sleep")))
    sent = time.monotonic()
    child.send(signal.SIGTERM)
    child.expect("main: cancelled, and carrying on")
    assert child.wait(5) == 128 + signal.SIGTERM
    exited = time.monotonic() - sent
    assert 3.0 <= exited < 4.0
    assert "poolkeeper shutdown NOT ok" in child.output  # the report, logged before the end
    assert "grace budget: the process still runs" in child.output
    assert server.settle(lambda: not server.backends())
