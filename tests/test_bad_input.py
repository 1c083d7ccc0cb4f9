"""Bad input through the whole public surface: a clear error naming the argument, nothing half done.

Wrong types, negative/NaN/infinite timeouts, empty or duplicate names, unknown dependencies,
cycles, registration after close, and a shutdown hook that closes its own registry: each is
refused at once with an error that names what is wrong, leaves nothing registered or guarded,
and never deadlocks.
"""

from __future__ import annotations

import asyncio
import math
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa

import poolkeeper
from poolkeeper import KeeperState, RegistrationError, Registry, ShutdownReport, UnsupportedResourceError
from poolkeeper import fastapi as poolkeeper_fastapi

# Integers too large for a float (10**400) used to escape as OverflowError.
BAD_SECONDS = [
    -1,
    -0.5,
    math.nan,
    math.inf,
    -math.inf,
    pytest.param(10**400, id="10**400"),
    pytest.param(-(10**400), id="-10**400"),
]
NOT_SECONDS = ["5", b"5", [5], True]


def sqlite_engine() -> sa.Engine:
    return sa.create_engine("sqlite://")


def is_guarded(engine: sa.Engine) -> bool:
    return hasattr(engine.pool, "_pk_driver")


def register(registry: Registry, how: str, engine: sa.Engine, **options: Any) -> None:
    """Register ``engine`` as a keeper (``how="wrap"``) or a no-op hook (``how="on_shutdown"``) with ``options``."""
    if how == "wrap":
        registry.wrap(engine, **options)
    else:
        registry.on_shutdown(lambda: None, **options)


# -- timeouts, everywhere one is taken ------------------------------------------------------------

TIMEOUT_ARGUMENTS: list[tuple[str, Callable[[Any], Any]]] = [
    ("drain_timeout", lambda value: Registry(drain_timeout=value)),
    ("close_timeout", lambda value: Registry(close_timeout=value)),
    ("drain_timeout", lambda value: Registry().wrap(sqlite_engine(), drain_timeout=value)),
    ("close_timeout", lambda value: Registry().wrap(sqlite_engine(), close_timeout=value)),
    ("leak_threshold", lambda value: Registry().wrap(sqlite_engine(), leak_threshold=value)),
    ("timeout", lambda value: Registry().on_shutdown(lambda: None, timeout=value)),
    ("timeout", lambda value: Registry().on_shutdown(timeout=value)),  # the decorator form fails at once too
    ("deadline", lambda value: Registry().close(deadline=value)),
    ("deadline", lambda value: asyncio.run(Registry().aclose(deadline=value))),
    (
        "shutdown_delay",
        lambda value: poolkeeper.install_signal_handlers(Registry(), signals=[signal.SIGUSR2], shutdown_delay=value),
    ),
    (
        "grace_period",
        lambda value: poolkeeper.install_signal_handlers(Registry(), signals=[signal.SIGUSR2], grace_period=value),
    ),
    ("grace_period", lambda value: poolkeeper_fastapi.lifespan(Registry(), grace_period=value)),
    (
        "deadline",
        lambda value: poolkeeper.install_signal_handlers(Registry(), signals=[signal.SIGUSR2], deadline=value),
    ),
    ("deadline", lambda value: poolkeeper.run(_main, registry=Registry(), deadline=value, signals=())),
    ("shutdown_delay", lambda value: poolkeeper_fastapi.lifespan(Registry(), shutdown_delay=value)),
    ("deadline", lambda value: poolkeeper_fastapi.lifespan(Registry(), deadline=value)),
]


async def _main() -> None:
    """A run() main that must never be reached by these tests."""
    raise AssertionError("main ran despite bad input")


@pytest.mark.parametrize("bad", BAD_SECONDS)
@pytest.mark.parametrize(
    ("argument", "call"), TIMEOUT_ARGUMENTS, ids=[f"{i}-{a}" for i, (a, _) in enumerate(TIMEOUT_ARGUMENTS)]
)
def test_negative_nan_and_infinite_seconds_are_value_errors_naming_the_argument(argument, call, bad):
    """Every timeout, deadline and delay of the public API refuses a negative, NaN or infinite value by name."""
    with pytest.raises(ValueError, match=rf"^{argument} must be a finite number of seconds >= 0"):
        call(bad)


@pytest.mark.parametrize("bad", NOT_SECONDS)
@pytest.mark.parametrize(
    ("argument", "call"), TIMEOUT_ARGUMENTS, ids=[f"{i}-{a}" for i, (a, _) in enumerate(TIMEOUT_ARGUMENTS)]
)
def test_seconds_that_are_not_numbers_are_type_errors_naming_the_argument(argument, call, bad):
    """Every timeout of the public API refuses a string, bytes, a list or a bool by name (bool is not seconds)."""
    with pytest.raises(TypeError, match=rf"^{argument} must be a number of seconds"):
        call(bad)


# -- names, dependencies, cycles ---------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["", "   ", "\t"])
@pytest.mark.parametrize("how", ["wrap", "on_shutdown"])
def test_empty_or_blank_names_are_refused_and_nothing_is_registered(how, bad):
    """A blank name is a ValueError naming `name`, for keepers and hooks alike; the engine stays unguarded."""
    registry, engine = Registry(), sqlite_engine()
    with pytest.raises(ValueError, match=r"^name must not be empty or blank"):
        register(registry, how, engine, name=bad)
    assert (len(registry), is_guarded(engine)) == (0, False)


@pytest.mark.parametrize("bad", ["db\nforged  sqlalchemy  clean", "db\r", "a\tb", "db\x1b[31m", "db\x00", "db\u2028x"])
@pytest.mark.parametrize("how", ["wrap", "on_shutdown"])
def test_names_with_newlines_or_control_characters_are_refused(how, bad):
    """A name that would break (or forge) a line of the report table is a ValueError naming `name`."""
    registry, engine = Registry(), sqlite_engine()
    with pytest.raises(ValueError, match=r"^name must contain only printable characters"):
        register(registry, how, engine, name=bad)
    assert (len(registry), is_guarded(engine)) == (0, False)


def test_names_with_spaces_and_non_ascii_letters_are_accepted():
    """Spaces and non-ASCII letters are printable: such names are kept as given."""
    registry = Registry()
    engine = registry.wrap(sqlite_engine(), name="main db é")  # kept: a dropped object is unmanaged
    registry.on_shutdown(lambda: None, name="flush métriques")
    assert [item.name for item in registry.close()] == ["main db é", "flush métriques"]
    assert engine is registry["main db é"].resource


@pytest.mark.parametrize("bad", [5, b"db", ["db"], object()])
@pytest.mark.parametrize("how", ["wrap", "on_shutdown"])
def test_names_that_are_not_strings_are_type_errors(how, bad):
    """A non-string name is a TypeError naming `name`."""
    registry = Registry()
    with pytest.raises(TypeError, match=r"^name must be a string or None"):
        register(registry, how, sqlite_engine(), name=bad)
    assert len(registry) == 0


@pytest.mark.parametrize(
    ("first", "second"),
    [("wrap", "wrap"), ("wrap", "on_shutdown"), ("on_shutdown", "wrap"), ("on_shutdown", "on_shutdown")],
)
def test_a_name_is_unique_across_keepers_and_hooks(first, second):
    """A name taken by a keeper or a hook is refused to the next keeper or hook; the refused engine stays unguarded."""
    registry = Registry()
    taken, refused = sqlite_engine(), sqlite_engine()
    register(registry, first, taken, name="db")
    with pytest.raises(RegistrationError, match=r"^the name 'db' is already registered"):
        register(registry, second, refused, name="db")
    assert len(registry) == 1
    assert not is_guarded(refused)


@pytest.mark.parametrize("bad", ["db", None, 5, [5], [""], ["db", None]])
@pytest.mark.parametrize("how", ["wrap", "on_shutdown"])
def test_depends_on_must_be_a_list_of_non_empty_names(how, bad):
    """depends_on refuses a bare string (it would mean 'd', 'b'), None, numbers and empty names, by name."""
    registry, engine = Registry(), sqlite_engine()
    with pytest.raises(TypeError, match=r"^depends_on must"):
        register(registry, how, engine, depends_on=bad)
    assert (len(registry), is_guarded(engine)) == (0, False)


def test_a_cycle_through_keepers_and_hooks_is_refused_by_the_registration_that_closes_it():
    """The keeper that would close db -> flush -> cache -> db is refused, the cycle named, the engine unguarded."""
    registry = Registry()
    registry.on_shutdown(lambda: None, name="flush", depends_on=["cache"])
    cache = registry.wrap(sqlite_engine(), name="cache", depends_on=["db"])  # kept: a dropped one leaves the cycle
    engine = sqlite_engine()
    with pytest.raises(RegistrationError, match=r"^dependency cycle: db -> flush -> cache -> db$"):
        registry.wrap(engine, name="db", depends_on=["flush"])
    assert "db" not in registry
    assert not is_guarded(engine)
    with pytest.raises(RegistrationError, match=r"'db' cannot depend on itself"):
        registry.wrap(engine, name="db", depends_on=["db"])
    assert "cache" in registry
    registry.close()
    assert cache is not None


def test_unknown_dependencies_are_named_by_check_and_ignored_by_close():
    """check() names every unknown dependency; close() still closes everything in order."""
    registry = Registry()
    engine = registry.wrap(sqlite_engine(), name="db", depends_on=["ghost"])
    registry.on_shutdown(lambda: None, name="flush", depends_on=["db", "phantom"])
    with pytest.raises(RegistrationError) as caught:
        registry.check()
    assert str(caught.value) == "'db' depends on unknown 'ghost'; 'flush' depends on unknown 'phantom'"
    report = registry.close()
    assert report.ok
    with pytest.raises(poolkeeper.PoolClosedError):
        engine.connect()


# -- what can be wrapped, and when ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "resource", [None, "postgresql://localhost/db", sa.Engine, sa.create_engine("sqlite://").pool, 42]
)
def test_unsupported_resources_are_type_errors_listing_what_is_supported(resource):
    """Anything but a supported pool or client is an UnsupportedResourceError (a TypeError) naming its type."""
    registry = Registry()
    with pytest.raises(UnsupportedResourceError, match=r"^poolkeeper cannot wrap a .+; it can wrap: SQLAlchemy Engine"):
        registry.wrap(resource)
    assert len(registry) == 0


@pytest.mark.asyncio
async def test_a_closed_aiohttp_session_is_refused_and_left_as_it_was():
    """Wrapping a session that is already closed is a ValueError naming the resource; nothing is registered."""
    session = aiohttp.ClientSession()
    await session.close()
    registry = Registry()
    with pytest.raises(ValueError, match=r"^resource: this aiohttp ClientSession is already closed"):
        registry.wrap(session)
    assert len(registry) == 0
    assert "_request" not in vars(session)


@pytest.mark.parametrize("bad", ["default", 5, object()])
def test_the_registry_argument_must_be_a_registry(bad):
    """Everywhere a registry is taken, anything but a Registry or None is a TypeError naming `registry`."""
    for call in (
        lambda: poolkeeper.wrap(sqlite_engine(), registry=bad),
        lambda: poolkeeper.install_signal_handlers(bad),
        lambda: poolkeeper.run(_main, registry=bad, signals=()),
        lambda: poolkeeper_fastapi.lifespan(bad),
        lambda: poolkeeper_fastapi.health_router(bad),
    ):
        with pytest.raises(TypeError, match=r"^registry must be a poolkeeper.Registry or None"):
            call()


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_track_borrowers_must_be_a_bool(bad):
    """track_borrowers refuses what is not True/False (None only on wrap(), where it means 'the registry's')."""
    if bad is not None:
        with pytest.raises(TypeError, match=r"^track_borrowers must be True, False or None"):
            Registry().wrap(sqlite_engine(), track_borrowers=bad)
    with pytest.raises(TypeError, match=r"^track_borrowers must be True or False"):
        Registry(track_borrowers=bad)


@pytest.mark.parametrize(
    ("signals", "error", "message"),
    [
        ("SIGTERM", TypeError, "^signals must be a sequence of signals"),
        ([signal.SIGTERM, "SIGINT"], TypeError, "^signals must contain signal numbers"),
        ([9999], ValueError, "^signals contains 9999, which is no signal"),
        ([signal.SIGKILL], ValueError, "^signals: cannot handle SIGKILL"),
    ],
)
def test_bad_signals_are_refused_and_no_handler_stays_installed(signals, error, message):
    """install_signal_handlers() names a bad `signals`; the handlers in place before are still in place after."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    with pytest.raises(error, match=message):
        poolkeeper.install_signal_handlers(Registry(), signals=signals)
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_registering_after_close_or_while_closing_is_refused():
    """wrap() and on_shutdown() during or after the shutdown raise RegistrationError; the engine stays unguarded."""
    registry = Registry()
    release = threading.Event()
    late = sqlite_engine()
    refusals: list[BaseException] = []

    def try_to_register() -> None:
        for register in (lambda: registry.wrap(late), lambda: registry.on_shutdown(lambda: None, name="late")):
            try:
                register()
            except RegistrationError as error:
                refusals.append(error)
        release.set()

    registry.on_shutdown(try_to_register, name="registers-while-closing")
    registry.close()
    assert release.is_set()
    assert [str(error) for error in refusals] == [
        "cannot wrap: this registry is already closing or closed",
        "cannot register a hook: this registry is already closing or closed",
    ]
    with pytest.raises(RegistrationError, match=r"closing or closed"):
        registry.wrap(late)
    assert not is_guarded(late)


def test_unknown_and_hook_names_are_key_errors():
    """registry[name] is a KeyError for an unknown name and for a hook's name (hooks are not keepers)."""
    registry = Registry()
    registry.on_shutdown(lambda: None, name="flush")
    with pytest.raises(KeyError, match="'nope'"):
        registry["nope"]
    with pytest.raises(KeyError, match="'flush' is a shutdown hook, not a keeper"):
        registry["flush"]


async def _async_generator() -> Any:
    yield None


def _generator() -> Any:
    yield None


def _needs_an_argument(value: object) -> None:
    """A hook that cannot be called with no arguments."""


@pytest.mark.parametrize("function", [_async_generator, _generator, _needs_an_argument])
def test_on_shutdown_refuses_callables_that_cannot_run_as_a_hook(function):
    """A generator function, or a callable that needs arguments, is a TypeError at registration, naming it."""
    registry = Registry()
    with pytest.raises(TypeError, match=function.__name__):
        registry.on_shutdown(function)
    assert len(registry) == 0


def test_run_refuses_a_main_that_is_not_a_coroutine_function():
    """run(plain_function) is a TypeError naming `main`, raised before main runs."""
    ran: list[bool] = []
    with pytest.raises(TypeError, match=r"^main must be a coroutine function"):
        poolkeeper.run(lambda: ran.append(True), registry=Registry(), signals=())  # type: ignore[arg-type, return-value]  # the bad input under test
    assert ran == []


# -- a hook that closes its own registry -----------------------------------------------------------------
#
# Defined behaviour: close() or aclose() called from one of the registry's own hooks would wait
# for a shutdown that waits for that very hook; it raises RuntimeError at once instead (as close()
# does on the loop that runs aclose()), and the hook is reported as failed with that error.
# force_close() from a hook is allowed: it forces the shutdown, which cancels running hooks, the
# caller included; from a sync hook it returns the report once the shutdown is done, from an
# async hook it returns None at once.


def registry_with_a_stuck_borrower() -> tuple[Registry, sa.Engine, Any]:
    registry = Registry(drain_timeout=30, close_timeout=10)
    engine = registry.wrap(sqlite_engine(), name="db")
    connection = engine.connect()  # held for the whole test: only a force ends the drain
    return registry, engine, connection


def test_close_from_a_sync_hook_of_the_same_registry_raises_at_once():
    """registry.close() inside its own sync hook raises RuntimeError at once; the shutdown goes on."""
    registry = Registry(close_timeout=1.5)
    errors: list[BaseException] = []

    @registry.on_shutdown(name="closes-its-registry")
    def closes_its_registry() -> None:
        try:
            registry.close()
        except RuntimeError as error:
            errors.append(error)
            raise

    started = time.monotonic()
    report = registry.close()
    assert time.monotonic() - started < 1.0
    assert len(errors) == 1
    assert "closes-its-registry" in str(errors[0])
    assert report["closes-its-registry"].outcome == "failed"


@pytest.mark.asyncio
async def test_aclose_from_an_async_hook_of_the_same_registry_raises_at_once():
    """Awaiting registry.aclose() inside its own async hook raises RuntimeError at once; the shutdown goes on."""
    registry = Registry(close_timeout=1.5)
    errors: list[BaseException] = []

    @registry.on_shutdown(name="acloses-its-registry")
    async def acloses_its_registry() -> None:
        try:
            await registry.aclose()
        except RuntimeError as error:
            errors.append(error)
            raise

    started = time.monotonic()
    report = await registry.aclose()
    assert time.monotonic() - started < 1.0
    assert len(errors) == 1
    assert "acloses-its-registry" in str(errors[0])
    assert report["acloses-its-registry"].outcome == "failed"


@pytest.mark.asyncio
async def test_sync_close_from_an_async_hook_raises_at_once():
    """registry.close() inside an async hook (on the closing loop) raises RuntimeError at once, never deadlocks."""
    registry = Registry(close_timeout=10)

    @registry.on_shutdown(name="sync-close-on-the-loop")
    async def sync_close_on_the_loop() -> None:
        registry.close()

    started = time.monotonic()
    report = await registry.aclose()
    assert time.monotonic() - started < 1.0
    assert report["sync-close-on-the-loop"].outcome == "failed"
    assert (report["sync-close-on-the-loop"].error or "").startswith("RuntimeError: registry.close() was called")


def test_force_close_from_a_sync_hook_forces_the_shutdown_and_returns_its_report():
    """force_close() in a sync hook cuts the drain of a stuck connection short and hands back the final report."""
    registry, _engine, connection = registry_with_a_stuck_borrower()
    got: list[ShutdownReport | None] = []
    registry.on_shutdown(lambda: got.append(registry.force_close()), name="forces")

    started = time.monotonic()
    report = registry.close()
    elapsed = time.monotonic() - started
    until_joined = time.monotonic() + 2
    while not got and time.monotonic() < until_joined:  # the abandoned hook thread hands its result over
        time.sleep(0.01)

    assert elapsed < 1.0
    assert got == [report]
    assert report["db"].outcome == "forced"
    assert report["forces"].error == "cancelled: the shutdown was forced"
    assert registry["db"].state is KeeperState.CLOSED
    connection.close()


@pytest.mark.asyncio
async def test_force_close_from_an_async_hook_returns_none_and_cancels_the_hook():
    """force_close() in an async hook returns None at once; the hook is cancelled at its next await; the drain ends."""
    registry, _engine, connection = registry_with_a_stuck_borrower()
    returned: list[object] = []
    cancelled = asyncio.Event()

    @registry.on_shutdown(name="forces")
    async def forces() -> None:
        returned.append(registry.force_close())
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    started = time.monotonic()
    report = await registry.aclose()
    assert time.monotonic() - started < 1.0
    assert returned == [None]
    assert cancelled.is_set()
    assert report["db"].outcome == "forced"
    connection.close()
