"""Signal handling: the first SIGTERM/SIGINT starts draining, then goes where it would have gone.

Python runs a signal handler in the main thread between two bytecodes of whatever that thread
was doing: possibly inside ``registry.close()``, holding a lock, or halfway through writing a
log line. So poolkeeper's handler does nothing that could block, deadlock or re-enter: it flips
``registry.draining`` (one attribute) and writes the signal number to a pipe (one system call,
no lock). A dispatcher thread reads the pipe and does the slow work. What has to happen in the
main thread (the replaced handler raising ``KeyboardInterrupt``, the process dying of the signal)
is sent back to the main thread as the same signal, with a token telling the handler to pass
it straight on.

``signal.signal`` is used, never ``loop.add_signal_handler``: the handler it replaces is known,
chained to, and restored, whoever installed it (uvicorn, gunicorn, Python's own SIGINT handler).
"""

from __future__ import annotations

import _thread
import contextlib
import logging
import os
import queue
import signal
import threading
import time
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from poolkeeper._budget import Budget, Plan, grace_period_or_default, plan_now, warn_misfit
from poolkeeper._registry import Registry, get_registry
from poolkeeper._timeouts import check_timeout

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import FrameType, TracebackType
    from typing import TypeAlias

    from typing_extensions import Self

    _Handler: TypeAlias = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None
    _Reaction: TypeAlias = Callable[[signal.Signals, int], None]

__all__ = ["SignalHandlers", "install_signal_handlers"]

logger = logging.getLogger("poolkeeper.signals")

_DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# After handing a terminating signal back to the main thread, how long the process may take to
# die of it before it is ended with os._exit (the main thread stuck in a long C call never runs
# Python signal handlers).
_KILL_GRACE = 2.0
_TERMINATING = {
    getattr(signal, name)
    for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM")
    if hasattr(signal, name)
}


def check_signals(argument: str, value: object) -> tuple[signal.Signals, ...]:
    """Return ``value`` as a tuple of distinct ``signal.Signals``, or raise naming ``argument``."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"{argument} must be a sequence of signals, got {value!r}")
    result: list[signal.Signals] = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int):
            raise TypeError(f"{argument} must contain signal numbers, got {item!r}")
        try:
            sig = signal.Signals(item)
        except ValueError:
            raise ValueError(f"{argument} contains {item!r}, which is no signal on this platform") from None
        if sig not in result:
            result.append(sig)
    return tuple(result)


def _signal_main_thread(signum: int) -> None:
    """Deliver ``signum`` to the main thread, waking it from a blocking system call."""
    main = threading.main_thread().ident
    if hasattr(signal, "pthread_kill") and main is not None:
        signal.pthread_kill(main, signum)
    else:  # Windows: no per-thread signals; simulate its arrival
        _thread.interrupt_main(signal.Signals(signum))


class _Interceptor:
    """Catches signals in a tiny handler and reacts to them in a dispatcher thread.

    ``react(signal, count)`` runs in the dispatcher for each signal caught (count 1 for the first);
    ``on_caught()`` runs in the handler itself and must be lock-free.
    """

    def __init__(self, wanted: tuple[signal.Signals, ...], react: _Reaction, on_caught: Callable[[], object]) -> None:
        self.wanted = wanted
        self._react = react
        self._on_caught = on_caught
        self._previous: dict[signal.Signals, _Handler] = {}
        # Tokens the dispatcher leaves for the handler: "this delivery is to be passed on".
        self._pending: dict[int, queue.SimpleQueue[str]] = {}
        self._handler = self._handle  # one bound method, so that getsignal() can be compared with `is`
        self._write_fd = -1
        self._active = False
        self.installed: tuple[signal.Signals, ...] = ()

    def previous(self, signum: int) -> _Handler:
        """The handler that was in place before ours."""
        return self._previous.get(signal.Signals(signum), signal.SIG_DFL)

    def install(self) -> None:
        """Install the handler on every wanted signal that can be chained; main thread only.

        Raises:
            ValueError: a signal cannot be handled (SIGKILL...); nothing stays installed.
        """
        previous: dict[signal.Signals, _Handler] = {}
        for sig in self.wanted:
            handler = signal.getsignal(sig)
            if handler == signal.SIG_IGN:
                logger.info("poolkeeper: %s is ignored in this process; it stays ignored", sig.name)
            elif handler is None:
                logger.warning(
                    "poolkeeper: the %s handler was not installed from Python, so it could be neither "
                    "chained nor restored; %s is left alone",
                    sig.name,
                    sig.name,
                )
            else:
                previous[sig] = handler
        if not previous:
            return
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)  # a full pipe drops the byte instead of blocking the handler
        self._previous = previous
        self._pending = {sig: queue.SimpleQueue() for sig in previous}
        self._write_fd = write_fd
        self._active = True
        threading.Thread(target=self._dispatch, args=(read_fd,), name="poolkeeper-signals", daemon=True).start()
        installed: list[signal.Signals] = []
        for sig in previous:
            try:
                signal.signal(sig, self._handler)
            except (OSError, ValueError, RuntimeError) as error:
                for done in installed:
                    signal.signal(done, previous[done])
                self._active = False
                os.close(write_fd)  # the dispatcher sees end-of-file and stops
                raise ValueError(f"signals: cannot handle {sig.name}: {error}") from error
            installed.append(sig)
        self.installed = tuple(installed)

    @property
    def in_place(self) -> bool:
        """True while installed and still the handler of at least one of its signals."""
        return self._active and any(signal.getsignal(sig) is self._handler for sig in self.installed)

    def uninstall(self) -> None:
        """Restore the replaced handlers; idempotent."""
        if not self._active:
            return
        self._active = False  # from now on the handler, wherever it is still called, passes signals on
        if threading.current_thread() is not threading.main_thread():
            # Python lets only the main thread change handlers. The pipe stays open: closing it
            # here could race the handler running in the main thread.
            warnings.warn(
                "poolkeeper: signal handlers can only be restored from the main thread; "
                "they stay installed but pass every signal straight on",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        for sig in self.installed:
            if signal.getsignal(sig) is self._handler:
                signal.signal(sig, self._previous[sig])
            else:
                logger.info(
                    "poolkeeper: the %s handler was replaced after poolkeeper's; it is left in place "
                    "(poolkeeper's passes signals straight on)",
                    sig.name,
                )
        os.close(self._write_fd)  # the dispatcher sees end-of-file and stops

    def deliver(self, signum: int) -> None:
        """Pass ``signum`` on to the replaced handler, in the main thread."""
        pending = self._pending.get(signum)
        if pending is not None:
            pending.put("pass")
        _signal_main_thread(signum)

    # -- in the main thread, between two bytecodes of whatever it was doing -------------------

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        token = None
        pending = self._pending.get(signum)
        if pending is not None:
            with contextlib.suppress(queue.Empty):
                token = pending.get_nowait()
        if token is not None or not self._active:
            if pending is not None and not pending.empty():
                # Deliveries of one signal coalesce while pending: ask again for the next pass-on.
                _signal_main_thread(signum)
            self._pass_on(signum, frame)
            return
        self._on_caught()
        with contextlib.suppress(OSError):  # a full pipe: the dispatcher has signals enough to act on
            os.write(self._write_fd, bytes((signum,)))

    def _pass_on(self, signum: int, frame: FrameType | None) -> None:
        previous = self.previous(signum)
        if callable(previous):
            previous(signum, frame)
            return
        # SIG_DFL: let the signal do what it does by default (end the process, for SIGTERM).
        current = signal.getsignal(signum)
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)  # delivered to this thread before raise_signal returns
        signal.signal(signum, current)  # still alive: that default was to ignore it

    # -- in the dispatcher thread ---------------------------------------------------------------

    def _dispatch(self, read_fd: int) -> None:
        count = 0
        try:
            while data := os.read(read_fd, 64):
                for number in data:
                    count += 1
                    try:
                        self._react(signal.Signals(number), count)
                    except Exception:
                        logger.exception("poolkeeper: reacting to signal %d failed", number)
        finally:
            os.close(read_fd)


class SignalHandlers:
    """poolkeeper's handlers on some signals, as installed by :func:`install_signal_handlers`.

    Use :meth:`uninstall` (or a ``with`` block) to restore the handlers they replaced.
    """

    def __init__(
        self,
        registry: Registry,
        signals: tuple[signal.Signals, ...],
        *,
        shutdown_delay: float,
        deadline: float | None,
        plan: Plan | None = None,
        delay_on_sigint: bool = False,
    ) -> None:
        self.registry = registry
        self.shutdown_delay = shutdown_delay
        self.delay_on_sigint = delay_on_sigint
        self.deadline = deadline
        #: The event loop the registry is best closed on at the force point (set by the lifespan).
        self.loop: Any = None
        self._hurry = threading.Event()  # set by a second signal or uninstall(): stop waiting `delay`
        self._interceptor = _Interceptor(
            signals,
            self._react,
            registry._mark_draining,  # noqa: SLF001 -- poolkeeper-internal: the flag a signal handler may flip
        )
        self.budget = None if plan is None else Budget(registry, plan, self._ask_server_to_exit, lambda: self.loop)

    @property
    def delay(self) -> float:
        """Deprecated name of :attr:`shutdown_delay`."""
        return self.shutdown_delay

    def close_deadline(self, deadline: float | None) -> float | None:
        """``deadline`` bounded by what is left of the grace budget (unchanged before any signal)."""
        remaining = None if self.budget is None else self.budget.remaining()
        if remaining is None:
            return deadline
        return remaining if deadline is None else min(deadline, remaining)

    @property
    def signals(self) -> tuple[signal.Signals, ...]:
        """The signals poolkeeper handles (empty off the main thread; ignored signals are left alone)."""
        return self._interceptor.installed

    def __repr__(self) -> str:
        names = ", ".join(sig.name for sig in self.signals) or "none"
        return f"<SignalHandlers signals=[{names}] shutdown_delay={self.shutdown_delay}>"

    def uninstall(self) -> None:
        """Restore the handlers that were replaced; idempotent.

        A first signal still waiting out its ``delay`` is passed on at once.
        """
        self._interceptor.uninstall()
        self._hurry.set()
        if self.budget is not None:
            self.budget.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.uninstall()

    # -- reactions, in poolkeeper's threads ---------------------------------------------------

    def _react(self, sig: signal.Signals, count: int) -> None:
        if count == 1:
            threading.Thread(target=self._first, args=(sig,), name="poolkeeper-signal", daemon=True).start()
            return
        logger.warning(
            "poolkeeper: %s received again: force-closing everything now",
            sig.name,
            extra={"poolkeeper_signal": sig.name, "poolkeeper_signal_count": count},
        )
        self._hurry.set()
        threading.Thread(target=self._force, name="poolkeeper-force", daemon=True).start()
        if callable(self._interceptor.previous(sig)):
            self._interceptor.deliver(sig)  # the replaced handler sees every signal it would have seen

    def _first(self, sig: signal.Signals) -> None:
        self.registry.start_draining()
        if self.budget is not None:
            self.budget.start()
        chained = callable(self._interceptor.previous(sig))
        # Ctrl-C is a developer, not a load balancer: nobody needs the endpoint-propagation gap.
        delay = self.shutdown_delay if sig != signal.SIGINT or self.delay_on_sigint else 0.0
        logger.info(
            "poolkeeper: %s received: draining; %s in %.3gs",
            sig.name,
            "passing it on" if chained else "closing the registry",
            delay,
            extra={"poolkeeper_signal": sig.name, "poolkeeper_delay": delay},
        )
        self._hurry.wait(delay)
        if chained:
            self._interceptor.deliver(sig)
            return
        # Nothing at Python level would have handled it (SIG_DFL): close the registry, then let
        # the signal end the process as it would have, so the exit status still says SIGTERM.
        try:
            self.registry.close(deadline=self.close_deadline(self.deadline))
        except Exception:
            logger.exception("poolkeeper: closing the registry on %s failed", sig.name)
        logger.info("poolkeeper: registry closed; %s now ends the process", sig.name)
        self._interceptor.deliver(sig)
        if sig in _TERMINATING:
            time.sleep(_KILL_GRACE)  # the process normally dies during this sleep
            os._exit(128 + sig)  # the main thread never came back to run Python code

    def _ask_server_to_exit(self) -> None:
        """The exit point of the grace budget: the server's own force-exit path.

        uvicorn (and gunicorn's uvicorn workers) treat a SIGINT after a first signal as "exit
        now" (``force_exit``): it stops waiting for requests and skips the lifespan shutdown,
        which is why the registry has been force-closed, and its report logged, before this.
        """
        self._interceptor.deliver(signal.SIGINT)

    def _force(self) -> None:
        try:
            self.registry.force_close()
        except Exception:
            logger.exception("poolkeeper: force-closing on a second signal failed")


def check_registry(registry: object) -> Registry:
    """``registry``, or the default registry for ``None``; raise naming the argument otherwise."""
    if registry is None:
        return get_registry()
    if not isinstance(registry, Registry):
        raise TypeError(f"registry must be a poolkeeper.Registry or None, got {registry!r}")
    return registry


# The handlers install_signal_handlers() put in place, while they are: a second call returns
# them rather than chaining a second set in front of the first (one SIGTERM would then reach
# poolkeeper twice and count as the "second signal" that force-closes everything).
_installed: SignalHandlers | None = None


def _already_installed(
    registry: Registry,
    wanted: tuple[signal.Signals, ...],
    *,
    shutdown_delay: float,
    deadline: float | None,
    plan: Plan,
    delay_on_sigint: bool,
) -> SignalHandlers | None:
    """The handlers in place if they are the ones asked for; raise naming what differs; None if none."""
    current = _installed
    if current is None or not current._interceptor.in_place:  # noqa: SLF001 -- the handle owns its interceptor
        return None
    differences = [
        argument
        for argument, same in (
            ("registry", current.registry is registry),
            ("signals", set(current._interceptor.wanted) == set(wanted)),  # noqa: SLF001
            ("shutdown_delay", current.shutdown_delay == shutdown_delay),
            ("deadline", current.deadline == deadline),
            ("grace_period", current.budget is not None and current.budget.plan.grace_period == plan.grace_period),
            ("delay_on_sigint", current.delay_on_sigint == delay_on_sigint),
        )
        if not same
    ]
    if differences:
        raise ValueError(
            f"{', '.join(differences)}: poolkeeper's signal handlers are already installed ({current!r}) with "
            f"another {' and '.join(differences)}; call .uninstall() on them before installing others"
        )
    return current


def install_signal_handlers(
    registry: Registry | None = None,
    *,
    signals: Iterable[int] = _DEFAULT_SIGNALS,
    shutdown_delay: float = 0.0,
    deadline: float | None = None,
    grace_period: float | None = None,
    delay_on_sigint: bool = False,
    delay: float | None = None,
) -> SignalHandlers:
    """Make SIGTERM and SIGINT start a graceful shutdown, chained to the handlers they replace.

    The first signal makes ``registry.draining`` true at once (readiness answers 503) while
    keepers still lend, so requests in flight and those still arriving are served. After
    ``shutdown_delay`` seconds (none for SIGINT unless ``delay_on_sigint``) the signal goes on
    to the handler it would have reached: a server's (uvicorn, gunicorn), which stops
    accepting, drains its requests and closes the registry from its lifespan; or Python's
    SIGINT handler, which raises ``KeyboardInterrupt``. Where no Python-level handler was in
    place (``SIG_DFL``), poolkeeper closes the registry itself (within ``deadline``) and then
    lets the signal end the process as it would have. A signal that is ignored (``SIG_IGN``)
    stays ignored. A second signal force-closes everything at once (and is passed on as well,
    where there is a handler to pass it to).

    The whole shutdown fits in ``grace_period``, counted from the first signal: at the force
    point (``grace_period - close_timeout - margin``) connections still borrowed are
    force-closed and the registry closes; at the exit point (``grace_period - margin``) a
    server still running is asked to exit now (a SIGINT: uvicorn's ``force_exit``). See
    ``docs/kubernetes.md`` for the timeline.

    Must be called from the main thread; anywhere else it installs nothing and warns.
    Idempotent: while they are installed, a second call with the same arguments returns the
    same handlers (one ``uninstall()`` removes them); with other arguments it raises
    ``ValueError`` naming them, rather than chaining a second set in front of the first.

    Args:
        registry: the registry to drain and close (default: :func:`poolkeeper.get_registry`).
        signals: the signals to handle.
        shutdown_delay: seconds between draining and passing the first signal on (the time a
            load balancer needs to stop sending traffic).
        deadline: bounds the close poolkeeper performs itself where there was no handler.
        grace_period: the pod's ``terminationGracePeriodSeconds`` (default:
            ``$POOLKEEPER_GRACE_PERIOD``, else 30).
        delay_on_sigint: wait out ``shutdown_delay`` on SIGINT too (Ctrl-C skips it by default).
        delay: deprecated spelling of ``shutdown_delay``.

    Returns:
        The installed handlers; ``uninstall()`` restores what they replaced.

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: ``shutdown_delay``/``deadline``/``grace_period`` is negative, NaN or
            infinite, a signal cannot be handled, or handlers with other arguments are already
            installed.
    """
    global _installed  # noqa: PLW0603 -- one set of handlers per process, like the signals themselves
    checked = check_registry(registry)
    wanted = check_signals("signals", signals)
    seconds = shutdown_delay_argument(shutdown_delay, delay)
    bound = check_timeout("deadline", deadline)
    plan = plan_for(checked, grace_period, seconds)
    if not isinstance(delay_on_sigint, bool):
        raise TypeError(f"delay_on_sigint must be True or False, got {delay_on_sigint!r}")
    on_main_thread = threading.current_thread() is threading.main_thread()
    if on_main_thread and (
        current := _already_installed(
            checked, wanted, shutdown_delay=seconds, deadline=bound, plan=plan, delay_on_sigint=delay_on_sigint
        )
    ):
        return current
    handlers = SignalHandlers(
        checked, wanted, shutdown_delay=seconds, deadline=bound, plan=plan, delay_on_sigint=delay_on_sigint
    )
    if not on_main_thread:
        warnings.warn(
            "poolkeeper.install_signal_handlers() was called off the main thread; Python lets only the "
            "main thread install signal handlers, so none were installed",
            RuntimeWarning,
            stacklevel=2,
        )
        return handlers
    handlers._interceptor.install()  # noqa: SLF001 -- the handle owns its interceptor
    _installed = handlers
    return handlers


def shutdown_delay_argument(shutdown_delay: object, delay: object, *, stacklevel: int = 3) -> float:
    """``shutdown_delay`` checked, or the deprecated ``delay`` (with a ``DeprecationWarning``)."""
    if delay is not None:
        warnings.warn(
            "poolkeeper: 'delay' is deprecated; use 'shutdown_delay' (the same name as in the FastAPI lifespan)",
            DeprecationWarning,
            stacklevel=stacklevel,
        )
        if shutdown_delay != 0.0:
            raise TypeError("pass shutdown_delay only; delay is its deprecated spelling")
        return check_timeout("delay", delay, allow_none=False) or 0.0
    return check_timeout("shutdown_delay", shutdown_delay, allow_none=False) or 0.0


def plan_for(registry: Registry, grace_period: object, shutdown_delay: float) -> Plan:
    """The grace budget's plan for ``registry``; logs a warning when its timeouts do not fit."""
    plan = plan_now(registry, grace_period_or_default(grace_period), shutdown_delay)
    warn_misfit(plan)  # early, at install; the plan is made again with the timeouts of the first signal
    return plan
