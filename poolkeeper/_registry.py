"""The registry: holds keepers and hooks, and closes them all, once, in order, inside one deadline."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar, overload

from poolkeeper import _exit
from poolkeeper._concurrency import wake_soon
from poolkeeper._held import HeldKeeper
from poolkeeper._hooks import Hook, check_hook, running_hook
from poolkeeper._keeper import Keeper, KeeperState
from poolkeeper._leak_watch import forget_inherited as forget_inherited_leak_watch
from poolkeeper._shutdown import ForceSwitch, Item, run_shutdown
from poolkeeper._timeouts import DEFAULT_CLOSE_TIMEOUT, DEFAULT_DRAIN_TIMEOUT, check_name, check_timeout
from poolkeeper.adapters import driver_for, prepare_adapter
from poolkeeper.errors import RegistrationError

if TYPE_CHECKING:
    from collections.abc import Coroutine
    from types import TracebackType

    from typing_extensions import Self  # typing.Self is 3.11+; only annotations use it

    from poolkeeper._report import ShutdownReport

__all__ = ["Registry", "get_registry"]

logger = logging.getLogger("poolkeeper.registry")

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

# Which keeper manages a resource, whatever registry it is in: wrapping twice is a no-op,
# and one resource is never managed by two registries.
# The keeper is held weakly too: it references the resource (through its driver), and a strong
# value would keep every wrapped resource, and its registry's keeper, alive forever.
_managed: weakref.WeakKeyDictionary[Any, weakref.ref[Keeper]] = weakref.WeakKeyDictionary()
# The same for objects that take no weak reference (asyncpg's Pool has __slots__), by id(): an
# entry is trusted only if its keeper still manages that very object, so a reused id is harmless,
# and it goes when the keeper is collected (with its object: each owns the other).
_managed_by_id: dict[int, weakref.ref[Keeper]] = {}
_managed_lock = threading.Lock()
# Every registry of this process, for the at-fork hook below.
_every_registry: weakref.WeakSet[Registry] = weakref.WeakSet()


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
        self.force = ForceSwitch()
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
        self,
        *,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
        track_borrowers: bool = False,
    ) -> None:
        self.drain_timeout: float = check_timeout("drain_timeout", drain_timeout, allow_none=False)  # type: ignore[assignment]
        self.close_timeout: float = check_timeout("close_timeout", close_timeout, allow_none=False)  # type: ignore[assignment]
        if not isinstance(track_borrowers, bool):
            raise TypeError(f"track_borrowers must be True or False, got {track_borrowers!r}")
        self.track_borrowers = track_borrowers
        self._lock = threading.RLock()
        # Hooks, and keepers held weakly (poolkeeper._held): a dropped resource is not kept alive.
        self._items: dict[str, Item | HeldKeeper] = {}
        # Entries of keepers collected since, removed under the lock on the registry's next use.
        self._dropped: collections.deque[HeldKeeper] = collections.deque()
        # How many runners pin the keepers (run(), the FastAPI lifespan): see poolkeeper._held.
        self._pins = 0
        # The next free suffix per default name ("redis" -> 3: "redis-3"), so wrap() stays O(1).
        self._name_counters: dict[str, int] = {}
        self._draining = False
        self._force_requested = False
        self._shutdown: _Shutdown | None = None
        self._forced_close: asyncio.Future[ShutdownReport] | None = None
        _every_registry.add(self)  # for the at-fork hook (_after_fork_in_child)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "closing" if self._shutdown else "draining" if self._draining else "open"
        return f"<Registry {state} items={list(self._live_items())}>"

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

    def _keeper_of(self, managed: Any) -> Keeper | None:
        """The keeper (of any registry) already managing ``managed``, if any."""
        existing_ref = _managed.get(managed) if _weakrefable(managed) else _managed_by_id.get(id(managed))
        keeper = existing_ref() if existing_ref is not None else None
        return keeper if keeper is not None and keeper.driver.managed_object is managed else None

    def _remember(self, managed: Any, keeper: Keeper) -> None:
        """Record that ``keeper`` manages ``managed`` (called with both locks held)."""
        if _weakrefable(managed):
            _managed[managed] = weakref.ref(keeper)
            return
        key = id(managed)

        def forget(ref: weakref.ref[Keeper]) -> None:  # the keeper was collected, with its object
            if _managed_by_id.get(key) is ref:  # a dict read and a pop: atomic, no lock needed
                _managed_by_id.pop(key, None)

        _managed_by_id[key] = weakref.ref(keeper, forget)

    @staticmethod
    def _forget(managed: Any) -> None:
        """Undo :meth:`_remember` (called with both locks held)."""
        if _weakrefable(managed):
            _managed.pop(managed, None)
        else:
            _managed_by_id.pop(id(managed), None)

    def _purge(self) -> None:
        """Remove the entries of keepers collected since the last call (with the lock held)."""
        while True:
            try:
                held = self._dropped.popleft()
            except IndexError:
                return
            if self._items.get(held.name) is held:
                del self._items[held.name]

    def _holds(self, keeper: Keeper) -> bool:
        item = self._items.get(keeper.name)
        return isinstance(item, HeldKeeper) and item.keeper() is keeper

    def _unique_name(self, base: str) -> str:
        # A counter per base name: trying base, base-2, base-3... in turn was O(n) per wrap.
        counter = self._name_counters.get(base, 1)
        name = base if counter == 1 else f"{base}-{counter}"
        while name in self._items:
            counter += 1
            name = f"{base}-{counter}"
        self._name_counters[base] = counter + 1
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
            track_borrowers: record who borrows each connection and the line that did (default:
                the registry's); see docs/lifecycle.md, "Leak detection in production".
            leak_threshold: warn, with the borrow site, about a connection held longer than this.

        Returns:
            The same object (or, where a library forbids that, a drop-in of the same type),
            now managed. Wrapping an object a second time returns it without registering again.

        Raises:
            UnsupportedResourceError: ``resource`` is of no supported type (built in, or given
                an adapter by :func:`poolkeeper.register_adapter` or an entry point).
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

        prepare_adapter(resource)  # a third-party adapter's entry point is imported outside the locks
        with self._lock, _managed_lock:
            self._refuse_if_closing("wrap")
            self._purge()
            driver = driver_for(resource)
            managed = driver.managed_object
            existing = self._keeper_of(managed)
            if existing is not None:
                if not self._holds(existing):
                    raise RegistrationError(
                        f"this {type(resource).__name__} is already managed by another registry as {existing.name!r}"
                    )
                if name is not None and name != existing.name:
                    raise RegistrationError(
                        f"this {type(resource).__name__} is already managed here as {existing.name!r}"
                        f"{'' if managed is resource else ' (through another object sharing its pool)'}; "
                        f"it cannot also be {name!r}"
                    )
                return resource
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
            held = self._items[name] = HeldKeeper(keeper, self._dropped)
            if self._pins:
                held.pin()
            self._remember(managed, keeper)
        _exit.track(self)
        logger.debug("poolkeeper: wrapped %s as %r", type(resource).__name__, name, extra={"poolkeeper_keeper": name})
        return driver.resource  # type: ignore[no-any-return]  # the same T that was passed in

    def unwrap(self, resource_or_name: Any) -> Any:
        """Stop managing an object: its guards are removed and the library's own behaviour is back.

        The keeper leaves the registry (its name is free again, and the object can be wrapped
        anew, here or elsewhere). Connections borrowed at that moment are no longer counted.
        Unwrapping a keeper that has closed only forgets it: the object stays closed.

        Args:
            resource_or_name: the object as ``wrap()`` returned it (or another object sharing
                its pool), or the keeper's name.

        Returns:
            The object the keeper managed, as ``wrap()`` returned it.

        Raises:
            KeyError: no keeper of this registry has that name or manages that object.
            RegistrationError: the registry or that keeper is closing: the shutdown owns it now.
            UnsupportedResourceError: the object is of no supported type.
        """
        if not isinstance(resource_or_name, str):
            prepare_adapter(resource_or_name)  # as in wrap(): no entry point imported under the locks
        with self._lock, _managed_lock:
            self._purge()
            if isinstance(resource_or_name, str):
                item = self._items.get(resource_or_name)
                keeper = item.keeper() if isinstance(item, HeldKeeper) else None
                if keeper is None:
                    raise KeyError(f"no keeper named {resource_or_name!r} in this registry")
            else:
                keeper = self._keeper_of(driver_for(resource_or_name).managed_object)
                if keeper is None or not self._holds(keeper):
                    raise KeyError(f"this {type(resource_or_name).__name__} is not managed by this registry")
            self._refuse_if_closing(f"unwrap {keeper.name!r}")
            if keeper.state in (KeeperState.DRAINING, KeeperState.FORCING):
                raise RegistrationError(f"cannot unwrap {keeper.name!r}: it is closing")
            held = self._items.pop(keeper.name)
            assert isinstance(held, HeldKeeper)  # noqa: S101 -- _holds() / the lookup above checked it
            held.released = True
            keeper.on_closed = None
            keeper.driver.detach()
            self._forget(keeper.driver.managed_object)
        logger.debug("poolkeeper: unwrapped %r", keeper.name, extra={"poolkeeper_keeper": keeper.name})
        return keeper.resource

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
            check_hook("on_shutdown's fn", function)
            with self._lock:
                self._refuse_if_closing("register a hook")
                self._purge()
                hook_name = name or getattr(function, "__qualname__", None) or repr(function)
                self._check_new_item(hook_name, dependencies)
                self._items[hook_name] = Hook(
                    hook_name,
                    function,
                    depends_on=dependencies,
                    timeout=self.close_timeout if seconds is None else seconds,
                    owner=self,
                )
            return function

        return register if fn is None else register(fn)

    def check(self) -> None:
        """Verify the registrations; call it at startup.

        Raises:
            RegistrationError: some ``depends_on`` names no registered item.
        """
        with self._lock:
            self._purge()
            unknown = [
                f"{item.name!r} depends on unknown {dependency!r}"
                for item in self._items.values()
                for dependency in item.depends_on
                if dependency not in self._items
            ]
        if unknown:
            raise RegistrationError("; ".join(unknown))

    # -- inspection ----------------------------------------------------------------------------

    def _live_items(self) -> dict[str, Item]:
        """The hooks and the keepers not collected, by name, in registration order."""
        items: dict[str, Item] = {}
        for name, item in list(self._items.items()):
            live = item.keeper() if isinstance(item, HeldKeeper) else item
            if live is not None:
                items[name] = live
        return items

    @property
    def keepers(self) -> tuple[Keeper, ...]:
        """The registered keepers, in registration order."""
        return tuple(item for item in self._live_items().values() if isinstance(item, Keeper))

    @property
    def hooks(self) -> tuple[Hook, ...]:
        """The registered shutdown hooks, in registration order."""
        return tuple(item for item in self._items.values() if isinstance(item, Hook))

    def __getitem__(self, name: str) -> Keeper:
        """The keeper registered as ``name`` (hooks are listed by :attr:`hooks`)."""
        item = self._items[name]
        if not isinstance(item, HeldKeeper):
            raise KeyError(f"{name!r} is a shutdown hook, not a keeper")
        keeper = item.keeper()
        if keeper is None:
            raise KeyError(name)
        return keeper

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._live_items()

    def __iter__(self) -> Iterator[str]:
        return iter(self._live_items())

    def __len__(self) -> int:
        return len(self._live_items())

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
        if self._mark_draining():
            logger.info(
                "poolkeeper: draining started; keepers still lend until the registry closes",
                extra={"poolkeeper_event": "draining"},
            )

    def _mark_draining(self) -> bool:
        """Set ``draining`` without a lock or a log line (a signal handler calls this); True if it changed."""
        if self._draining:
            return False
        self._draining = True
        return True

    def _pin(self) -> None:
        """Hold every open keeper, and each one wrapped from now on, strongly (see poolkeeper._held).

        For a runner that owns the process's lifetime and closes the registry at its end: an
        object wrapped inside ``main`` and dropped when ``main`` ends is still there to close.
        Each :meth:`_pin` is undone by one :meth:`_unpin`.
        """
        with self._lock:
            self._purge()
            self._pins += 1
            for item in self._items.values():
                if isinstance(item, HeldKeeper):
                    item.pin()

    def _unpin(self) -> None:
        """Undo one :meth:`_pin`; after the last, keepers are held weakly again."""
        with self._lock:
            self._pins -= 1
            if not self._pins:
                for item in self._items.values():
                    if isinstance(item, HeldKeeper):
                        item.unpin()

    def _refuse_from_own_hook(self, method: str) -> None:
        running = running_hook.get()
        if running is not None and running[0] is self:
            raise RuntimeError(
                f"registry.{method}() was called from its own shutdown hook {running[1]!r}: the registry is "
                "closing already, and that close would wait for this very hook; force_close() cuts it short"
            )

    def _begin(self) -> tuple[_Shutdown, bool]:
        with self._lock:
            if self._shutdown is not None:
                return self._shutdown, False
            shutdown = _Shutdown()
            if self._force_requested:
                shutdown.force.trip()
            self._shutdown = shutdown
            self._draining = True
            return shutdown, True

    async def _run(self, shutdown: _Shutdown, deadline: float | None) -> ShutdownReport:
        def publish(report: ShutdownReport) -> None:
            # Also called when the task running the shutdown is cancelled: the force-close has
            # finished, so every other caller gets the report while the cancellation propagates.
            # Logged before any caller gets it: a caller may end the process at once (run() after
            # a second signal, whose force-close runs this in a daemon thread that the exit kills).
            level = logging.INFO if report.ok else logging.WARNING
            if logger.isEnabledFor(level):  # to_dict() of thousands of forced borrowers is not free
                logger.log(level, "%s", report, extra={"poolkeeper_report": report.to_dict()})
            shutdown.finish(report)

        try:
            return await run_shutdown(self._live_items(), deadline, shutdown.force, publish)
        except BaseException as error:
            if not shutdown.done.is_set():
                shutdown.finish(None, error)
            raise

    async def aclose(self, deadline: float | None = None) -> ShutdownReport:
        """Close everything and return the report. Idempotent; concurrent callers share one shutdown.

        Args:
            deadline: seconds the whole shutdown may take; drains that would overrun it are cut
                short and force-closed in time. ``None``: each item's own timeouts apply.

        Cancelling the task that runs the shutdown cuts it short: everything is force-closed
        and the report published (to :attr:`report` and to the other callers) before the
        cancellation propagates. Cancelling another caller only stops its wait.

        Raises:
            ValueError: ``deadline`` is negative, NaN or infinite.
        """
        seconds = check_timeout("deadline", deadline)
        self._refuse_from_own_hook("aclose")
        shutdown, owner = self._begin()
        if not owner:
            return await asyncio.shield(shutdown.wait())
        return await self._run(shutdown, seconds)

    def close(self, deadline: float | None = None) -> ShutdownReport:
        """Blocking twin of :meth:`aclose`, for code without an event loop.

        Keepers of async libraries are closed on their own event loop when it runs in another
        thread. Called from inside the loop those keepers live on, it would deadlock, so it
        raises instead: use ``await registry.aclose()`` there.

        Interrupted (``KeyboardInterrupt`` from a signal handler), it still force-closes
        everything and publishes the report before the interruption propagates.

        Raises:
            ValueError: ``deadline`` is negative, NaN or infinite.
            RuntimeError: called from the event loop that async keepers belong to, or from the
                event loop on which ``aclose()`` is already closing this registry.
        """
        seconds = check_timeout("deadline", deadline)
        self._refuse_from_own_hook("close")
        running = _running_loop()
        homes = {keeper.driver.home_loop for keeper in self.keepers} - {None}
        if running is not None and running in homes:
            raise RuntimeError(
                "registry.close() was called from the event loop its async keepers use; "
                "use 'await registry.aclose()' instead"
            )
        shutdown, owner = self._begin()
        if not owner:
            if running is not None and running is shutdown.force.loop and not shutdown.done.is_set():
                raise RuntimeError(
                    "registry.close() was called from the event loop that is closing the registry; "
                    "use 'await registry.aclose()' there"
                )
            shutdown.done.wait()
            return shutdown.result()
        idle_homes = [loop for loop in homes if loop is not None and not loop.is_running() and not loop.is_closed()]
        if running is None:
            try:
                if len(idle_homes) == 1:
                    # The async keepers' loop exists but is not running: run the shutdown on it here.
                    return _run_until_complete(idle_homes[0], self._run(shutdown, seconds))
                return _run_on_private_loop(self._run(shutdown, seconds))
            except BaseException as error:
                if not shutdown.done.is_set():  # interrupted before the shutdown even started
                    shutdown.finish(None, error)
                raise
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

    def force_close(self) -> ShutdownReport | None:
        """Close everything now: drains end at once, borrowed connections are force-closed.

        Hooks still running are cancelled and hooks not started yet are skipped. A shutdown
        already running (``aclose()`` in some task, ``close()`` in some thread) is cut short;
        otherwise a forced one starts.

        It never blocks a thread that runs an event loop, since that loop may be the one running
        the shutdown: there (a coroutine, or a signal handler that interrupted ``close()`` or
        ``aclose()`` in the main thread) it only forces the shutdown, or schedules a forced one
        on that loop, and returns at once. Elsewhere it waits for the report, running the
        forced shutdown itself if none had started.

        Returns:
            The report, once the shutdown has finished; ``None`` when called from a thread
            running an event loop before the shutdown has finished (``await registry.aclose()``
            then returns the report, and :attr:`report` holds it once it is done).
        """
        self._force_requested = True
        shutdown = self._shutdown
        if shutdown is not None:
            shutdown.force.trip()
        running = _running_loop()
        if shutdown is None:
            if running is None:
                return self.close(deadline=0.0)
            # Scheduled rather than started here: this may be a signal handler that interrupted the loop.
            running.call_soon_threadsafe(self._start_forced_close)
            return None
        if shutdown.done.is_set():
            return shutdown.result()
        if running is not None:
            return None
        shutdown.done.wait()
        return shutdown.result()

    def _start_forced_close(self) -> None:
        # A reference is kept: the event loop holds only weak references to its tasks.
        self._forced_close = asyncio.ensure_future(self.aclose(deadline=0.0))

    def _forget_inherited(self) -> None:
        """In a forked child: this process's own state; the keepers forget the parent's connections.

        Draining and a shutdown the parent had started or finished are the parent's: the child's
        registry is open (its keepers refuse if the parent had closed them) and closes once, itself.
        """
        self._lock = threading.RLock()
        self._draining = False
        self._force_requested = False
        self._shutdown = None
        self._forced_close = None
        for keeper in self.keepers:
            keeper._forget_inherited()  # noqa: SLF001 -- the keeper's own at-fork step

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


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _run_until_complete(
    loop: asyncio.AbstractEventLoop, coroutine: Coroutine[Any, Any, ShutdownReport]
) -> ShutdownReport:
    """``loop.run_until_complete(coroutine)``, except that an interruption still force-closes.

    A ``KeyboardInterrupt`` (or ``SystemExit``) raised by a signal handler in the middle of
    ``close()`` escapes the loop and would leave the shutdown half done: the shutdown's task is
    cancelled instead, so it force-closes everything and publishes its report, and then the
    interruption propagates.
    """
    task = loop.create_task(coroutine)
    try:
        return loop.run_until_complete(task)
    except BaseException:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):  # its own cancellation, or a second interruption
                loop.run_until_complete(task)
        raise


def _run_on_private_loop(coroutine: Coroutine[Any, Any, ShutdownReport]) -> ShutdownReport:
    loop = asyncio.new_event_loop()
    try:
        return _run_until_complete(loop, coroutine)
    finally:
        loop.close()


def _after_fork_in_child() -> None:
    """Keepers are per process (PRODUCT.md 4.9): the child starts owning nothing it inherited.

    Runs in the child of every ``os.fork()`` (multiprocessing's fork, gunicorn and Celery
    workers), while it has one thread: every lock is made anew (another thread may have held
    it at the fork), the leak watcher and the exit-time net are re-armed for this pid, and every
    keeper forgets the parent's borrows and connections.
    """
    global _managed_lock  # noqa: PLW0603 -- a lock held by a parent thread at the fork would never be released
    _managed_lock = threading.Lock()
    _exit.forget_inherited()
    forget_inherited_leak_watch()
    for registry in list(_every_registry):
        try:
            registry._forget_inherited()  # noqa: SLF001 -- the registry's own at-fork step
        except Exception:  # an exception here would be printed and ignored by os.fork: log it clearly
            logger.exception("poolkeeper: forgetting the parent's connections after fork failed")


os.register_at_fork(after_in_child=_after_fork_in_child)

_default_registry = Registry()


def get_registry() -> Registry:
    """The process-wide default registry, used by :func:`poolkeeper.wrap`."""
    return _default_registry
