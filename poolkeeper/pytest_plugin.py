"""The poolkeeper pytest plugin: a registry per test, a connection-leak check, and service fixtures.

Loaded through the ``pytest11`` entry point under the name ``poolkeeper`` (``-p no:poolkeeper``
turns it off). Importing it imports pytest, poolkeeper and the standard library only: database
drivers, redis-py, pytest-asyncio and testcontainers are imported inside the fixtures and hooks
that need them.

What it provides:

* ``poolkeeper_registry``: a fresh :class:`~poolkeeper.Registry` per test, with borrower tracking
  on, closed at teardown with a short deadline (on the test's own event loop for async tests run
  by pytest-asyncio or anyio).
* The leak check: a test that ends with a connection still borrowed (from its
  ``poolkeeper_registry`` or from the default registry), or whose connection only came back
  through the garbage collector, fails at teardown with the keeper's name, how long the
  connection was held and the line that borrowed it. ``poolkeeper_leak_check`` (ini),
  ``--poolkeeper-leak-check`` and ``@pytest.mark.poolkeeper(leak_check=...)`` choose between
  ``error``, ``warn`` (a :class:`PoolkeeperLeakWarning`) and ``off``.
* ``poolkeeper_postgres_url`` / ``poolkeeper_redis_url`` / ``poolkeeper_mysql_url``: URLs of
  servers for the session, from ``POOLKEEPER_POSTGRES_URL`` / ``POOLKEEPER_REDIS_URL`` /
  ``POOLKEEPER_MYSQL_URL``, else testcontainers when Docker answers, else a skip (a failure with
  ``--poolkeeper-require-services``). A session gets a throwaway PostgreSQL database, a Redis
  database index and a throwaway MySQL/MariaDB database of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import inspect
import os
import re
import secrets
import socket
import threading
import time
import traceback
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import pytest

from poolkeeper._borrowers import record_callers
from poolkeeper._redact import redact
from poolkeeper._registry import Registry, get_registry

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator

    from poolkeeper._borrowers import Borrower
    from poolkeeper._report import ShutdownReport

__all__ = ["LEAK_CHECK_MODES", "PoolkeeperLeakWarning", "PoolkeeperWarning"]

#: The values ``poolkeeper_leak_check``, ``--poolkeeper-leak-check`` and the marker accept.
LEAK_CHECK_MODES = ("error", "warn", "off")

POSTGRES_URL_ENV = "POOLKEEPER_POSTGRES_URL"
REDIS_URL_ENV = "POOLKEEPER_REDIS_URL"
POSTGRES_IMAGE_ENV = "POOLKEEPER_POSTGRES_IMAGE"
REDIS_IMAGE_ENV = "POOLKEEPER_REDIS_IMAGE"
MYSQL_URL_ENV = "POOLKEEPER_MYSQL_URL"
MYSQL_IMAGE_ENV = "POOLKEEPER_MYSQL_IMAGE"
_DEFAULT_POSTGRES_IMAGE = "postgres:16-alpine"
_DEFAULT_REDIS_IMAGE = "redis:7-alpine"
_DEFAULT_MYSQL_IMAGE = "mariadb:11"

# The fixture registry is closed this fast at teardown: anything still borrowed by then is a
# leak that has already been recorded, so there is nothing worth waiting long for.
_TEARDOWN_DEADLINE = 1.0
# Connecting to a service or to Docker: long enough for a loaded CI machine, short enough
# that a missing service is reported quickly.
_CONNECT_TIMEOUT = 5.0
_DOCKER_TIMEOUT = 1.0
# Redis: a session claims a database with this key (SET NX) and gives it back at the end.
_REDIS_CLAIM_KEY = "poolkeeper:pytest-session"
_REDIS_CLAIM_SECONDS = 24 * 3600
_REDIS_CANDIDATE_DATABASES = range(1, 16)


class PoolkeeperWarning(pytest.PytestWarning):
    """Base class of the warnings the poolkeeper plugin emits."""


class PoolkeeperLeakWarning(PoolkeeperWarning):
    """A test left a connection borrowed (emitted instead of an error under ``leak_check="warn"``)."""


# -- options, marker, configuration ------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register the ini option and the command-line options."""
    group = parser.getgroup("poolkeeper", "poolkeeper: connection-leak check and service fixtures")
    group.addoption(
        "--poolkeeper-leak-check",
        choices=LEAK_CHECK_MODES,
        default=None,
        dest="poolkeeper_leak_check",
        help="what a test that leaves a connection borrowed does: error (default), warn or off; "
        "replaces the poolkeeper_leak_check ini value (a poolkeeper marker on a test still wins)",
    )
    group.addoption(
        "--poolkeeper-require-services",
        action="store_true",
        default=False,
        dest="poolkeeper_require_services",
        help="fail, instead of skipping, the tests whose poolkeeper_postgres_url / poolkeeper_redis_url / "
        "poolkeeper_mysql_url fixture finds no server",
    )
    parser.addini(
        "poolkeeper_leak_check",
        "what a test that leaves a connection borrowed does: error, warn or off",
        default="error",
    )


def _session_mode(config: pytest.Config) -> str:
    option = config.getoption("poolkeeper_leak_check")
    if option is not None:
        return str(option)
    value = str(config.getini("poolkeeper_leak_check")).strip().lower()
    if value not in LEAK_CHECK_MODES:
        raise pytest.UsageError(f"poolkeeper_leak_check must be one of {', '.join(LEAK_CHECK_MODES)}, got {value!r}")
    return value


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport() -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Make each test's report with the garbage collector paused.

    To show a failure, pytest parses the test's source with :func:`ast.parse`. A finalizer the
    collector runs inside that parse (a dropped session's or connection's, which poolkeeper
    tests make plenty of) can trip CPython's AST recursion bookkeeping (seen on 3.11.7; see
    python/cpython#106905): ``SystemError: AST constructor recursion depth mismatch``, an
    INTERNALERROR that ends the whole session. Paused, the collector runs after the report.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        return (yield)
    finally:
        if enabled:
            gc.enable()


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker and the leak checker; record borrow sites in the default registry."""
    config.addinivalue_line(
        "markers",
        'poolkeeper(leak_check="error"|"warn"|"off"): what this test (module, class) does when it '
        "leaves a connection borrowed",
    )
    mode = _session_mode(config)
    config.pluginmanager.register(_LeakChecker(config, mode), "poolkeeper-leak-checker")
    if config.pluginmanager.has_plugin("asyncio"):
        config.pluginmanager.register(_asyncio_registry_fixtures(), "poolkeeper-asyncio-fixtures")


# -- the leak check ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Leak:
    """A connection borrowed during a test and not given back by its end."""

    registry: str
    kind: str
    borrower: Borrower


@dataclass
class _TestWindow:
    """When a test began, which stretches of it belong to longer-lived fixtures, what leaked."""

    mode: str
    started: float = field(default_factory=time.time)
    # (start, end) of each setup of a class/module/package/session fixture during this test:
    # what those borrow belongs to the fixture, which outlives the test, not to the test.
    fixture_setups: list[tuple[float, float]] = field(default_factory=list)
    leaks: list[_Leak] = field(default_factory=list)

    def owns(self, borrower: Borrower) -> bool:
        """True if ``borrower`` began during this test, outside any longer-lived fixture's setup."""
        began = borrower.borrowed_at
        return began >= self.started and not any(start <= began <= end for start, end in self.fixture_setups)

    def collect(self, registry: Registry, label: str) -> None:
        """Record this test's borrows still out in ``registry``, and its garbage-collected returns."""
        keepers = registry.keepers
        if any(self.owns(borrower) for keeper in keepers for borrower in keeper.borrowers()):
            # A connection whose holder is garbage in a reference cycle comes back now, in a
            # known place, and is reported as what it is, rather than later, under another test.
            gc.collect()
        for keeper in keepers:
            # Drained on every test, so that a return by the collector is judged once.
            returned_by_gc = keeper.gc_leaks(clear=True)
            for borrower in [*keeper.borrowers(), *returned_by_gc]:
                if self.owns(borrower):
                    self.leaks.append(_Leak(label, keeper.kind, borrower))


_WINDOW = pytest.StashKey[_TestWindow]()
# The report of the test's call (or of a setup that skipped it).
_OUTCOME = pytest.StashKey[pytest.TestReport]()


def _skipped_or_expected_to_fail(item: pytest.Item) -> bool:
    """True if the test was skipped (``pytest.skip()`` included) or is an xfail, failing or not.

    Its leaks are then shown as warnings, not as a teardown error: a test stopped half-way
    often leaves its connection out as a consequence, and pytest would turn a teardown error of
    an xfail test into a second xfail, hiding the leak and counting the test twice.
    """
    outcome = item.stash.get(_OUTCOME, None)
    return outcome is not None and (outcome.skipped or hasattr(outcome, "wasxfail"))


@dataclass
class _FixtureTeardown:
    """When the teardown of one class/module/package/session fixture ran: what it borrows is its own."""

    name: str
    scope: str
    location: tuple[str, int]  # (file, line) of the fixture function
    started: float | None = None
    ended: float | None = None

    def start(self) -> None:
        self.started = time.time()

    def end(self) -> None:
        self.ended = time.time()

    def owns(self, borrower: Borrower) -> bool:
        """True if ``borrower`` began during this teardown."""
        began = borrower.borrowed_at
        return self.started is not None and self.started <= began <= (self.ended or time.time())


def _fixture_location(fixturedef: pytest.FixtureDef[Any]) -> tuple[str, int]:
    code = getattr(inspect.unwrap(fixturedef.func), "__code__", None)
    return ("?", 0) if code is None else (code.co_filename, code.co_firstlineno)


def _fixture_teardown_leaks(
    window: _TestWindow, teardowns: list[_FixtureTeardown]
) -> list[tuple[_FixtureTeardown, _Leak]]:
    """Take out of ``window.leaks`` those borrowed by a fixture teardown that has run (dropped from ``teardowns``)."""
    done = [teardown for teardown in teardowns if teardown.ended is not None]
    if not done:
        return []
    for teardown in done:
        teardowns.remove(teardown)
    found: list[tuple[_FixtureTeardown, _Leak]] = []
    for leak in list(window.leaks):
        owner = next((teardown for teardown in done if teardown.owns(leak.borrower)), None)
        if owner is not None:
            window.leaks.remove(leak)
            found.append((owner, leak))
    return found


def _fixture_failure_message(leaks: list[tuple[_FixtureTeardown, _Leak]], root: Path) -> str:
    parts: list[str] = []
    for number, (teardown, leak) in enumerate(leaks, 1):
        filename, lineno = teardown.location
        parts.append(
            f"[{number}] poolkeeper: the teardown of {teardown.scope}-scoped fixture {teardown.name!r} "
            f"({_shown_path(filename, root)}:{lineno}) borrowed a connection and never gave it back "
            f"(not this test's doing):\n{_describe(leak, root)}"
        )
    parts.append("Give each connection the fixture's teardown borrows back before the teardown ends.")
    return "\n".join(parts)


def _marker_mode(item: pytest.Item) -> str | None:
    marker = item.get_closest_marker("poolkeeper")
    if marker is None:
        return None
    if marker.args or set(marker.kwargs) - {"leak_check"}:
        pytest.fail(
            f"{item.nodeid}: @pytest.mark.poolkeeper takes only the keyword argument leak_check, "
            f"got args={marker.args!r} kwargs={marker.kwargs!r}",
            pytrace=False,
        )
    mode = marker.kwargs.get("leak_check")
    if mode not in LEAK_CHECK_MODES:
        pytest.fail(
            f"{item.nodeid}: @pytest.mark.poolkeeper(leak_check=...) must be one of "
            f"{', '.join(map(repr, LEAK_CHECK_MODES))}, got {mode!r}",
            pytrace=False,
        )
    return str(mode)


class _LeakChecker:
    """The hooks that time each test and fail (or warn about) the ones that leak connections."""

    def __init__(self, config: pytest.Config, mode: str) -> None:
        self._config = config
        self._mode = mode
        self._current: _TestWindow | None = None
        # Teardowns of longer-lived fixtures set up so far; each is judged (and dropped) once run.
        self._teardowns: list[_FixtureTeardown] = []
        self._default_tracking: bool | None = None
        self._recorded_callers: bool | None = None
        if mode != "off":
            # Keepers wrapped from now on record their borrow sites, so a leak names its line,
            # and tracked checkouts record their callers too: a leak is looked at after its
            # borrower moved on, when its stack no longer shows who called the borrowing line.
            self._default_tracking = get_registry().track_borrowers
            get_registry().track_borrowers = True
            self._recorded_callers = record_callers(on=True)

    def pytest_unconfigure(self) -> None:
        if self._default_tracking is not None:
            get_registry().track_borrowers = self._default_tracking
        if self._recorded_callers is not None:
            record_callers(on=self._recorded_callers)

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> Iterator[None]:
        window = self._current = item.stash[_WINDOW] = _TestWindow(self._mode)
        result = yield
        # Checked once setup is done: failing before it would leave other plugins half set up.
        window.mode = _marker_mode(item) or self._mode
        return result

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        # Outermost, so the report is seen as the skipping plugin left it (xfail or not).
        report = yield
        if call.when == "call" or (call.when == "setup" and report.skipped):
            item.stash[_OUTCOME] = report
        return report

    @pytest.hookimpl(wrapper=True)
    def pytest_fixture_setup(self, fixturedef: pytest.FixtureDef[Any]) -> Iterator[Any]:
        window = self._current
        if window is None or fixturedef.scope == "function":
            return (yield)
        # Finalizers run last-added first: this one runs after the fixture's own teardown, the
        # one added after the setup runs just before it.
        teardown = _FixtureTeardown(fixturedef.argname, fixturedef.scope, _fixture_location(fixturedef))
        fixturedef.addfinalizer(teardown.end)
        started = time.time()
        try:
            result = yield
        finally:
            window.fixture_setups.append((started, time.time()))
        fixturedef.addfinalizer(teardown.start)
        self._teardowns.append(teardown)
        return result

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> Iterator[None]:
        # Outermost: every fixture of the test (and of scopes ending with it) is finalized first.
        try:
            result = yield
        except BaseException:
            self._finish(item, teardown_failed=True)
            raise
        self._finish(item, teardown_failed=False)
        return result

    def _finish(self, item: pytest.Item, *, teardown_failed: bool) -> None:
        self._current = None
        window = item.stash.get(_WINDOW, None)
        if window is None:
            return
        window.collect(get_registry(), "default registry")
        fixture_leaks = _fixture_teardown_leaks(window, self._teardowns)
        if window.mode == "off" or not (window.leaks or fixture_leaks):
            return
        root = self._config.rootpath
        if window.mode == "warn" or teardown_failed or _skipped_or_expected_to_fail(item):
            # A failing teardown keeps its own error; the leaks still show, as warnings.
            for leak in window.leaks:
                filename, lineno = _warning_location(leak, item)
                warnings.warn_explicit(
                    PoolkeeperLeakWarning(f"{_headline(window.leaks)}\n{_describe(leak, root)}"), None, filename, lineno
                )
            for leak_of_fixture in fixture_leaks:
                filename, lineno = _warning_location(leak_of_fixture[1], item)
                warnings.warn_explicit(
                    PoolkeeperLeakWarning(_fixture_failure_message([leak_of_fixture], root)), None, filename, lineno
                )
            return
        messages = [_failure_message(window.leaks, root)] if window.leaks else []
        if fixture_leaks:
            messages.append(_fixture_failure_message(fixture_leaks, root))
        pytest.fail("\n".join(messages), pytrace=False)


def _headline(leaks: list[_Leak]) -> str:
    count = len(leaks)
    return f"poolkeeper: this test leaked {count} connection{'s' if count != 1 else ''}"


def _in_project(filename: str, root: Path) -> str | None:
    """``filename`` relative to the root directory, or None when it lies outside it."""
    if not Path(filename).is_absolute():  # "<frozen runpy>", "<string>"...
        return None
    try:
        relative = os.path.relpath(filename, root)
    except ValueError:  # another drive (Windows)
        return None
    return None if relative.startswith(os.pardir) else relative


def _shown_path(filename: str, root: Path) -> str:
    return _in_project(filename, root) or filename


def _describe(leak: _Leak, root: Path) -> str:
    borrower = leak.borrower
    who = ", ".join(
        part
        for part in (borrower.thread and f"thread {borrower.thread}", borrower.task and f"task {borrower.task}")
        if part
    )
    if borrower.returned_by_gc:
        fate = f"given back only by the garbage collector, after {borrower.held_seconds:.3f}s" + (
            f", borrowed by {who}" if who else ""
        )
    else:
        fate = f"still borrowed when the test ended, held for {borrower.held_seconds:.3f}s" + (
            f" by {who}" if who else ""
        )
    lines = [f"keeper {borrower.keeper!r} ({leak.kind}, {leak.registry}): {fate}"]
    stack = borrower.stack
    if stack is None:
        lines.append(
            "  borrow site not recorded: this keeper does not track borrowers. Wrap it with "
            "track_borrowers=True (or give its Registry track_borrowers=True); the plugin turns "
            "tracking on for the default registry's keepers wrapped after pytest has started."
        )
        return "\n".join(lines)
    frames = list(stack)
    # Frames before the first one in the project are the test runner's own entry point.
    first = next((index for index, frame in enumerate(frames) if _in_project(frame.filename, root)), 0)
    frames = frames[first:]
    if not frames:
        lines.append("  borrow site unknown: every frame of the checkout was inside a library")
    else:
        innermost = frames[-1]
        lines.append(
            f"  borrowed at {_shown_path(innermost.filename, root)}:{innermost.lineno} in {innermost.function}"
        )
        lines.append("  borrow-site stack (most recent call last):")
        lines.extend(f"    {_shown_path(frame.filename, root)}:{frame.lineno} in {frame.function}" for frame in frames)
    return "\n".join(lines)


def _failure_message(leaks: list[_Leak], root: Path) -> str:
    parts = [_headline(leaks) + " (borrowed during the test and not given back by its end):"]
    parts.extend(f"[{number}] {_describe(leak, root)}" for number, leak in enumerate(leaks, 1))
    parts.append(
        "Give each connection back before the test ends (e.g. `with engine.connect() as connection:`), "
        'or mark the test @pytest.mark.poolkeeper(leak_check="warn") or leak_check="off".'
    )
    return "\n".join(parts)


def _warning_location(leak: _Leak, item: pytest.Item) -> tuple[str, int]:
    stack = leak.borrower.stack
    if stack:
        return stack[-1].filename, stack[-1].lineno
    path, lineno, _ = item.location
    return str(item.config.rootpath / path), (lineno or 0) + 1


# -- the poolkeeper_registry fixture --------------------------------------------------------------


def _new_registry() -> Registry:
    registry = Registry(track_borrowers=True)
    # An engine local to the test is dropped when the test returns, before this registry's
    # teardown closes it: held until then (until it closes), the close still finds it.
    registry._pin()  # noqa: SLF001 -- poolkeeper-internal
    return registry


def _before_close(request: pytest.FixtureRequest, registry: Registry) -> bool:
    """Record the registry's leaks for the leak check; False if the test has closed it itself."""
    window = request.node.stash.get(_WINDOW, None)
    if window is not None:
        window.collect(registry, "poolkeeper_registry")
    if registry.closed:
        return False
    for keeper in registry.keepers:
        if keeper.borrowed:
            keeper.request_force()  # what is still out is a leak already recorded: no drain wait
    return True


def _close_failed(error: Exception) -> NoReturn:
    """Fail (error) the test whose registry could not be closed, with the error and where it arose.

    Only this test: the next ones run. The traceback is plain text, so that reporting it never
    depends on rendering the sources of the frames it passed through.
    """
    where = "".join(traceback.format_exception(error)).rstrip()
    pytest.fail(
        f"poolkeeper_registry could not be closed at teardown: {redact(f'{type(error).__name__}: {error}')}\n"
        f"{redact(where)}",
        pytrace=False,
    )


def _after_close(report: ShutdownReport) -> None:
    failed = [item for item in report.items if item.outcome == "failed"]
    if failed:
        warnings.warn(
            PoolkeeperWarning(f"poolkeeper_registry could not close everything at teardown:\n{report}"),
            stacklevel=2,
        )


def _close_on_test_loop(request: pytest.FixtureRequest) -> str | None:
    """The async fixture that owns the registry for an async test, or None for the sync path."""
    item = request.node
    function = getattr(item, "obj", None)
    if not inspect.iscoroutinefunction(function):
        return None
    if "anyio_backend" in request.fixturenames:
        backend = request.getfixturevalue("anyio_backend")
        name = backend if isinstance(backend, str) else backend[0]
        return "_poolkeeper_anyio_registry" if name == "asyncio" else None
    marker = item.get_closest_marker("asyncio")
    if marker is not None and request.config.pluginmanager.has_plugin("asyncio"):
        scope = (
            marker.kwargs.get("loop_scope")
            or marker.kwargs.get("scope")
            or request.config.getini("asyncio_default_test_loop_scope")
            or "function"
        )
        return f"_poolkeeper_asyncio_registry_{scope}"
    return None


@pytest.fixture
def poolkeeper_registry(request: pytest.FixtureRequest) -> Iterator[Registry]:
    """A fresh :class:`~poolkeeper.Registry` for this test, tracking borrowers, closed at teardown.

    Its leaks count in the leak check. Sync tests get it closed with ``registry.close()``; async
    tests run by pytest-asyncio or anyio (asyncio backend) get it closed with
    ``await registry.aclose()`` on the event loop the test ran on, before that loop closes.
    """
    owner = _close_on_test_loop(request)
    if owner is not None:
        yield request.getfixturevalue(owner)  # that fixture closes it on the test's loop
        return
    registry = _new_registry()
    yield registry
    if _before_close(request, registry):
        try:
            report = registry.close(deadline=_TEARDOWN_DEADLINE)
        except Exception as error:  # noqa: BLE001 -- whatever it is, it fails this test, not the session
            _close_failed(error)
        _after_close(report)


def _registry_fixture_function() -> Callable[[pytest.FixtureRequest], AsyncIterator[Registry]]:
    # A new function each time: pytest-asyncio records the loop scope on the function object.
    async def registry_closed_on_the_test_loop(request: pytest.FixtureRequest) -> AsyncIterator[Registry]:
        registry = _new_registry()
        yield registry
        if _before_close(request, registry):
            try:
                report = await registry.aclose(deadline=_TEARDOWN_DEADLINE)
            except Exception as error:  # noqa: BLE001 -- whatever it is, it fails this test, not the session
                _close_failed(error)
            _after_close(report)

    return registry_closed_on_the_test_loop


# anyio runs this (an async fixture requested by an anyio test) on the test's runner, which
# stays open until the fixture's teardown.
_poolkeeper_anyio_registry = pytest.fixture(_registry_fixture_function(), name="_poolkeeper_anyio_registry")


def _asyncio_registry_fixtures() -> types.ModuleType:
    """One pytest-asyncio fixture per loop scope, so the registry closes on the test's own loop."""
    import pytest_asyncio  # noqa: PLC0415 -- only when pytest-asyncio is active

    holder = types.ModuleType("poolkeeper_pytest_asyncio_fixtures")
    for scope in ("function", "class", "module", "package", "session"):
        name = f"_poolkeeper_asyncio_registry_{scope}"
        setattr(holder, name, pytest_asyncio.fixture(_registry_fixture_function(), loop_scope=scope, name=name))
    return holder


# -- service fixtures -------------------------------------------------------------------------------


def _unavailable(config: pytest.Config, message: str) -> NoReturn:
    if config.getoption("poolkeeper_require_services"):
        pytest.fail(f"{message} (--poolkeeper-require-services is set)", pytrace=False)
    pytest.skip(message)


def _docker_problem() -> str | None:
    """Why Docker does not answer, or None if it does (or cannot be checked cheaply)."""
    endpoint = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    parsed = urlsplit(endpoint)
    try:
        if parsed.scheme == "unix":
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.settimeout(_DOCKER_TIMEOUT)
                probe.connect(parsed.path)
        elif parsed.scheme in ("tcp", "http", "https"):
            port = parsed.port or (2376 if parsed.scheme == "https" else 2375)
            socket.create_connection((parsed.hostname or "localhost", port), timeout=_DOCKER_TIMEOUT).close()
    except OSError as error:
        return f"Docker does not answer at {endpoint} ({error.strerror or error})"
    return None


def _container_class(service: str, class_name: str) -> Any:
    """The container class of testcontainers: ``testcontainers.community.*`` (4.15+) or ``testcontainers.*``."""
    errors = []
    for module_name in (f"testcontainers.community.{service}", f"testcontainers.{service}"):
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            errors.append(str(error))
            continue
        return getattr(module, class_name)
    raise ImportError("; ".join(errors))


def _start_container(config: pytest.Config, what: str, env: str, service: str, class_name: str, **options: Any) -> Any:
    """A started testcontainers container for ``service``; skips (or fails) when there can be none."""
    hint = f"set {env} to the URL of a {what} server the tests may use"
    problem = _docker_problem()
    if problem is not None:
        _unavailable(config, f"no {what} for the tests: {env} is not set and {problem}; {hint}, or start Docker")
    try:
        container_class = _container_class(service, class_name)
    except ImportError as error:
        _unavailable(
            config,
            f"no {what} for the tests: {env} is not set and testcontainers cannot be imported ({error}); "
            f"{hint}, or `pip install testcontainers`",
        )
    container = container_class(**options)
    try:
        container.start()
    except Exception as error:  # noqa: BLE001 -- any failure to start means "no server here"
        with contextlib.suppress(Exception):
            container.stop()
        _unavailable(
            config, f"no {what} for the tests: {env} is not set and its container did not start ({error}); {hint}"
        )
    return container


def _run_coroutine_in_thread(make: Callable[[], Awaitable[None]]) -> None:
    """Run a coroutine on a private loop in a helper thread: safe even inside a running loop."""
    errors: list[BaseException] = []

    async def main() -> None:
        await make()

    def target() -> None:
        try:
            asyncio.run(main())
        except BaseException as error:  # noqa: BLE001 -- re-raised in the calling thread
            errors.append(error)

    thread = threading.Thread(target=target, name="poolkeeper-pytest-admin", daemon=True)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


def _postgres_execute(url: str, statements: list[str]) -> bool:
    """Run ``statements`` outside a transaction with psycopg, else asyncpg; False if neither exists."""
    admin_url = re.sub(r"^postgres(?:ql)?(\+\w+)?://", "postgresql://", url)
    try:
        import psycopg  # noqa: PLC0415 -- the plugin imports drivers only when a fixture needs one
    except ImportError:
        pass
    else:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=int(_CONNECT_TIMEOUT)) as connection:
            for statement in statements:
                connection.execute(statement.encode())
        return True
    try:
        import asyncpg  # noqa: PLC0415 -- as above
    except ImportError:
        return False

    async def run() -> None:
        connection = await asyncpg.connect(admin_url, timeout=_CONNECT_TIMEOUT)
        try:
            for statement in statements:
                await connection.execute(statement)
        finally:
            await connection.close()

    _run_coroutine_in_thread(run)
    return True


def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + quote(database)))


def _password(url: str) -> tuple[str, ...]:
    with contextlib.suppress(ValueError):
        password = urlsplit(url).password
        if password:
            return (password, unquote(password))
    return ()


@pytest.fixture(scope="session")
def poolkeeper_postgres_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """The URL of a PostgreSQL database of this test session's own.

    From ``POOLKEEPER_POSTGRES_URL`` (a ``postgresql://`` URL) when set: the session then gets a
    throwaway database ``poolkeeper_test_<random>`` on that server, dropped at the end (created
    with psycopg, else asyncpg). Otherwise a testcontainers PostgreSQL container when Docker
    answers (image: ``POOLKEEPER_POSTGRES_IMAGE``, default ``postgres:16-alpine``). Otherwise
    the test is skipped, or fails under ``--poolkeeper-require-services``. A server named in the
    environment that does not answer always fails the test.
    """
    config = request.config
    base = os.environ.get(POSTGRES_URL_ENV, "").strip()
    if not base:
        container = _start_container(
            config,
            "PostgreSQL",
            POSTGRES_URL_ENV,
            "postgres",
            "PostgresContainer",
            image=os.environ.get(POSTGRES_IMAGE_ENV, _DEFAULT_POSTGRES_IMAGE),
            driver=None,
        )
        try:
            yield str(container.get_connection_url())
        finally:
            container.stop()
        return
    if not re.match(r"^postgres(?:ql)?(\+\w+)?://", base):
        pytest.fail(f"{POSTGRES_URL_ENV} must be a postgresql:// URL, got {redact(base)!r}", pytrace=False)
    database = f"poolkeeper_test_{secrets.token_hex(6)}"
    hidden = _password(base)
    problem: str | None = None
    try:
        created = _postgres_execute(base, [f'CREATE DATABASE "{database}"'])
    except Exception as error:  # noqa: BLE001 -- any failure is reported, with secrets scrubbed
        created, problem = False, redact(f"{type(error).__name__}: {error}", hidden)
    if problem is not None and "permission denied" in problem:
        warnings.warn(
            PoolkeeperWarning(
                f"could not create a throwaway database ({problem}); the tests share {redact(base, hidden)}"
            ),
            stacklevel=1,
        )
    elif problem is not None:  # failed outside the except block: the driver's own error, unscrubbed, stays out
        pytest.fail(
            f"PostgreSQL at {redact(base, hidden)} ({POSTGRES_URL_ENV}) did not answer: {problem}", pytrace=False
        )
    if not created:
        yield base
        return
    try:
        yield _with_database(base, database)
    finally:
        try:
            _postgres_execute(
                base,
                [
                    # The name is ours (a random hex suffix): nothing here comes from the outside.
                    (
                        "select pg_terminate_backend(pid) from pg_stat_activity "  # noqa: S608 -- see above
                        f"where datname = '{database}' and pid <> pg_backend_pid()"
                    ),
                    f'DROP DATABASE IF EXISTS "{database}"',
                ],
            )
        except Exception as error:  # noqa: BLE001 -- reported, never fails the session's last test
            warnings.warn(
                PoolkeeperWarning(f"could not drop the throwaway database {database}: {redact(str(error), hidden)}"),
                stacklevel=1,
            )


def _redis_database(url: str) -> int | None:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    if "db" in query:
        return int(query["db"])
    path = parts.path.strip("/") if parts.scheme != "unix" else ""
    return int(path) if path.isdigit() else None


def _with_redis_database(url: str, database: int) -> str:
    parts = urlsplit(url)
    query = [(key, value) for key, value in parse_qsl(parts.query) if key != "db"]
    if parts.scheme == "unix":
        return urlunsplit(parts._replace(query=urlencode([*query, ("db", str(database))])))
    return urlunsplit(parts._replace(path=f"/{database}", query=urlencode(query)))


class _RedisClaim:
    """A Redis database index claimed for one session: a SET NX key in an otherwise empty database."""

    def __init__(self, url: str) -> None:
        import redis  # noqa: PLC0415 -- the plugin imports redis-py only when this fixture runs

        self._redis = redis
        self._url = url
        self._token = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(8)}"
        self.database: int | None = None

    def take(self) -> int | None:
        for database in _REDIS_CANDIDATE_DATABASES:
            client = self._redis.Redis.from_url(self._url, db=database, socket_connect_timeout=_CONNECT_TIMEOUT)
            try:
                if not client.set(_REDIS_CLAIM_KEY, self._token, nx=True, ex=_REDIS_CLAIM_SECONDS):
                    continue  # another session's
                if client.dbsize() == 1:
                    self.database = database
                    return database
                client.delete(_REDIS_CLAIM_KEY)  # somebody's data lives here: not ours to use
            finally:
                client.close()
        return None

    def release(self) -> None:
        """Empty the claimed database and give it back, if the claim is still this session's.

        Flushing is sound here: the database was empty when claimed, and the claim key kept
        every other session out, so whatever is in it now this session wrote. FLUSHDB empties
        that one database only (never FLUSHALL). A claim lost meanwhile (it expired) is left
        alone: the database may be someone else's by now.
        """
        if self.database is None:
            return
        client = self._redis.Redis.from_url(self._url, db=self.database, socket_connect_timeout=_CONNECT_TIMEOUT)
        try:
            if client.get(_REDIS_CLAIM_KEY) == self._token.encode():
                client.flushdb()  # the claim key goes with the session's keys
        finally:
            client.close()


def _xdist_worker_index() -> int | None:
    """The index of this pytest-xdist worker (``gw3`` -> 3), or None outside a worker."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    return int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else None


def _worker_database(database: int, base: str, hidden: tuple[str, ...]) -> int:
    """The named ``database`` for this process: shifted by the xdist worker index, so workers never share one."""
    index = _xdist_worker_index()
    if index is None:
        return database
    if database + index > _REDIS_CANDIDATE_DATABASES[-1]:
        pytest.fail(
            f"{REDIS_URL_ENV} names database {database}; pytest-xdist worker gw{index} would use "
            f"{database + index}, past {_REDIS_CANDIDATE_DATABASES[-1]}: name a lower one, or run fewer "
            f"workers ({redact(base, hidden)})",
            pytrace=False,
        )
    return database + index


def _redis_ping(url: str) -> None:
    import redis  # noqa: PLC0415 -- the plugin imports redis-py only when this fixture runs

    client = redis.Redis.from_url(url, socket_connect_timeout=_CONNECT_TIMEOUT)
    try:
        client.ping()
    finally:
        client.close()


@pytest.fixture(scope="session")
def poolkeeper_redis_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """The URL of a Redis database index of this test session's own (never database 0).

    From ``POOLKEEPER_REDIS_URL`` when set: a URL that names a database other than 0 is used as
    it is (under pytest-xdist, worker ``gwN`` gets that database + N, so that workers never
    share one); one that names none (or 0) gets the first empty database from 1 to 15, claimed
    for the session with the key ``poolkeeper:pytest-session``, emptied (``FLUSHDB`` of that
    database alone) and given back at the end, so the next session can claim it again. A named
    database is never flushed. Otherwise a testcontainers Redis container (database 1) when Docker answers (image:
    ``POOLKEEPER_REDIS_IMAGE``, default ``redis:7-alpine``). Otherwise the test is skipped, or
    fails under ``--poolkeeper-require-services``. A server named in the environment that does
    not answer always fails the test.
    """
    config = request.config
    base = os.environ.get(REDIS_URL_ENV, "").strip()
    if not base:
        container = _start_container(
            config,
            "Redis",
            REDIS_URL_ENV,
            "redis",
            "RedisContainer",
            image=os.environ.get(REDIS_IMAGE_ENV, _DEFAULT_REDIS_IMAGE),
        )
        try:
            host, port = container.get_container_host_ip(), container.get_exposed_port(container.port)
            yield f"redis://{host}:{port}/1"
        finally:
            container.stop()
        return
    hidden = _password(base)
    try:
        database = _redis_database(base)
    except ValueError:
        pytest.fail(f"{REDIS_URL_ENV} names no valid database index: {redact(base, hidden)!r}", pytrace=False)
    claim: _RedisClaim | None = None
    problem: str | None = None
    try:
        if database:
            with contextlib.suppress(ImportError):  # without redis-py the URL is handed out unchecked
                _redis_ping(base)
        else:
            claim = _RedisClaim(base)
            database = claim.take()
    except ImportError:
        problem = (
            f"{REDIS_URL_ENV} names no database (or 0), and choosing one of the session's own needs "
            "redis-py (`pip install redis`); or name one in the URL, e.g. redis://host:6379/9"
        )
    except Exception as error:  # noqa: BLE001 -- any failure is reported, with secrets scrubbed
        text = redact(f"{type(error).__name__}: {error}", hidden)
        problem = f"Redis at {redact(base, hidden)} ({REDIS_URL_ENV}) did not answer: {text}"
    if problem is not None:  # failed outside the except block: the driver's own error, unscrubbed, stays out
        pytest.fail(problem, pytrace=False)
    if claim is None:  # a named database (not None, not 0)
        worker_database = _worker_database(database or 0, base, hidden)
        yield base if worker_database == database else _with_redis_database(base, worker_database)
        return
    if database is None:
        pytest.fail(
            f"no empty Redis database from 1 to 15 could be claimed at {redact(base, hidden)}; "
            f"name one in {REDIS_URL_ENV}, e.g. redis://host:6379/9",
            pytrace=False,
        )
    try:
        yield _with_redis_database(base, database)
    finally:
        claim.release()


# -- MySQL / MariaDB ------------------------------------------------------------------------------

_MYSQL_SCHEMES = re.compile(r"^(?:mysql|mariadb)(?:\+\w+)?://")


def _mysql_execute(url: str, statements: list[str]) -> bool:
    """Run ``statements`` with PyMySQL, else mysqlclient; False if neither is installed."""
    parts = urlsplit(url)
    options: dict[str, Any] = {
        "host": parts.hostname or "127.0.0.1",
        "port": parts.port or 3306,
        "user": unquote(parts.username or "root"),
        "password": unquote(parts.password or ""),
        "connect_timeout": int(_CONNECT_TIMEOUT),
    }
    unix_socket = dict(parse_qsl(parts.query)).get("unix_socket")
    if unix_socket:
        options["unix_socket"] = unix_socket
    driver: Any
    try:
        import pymysql  # noqa: PLC0415 -- the plugin imports drivers only when a fixture needs one

        driver = pymysql
    except ImportError:
        try:
            import MySQLdb  # noqa: PLC0415 -- as above

            driver = MySQLdb
        except ImportError:
            return False
    connection = driver.connect(**options)
    try:
        cursor = connection.cursor()
        for statement in statements:
            cursor.execute(statement)
        cursor.close()
    finally:
        connection.close()
    return True


@pytest.fixture(scope="session")
def poolkeeper_mysql_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """The URL of a MySQL/MariaDB database of this test session's own.

    From ``POOLKEEPER_MYSQL_URL`` (a ``mysql://`` or ``mariadb://`` URL, a SQLAlchemy driver
    suffix such as ``mysql+pymysql://`` allowed) when set: the session then gets a throwaway
    database ``poolkeeper_test_<random>`` on that server, dropped at the end (created with PyMySQL,
    else mysqlclient; without either the URL is handed out unchecked). Otherwise a testcontainers
    MySQL container when Docker answers (image: ``POOLKEEPER_MYSQL_IMAGE``, default
    ``mariadb:11``). Otherwise the test is skipped, or fails under
    ``--poolkeeper-require-services``. A server named in the environment that does not answer
    always fails the test.
    """
    config = request.config
    base = os.environ.get(MYSQL_URL_ENV, "").strip()
    if not base:
        container = _start_container(
            config,
            "MySQL/MariaDB",
            MYSQL_URL_ENV,
            "mysql",
            "MySqlContainer",
            image=os.environ.get(MYSQL_IMAGE_ENV, _DEFAULT_MYSQL_IMAGE),
        )
        try:
            yield str(container.get_connection_url())
        finally:
            container.stop()
        return
    hidden = _password(base)
    if not _MYSQL_SCHEMES.match(base):
        pytest.fail(
            f"{MYSQL_URL_ENV} must be a mysql:// or mariadb:// URL, got {redact(base, hidden)!r}", pytrace=False
        )
    database = f"poolkeeper_test_{secrets.token_hex(6)}"
    problem: str | None = None
    try:
        created = _mysql_execute(base, [f"CREATE DATABASE `{database}`"])
    except Exception as error:  # noqa: BLE001 -- any failure is reported, with secrets scrubbed
        created, problem = False, redact(f"{type(error).__name__}: {error}", hidden)
    if problem is not None and "denied" in problem:
        warnings.warn(
            PoolkeeperWarning(
                f"could not create a throwaway database ({problem}); the tests share {redact(base, hidden)}"
            ),
            stacklevel=1,
        )
    elif problem is not None:  # failed outside the except block: the driver's own error, unscrubbed, stays out
        pytest.fail(
            f"MySQL/MariaDB at {redact(base, hidden)} ({MYSQL_URL_ENV}) did not answer: {problem}", pytrace=False
        )
    if not created:
        yield base
        return
    try:
        yield _with_database(base, database)
    finally:
        try:
            _mysql_execute(base, [f"DROP DATABASE IF EXISTS `{database}`"])
        except Exception as error:  # noqa: BLE001 -- reported, never fails the session's last test
            warnings.warn(
                PoolkeeperWarning(f"could not drop the throwaway database {database}: {redact(str(error), hidden)}"),
                stacklevel=1,
            )
