"""A one-file Django app kept by poolkeeper, served by gunicorn with the hooks of ``poolkeeper.gunicorn``.

    gunicorn -c integrations/gunicorn_conf.py integrations.django_app.app:application

The same service as the Flask example: ``GET /work?ms=N`` holds a connection of a wrapped
SQLAlchemy engine for N ms; ``/readyz`` and ``/livez`` come from
:class:`poolkeeper.health.HealthMiddleware` around Django's WSGI application.

With ``POOLKEEPER_DJANGO_POOL=1`` the work goes through Django's own database connection
instead, pooled by psycopg_pool (``OPTIONS={"pool": ...}``, Django 5.1+), and that pool is
what poolkeeper keeps, with one line after ``django.setup()``::

    poolkeeper.wrap(connections["default"].pool, name="db")
"""

from __future__ import annotations

import os
import urllib.parse
from typing import Any

import django
from django.conf import settings
from django.core.wsgi import get_wsgi_application
from django.db import connections
from django.http import HttpRequest, JsonResponse
from django.urls import path

import poolkeeper
from integrations.sync_common import hold_connection, wrapped_engine
from poolkeeper.health import HealthMiddleware

POOLED = os.environ.get("POOLKEEPER_DJANGO_POOL") == "1"


def pooled_databases() -> dict[str, dict[str, Any]]:
    """Django's ``DATABASES`` for ``POOLKEEPER_DEMO_DATABASE_URL``, pooled by psycopg_pool."""
    url = urllib.parse.urlsplit(
        os.environ.get("POOLKEEPER_DEMO_DATABASE_URL", "postgresql://postgres@127.0.0.1/postgres")
    )
    return {
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": url.path.lstrip("/") or "postgres",
            "USER": urllib.parse.unquote(url.username or "postgres"),
            "PASSWORD": urllib.parse.unquote(url.password or ""),
            "HOST": url.hostname or "127.0.0.1",
            "PORT": str(url.port or 5432),
            "OPTIONS": {
                "pool": {"min_size": 1, "max_size": 4},
                "application_name": os.environ.get("POOLKEEPER_DEMO_APPLICATION_NAME", "poolkeeper-example"),
            },
        }
    }


settings.configure(
    DEBUG=False,
    ALLOWED_HOSTS=["*"],
    ROOT_URLCONF=__name__,
    SECRET_KEY=os.environ.get("DJANGO_SECRET_KEY", "example-only-not-secret"),
    DATABASES=pooled_databases() if POOLED else {},
)
django.setup()

if POOLED:
    # The one line: Django keeps its psycopg_pool ConnectionPool on the connection wrapper.
    poolkeeper.wrap(
        connections["default"].pool, name="db", drain_timeout=float(os.environ.get("POOLKEEPER_DRAIN_TIMEOUT", "10"))
    )
else:
    engine = wrapped_engine()


def work(request: HttpRequest) -> JsonResponse:
    """Hold a database connection for ``ms`` milliseconds."""
    seconds = int(request.GET.get("ms", "50")) / 1000
    if POOLED:
        with connections["default"].cursor() as cursor:
            cursor.execute("select pg_sleep(%s)", [seconds])
    else:
        hold_connection(engine, seconds)
    return JsonResponse({"pid": os.getpid()})


urlpatterns = [path("work", work)]

application = HealthMiddleware(get_wsgi_application())
