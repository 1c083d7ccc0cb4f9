"""The FastAPI / Starlette integration: lifespan composition and the health endpoints."""

from __future__ import annotations

import contextlib
import gc
import json
import weakref
from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from starlette.applications import Starlette
from starlette.routing import Mount

from poolkeeper import KeeperState, PoolClosedError, RegistrationError, Registry
from poolkeeper.fastapi import health_router, health_routes, lifespan
from tests.conftest import sqlalchemy_url

PASSWORD = "pk-health-s3cret"


def test_lifespan_closes_the_registry_after_the_apps_own_teardown(make_engine):
    """The app's setup runs inside; its teardown still uses the database; then the registry closes."""
    registry = Registry()
    engine = registry.wrap(make_engine(), name="db")
    events: list[str] = []

    @contextlib.asynccontextmanager
    async def setup(app: FastAPI) -> AsyncIterator[dict[str, str]]:  # noqa: ARG001 -- the lifespan signature
        events.append("setup")
        yield {"greeting": "hello"}
        with engine.connect() as connection:  # teardown: the database is still open
            events.append(f"teardown saw {connection.execute(sa.text('select 7')).scalar()}")

    app = FastAPI(lifespan=lifespan(registry, setup=setup))

    @app.get("/state")
    def state(request: Request) -> dict[str, object]:
        return {"greeting": request.state.greeting, "same": request.state.poolkeeper_registry is registry}

    with TestClient(app) as client:
        assert client.get("/state").json() == {"greeting": "hello", "same": True}
        assert app.state.poolkeeper_registry is registry
        assert not registry.draining
    assert events == ["setup", "teardown saw 7"]
    assert registry.closed
    assert registry["db"].state is KeeperState.CLOSED
    with pytest.raises(PoolClosedError):
        engine.connect()


def test_an_engine_the_apps_own_lifespan_wraps_and_drops_is_still_closed(pg_url, application_name, server):
    """An engine local to the app's lifespan, dropped by its teardown, is closed and reported.

    The engine and its keeper reference each other; once dropped, only the collector frees them.
    Here it runs at the end of the app's teardown, before the registry closes.
    """
    registry = Registry()
    engines: list[weakref.ref[object]] = []

    @contextlib.asynccontextmanager
    async def setup(app: FastAPI) -> AsyncIterator[None]:  # noqa: ARG001 -- the lifespan signature
        engine = registry.wrap(
            sa.create_engine(sqlalchemy_url(pg_url, "psycopg"), connect_args={"application_name": application_name}),
            name="db",
        )
        engines.append(weakref.ref(engine))
        with engine.connect() as connection:
            connection.execute(sa.text("select 1"))
        yield
        del engine, connection
        gc.collect()

    with TestClient(FastAPI(lifespan=lifespan(registry, setup=setup))):
        assert server.settle(lambda: len(server.backends()) == 1)  # the pool's idle connection
    assert registry.report is not None
    assert registry.report["db"].outcome == "clean"
    assert server.settle(lambda: not server.backends())
    gc.collect()
    assert engines[0]() is None  # closed, the keeper no longer keeps it


def test_startup_fails_on_an_unknown_dependency():
    """lifespan() calls registry.check() at startup: an unknown depends_on stops the app from starting."""
    registry = Registry()
    registry.on_shutdown(lambda: None, name="flush", depends_on=["nowhere"])
    app = FastAPI(lifespan=lifespan(registry))
    with pytest.raises(RegistrationError, match="nowhere"), TestClient(app):
        pass


def test_readiness_is_200_with_keeper_states_then_503_once_draining(make_engine):
    """/readyz answers 200 with each keeper's state and ping, and 503 from the moment draining starts."""
    registry = Registry()
    registry.wrap(make_engine(password=PASSWORD), name="db")
    app = FastAPI(lifespan=lifespan(registry))
    app.include_router(health_router(registry, ping=True))
    with TestClient(app) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200
        body = ready.json()
        age = body["keepers"]["db"].pop("ping_age")  # the ping this probe caused: seconds old, a fresh one
        assert body == {
            "status": "ready",
            "keepers": {"db": {"kind": "sqlalchemy", "state": "open", "borrowed": 0, "ping": "ok"}},
        }
        assert 0 <= age < 1
        registry.start_draining()
        draining = client.get("/readyz")
        assert draining.status_code == 503
        assert draining.json()["status"] == "draining"
        live = client.get("/livez")
        assert live.status_code == 200
        assert live.json() == {"status": "alive", "draining": True}
        assert PASSWORD not in ready.text + draining.text + live.text


def test_readiness_is_503_when_a_ping_fails_and_shows_no_password():
    """A keeper whose server does not answer makes /readyz 503, with the error redacted."""
    registry = Registry()
    dead = sa.create_engine(
        f"postgresql+psycopg://postgres:{PASSWORD}@127.0.0.1:1/postgres", connect_args={"connect_timeout": 1}
    )
    registry.wrap(dead, name="db")
    app = FastAPI(lifespan=lifespan(registry))
    app.include_router(health_router(registry, ping=True))
    with TestClient(app) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["keepers"]["db"]["ping"].startswith("failed: OperationalError")
    assert PASSWORD not in json.dumps(body)


def test_readiness_without_ping_reports_state_only(make_engine):
    """health_router() (pings are opt-in) never touches the keepers' servers."""
    registry = Registry()
    registry.wrap(make_engine(), name="db")
    app = FastAPI()
    app.include_router(health_router(registry, ready_path="/ready", live_path="/live"))
    client = TestClient(app)
    assert client.get("/ready").json()["keepers"]["db"] == {"kind": "sqlalchemy", "state": "open", "borrowed": 0}
    assert client.get("/live").status_code == 200
    registry.close()
    assert client.get("/ready").status_code == 503


def test_plain_starlette_app(make_engine):
    """The lifespan and the health routes work in a Starlette app without FastAPI routing."""
    registry = Registry()
    registry.wrap(make_engine(), name="db")
    app = Starlette(lifespan=lifespan(registry), routes=[Mount("/health", routes=health_routes(registry))])
    with TestClient(app) as client:
        assert client.get("/health/readyz").status_code == 200
        assert client.get("/health/livez").status_code == 200
    assert registry.closed


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_bad_shutdown_delay_is_refused(bad):
    """shutdown_delay must be a finite number of seconds >= 0."""
    with pytest.raises(ValueError, match="shutdown_delay"):
        lifespan(Registry(), shutdown_delay=bad)


def test_the_shutdown_report_is_served_once_closed_and_only_when_asked_for(make_engine):
    """report_path answers 404 with the status while open or draining, then report.to_dict(), password-free."""
    registry = Registry(drain_timeout=0.0)
    engine = registry.wrap(make_engine(password=PASSWORD), name="db")
    app = FastAPI()
    app.include_router(health_router(registry, ping=False, report_path="/shutdown-report"))
    client = TestClient(app)
    assert client.get("/shutdown-report").status_code == 404
    assert client.get("/shutdown-report").json() == {"status": "open"}
    registry.start_draining()
    assert client.get("/shutdown-report").json() == {"status": "draining"}
    held = engine.connect()  # trust authentication accepts the fake password
    report = registry.close()
    response = client.get("/shutdown-report")
    with contextlib.suppress(sa.exc.DBAPIError):  # its socket was cut by the force-close
        held.close()
    assert response.status_code == 200
    assert response.json() == report.to_dict()
    assert response.json()["items"][0]["forced"] == 1
    assert PASSWORD not in response.text
    without = FastAPI()
    without.include_router(health_router(registry, ping=False))
    assert TestClient(without).get("/shutdown-report").json() == {"detail": "Not Found"}


def test_a_bad_report_path_is_refused():
    """report_path must be a path starting with '/' or None."""
    with pytest.raises(ValueError, match="report_path"):
        health_routes(Registry(), report_path="shutdown-report")
