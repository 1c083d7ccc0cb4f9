"""The OpenTelemetry instruments, read with the SDK's in-memory reader, on real keepers."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis
import sqlalchemy as sa
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from poolkeeper import PoolClosedError, Registry
from poolkeeper.otel import instrument

PASSWORD = "pk-otel-s3cret-pw"


def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Block until in-process ``predicate`` holds (e.g. "the keeper is draining")."""
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition never held"
        time.sleep(0.002)


class Reading:
    """One collection of the in-memory reader: every data point by metric name."""

    def __init__(self, reader: InMemoryMetricReader) -> None:
        data = reader.get_metrics_data()
        assert data is not None
        self.points: dict[str, list[Any]] = {}
        self.units: dict[str, str] = {}
        for resource_metrics in data.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                assert scope_metrics.scope.name == "poolkeeper"
                for metric in scope_metrics.metrics:
                    self.points.setdefault(metric.name, []).extend(metric.data.data_points)
                    self.units[metric.name] = metric.unit or ""

    def value(self, name: str, **attributes: str) -> Any:
        """The value of the one data point of ``name`` with exactly these attributes (None if absent)."""
        matches = [point for point in self.points.get(name, ()) if dict(point.attributes) == attributes]
        assert len(matches) <= 1
        return matches[0].value if matches else None

    def histogram(self, name: str, **attributes: str) -> Any:
        matches = [point for point in self.points.get(name, ()) if dict(point.attributes) == attributes]
        assert len(matches) <= 1
        return matches[0] if matches else None

    def attribute_values(self) -> Iterator[str]:
        for points in self.points.values():
            for point in points:
                yield from (str(value) for value in point.attributes.values())


def provider_reading(registry: Registry) -> tuple[MeterProvider, InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    instrument(registry, meter_provider=provider)
    return provider, reader


def keeper(name: str, kind: str) -> dict[str, str]:
    return {"poolkeeper.keeper.name": name, "poolkeeper.keeper.kind": kind}


def pool(name: str, state: str) -> dict[str, str]:
    return {"db.client.connection.pool.name": name, "db.client.connection.state": state}


def test_database_keepers_report_the_semantic_convention_connection_count(make_engine):
    """db.client.connection.count of a SQLAlchemy keeper: used and idle connections, by pool name."""
    registry = Registry()
    engine = registry.wrap(make_engine(pool_size=5), name="db")
    provider, reader = provider_reading(registry)
    try:
        first, second = engine.connect(), engine.connect()
        second.close()
        reading = Reading(reader)
        assert reading.units["db.client.connection.count"] == "{connection}"
        assert reading.value("db.client.connection.count", **pool("db", "used")) == 1
        assert reading.value("db.client.connection.count", **pool("db", "idle")) == 1
        first.close()
        later = Reading(reader)
        assert later.value("db.client.connection.count", **pool("db", "used")) == 0
        assert later.value("db.client.connection.count", **pool("db", "idle")) == 2
        open_state = {**keeper("db", "sqlalchemy"), "poolkeeper.keeper.state": "open"}
        assert reading.value("poolkeeper.keeper.state", **open_state) == 1
    finally:
        registry.close()
        provider.shutdown()


def test_lifecycle_counters_and_durations_of_a_forced_shutdown(make_engine, server):
    """Refusals and forced closes are counted; each duration is recorded once, after the keeper closed."""
    registry = Registry(drain_timeout=0.3)
    engine = registry.wrap(make_engine(), name="db")
    provider, reader = provider_reading(registry)
    checked_out = threading.Event()

    def hold() -> None:
        try:
            with engine.connect() as connection:
                checked_out.set()
                connection.execute(sa.text("select pg_sleep(30)"))
        except sa.exc.DBAPIError:
            pass  # the force-close cancels it: that is the shutdown under test

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert checked_out.wait(5)
    assert server.settle(lambda: len(server.running("pg_sleep")) == 1)
    closer = threading.Thread(target=registry.close, daemon=True)
    closer.start()
    until(lambda: registry["db"].state.value != "open")
    for _ in range(2):
        with pytest.raises(PoolClosedError):
            engine.connect()
    during = Reading(reader)
    closer.join(10)
    holder.join(5)
    after, again = Reading(reader), Reading(reader)
    provider.shutdown()

    attributes = keeper("db", "sqlalchemy")
    assert during.value("poolkeeper.keeper.state", **attributes, **{"poolkeeper.keeper.state": "draining"}) == 1
    assert during.value("poolkeeper.refused_checkouts", **attributes) == 2
    assert during.histogram("poolkeeper.drain.duration", **attributes) is None

    assert after.value("poolkeeper.keeper.state", **attributes, **{"poolkeeper.keeper.state": "closed"}) == 1
    assert after.value("poolkeeper.keeper.state", **attributes, **{"poolkeeper.keeper.state": "draining"}) == 0
    assert after.value("poolkeeper.refused_checkouts", **attributes) == 2
    assert after.value("poolkeeper.forced_closes", **attributes) == 1
    drain = after.histogram("poolkeeper.drain.duration", **attributes)
    assert drain.count == 1
    assert 0.29 <= drain.sum < 5.0
    assert after.units["poolkeeper.drain.duration"] == "s"
    assert 0.25 in drain.explicit_bounds
    assert after.histogram("poolkeeper.close.duration", **attributes).count == 1
    assert again.histogram("poolkeeper.drain.duration", **attributes).count == 1  # cumulative: not recorded twice


def test_no_password_or_url_in_any_attribute(make_engine):
    """An engine URL with a password yields attributes of names, kinds and states only."""
    registry = Registry(drain_timeout=0.0)
    engine = registry.wrap(make_engine(password=PASSWORD), name="db")
    provider, reader = provider_reading(registry)
    held = engine.connect()  # trust authentication accepts the fake password
    open_reading = Reading(reader)
    registry.close()
    closed_reading = Reading(reader)
    held.close()
    provider.shutdown()

    for reading in (open_reading, closed_reading):
        values = set(reading.attribute_values())
        assert values <= {"db", "sqlalchemy", "open", "draining", "forcing", "closed", "used", "idle"}
        assert PASSWORD not in json.dumps(sorted(values))


def test_redis_is_a_database_keeper(redis_url):
    """A redis keeper reports db.client.connection.count under its keeper name."""
    registry = Registry()
    client = registry.wrap(redis.Redis.from_url(redis_url), name="cache")
    provider, reader = provider_reading(registry)
    try:
        assert client.ping()
        reading = Reading(reader)
        assert reading.value("db.client.connection.count", **pool("cache", "used")) == 0
        assert reading.value("db.client.connection.count", **pool("cache", "idle")) == 1
    finally:
        registry.close()
        provider.shutdown()


@pytest.mark.asyncio
async def test_asyncpg_idle_and_used_connections(pg_url, application_name):
    """An asyncpg keeper reports its acquired connection as used and the rest of min_size as idle."""
    registry = Registry()
    pg = registry.wrap(
        await asyncpg.create_pool(
            pg_url, min_size=2, max_size=4, server_settings={"application_name": application_name}
        ),
        name="pg",
    )
    provider, reader = provider_reading(registry)
    try:
        async with pg.acquire() as connection:
            assert await connection.fetchval("select 1") == 1
            reading = Reading(reader)
        assert reading.value("db.client.connection.count", **pool("pg", "used")) == 1
        assert reading.value("db.client.connection.count", **pool("pg", "idle")) == 1
    finally:
        await registry.aclose()
        provider.shutdown()


@pytest.mark.asyncio
async def test_http_keepers_get_lifecycle_instruments_but_no_database_count():
    """An aiohttp keeper is not a database: no db.client.connection.count, its state and counters all the same."""
    registry = Registry()
    session = registry.wrap(aiohttp.ClientSession(), name="upstream")  # kept: a dropped one is unmanaged
    provider, reader = provider_reading(registry)
    try:
        reading = Reading(reader)
        assert reading.points.get("db.client.connection.count", []) == []
        attributes = keeper("upstream", "aiohttp")
        assert reading.value("poolkeeper.keeper.state", **attributes, **{"poolkeeper.keeper.state": "open"}) == 1
        assert reading.value("poolkeeper.refused_checkouts", **attributes) == 0
        assert reading.value("poolkeeper.forced_closes", **attributes) == 0
    finally:
        await registry.aclose()
        provider.shutdown()
    assert session.closed


def test_a_bad_registry_is_refused():
    """instrument() names the registry argument when given something else."""
    with pytest.raises(TypeError, match=r"registry must be a poolkeeper\.Registry"):
        instrument("db")  # type: ignore[arg-type]  # the point of the test


def test_poolkeeper_otel_needs_only_the_api():
    """Importing poolkeeper.otel loads opentelemetry's API, not its SDK."""
    code = "import json, sys; import poolkeeper.otel; print(json.dumps('opentelemetry.sdk' in sys.modules))"
    output = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert json.loads(output) is False


def test_missing_opentelemetry_names_the_extra():
    """Without opentelemetry-api, importing poolkeeper.otel says which extra to install."""
    code = "import sys; sys.modules['opentelemetry'] = None; import poolkeeper.otel"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert "pip install 'poolkeeper[otel]'" in result.stderr
