"""A Flask app kept by poolkeeper, served by gunicorn with the hooks of ``poolkeeper.gunicorn``.

    gunicorn -c integrations/gunicorn_conf.py integrations.flask_app.app:app

``GET /work?ms=N`` holds a database connection for N ms; ``/readyz`` and ``/livez`` come from
:class:`poolkeeper.health.HealthMiddleware`. SIGTERM: readiness answers 503 at once, the
workers keep serving for ``POOLKEEPER_SHUTDOWN_DELAY`` seconds, gunicorn stops them gracefully,
and each worker closes its pools and logs its report.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from flask import Flask, jsonify, request

from integrations.sync_common import hold_connection, wrapped_engine
from poolkeeper.health import HealthMiddleware

if TYPE_CHECKING:
    from flask.typing import ResponseReturnValue

engine = wrapped_engine()

app = Flask(__name__)


@app.get("/work")
def work() -> ResponseReturnValue:
    """Hold a database connection for ``ms`` milliseconds."""
    hold_connection(engine, int(request.args.get("ms", "50")) / 1000)
    return jsonify(pid=os.getpid())


app.wsgi_app = HealthMiddleware(app.wsgi_app)  # type: ignore[method-assign]  # Flask's documented way to add WSGI middleware
