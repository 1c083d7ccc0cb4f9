"""FastAPI and Starlette integration: a lifespan that closes the registry, and health endpoints.

``lifespan()`` is usable as ``FastAPI(lifespan=...)`` (or ``Starlette(lifespan=...)``): it calls
``registry.check()`` at startup, runs the app's own lifespan (``setup``) inside it, and at
shutdown runs ``setup``'s teardown first, then closes the registry and logs the report.
``health_router()`` serves readiness (503 from the instant draining starts, or when a keeper's
ping fails) and liveness (200 while the process lives).

With ``shutdown_delay`` set, SIGTERM flips readiness to 503 at once while the app keeps serving
for that many seconds, and only then is the signal passed on to the server (uvicorn, gunicorn
with uvicorn workers), whose own graceful shutdown follows: this closes the Kubernetes
endpoint-propagation gap without a ``sleep`` binary in the image.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from poolkeeper._redact import redact
from poolkeeper._registry import Registry, get_registry
from poolkeeper._timeouts import check_timeout

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Mapping
    from contextlib import AbstractAsyncContextManager

    from fastapi import APIRouter
    from starlette.requests import Request

    from poolkeeper._keeper import Keeper

__all__ = ["health_router", "health_routes", "lifespan"]

logger = logging.getLogger("poolkeeper.fastapi")

#: Seconds a readiness probe waits for each keeper's ping.
PING_TIMEOUT = 1.0


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
) -> Callable[[Any], AbstractAsyncContextManager[dict[str, Any]]]:
    """A lifespan for ``FastAPI(lifespan=...)`` / ``Starlette(lifespan=...)`` that closes ``registry``.

    Args:
        registry: the registry to close (default: :func:`poolkeeper.get_registry`).
        setup: the app's own lifespan (``@asynccontextmanager async def setup(app): ...; yield``);
            it runs inside this one, and its teardown runs before the registry closes. The
            state it yields is merged into the lifespan state.
        shutdown_delay: seconds to keep serving (with readiness failing) after SIGTERM before
            the server's own shutdown begins.
        deadline: the deadline of ``registry.aclose()`` (default: the items' own timeouts).

    Returns:
        The lifespan function. Its state (``request.state``) holds ``poolkeeper_registry``;
        ``app.state.poolkeeper_registry`` is set too.

    Raises:
        ValueError: ``shutdown_delay`` or ``deadline`` is negative, NaN or infinite.
    """
    chosen = _registry_or_default(registry)
    delay = check_timeout("shutdown_delay", shutdown_delay, allow_none=False) or 0.0
    close_deadline = check_timeout("deadline", deadline)
    if setup is not None and not callable(setup):
        raise TypeError(f"setup must be a lifespan function (app -> async context manager), got {setup!r}")

    @contextlib.asynccontextmanager
    async def poolkeeper_lifespan(app: Any) -> AsyncIterator[dict[str, Any]]:
        chosen.check()
        app_state = getattr(app, "state", None)
        if app_state is not None:
            app_state.poolkeeper_registry = chosen
        handlers = _install_delay(chosen, delay)
        try:
            state: dict[str, Any] = {"poolkeeper_registry": chosen}
            if setup is None:
                yield state
            else:
                async with setup(app) as own_state:
                    yield {**state, **(own_state or {})}
        finally:
            if handlers is not None:
                handlers.uninstall()
            report = await chosen.aclose(close_deadline)
            logger.info("poolkeeper: application shutdown closed the registry (ok=%s)", report.ok)

    return poolkeeper_lifespan


def _install_delay(registry: Registry, delay: float) -> Any:
    """Chain poolkeeper's SIGTERM/SIGINT handling in front of the server's, when a delay is asked."""
    if delay <= 0:
        return None
    from poolkeeper._signals import install_signal_handlers  # noqa: PLC0415 -- only with a delay

    return install_signal_handlers(registry, delay=delay)


def _keeper_body(keeper: Keeper, ping: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"kind": keeper.kind, "state": keeper.state.value, "borrowed": keeper.borrowed}
    if ping is not None:
        body["ping"] = ping
    return body


async def _ping(keeper: Keeper) -> str:
    try:
        await asyncio.wait_for(keeper.driver.ping(), PING_TIMEOUT)
    except asyncio.TimeoutError:
        return f"failed: no answer within {PING_TIMEOUT:g}s"
    except Exception as error:  # noqa: BLE001 -- any failure means "not ready"; its text is shown redacted
        return "failed: " + redact(f"{type(error).__name__}: {error}", keeper.driver.secrets())
    return "ok"


def health_routes(
    registry: Registry | None = None,
    *,
    ready_path: str = "/readyz",
    live_path: str = "/livez",
    ping: bool = True,
    report_path: str | None = None,
) -> list[BaseRoute]:
    """The readiness and liveness routes as plain Starlette routes (see :func:`health_router`).

    For a Starlette app: ``Starlette(routes=[*health_routes(registry), ...])``.
    """
    chosen = _registry_or_default(registry)
    if report_path is not None and (not isinstance(report_path, str) or not report_path.startswith("/")):
        raise ValueError(f"report_path must be a path starting with '/' or None, got {report_path!r}")

    async def readyz(request: Request) -> JSONResponse:  # noqa: ARG001 -- Starlette passes the request
        keepers = chosen.keepers
        if chosen.draining:
            body = {"status": "draining", "keepers": {k.name: _keeper_body(k, None) for k in keepers}}
            return JSONResponse(body, status_code=503)
        pings = await asyncio.gather(*(_ping(k) for k in keepers)) if ping else [None] * len(keepers)
        ready = all(result in (None, "ok") for result in pings)
        body = {
            "status": "ready" if ready else "unavailable",
            "keepers": {k.name: _keeper_body(k, result) for k, result in zip(keepers, pings, strict=True)},
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    async def livez(request: Request) -> JSONResponse:  # noqa: ARG001 -- Starlette passes the request
        return JSONResponse({"status": "alive", "draining": chosen.draining})

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
    ping: bool = True,
    report_path: str | None = None,
) -> APIRouter:
    """Readiness and liveness endpoints, for ``app.include_router(...)``.

    Readiness (``ready_path``) answers 503 from the instant draining starts (``start_draining``,
    SIGTERM with a shutdown delay, or closing), or when a keeper's cheap ping (``SELECT 1``,
    ``PING``) fails within a short timeout; 200 otherwise. Liveness (``live_path``) answers 200
    while the process lives. Bodies are JSON with each keeper's state, never a DSN or password.

    Args:
        registry: the registry to report on (default: :func:`poolkeeper.get_registry`).
        ready_path: path of the readiness endpoint.
        live_path: path of the liveness endpoint.
        ping: ping every keeper on each readiness probe.
        report_path: opt-in path serving the shutdown report as JSON: ``registry.report.to_dict()``
            (redacted; with borrow-site stacks when tracked) once the registry has closed, and
            404 ``{"status": "open"}`` (or ``"draining"``) before.

    Returns:
        A FastAPI ``APIRouter``. A Starlette app without FastAPI uses :func:`health_routes`.
    """
    from fastapi import APIRouter  # noqa: PLC0415 -- the rest of this module serves Starlette-only apps too

    routes = health_routes(registry, ready_path=ready_path, live_path=live_path, ping=ping, report_path=report_path)
    return APIRouter(routes=routes)
