"""The registry: holds keepers and hooks, and closes them all, once, in order, inside one deadline."""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar, overload

from typing_extensions import Self

from poolkeeper._concurrency import wake_soon
from poolkeeper._hooks import Hook
from poolkeeper._keeper import Keeper
from poolkeeper._shutdown import Item, run_shutdown
from poolkeeper._timeouts import check_name, check_timeout
from poolkeeper.adapters import driver_for
from poolkeeper.errors import RegistrationError

if TYPE_CHECKING:
    from types import TracebackType

    from poolkeeper._report import ShutdownReport

__all__ = ["Registry", "get_registry"]

logger = logging.getLogger("poolkeeper.registry")

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

# Which keeper manages a resource, whatever registry it is in: wrapping twice is a no-op,
# and one resource is never managed by two registries.
_managed: weakref.WeakKeyDictionary[Any, Keeper] = weakref.WeakKeyDictionary()
_managed_lock = threading.Lock()


def _check_depends_on(value: object) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise TypeError(f"depends_on must be a list of names, got {value!r}")
    names = tuple(value)
    for name in names:
        if not isinstance(name, str) or not name:
            raise TypeError(f"depends_on must contain non-empty names, got {name!r}")
    return names


class _Shutdown:
    """The one shutdown of a registry; every caller of close/aclose gets its report."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.report: ShutdownReport | None = None
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def finish(self, report: ShutdownReport | None, error: BaseException | None = None) -> None:
        with self._lock:
            self.report, self.error = report, error
            self.done.set()
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            wake_soon(loop, future)

    def result(self) -> ShutdownReport:
        if self.error is not None:
            raise RuntimeError("the registry's shutdown failed") from self.error
        if self.report is None:
            raise RuntimeError("the registry's shutdown has not finished")
        return self.report

    async def wait(self) -> ShutdownReport:
        loop = asyncio.get_running_loop()
        with self._lock:
            if not self.done.is_set():
                future: asyncio.Future[None] = loop.create_future()
                self._waiters.append((loop, future))
            else:
                future = loop.create_future()
                future.set_result(None)
        await future
        return self.result()


class Registry:
    """Keepers and shutdown hooks, closed together in dependency order inside one deadline.

    Args:
        drain_timeout: default seconds a keeper waits for borrowed connections to come back.
        close_timeout: default seconds a keeper gets to force-close and close its connections,
            and the default timeout of hooks.
        track_borrowers: default for recording borrow-site stacks (costs a stack walk per checkout).

    Raises:
        ValueError: a timeout is negative, NaN or infinite.
        TypeError: a timeout is not a number.
    """

    def __init__(
        self, *, drain_timeout: float = 30.0, close_timeout: float = 10.0, track_borrowers: bool = False
    ) -> None:
        self.drain_timeout: float = check_timeout("drain_timeout", drain_timeout, allow_none=False)  # type: ignore[assignment]
        self.close_timeout: float = check_timeout("close_timeout", close_timeout, allow_none=False)  # type: ignore[assignment]
        if not isinstance(track_borrowers, bool):
            raise TypeError(f"track_borrowers must be True or False, got {track_borrowers!r}")
        self.track_borrowers = track_borrowers
        self._lock = threading.RLock()
        self._items: dict[str, Item] = {}
        self._draining = False
        self._shutdown: _Shutdown | None = None

    def __repr__(self) -> str:
        state = "closed" if self.closed else "closing" if self._shutdown else "draining" if self._draining else "open"
        return f"<Registry {state} items={list(self._items)}>"

    # -- registration ------------------------------------------------------------------------

    def _refuse_if_closing(self, what: str) -> None:
        if self._shutdown is not None:
            raise RegistrationError(f"cannot {what}: this registry is already closing or closed")

    def _check_new_item(self, name: str, depends_on: tuple[str, ...]) -> None:
        if name in self._items:
            raise RegistrationError(f"the name {name!r} is already registered; names must be unique")
        if name in depends_on:
            raise RegistrationError(f"{name!r} cannot depend on itself")
        # A cycle exists if a dependency already (transitively) depends on the new name.
        for start in depends_on:
            path = self._path_to(start, name, [start])
            if path is not None:
                cycle = " -> ".join([name, *path])
                raise RegistrationError(f"dependency cycle: {cycle}")

    def _path_to(self, current: str, target: str, path: list[str]) -> list[str] | None:
        item = self._items.get(current)
        if item is None:
            return None
        for dependency in item.depends_on:
            if dependency == target:
                return [*path, target]
            if dependency not in path:
                found = self._path_to(dependency, target, [*path, dependency])
                if found is not None:
                    return found
        return None

    def _unique_name(self, base: str) -> str:
        name, counter = base, 2
        while name in self._items:
            name, counter = f"{base}-{counter}", counter + 1
        return name

    def wrap(
        self,
        resource: T,
        *,
        name: str | None = None,
        drain_timeout: float | None = None,
        close_timeout: float | None = None,
        depends_on: Iterable[str] = (),
        track_borrowers: bool | None = None,
        leak_threshold: float | None = None,
    ) -> T:
        """Put ``resource`` under this registry's management and return it.

        Args:
            resource: a SQLAlchemy ``Engine``/``AsyncEngine``, asyncpg ``Pool``, redis-py
                ``Redis`` (sync or asyncio) or aiohttp ``ClientSession``.
            name: unique name in this registry; defaults to the library's name.
            drain_timeout: seconds to wait for borrowed connections (default: the registry's).
            close_timeout: seconds to force-close and close connections (default: the registry's).
            depends_on: names of items this one uses; they close after it.
            track_borrowers: record borrow-site stacks (default: the registry's).
            leak_threshold: warn, with the borrow site, about a connection held longer than this.

        Returns:
            The same object (or, where a library forbids that, a drop-in of the same type),
            now managed. Wrapping an object a second time returns it without registering again.

        Raises:
            UnsupportedResourceError: ``resource`` is of no supported type.
            RegistrationError: duplicate name, dependency cycle, registry closed, or the
                resource is managed by another registry.
            ValueError: a timeout is negative, NaN or infinite.
            TypeError: an argument has the wrong type.
        """
        name = check_name("name", name)
        drain = check_timeout("drain_timeout", drain_timeout)
        close = check_timeout("close_timeout", close_timeout)
        threshold = check_timeout("leak_threshold", leak_threshold)
        if threshold == 0:
            raise ValueError("leak_threshold must be a positive number of seconds or None, got 0")
        dependencies = _check_depends_on(depends_on)
        if track_borrowers is not None and not isinstance(track_borrowers, bool):
            raise TypeError(f"track_borrowers must be True, False or None, got {track_borrowers!r}")

        with self._lock, _managed_lock:
            self._refuse_if_closing("wrap")
            existing = _managed.get(resource) if _weakrefable(resource) else None
            if existing is not None:
                if self._items.get(existing.name) is existing:
                    return resource
                raise RegistrationError(
                    f"this {type(resource).__name__} is already managed by another registry as {existing.name!r}"
                )
            driver = driver_for(resource)
            name = name if name is not None else self._unique_name(driver.kind)
            self._check_new_item(name, dependencies)
            keeper = Keeper(
                name,
                driver,
                drain_timeout=self.drain_timeout if drain is None else drain,
                close_timeout=self.close_timeout if close is None else close,
                depends_on=dependencies,
                track_borrowers=self.track_borrowers if track_borrowers is None else track_borrowers,
                leak_threshold=threshold,
            )
            driver.attach(keeper)  # raises, having undone itself, if the resource cannot be guarded
            self._items[name] = keeper
            if _weakrefable(resource):
                _managed[resource] = keeper
        logger.debug("poolkeeper: wrapped %s as %r", type(resource).__name__, name, extra={"poolkeeper_keeper": name})
        return driver.resource  # type: ignore[no-any-return]  # the same T that was passed in

    @overload
    def on_shutdown(
        self, fn: F, *, name: str | None = None, depends_on: Iterable[str] = (), timeout: float | None = None
    ) -> F: ...

    @overload
    def on_shutdown(
        self, fn: None = None, *, name: str | None = None, depends_on: Iterable[str] = (), timeout: float | None = None
    ) -> Callable[[F], F]: ...

    def on_shutdown(
        self,
        fn: F | None = None,
        *,
        name: str | None = None,
        depends_on: Iterable[str] = (),
        timeout: float | None = None,
    ) -> F | Callable[[F], F]:
        """Register ``fn`` (sync or async, no arguments) to run during shutdown.

        Usable as ``registry.on_shutdown(fn, ...)`` or as a decorator, with or without arguments.

        Args:
            fn: the callable.
            name: unique name (default: the function's ``__qualname__``).
            depends_on: names of items the hook uses; they close after it.
            timeout: seconds the hook may take (default: the registry's ``close_timeout``).

        Raises:
            RegistrationError: duplicate name, dependency cycle, or the registry is closing.
            ValueError: ``timeout`` is negative, NaN or infinite.
            TypeError: ``fn`` is not callable, or an argument has the wrong type.
        """
        name = check_name("name", name)
        seconds = check_timeout("timeout", timeout)
        dependencies = _check_depends_on(depends_on)

        def register(function: F) -> F:
            if not callable(function):
                raise TypeError(f"on_shutdown needs a callable, got {function!r}")
            with self._lock:
                self._refuse_if_closing("register a hook")
                hook_name = name or getattr(function, "__qualname__", None) or repr(function)
                self._check_new_item(hook_name, dependencies)
                self._items[hook_name] = Hook(
                    hook_name,
                    function,
                    depends_on=dependencies,
                    timeout=self.close_timeout if seconds is None else seconds,
                )
            return function

        return register if fn is None else register(fn)

    def check(self) -> None:
        """Verify the registrations; call it at startup.

        Raises:
            RegistrationError: some ``depends_on`` names no registered item.
        """
        with self._lock:
            unknown = [
                f"{item.name!r} depends on unknown {dependency!r}"
                for item in self._items.values()
                for dependency in item.depends_on
                if dependency not in self._items
            ]
        if unknown:
            raise RegistrationError("; ".join(unknown))

    # -- inspection ----------------------------------------------------------------------------

    @property
    def keepers(self) -> tuple[Keeper, ...]:
        """The registered keepers, in registration order."""
        return tuple(item for item in self._items.values() if isinstance(item, Keeper))

    @property
    def hooks(self) -> tuple[Hook, ...]:
        """The registered shutdown hooks, in registration order."""
        return tuple(item for item in self._items.values() if isinstance(item, Hook))

    def __getitem__(self, name: str) -> Keeper:
        """The keeper registered as ``name`` (hooks are listed by :attr:`hooks`)."""
        item = self._items[name]
        if not isinstance(item, Keeper):
            raise KeyError(f"{name!r} is a shutdown hook, not a keeper")
        return item

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)

    @property
    def draining(self) -> bool:
        """True once shutdown has been requested (``start_draining``) or started."""
        return self._draining or self._shutdown is not None

    @property
    def closed(self) -> bool:
        """True once the shutdown has finished."""
        return self._shutdown is not None and self._shutdown.done.is_set()

    @property
    def report(self) -> ShutdownReport | None:
        """The :class:`ShutdownReport` once closed, else ``None``."""
        shutdown = self._shutdown
        return shutdown.report if shutdown is not None and shutdown.done.is_set() else None

    # -- shutdown ---------------------------------------------------------------------------------

    def start_draining(self) -> None:
        """Say that shutdown has been requested: readiness fails from now on, keepers still lend."""
        with self._lock:
            if self._draining:
                return
            self._draining = True
        logger.info("poolkeeper: draining started; keepers still lend until the registry closes")

    def _begin(self) -> tuple[_Shutdown, bool]:
        with self._lock:
            if self._shutdown is not None:
                return self._shutdown, False
            self._shutdown = _Shutdown()
            self._draining = True
            return self._shutdown, True

    async def _run(self, shutdown: _Shutdown, deadline: float | None) -> ShutdownReport:
        try:
            report = await run_shutdown(dict(self._items), deadline)
        except BaseException as error:
            shutdown.finish(None, error)
            raise
        shutdown.finish(report)
        logger.log(
            logging.INFO if report.ok else logging.WARNING,
            "%s",
            report,
            extra={"poolkeeper_report": report.to_dict()},
        )
        return report

    async def aclose(self, deadline: float | None = None) -> ShutdownReport:
        """Close everything and return the report. Idempotent; concurrent callers share one shutdown.

        Args:
            deadline: seconds the whole shutdown may take; drains that would overrun it are cut
                short and force-closed in time. ``None``: each item's own timeouts apply.

        Raises:
            ValueError: ``deadline`` is negative, NaN or infinite.
        """
        seconds = check_timeout("deadline", deadline)
        shutdown, owner = self._begin()
        if not owner:
            return await asyncio.shield(shutdown.wait())
        return await self._run(shutdown, seconds)

    def close(self, deadline: float | None = None) -> ShutdownReport:
        """Blocking twin of :meth:`aclose`, for code without an event loop.

        Keepers of async libraries are closed on their own event loop when it runs in another
        thread. Called from inside the loop those keepers live on, it would deadlock, so it
        raises instead: use ``await registry.aclose()`` there.

        Raises:
            ValueError: ``deadline`` is negative, NaN or infinite.
            RuntimeError: called from the event loop that async keepers belong to.
        """
        seconds = check_timeout("deadline", deadline)
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        homes = {keeper.driver.home_loop for keeper in self.keepers} - {None}
        if running is not None and running in homes:
            raise RuntimeError(
                "registry.close() was called from the event loop its async keepers use; "
                "use 'await registry.aclose()' instead"
            )
        shutdown, owner = self._begin()
        if not owner:
            shutdown.done.wait()
            return shutdown.result()
        idle_homes = [loop for loop in homes if loop is not None and not loop.is_running() and not loop.is_closed()]
        if running is None and len(idle_homes) == 1:
            # The async keepers' loop exists but is not running: run the shutdown on it here.
            return idle_homes[0].run_until_complete(self._run(shutdown, seconds))
        if running is None:
            return _run_on_private_loop(self._run(shutdown, seconds))
        # This thread runs an unrelated loop; it cannot host another, so use a helper thread.
        result: list[ShutdownReport] = []
        helper = threading.Thread(
            target=lambda: result.append(_run_on_private_loop(self._run(shutdown, seconds))),
            name="poolkeeper-close",
            daemon=True,
        )
        helper.start()
        helper.join()
        return result[0] if result else shutdown.result()

    def force_close(self) -> ShutdownReport:
        """Close everything now: no drain wait; borrowed connections are force-closed at once."""
        for keeper in self.keepers:
            keeper.request_force()
        shutdown = self._shutdown
        if shutdown is not None:
            shutdown.done.wait()
            return shutdown.result()
        return self.close(deadline=0.0)

    # -- context managers -------------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


def _weakrefable(resource: object) -> bool:
    try:
        weakref.ref(resource)
    except TypeError:
        return False
    return True


def _run_on_private_loop(coroutine: Any) -> ShutdownReport:
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coroutine)  # type: ignore[no-any-return]  # a ShutdownReport coroutine
    finally:
        loop.close()


_default_registry = Registry()


def get_registry() -> Registry:
    """The process-wide default registry, used by :func:`poolkeeper.wrap`."""
    return _default_registry
