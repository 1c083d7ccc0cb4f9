"""A one-file Django app kept by poolkeeper, served by gunicorn with the hooks of ``poolkeeper.gunicorn``.

    gunicorn -c integrations/gunicorn_conf.py integrations.django_app.app:application

The same service as the Flask example: ``GET /work?ms=N`` holds a connection of a wrapped
SQLAlchemy engine for N ms; ``/readyz`` and ``/livez`` come from
:class:`poolkeeper.health.HealthMiddleware` around Django's WSGI application.
"""

from __future__ import annotations

import os

import django
from django.conf import settings
from django.core.wsgi import get_wsgi_application
from django.http import HttpRequest, JsonResponse
from django.urls import path

from integrations.sync_common import hold_connection, wrapped_engine
from poolkeeper.health import HealthMiddleware

settings.configure(
    DEBUG=False,
    ALLOWED_HOSTS=["*"],
    ROOT_URLCONF=__name__,
    SECRET_KEY=os.environ.get("DJANGO_SECRET_KEY", "example-only-not-secret"),
    DATABASES={},
)
django.setup()

engine = wrapped_engine()


def work(request: HttpRequest) -> JsonResponse:
    """Hold a database connection for ``ms`` milliseconds."""
    hold_connection(engine, int(request.GET.get("ms", "50")) / 1000)
    return JsonResponse({"pid": os.getpid()})


urlpatterns = [path("work", work)]

application = HealthMiddleware(get_wsgi_application())
