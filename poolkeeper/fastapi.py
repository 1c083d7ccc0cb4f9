"""FastAPI and Starlette integration: a lifespan that closes the registry, and health endpoints.

``lifespan()`` is usable as ``FastAPI(lifespan=...)`` (or ``Starlette(lifespan=...)``): it calls
``registry.check()`` at startup, runs the app's own lifespan (``setup``) inside it, and at
shutdown runs ``setup``'s teardown first, then closes the registry and logs the report.
``health_router()`` serves readiness (answered from state: 503 from the instant draining starts;
dependency pings opt-in, cached, over side connections) and liveness (200 while the process
lives); the logic lives in the framework-free ``poolkeeper._health``.

With ``shutdown_delay`` set, SIGTERM flips readiness to 503 at once while the app keeps serving
for that many seconds, and only then is the signal passed on to the server (uvicorn, gunicorn
with uvicorn workers), whose own graceful shutdown follows: this closes the Kubernetes
endpoint-propagation gap without a ``sleep`` binary in the image.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from typing import TYPE_CHECKING, Any

from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from poolkeeper._budget import grace_period_or_default
from poolkeeper._health import PING_INTERVAL, PING_TIMEOUT, HealthCheck
from poolkeeper._registry import Registry, get_registry
from poolkeeper._signals import SignalHandlers, install_signal_handlers
from poolkeeper._timeouts import check_timeout

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Mapping
    from contextlib import AbstractAsyncContextManager

    from fastapi import APIRouter
    from starlette.requests import Request


__all__ = ["health_router", "health_routes", "lifespan"]

logger = logging.getLogger("poolkeeper.fastapi")

# Probes must see the state now, never a cached answer from a proxy.
_NO_STORE = {"Cache-Control": "no-store"}


def _registry_or_default(registry: Registry | None) -> Registry:
    if registry is not None and not isinstance(registry, Registry):
        raise TypeError(f"registry must be a poolkeeper.Registry or None, got {registry!r}")
    return registry if registry is not None else get_registry()


def lifespan(
    registry: Registry | None = None,
    *,
    setup: Callable[[Any], AbstractAsyncContextManager[Mapping[str, Any] | None]] | None = None,
    shutdown_delay: float = 0.0,
    deadline: float | None = None,
    grace_period: float | None = None,
    delay_on_sigint: bool = False,
) -> Callable[[Any], AbstractAsyncContextManager[dict[str, Any]]]:
    """A lifespan for ``FastAPI(lifespan=...)`` / ``Starlette(lifespan=...)`` that closes ``registry``.

    Under a server running in the main thread (``uvicorn app:app``, ``uvicorn.run()``, gunicorn's
    uvicorn workers) it installs poolkeeper's signal handlers in front of the server's
    (:func:`poolkeeper.install_signal_handlers`): the first SIGTERM fails readiness at once,
    ``shutdown_delay`` later the server starts its own shutdown, and the whole shutdown is
    planned inside ``grace_period`` (stuck requests are force-closed at the force point; a server
    still running at the exit point is asked to exit now). See ``docs/kubernetes.md``.

    Args:
        registry: the registry to close (default: :func:`poolkeeper.get_registry`).
        setup: the app's own lifespan (``@asynccontextmanager async def setup(app): ...; yield``);
            it runs inside this one, and its teardown runs before the registry closes. The
            state it yields is merged into the lifespan state.
        shutdown_delay: seconds to keep serving (with readiness failing) after SIGTERM before
            the server's own shutdown begins (none after SIGINT unless ``delay_on_sigint``).
        deadline: bounds closing the registry once the server has drained (default: the items'
            own timeouts); never the whole shutdown, which ``grace_period`` bounds.
        grace_period: seconds from the first SIGTERM to SIGKILL (default, read at startup: the
            worker's own under gunicorn's hooks, see :func:`poolkeeper.gunicorn.configure`;
            else ``$POOLKEEPER_GRACE_PERIOD``, else 30, Kubernetes' default).
        delay_on_sigint: wait out ``shutdown_delay`` on Ctrl-C too.

    Returns:
        The lifespan function. Its state (``request.state``) holds ``poolkeeper_registry``;
        ``app.state.poolkeeper_registry`` is set too.

    Raises:
        ValueError: ``shutdown_delay``, ``deadline`` or ``grace_period`` is negative, NaN or infinite.
    """
    chosen = _registry_or_default(registry)
    delay = check_timeout("shutdown_delay", shutdown_delay, allow_none=False) or 0.0
    close_deadline = check_timeout("deadline", deadline)
    grace = grace_period_or_default(grace_period)  # a bad value or $POOLKEEPER_GRACE_PERIOD fails here, early
    if not isinstance(delay_on_sigint, bool):
        raise TypeError(f"delay_on_sigint must be True or False, got {delay_on_sigint!r}")
    if setup is not None and not callable(setup):
        raise TypeError(f"setup must be a lifespan function (app -> async context manager), got {setup!r}")

    @contextlib.asynccontextmanager
    async def poolkeeper_lifespan(app: Any) -> AsyncIterator[dict[str, Any]]:
        chosen.check()
        app_state = getattr(app, "state", None)
        if app_state is not None:
            app_state.poolkeeper_registry = chosen
        # Without an explicit grace_period, read it now: under gunicorn the worker's hooks have
        # set the grace period it really has (poolkeeper.gunicorn) since the app was imported.
        handlers = _install_handlers(
            chosen, delay, grace if grace_period is not None else grace_period_or_default(None), delay_on_sigint
        )
        pinned = False
        try:
            state: dict[str, Any] = {"poolkeeper_registry": chosen}
            if setup is None:
                yield state
            else:
                async with setup(app) as own_state:
                    try:
                        yield {**state, **(own_state or {})}
                    finally:
                        # Before the app's own teardown drops what it wrapped (poolkeeper._held).
                        chosen._pin()  # noqa: SLF001 -- poolkeeper-internal
                        pinned = True
        finally:
            bounded = close_deadline if handlers is None else handlers.close_deadline(close_deadline)
            try:
                report = await chosen.aclose(bounded)
            finally:
                if pinned:
                    chosen._unpin()  # noqa: SLF001 -- poolkeeper-internal
                if handlers is not None:
                    handlers.uninstall()
            logger.info("poolkeeper: application shutdown closed the registry (ok=%s)", report.ok)

    return poolkeeper_lifespan


def _install_handlers(registry: Registry, delay: float, grace: float, delay_on_sigint: bool) -> SignalHandlers | None:
    """Chain poolkeeper's SIGTERM/SIGINT handling in front of the server's, where signals can be handled."""
    if threading.current_thread() is not threading.main_thread() and delay <= 0:
        return None  # a test client's portal thread: no signals to handle, and nothing was asked
    handlers = install_signal_handlers(
        registry, shutdown_delay=delay, grace_period=grace, delay_on_sigint=delay_on_sigint
    )
    handlers.loop = asyncio.get_running_loop()  # the force point closes the registry on the app's loop
    return handlers


def health_routes(
    registry: Registry | None = None,
    *,
    ready_path: str = "/readyz",
    live_path: str = "/livez",
    ping: bool = False,
    ping_timeout: float = PING_TIMEOUT,
    ping_interval: float = PING_INTERVAL,
    report_path: str | None = None,
) -> list[BaseRoute]:
    """The readiness and liveness routes as plain Starlette routes (see :func:`health_router`).

    For a Starlette app: ``Starlette(routes=[*health_routes(registry), ...])``.
    """
    chosen = _registry_or_default(registry)
    health = HealthCheck(chosen, ping=ping, ping_timeout=ping_timeout, ping_interval=ping_interval)
    if report_path is not None and (not isinstance(report_path, str) or not report_path.startswith("/")):
        raise ValueError(f"report_path must be a path starting with '/' or None, got {report_path!r}")

    async def readyz(request: Request) -> JSONResponse:  # noqa: ARG001 -- Starlette passes the request
        status, body = await health.readiness()
        return JSONResponse(body, status_code=status, headers=_NO_STORE)

    async def livez(request: Request) -> JSONResponse:  # noqa: ARG001 -- Starlette passes the request
        status, body = HealthCheck.liveness(chosen)
        return JSONResponse(body, status_code=status, headers=_NO_STORE)

    async def shutdown_report(request: Request) -> JSONResponse:  # noqa: ARG001 -- Starlette passes the request
        report = chosen.report
        if report is None:
            return JSONResponse({"status": "draining" if chosen.draining else "open"}, status_code=404)
        return JSONResponse(report.to_dict())

    routes: list[BaseRoute] = [
        Route(ready_path, readyz, methods=["GET"], include_in_schema=False),
        Route(live_path, livez, methods=["GET"], include_in_schema=False),
    ]
    if report_path is not None:
        routes.append(Route(report_path, shutdown_report, methods=["GET"], include_in_schema=False))
    return routes


def health_router(
    registry: Registry | None = None,
    *,
    ready_path: str = "/readyz",
    live_path: str = "/livez",
    ping: bool = False,
    ping_timeout: float = PING_TIMEOUT,
    ping_interval: float = PING_INTERVAL,
    report_path: str | None = None,
) -> APIRouter:
    """Readiness and liveness endpoints, for ``app.include_router(...)``.

    Readiness (``ready_path``) answers from state, in well under 10 ms even when every pool
    connection is borrowed: 503 from the instant draining starts (``start_draining``, the first
    SIGTERM, or closing), 200 otherwise. With ``ping=True`` it also pings each keeper's server
    (``SELECT 1``, ``PING``) over a side connection of its own, never a pool connection; the
    result, a failure too, is cached for ``ping_interval`` seconds (concurrent probes share one
    ping in flight, so probes cannot storm a database that is down) and shown with its age
    (``ping_age``), a failed or late ping (``ping_timeout``) makes it 503, and a keeper whose
    library has no cheap ping (aiohttp) reports ``"not checked"``. Liveness (``live_path``) answers 200 while
    the process lives. Bodies are JSON with each keeper's state, never a DSN or password.

    Args:
        registry: the registry to report on (default: :func:`poolkeeper.get_registry`).
        ready_path: path of the readiness endpoint.
        live_path: path of the liveness endpoint.
        ping: also ping each keeper's server (opt-in; off by default since 0.x, see the changelog).
        ping_timeout: seconds a ping may take before readiness fails.
        ping_interval: seconds a ping result, failed or not, is reused before a probe pings
            again: also how long a recovered database may still be reported down.
        report_path: opt-in path serving the shutdown report as JSON: ``registry.report.to_dict()``
            (redacted; with borrow-site stacks when tracked) once the registry has closed, and
            404 ``{"status": "open"}`` (or ``"draining"``) before.

    Returns:
        A FastAPI ``APIRouter``. A Starlette app without FastAPI uses :func:`health_routes`.
    """
    from fastapi import APIRouter  # noqa: PLC0415 -- the rest of this module serves Starlette-only apps too

    routes = health_routes(
        registry,
        ready_path=ready_path,
        live_path=live_path,
        ping=ping,
        ping_timeout=ping_timeout,
        ping_interval=ping_interval,
        report_path=report_path,
    )
    return APIRouter(routes=routes)
