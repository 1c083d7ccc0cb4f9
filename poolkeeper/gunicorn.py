"""Server hooks for gunicorn: one line in ``gunicorn.conf.py``.

```python
# gunicorn.conf.py
from poolkeeper.gunicorn import *  # post_fork, post_worker_init, worker_exit, on_exit

# optional: another registry, a readiness delay before each worker stops accepting, the grace period
import poolkeeper.gunicorn
poolkeeper.gunicorn.configure(shutdown_delay=5.0, grace_period=25.0)
graceful_timeout = 25
```

The grace budget (docs/kubernetes.md) of a worker is the smallest of: ``grace_period`` (else
``$POOLKEEPER_GRACE_PERIOD``) and gunicorn's ``graceful_timeout``, after which the master kills a
worker that has not exited. Without either of the first two, ``graceful_timeout`` alone. The
master forwards its SIGTERM to the workers at once, so both clocks start together; keep
``graceful_timeout`` a little under the pod's ``terminationGracePeriodSeconds`` so that the master
itself exits in time.

What each hook does, with or without ``--preload``:

* ``post_fork`` (in each new worker): SQLAlchemy engines start the worker with their own
  connections (``engine.dispose(close=False)``, SQLAlchemy's own fork recipe), so a connection
  the master opened before forking (a query at import time under ``--preload``) is never shared.
  The keepers have already forgotten everything the master had (see docs/processes.md).
* ``post_worker_init`` (in each worker, after gunicorn installed the worker's own signal
  handlers, which would replace any installed earlier): poolkeeper's SIGTERM handler goes in
  front of gunicorn's. The first SIGTERM makes ``registry.draining`` true (readiness fails)
  while the worker keeps serving for ``shutdown_delay`` seconds, then gunicorn's graceful stop
  follows, inside the worker's grace budget. uvicorn workers handle SIGTERM themselves while
  serving: use :func:`poolkeeper.fastapi.lifespan` for the delay there (its budget is the
  worker's grace period set here, unless the lifespan is given one); the hook only makes sure
  the worker leaves through ``worker_exit`` afterwards instead of dying of the re-raised signal.
* ``worker_exit`` (in each worker, once it stopped serving): closes the registry within what is
  left of gunicorn's ``graceful_timeout`` and logs the report once, through gunicorn's error log,
  with the worker's pid.
* ``on_exit`` (in the master): closes what the master itself opened (pools created and used at
  import time under ``--preload``), without the "keepers left open at exit" warning; nothing is
  logged unless something was still borrowed there.

gunicorn itself is never imported here: the hooks only use the objects gunicorn passes them.
If you define a hook of the same name yourself, call ours from it.
"""

from __future__ import annotations

import _thread
import logging
import os
import signal
import sys
import time
from typing import Any

from poolkeeper._budget import GRACE_PERIOD_ENV, grace_period_or_default, set_server_grace_period
from poolkeeper._registry import Registry, get_registry
from poolkeeper._signals import SignalHandlers, check_registry, install_signal_handlers
from poolkeeper._timeouts import check_timeout

__all__ = [
    "configure",
    "on_exit",
    "post_fork",
    "post_worker_init",
    "worker_exit",
]  # what `import *` brings into gunicorn.conf.py

logger = logging.getLogger("poolkeeper.gunicorn")

#: Seconds kept back from ``graceful_timeout`` so that a worker's close ends before gunicorn kills it.
EXIT_MARGIN = 1.0
#: gunicorn's own default ``graceful_timeout``.
GUNICORN_GRACEFUL_TIMEOUT = 30.0

_settings: dict[str, Any] = {"registry": None, "shutdown_delay": 0.0, "grace_period": None}
_handlers: SignalHandlers | None = None
_stopped_at: float | None = None  # when gunicorn's own SIGTERM handler ran in this worker
_leaving = False  # a uvicorn worker's SIGTERM raised _WorkerExit, which is on its way out


def configure(
    registry: Registry | None = None, *, shutdown_delay: float = 0.0, grace_period: float | None = None
) -> None:
    """Set what the hooks use; call it in ``gunicorn.conf.py``.

    Args:
        registry: the registry to drain and close (default: :func:`poolkeeper.get_registry`).
        shutdown_delay: seconds a worker keeps serving, with readiness failing, after SIGTERM
            and before gunicorn's graceful stop (the time a load balancer needs to stop routing).
        grace_period: seconds from SIGTERM to SIGKILL (the pod's
            ``terminationGracePeriodSeconds``; default ``$POOLKEEPER_GRACE_PERIOD``). Each worker
            plans its shutdown inside the smaller of this and gunicorn's ``graceful_timeout``
            (see :func:`worker_grace_period`), and passes it on to its signal handlers and to
            :func:`poolkeeper.fastapi.lifespan`.

    Raises:
        TypeError: ``registry`` is not a :class:`poolkeeper.Registry`.
        ValueError: ``shutdown_delay`` is negative, NaN or infinite, or ``grace_period`` is not
            a positive finite number.
    """
    checked = check_registry(registry)
    delay = check_timeout("shutdown_delay", shutdown_delay, allow_none=False) or 0.0
    grace = None if grace_period is None else grace_period_or_default(grace_period, server=False)
    _settings.update(registry=checked, shutdown_delay=delay, grace_period=grace)


def worker_grace_period(graceful_timeout: float) -> float:
    """A worker's grace period: the configured one (else ``$POOLKEEPER_GRACE_PERIOD``), at most ``graceful_timeout``.

    gunicorn's master kills a worker ``graceful_timeout`` seconds after forwarding it the
    SIGTERM, whatever the pod's grace period: a plan longer than that would be cut by SIGKILL.
    """
    configured: float | None = _settings["grace_period"]
    if configured is None and os.environ.get(GRACE_PERIOD_ENV, "").strip():
        configured = grace_period_or_default(None, server=False)
    if configured is None:
        return graceful_timeout
    if configured > graceful_timeout:
        logger.warning(
            "poolkeeper: grace period %gs is longer than gunicorn's graceful_timeout %gs, after which the master "
            "kills the worker: the worker plans its shutdown inside %gs; raise graceful_timeout to match",
            configured,
            graceful_timeout,
            graceful_timeout,
            extra={"poolkeeper_event": "budget-misfit"},
        )
        return graceful_timeout
    return configured


def _registry() -> Registry:
    registry: Registry | None = _settings["registry"]
    return registry if registry is not None else get_registry()


def post_fork(server: Any, worker: Any) -> None:  # noqa: ARG001 -- gunicorn's hook signature
    """In a new worker: SQLAlchemy engines open the worker's own connections (``dispose(close=False)``)."""
    for keeper in _registry().keepers:
        engine = getattr(keeper.driver, "engine", None)
        if keeper.kind == "sqlalchemy" and engine is not None:
            engine.dispose(close=False)  # drops the master's connections from the pool, never closes them


def post_worker_init(worker: Any) -> None:
    """In a worker, after gunicorn's own handlers: put poolkeeper's SIGTERM handling in front of them.

    The worker's grace period (:func:`worker_grace_period`) becomes this process's default, which
    an ASGI app's :func:`poolkeeper.fastapi.lifespan` reads when it starts.
    """
    global _handlers  # noqa: PLW0603 -- one set of handlers per worker process
    graceful = float(getattr(worker.cfg, "graceful_timeout", GUNICORN_GRACEFUL_TIMEOUT))
    grace = worker_grace_period(graceful)
    set_server_grace_period(grace)
    stop_serving = signal.getsignal(signal.SIGTERM)
    if not callable(stop_serving):
        # uvicorn's worker resets SIGTERM to the default, and its server puts its own handler in
        # front of whatever is here while it serves (poolkeeper.fastapi.lifespan(shutdown_delay=...)
        # chains in front of that one). Once it has stopped serving, uvicorn raises the SIGTERM
        # again: with the default the worker would die of it before worker_exit runs, unreported.
        signal.signal(signal.SIGTERM, _exit_worker)
        sys.unraisablehook = _resend_swallowed_exit(sys.unraisablehook)
        worker.log.debug("poolkeeper: this worker's server handles SIGTERM while it serves")
        return

    # gunicorn's handler, timed: the graceful_timeout budget runs from the first SIGTERM, and
    # the delay poolkeeper's handler waits before passing it on has spent part of it.
    def timed_stop_serving(signum: int, frame: Any) -> None:
        global _stopped_at  # noqa: PLW0603 -- per worker process
        if _stopped_at is None:
            _stopped_at = time.monotonic()
        stop_serving(signum, frame)

    signal.signal(signal.SIGTERM, timed_stop_serving)
    _handlers = install_signal_handlers(
        _registry(), signals=(signal.SIGTERM,), shutdown_delay=_settings["shutdown_delay"], grace_period=grace
    )


class _WorkerExit(SystemExit):
    """``SystemExit(0)`` raised by a uvicorn worker's SIGTERM outside uvicorn's own handler."""


def _exit_worker(signum: int, frame: Any) -> None:  # noqa: ARG001 -- a signal handler's signature
    global _leaving  # noqa: PLW0603 -- per worker process
    if _leaving:
        return  # a second SIGTERM must not cut short the worker_exit the first one leads to
    _leaving = True
    raise _WorkerExit(0)  # gunicorn then runs worker_exit, as for any worker leaving normally


def _resend_swallowed_exit(previous: Any) -> Any:
    """A ``sys.unraisablehook`` that sends the SIGTERM again when a finalizer swallowed its exit.

    A SIGTERM in the window before uvicorn has put its own handler in place (while the worker
    starts, where the master's connections dropped after the fork are finalized) can land inside
    a ``__del__`` or a weakref callback. Python reports an exception raised there and goes on:
    the worker would start serving and live until gunicorn kills it, unreported. The signal is
    sent to the main thread again from a new thread, which needs the GIL to send it, so it lands
    after the finalizer returned: in the worker's next line, or in uvicorn's handler if that is
    in place by then.
    """

    def hook(unraisable: Any) -> None:
        global _leaving  # noqa: PLW0603 -- per worker process
        if not isinstance(unraisable.exc_value, _WorkerExit):
            previous(unraisable)
            return
        _leaving = False
        # _WorkerExit comes from the signal handler, so this hook runs in the main thread: the
        # signal goes to this thread. Not through threading.Thread, whose start() waits for the
        # new thread and would so take the signal inside this hook, where it is swallowed again.
        _thread.start_new_thread(signal.pthread_kill, (_thread.get_ident(), signal.SIGTERM))

    return hook


def worker_exit(server: Any, worker: Any) -> None:  # noqa: ARG001 -- gunicorn's hook signature
    """In a worker that stopped serving: close the registry within ``graceful_timeout``; log the report once."""
    registry = _registry()
    graceful = float(getattr(worker.cfg, "graceful_timeout", 30.0))
    spent = 0.0 if _stopped_at is None else time.monotonic() - _stopped_at + _settings["shutdown_delay"]
    deadline = max(0.0, graceful - spent - EXIT_MARGIN)
    already_closed = registry.closed  # by the app's own shutdown (an ASGI lifespan)
    try:
        report = registry.close(deadline=deadline)
    except Exception:
        worker.log.exception("poolkeeper: worker %d: closing the registry failed", os.getpid())
        return
    finally:
        if _handlers is not None:
            _handlers.uninstall()
    log = worker.log.info if report.ok else worker.log.warning
    how = "closed by the application" if already_closed else f"closed within {deadline:.3g}s"
    log("poolkeeper: worker %d %s:\n%s", os.getpid(), how, report)


def on_exit(server: Any) -> None:
    """In the master, as it exits: close what the master opened itself, quietly."""
    registry = _registry()
    if registry.closed or not registry.keepers:
        return
    borrowed = sum(keeper.borrowed for keeper in registry.keepers)
    report = registry.close(deadline=EXIT_MARGIN)  # the master serves nothing: no drain to wait for
    if not report.ok or borrowed:
        server.log.warning("poolkeeper: master %d closed its own pools:\n%s", os.getpid(), report)
