"""Readiness and liveness for any framework: plain functions, and a WSGI middleware.

For FastAPI/Starlette use :mod:`poolkeeper.fastapi`. Everywhere else (Flask, Django, any WSGI
app under gunicorn):

```python
from poolkeeper.health import HealthMiddleware
app.wsgi_app = HealthMiddleware(app.wsgi_app)          # Flask
application = HealthMiddleware(get_wsgi_application())  # Django's wsgi.py
```

or call :func:`readiness` / :func:`liveness` from a view of your own. Readiness answers from
state, in microseconds, even when every pool connection is borrowed: 503 from the moment
draining starts (the first SIGTERM), 200 before. No connection is taken and nothing is pinged,
so a keeper's entry never claims a ping it did not make. Bodies are JSON and hold no secret.
Only the standard library is imported.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from poolkeeper._health import HealthCheck
from poolkeeper._signals import check_registry

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from poolkeeper._registry import Registry

__all__ = ["HealthMiddleware", "liveness", "readiness"]


def readiness(registry: Registry | None = None) -> tuple[int, dict[str, Any]]:
    """``(status, body)``: 200 ``{"status": "ready"}`` while open, 503 ``"draining"`` once shutdown was requested.

    The same answer as FastAPI's ``/readyz`` without pings (:class:`poolkeeper._health.HealthCheck`).

    Raises:
        TypeError: ``registry`` is not a :class:`poolkeeper.Registry`.
    """
    return HealthCheck(check_registry(registry)).state()


def liveness(registry: Registry | None = None) -> tuple[int, dict[str, Any]]:
    """``(200, {"status": "alive", "draining": ...})``: the process lives, draining or not.

    Raises:
        TypeError: ``registry`` is not a :class:`poolkeeper.Registry`.
    """
    return HealthCheck.liveness(check_registry(registry))


_REASONS = {200: "200 OK", 503: "503 Service Unavailable"}


class HealthMiddleware:
    """A WSGI middleware answering ``ready_path`` and ``live_path``; every other request goes to ``app``.

    Args:
        app: the WSGI application.
        registry: the registry whose state is reported (default: :func:`poolkeeper.get_registry`).
        ready_path: the readiness path.
        live_path: the liveness path.

    Raises:
        TypeError: ``registry`` is not a :class:`poolkeeper.Registry`.
        ValueError: a path does not start with ``/``.
    """

    def __init__(
        self,
        app: Callable[[dict[str, Any], Any], Iterable[bytes]],
        registry: Registry | None = None,
        *,
        ready_path: str = "/readyz",
        live_path: str = "/livez",
    ) -> None:
        for name, path in (("ready_path", ready_path), ("live_path", live_path)):
            if not isinstance(path, str) or not path.startswith("/"):
                raise ValueError(f"{name} must be a path starting with '/', got {path!r}")
        self.app = app
        self.registry = check_registry(registry)
        self._routes = {ready_path: readiness, live_path: liveness}

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        """Answer a health path from state, or pass the request on."""
        check = self._routes.get(environ.get("PATH_INFO", ""))
        if check is None:
            return self.app(environ, start_response)
        status, body = check(self.registry)
        payload = json.dumps(body).encode()
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
        start_response(_REASONS[status], [*headers, ("Cache-Control", "no-store")])
        return [payload]
