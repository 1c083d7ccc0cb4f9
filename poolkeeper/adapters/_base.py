"""The driver contract: what every adapter implements to do one library's I/O for its keeper.

The keeper (``poolkeeper._keeper``) decides; the driver acts. A driver installs its guards
on the wrapped object (``attach``), wakes the library's own queued waiters when refusal
starts (``refuse``), aborts borrowed connections (``force_close``) and closes the physical
connections (``close_connections``). The last two are coroutines for every library: sync
libraries run their blocking calls in daemon threads (``run_blocking``), so a call stuck on a
dead peer can be abandoned at the deadline without holding up the process's exit.

This contract is public (``poolkeeper.adapters.Driver``); each method's docstring says what it
must do, from which thread or event loop it is called, within which time, and what happens to
what it raises. ``docs/adapters.md`` shows a complete third-party adapter.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import types
from typing import TYPE_CHECKING, Any, ClassVar

from poolkeeper._borrowers import add_library_modules
from poolkeeper._concurrency import run_blocking, run_on_loop
from poolkeeper.errors import PoolClosedError, UnsupportedResourceError

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence

    from poolkeeper._borrowers import Borrow
    from poolkeeper._keeper import Keeper
    from poolkeeper._report import ResourceReport

__all__ = ["Driver", "guarded_subclass", "log_own_close", "run_blocking", "run_on_loop", "unsupported_version"]


class Driver(abc.ABC):
    """The I/O half of a keeper, one subclass per wrapped library.

    A driver is made by its adapter's factory for one object passed to ``wrap()``, attached to
    one keeper, and never reused. The keeper calls it; it never calls the keeper's lifecycle
    steps itself. Its guards (installed by :meth:`attach`) report the library's checkouts and
    returns through the keeper's checkout protocol: :meth:`Keeper.admit` (or
    :meth:`Keeper.start_checkout` ... :meth:`Keeper.end_checkout` around a checkout that does
    I/O), :meth:`Keeper.lend` once a connection is handed out, :meth:`Keeper.checkin` when it
    comes back, and :meth:`Keeper.refusal` for the error a refused checkout raises.

    Subclasses set :attr:`kind`, may set :attr:`refusal_class` and :attr:`can_ping`, implement
    :meth:`refuse`, :meth:`force_close` and :meth:`close_connections`, and override the others
    where their library needs it. ``__init__(resource)`` (or the registered factory) runs in the
    thread calling ``wrap()``, under the registry's lock: it checks the object and the library
    version and must do no I/O. Raising ``TypeError`` or
    :class:`~poolkeeper.UnsupportedResourceError` there refuses the object; nothing is registered.
    """

    #: Short name of the library, shown as the keeper's ``kind`` (``"redis"``, ``"socketpool"``).
    kind: ClassVar[str]
    #: What a refused checkout raises: a :class:`PoolClosedError` that is also the library's own
    #: error for use after close, so that the application's existing ``except`` clauses catch it.
    #: Its constructor takes ``(keeper_name, state)``, as :class:`PoolClosedError`'s does.
    refusal_class: ClassVar[type[PoolClosedError]] = PoolClosedError
    #: Names of the wrapped library's modules (``("mypool",)``, submodules included): their frames
    #: are never reported as a borrow site, which is the first frame outside them. The built-in
    #: adapters' libraries are known already.
    library_modules: ClassVar[tuple[str, ...]] = ()

    def __init__(self, resource: Any) -> None:
        #: The object ``wrap()`` was given; ``wrap()`` returns it.
        self.resource = resource
        self._keeper: Keeper | None = None

    @property
    def keeper(self) -> Keeper:
        """The keeper this driver serves (set by :meth:`attach`).

        Raises:
            RuntimeError: read before :meth:`attach`.
        """
        if self._keeper is None:
            raise RuntimeError("driver used before attach()")
        return self._keeper

    @property
    def managed_object(self) -> Any:
        """The object the guards go on; two resources sharing it are one keeper's.

        A redis client's connection pool, an ``AsyncEngine``'s sync engine; by default the
        wrapped resource itself. Read under the registry's lock: no I/O.
        """
        return self.resource

    @property
    def home_loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the connections live on; ``None`` for thread-based libraries.

        The shutdown may run on another loop (or on a private one, for ``registry.close()``):
        the driver then reaches its connections with :func:`run_on_loop`. ``registry.close()``
        refuses to run on this loop (it would block it).
        """
        return None

    def attach(self, keeper: Keeper) -> None:
        """Install the guards on the resource, so that its checkouts and returns reach ``keeper``.

        Called once, in the thread calling ``wrap()``, under the registry's lock: no I/O, no
        waiting. Call ``super().attach(keeper)`` first. Connections already out at this moment
        (a held subscription) should be lent to the keeper, so that the drain waits for them.

        Raises:
            Exception: anything, to refuse the object (``ValueError`` for a closed pool,
                :class:`~poolkeeper.RegistrationError` for one managed elsewhere). It must then
                have undone itself: ``wrap()`` raises it and nothing stays registered or guarded.
        """
        self._keeper = keeper
        if self.library_modules:
            add_library_modules(self.library_modules)

    def detach(self) -> None:  # noqa: B027 -- adapters with guards override it
        """Remove the guards :meth:`attach` installed: registration failed halfway, or ``unwrap()``.

        The library's own classes and methods come back; a closed resource stays closed.
        Called under the registry's lock, never while the keeper is draining or forcing; it
        must not raise and must be safe to call twice.
        """

    @abc.abstractmethod
    def refuse(self) -> None:
        """Wake checkouts queued inside the library so they fail with the refusal at once.

        Called once, right after the keeper starts draining (from then on
        :meth:`Keeper.admit` refuses), from the thread running the shutdown, which may be any
        thread and need not run the library's loop: reach that loop with
        ``loop.call_soon_threadsafe`` or ``asyncio.run_coroutine_threadsafe``. Must not block
        or do I/O. A library that queues nobody (every waiter was admitted first and is in
        flight) does nothing. An exception is logged and named in the report's ``error``; the
        shutdown goes on.
        """

    @abc.abstractmethod
    def force_close(self, borrows: Sequence[Borrow], timeout: float) -> Awaitable[None]:
        """Abort the borrowed connections: cancel their work on the server, then cut the socket.

        Awaited on the shutdown's event loop (not necessarily :attr:`home_loop`: use
        :func:`run_on_loop`), once, when the drain deadline passed with ``borrows`` still out
        (each :class:`Borrow`'s ``connection`` is what the guards passed to :meth:`Keeper.lend`).
        Blocking calls go through :func:`run_blocking`, never on the loop. The call is
        cancelled after ``timeout`` seconds: an abort never waits for a polite answer from a
        peer that may be dead, and a cancelled force-close should still cut its sockets (in a
        ``finally``). Afterwards each borrower blocked in a call must get an error promptly, and
        nothing may reconnect behind poolkeeper's back. An exception (or the timeout) is logged
        and makes the report's outcome ``"failed"``; :meth:`close_connections` still runs.
        """

    @abc.abstractmethod
    def close_connections(self) -> Awaitable[None]:
        """Close every physical connection the pool still has.

        Awaited on the shutdown's event loop after the drain (and after :meth:`force_close`,
        if it ran), once; cancelled when the keeper's ``close_timeout`` (or the deadline) runs
        out, so it must not wait on a peer without bound. Idle connections are closed, and the
        pool is left so that it opens no new ones. An exception is logged and makes the
        report's outcome ``"failed"``; the keeper is marked closed either way.
        """

    def blocking_close(self) -> Callable[[], None] | None:
        """The blocking twin of :meth:`close_connections`, for a library without an event loop; ``None`` if none.

        A sync library's :meth:`close_connections` closes its idle connections in a helper
        thread (:func:`run_blocking`). Returning that function here lets the keeper run it in
        the thread that waits for the drain, the moment the last connection comes back, with no
        hop through the event loop in between: a shutdown ends sooner after its last return.
        Called once, when closing starts; the function runs at most once, in a daemon thread,
        bounded by ``close_timeout`` like :meth:`close_connections`, and only after a clean
        drain (a drain cut short forces and then awaits :meth:`close_connections`, as usual).
        The default, ``None``, always awaits :meth:`close_connections`.
        """
        return None

    #: Whether :meth:`ping` checks anything; readiness reports "not checked" when it does not.
    can_ping: ClassVar[bool] = False

    async def ping(self) -> None:  # noqa: B027 -- optional: a library without a cheap ping is "not checked"
        """Check cheaply that the server answers (``SELECT 1``, ``PING``); raise if it does not.

        Readiness probes call this (opt-in, cached, with a timeout that cancels it), on the
        health endpoint's event loop. It must never take a pool connection a request could
        use: it talks over a side connection of its own. Once the keeper is closing it raises
        the refusal (call :meth:`Keeper.admit` first). The default does nothing, and
        :attr:`can_ping` says so.
        """

    def idle_count(self) -> int | None:
        """How many physical connections sit idle in the pool now; ``None`` when the library does not say.

        Read at metrics scrape time, from any thread: no I/O, no waiting on the library's loop.
        """
        return None

    def forget_inherited(self, borrowed: Sequence[Any]) -> None:  # noqa: B027 -- every adapter of a pool overrides it
        """In a forked child, right after the fork: leave every connection that exists now to the parent.

        From then on nothing this driver does in the child (force-close, close, a late return)
        may cancel, terminate, say goodbye on or shut down a connection the parent opened: the
        socket is shared with the parent. Such connections are dropped, never closed; only the
        connections the child opens itself are closed. ``borrowed`` are the keys of the parent's
        borrows, which the keeper has just forgotten. Called while no other thread exists.

        The default does nothing: an adapter whose resource holds connections must override it.
        """

    def describe_borrow(self, connection: Any) -> str | None:  # noqa: ARG002 -- adapters that can say override it
        """What one borrow is, for the report's force-closed list (a message's queue and delivery tag); no secret."""
        return None

    def returned_after_close(self) -> None:  # noqa: B027 -- optional hook, a no-op by default
        """A connection came back once the closer had begun closing the idle ones (a forced borrower, late): close it.

        The closer's sweep of the idle connections may already have passed it, and nothing
        sweeps the pool again; the return can also land while that sweep runs, so closing it
        must be safe beside the sweep (each idle connection taken out of the pool once). Called
        from the thread that returned it, possibly from a finaliser run by the garbage
        collector: must not block, must not raise.
        """

    def connection_returned_after_close(self, connection: Any) -> None:  # noqa: ARG002 -- the default cannot use it
        """:meth:`returned_after_close`, told which connection came back (what the adapter lent).

        What the keeper calls. The default calls :meth:`returned_after_close`, which knows only
        that one did. Override this one where a sweep of the whole pool per late return would add
        up: thousands of forced borrowers come back one after another, and a sweep each costs
        the square of their number. Same constraints: must not block, must not raise.
        """
        self.returned_after_close()

    def describe(self) -> str:
        """What the resource points at, with no secret in it (``redis://host:6379/0``).

        Shown in reports and health answers; called from any thread: no I/O. The text is
        scrubbed of :meth:`secrets` anyway, but should not contain them.
        """
        return type(self.resource).__name__

    def secrets(self) -> tuple[str, ...]:
        """Literal secrets (passwords, tokens) that must be scrubbed from any text shown.

        Every error message, report and health answer about this keeper is redacted with
        them. Called from any thread: no I/O. If it raises, error texts of this keeper show
        only the exception's type.
        """
        return ()


def unsupported_version(
    library: str, installed: str, supported: str, missing: Sequence[str]
) -> UnsupportedResourceError:
    """The error ``wrap()`` raises when the installed ``library`` lacks internals the adapter needs.

    Raised at wrap time, so that nothing in a shutdown ever meets a missing name.
    """
    return UnsupportedResourceError(
        f"poolkeeper cannot wrap this {library} object: the installed {library} {installed} lacks "
        f"{', '.join(missing)}; poolkeeper supports {library} {supported}"
    )


def log_own_close(logger: logging.Logger, report: ResourceReport, how: str) -> None:
    """Log the report of a close the application started with the library's own call (``how``)."""
    leaks = "".join(f"\n{leak.format()}" for leak in report.leaks)
    logger.log(
        logging.INFO if report.ok else logging.WARNING,
        "poolkeeper %r: closed by %s: %s (borrowed %d, returned %d, forced %d)%s",
        report.name,
        how,
        report.outcome,
        report.borrowed_at_start,
        report.returned,
        report.forced,
        leaks,
        extra={"poolkeeper_keeper": report.name, "poolkeeper_report": report.to_dict()},
    )


_guarded_classes: dict[tuple[type[Any], Callable[[type[Any]], type[Any]]], type[Any]] = {}


def guarded_subclass(cls: type[Any], factory: Callable[[type[Any]], type[Any]]) -> type[Any]:
    """``factory(cls)``: a guarded subclass of a library class, made once; ``cls`` itself if guarded already.

    For guards put on an object by ``__class__`` assignment: ``factory`` defines a plain
    single-inheritance subclass (a mixin would change the instance layout, and ``__class__``
    assignment needs the same layout), so that zero-argument ``super()`` reaches the library's
    own method, patched or not. The subclass takes the library class's names, so that reprs and
    tracebacks read as before.
    """
    if getattr(cls, "_poolkeeper_guard", None) is factory:
        return cls
    key = (cls, factory)
    if key not in _guarded_classes:
        guarded = factory(cls)
        guarded.__name__, guarded.__qualname__, guarded.__module__ = cls.__name__, cls.__qualname__, cls.__module__
        setattr(guarded, "_poolkeeper_guard", factory)  # noqa: B010 -- marks the class as guarded; mypy knows no such name
        _guarded_classes[key] = guarded
    return _guarded_classes[key]


def set_methods(target: Any, methods: Mapping[str, Callable[..., Any]]) -> None:
    """Set each function of ``methods`` on ``target``, bound to it, as an instance attribute over its class's method.

    The way to guard a hot object (a pool, a client) without ``__class__`` assignment: on CPython
    3.11 that assignment turns the object's attribute storage into a dict, and every attribute
    read on it, in the library's own code too, then runs unspecialised (a redis pool: about 6%
    more instructions per checkout). The functions call the library's method through
    ``type(target)`` at each call, so that a patch of it made after wrapping is what runs.
    """
    for name, function in methods.items():
        setattr(target, name, types.MethodType(function, target))


def remove_attributes(target: Any, names: Iterable[str]) -> None:
    """Undo :func:`set_methods` and the other instance attributes a guard set, those that are there."""
    for name in names:
        with contextlib.suppress(AttributeError):
            delattr(target, name)  # not through vars(target), which would make its attributes a dict
