"""The Prometheus collector, scraped through prometheus_client's own exposition, on real keepers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import aiohttp
import pytest
import redis
import sqlalchemy as sa
from aiohttp import web
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from poolkeeper import PoolClosedError, Registry
from poolkeeper.prometheus import PoolkeeperCollector, register

PASSWORD = "pk-prom-s3cret-pw"


def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Block until in-process ``predicate`` holds (e.g. "the keeper is draining")."""
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition never held"
        time.sleep(0.002)


class Scrape:
    """One scrape of a ``CollectorRegistry``: the exposition text, parsed back by prometheus_client."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.text = generate_latest(registry).decode()
        self.samples = {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(self.text)
            for sample in family.samples
        }
        self.label_values = {
            value
            for family in text_string_to_metric_families(self.text)
            for sample in family.samples
            for value in sample.labels.values()
        }

    def value(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, frozenset(labels.items())))

    def connections(self, keeper: str, kind: str, state: str) -> float | None:
        return self.value("poolkeeper_connections", keeper=keeper, kind=kind, state=state)

    def state(self, keeper: str, kind: str) -> str:
        """The one state whose ``poolkeeper_keeper_state`` sample is 1."""
        current = [
            dict(labels)["state"]
            for (name, labels), value in self.samples.items()
            if name == "poolkeeper_keeper_state"
            and {"keeper": keeper, "kind": kind}.items() <= dict(labels).items()
            and value == 1.0
        ]
        assert len(current) == 1, current
        return current[0]


def hold_in_thread(engine: sa.Engine, sql: str) -> tuple[threading.Event, threading.Thread, list[BaseException]]:
    """A thread that checks out a connection and runs ``sql``; returns (checked out, thread, errors)."""
    checked_out = threading.Event()
    errors: list[BaseException] = []

    def hold() -> None:
        try:
            with engine.connect() as connection:
                checked_out.set()
                connection.execute(sa.text(sql))
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    return checked_out, thread, errors


def test_borrowed_and_idle_connections_are_read_at_scrape_time(make_engine):
    """Each scrape shows the SQLAlchemy pool as it is: borrowed checkouts and idle connections."""
    registry = Registry()
    engine = registry.wrap(make_engine(pool_size=5), name="db")
    metrics = CollectorRegistry()
    register(metrics, registry=registry)

    first, second = engine.connect(), engine.connect()
    second.close()
    scrape = Scrape(metrics)
    assert scrape.connections("db", "sqlalchemy", "borrowed") == 1.0
    assert scrape.connections("db", "sqlalchemy", "idle") == 1.0
    assert scrape.state("db", "sqlalchemy") == "open"

    first.close()
    scrape = Scrape(metrics)
    assert scrape.connections("db", "sqlalchemy", "borrowed") == 0.0
    assert scrape.connections("db", "sqlalchemy", "idle") == 2.0

    registry.close()
    scrape = Scrape(metrics)
    assert scrape.state("db", "sqlalchemy") == "closed"
    assert scrape.connections("db", "sqlalchemy", "idle") == 0.0


def test_refusals_forced_closes_and_durations_of_a_forced_shutdown(make_engine, server):
    """During the drain the refusals count up; after it, one forced close and one drain of about drain_timeout."""
    registry = Registry(drain_timeout=0.3)
    engine = registry.wrap(make_engine(), name="db")
    metrics = CollectorRegistry()
    register(metrics, registry=registry)
    checked_out, holder, _ = hold_in_thread(engine, "select pg_sleep(30)")
    assert checked_out.wait(5)
    assert server.settle(lambda: len(server.running("pg_sleep")) == 1)

    closer = threading.Thread(target=registry.close, daemon=True)
    closer.start()
    until(lambda: registry["db"].state.value != "open")
    for _ in range(3):
        with pytest.raises(PoolClosedError):
            engine.connect()
    during = Scrape(metrics)
    closer.join(10)
    holder.join(5)
    after = Scrape(metrics)

    assert during.state("db", "sqlalchemy") == "draining"
    assert during.value("poolkeeper_refused_checkouts_total", keeper="db", kind="sqlalchemy") == 3.0
    assert during.connections("db", "sqlalchemy", "borrowed") == 1.0
    assert during.value("poolkeeper_drain_duration_seconds_count", keeper="db", kind="sqlalchemy") == 0.0

    labels = {"keeper": "db", "kind": "sqlalchemy"}
    assert after.state("db", "sqlalchemy") == "closed"
    assert after.value("poolkeeper_forced_closes_total", **labels) == 1.0
    assert after.value("poolkeeper_refused_checkouts_total", **labels) == 3.0
    assert after.value("poolkeeper_drain_duration_seconds_count", **labels) == 1.0
    assert after.value("poolkeeper_drain_duration_seconds_bucket", **labels, le="0.25") == 0.0
    assert after.value("poolkeeper_drain_duration_seconds_bucket", **labels, le="+Inf") == 1.0
    assert 0.29 <= (after.value("poolkeeper_drain_duration_seconds_sum", **labels) or 0.0) < 5.0
    assert after.value("poolkeeper_close_duration_seconds_count", **labels) == 1.0
    assert after.connections("db", "sqlalchemy", "borrowed") == 0.0


def test_queued_waiters_woken_by_the_refusal_count_once_each(make_engine):
    """Ten threads queued for the one connection are refused when closing starts: ten refusals, no more."""
    registry = Registry(drain_timeout=5.0)
    engine = registry.wrap(make_engine(pool_size=1, max_overflow=0, pool_timeout=30), name="db")
    metrics = CollectorRegistry()
    register(metrics, registry=registry)
    held = engine.connect()
    queued = [hold_in_thread(engine, "select 1") for _ in range(10)]
    queue = engine.pool._pool
    until(lambda: len(queue.not_empty._waiters) == 10)  # all ten parked in the pool's queue
    closer = threading.Thread(target=registry.close, daemon=True)
    closer.start()
    for _, thread, _ in queued:
        thread.join(5)
    during = Scrape(metrics)
    held.close()
    closer.join(10)

    assert [type(errors[0]) for _, _, errors in queued] == [PoolClosedError] * 10
    assert during.value("poolkeeper_refused_checkouts_total", keeper="db", kind="sqlalchemy") == 10.0
    assert Scrape(metrics).value("poolkeeper_refused_checkouts_total", keeper="db", kind="sqlalchemy") == 10.0


def test_no_password_or_url_in_any_label(make_engine):
    """An engine URL with a password gives labels of keeper name, kind and state only."""
    registry = Registry(drain_timeout=0.0)
    engine = registry.wrap(make_engine(password=PASSWORD), name="db")
    metrics = CollectorRegistry()
    register(metrics, registry=registry)
    held = engine.connect()  # trust authentication accepts the fake password
    open_scrape = Scrape(metrics)
    registry.close()
    closed_scrape = Scrape(metrics)
    held.close()

    for scrape in (open_scrape, closed_scrape):
        assert PASSWORD not in scrape.text
        assert "127.0.0.1" not in scrape.text
        assert scrape.label_values - {"db", "sqlalchemy"} <= {
            "open",
            "draining",
            "forcing",
            "closed",
            "borrowed",
            "idle",
            *(f"{bound}" for bound in (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)),
            "+Inf",
        }


def test_redis_idle_connections_are_the_connected_ones_in_the_pool(redis_url):
    """A pubsub counts as borrowed, a released connection as idle; a disconnected one in the pool does not."""
    registry = Registry()
    client = registry.wrap(redis.Redis.from_url(redis_url), name="cache")
    metrics = CollectorRegistry()
    register(metrics, registry=registry)
    pubsub = client.pubsub()  # type: ignore[no-untyped-call]  # redis-py leaves pubsub() unannotated
    try:
        pubsub.subscribe("pk-prometheus-test")  # holds its connection until closed
        assert client.ping()  # a second connection, back in the pool at once
        scrape = Scrape(metrics)
        assert scrape.connections("cache", "redis", "borrowed") == 1.0
        assert scrape.connections("cache", "redis", "idle") == 1.0
        pubsub.close()  # redis-py disconnects a pubsub's connection before putting it back
        scrape = Scrape(metrics)
        assert scrape.connections("cache", "redis", "borrowed") == 0.0
        assert scrape.connections("cache", "redis", "idle") == 1.0
    finally:
        pubsub.close()
        registry.close()
    assert Scrape(metrics).connections("cache", "redis", "idle") == 0.0


@pytest.mark.asyncio
async def test_aiohttp_keep_alive_connections_are_idle():
    """A released keep-alive connection is idle; a response whose body is still coming is borrowed."""
    finish = asyncio.Event()

    async def fast(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"first;")
        await finish.wait()
        await response.write_eof(b"last")
        return response

    app = web.Application()
    app.router.add_get("/fast", fast)
    app.router.add_get("/stream", stream)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    registry = Registry()
    session = registry.wrap(aiohttp.ClientSession(), name="upstream")
    metrics = CollectorRegistry()
    register(metrics, registry=registry)
    try:
        async with session.get(f"{url}/fast") as response:
            assert await response.text() == "ok"
        scrape = Scrape(metrics)
        assert scrape.connections("upstream", "aiohttp", "idle") == 1.0
        assert scrape.connections("upstream", "aiohttp", "borrowed") == 0.0
        async with session.get(f"{url}/stream") as response:
            scrape = Scrape(metrics)
            finish.set()
            assert await response.text() == "first;last"
        assert scrape.connections("upstream", "aiohttp", "borrowed") == 1.0
        assert scrape.connections("upstream", "aiohttp", "idle") == 0.0
    finally:
        finish.set()
        await registry.aclose()
        await runner.cleanup()
    assert Scrape(metrics).connections("upstream", "aiohttp", "idle") == 0.0


def test_registers_only_in_the_injected_collector_registry(make_engine):
    """register(collector_registry) leaves the global REGISTRY alone; a second register() there is refused."""
    registry = Registry()
    registry.wrap(make_engine(), name="db")
    metrics = CollectorRegistry()
    collector = register(metrics, registry=registry)
    assert isinstance(collector, PoolkeeperCollector)
    assert REGISTRY.get_sample_value("poolkeeper_connections", {"keeper": "db", "kind": "sqlalchemy"}) is None
    with pytest.raises(ValueError, match="poolkeeper_connections"):
        register(metrics, registry=registry)
    metrics.unregister(collector)
    assert "poolkeeper" not in generate_latest(metrics).decode()
    registry.close()


def test_registering_does_not_scrape():
    """describe() names the families, so registering in an auto-describing registry reads no keeper."""

    class CountingRegistry(Registry):
        reads = 0

        @property
        def keepers(self):  # counts the reads, returns the same
            CountingRegistry.reads += 1
            return super().keepers

    metrics = CollectorRegistry(auto_describe=True)
    register(metrics, registry=CountingRegistry())
    assert CountingRegistry.reads == 0
    generate_latest(metrics)
    assert CountingRegistry.reads == 1


def test_bad_arguments_name_the_argument():
    """A wrong registry, collector registry or bucket list is refused with a message naming it."""
    with pytest.raises(TypeError, match=r"registry must be a poolkeeper\.Registry"):
        PoolkeeperCollector("db")  # type: ignore[arg-type]  # the point of the test
    with pytest.raises(TypeError, match="collector_registry"):
        register(object())  # type: ignore[arg-type]  # the point of the test
    with pytest.raises(ValueError, match="buckets"):
        PoolkeeperCollector(Registry(), buckets=[1.0, 0.5])
    with pytest.raises(ValueError, match="buckets"):
        PoolkeeperCollector(Registry(), buckets=[0.0, 1.0])
    with pytest.raises(TypeError, match="buckets"):
        PoolkeeperCollector(Registry(), buckets="1,2")  # type: ignore[arg-type]  # the point of the test


def test_importing_poolkeeper_imports_neither_prometheus_client_nor_opentelemetry():
    """Importing poolkeeper loads no metrics library; poolkeeper.prometheus loads prometheus_client only."""
    code = (
        "import json, sys; import poolkeeper; before = sorted({m.split('.')[0] for m in sys.modules} "
        "& {'prometheus_client', 'opentelemetry'}); import poolkeeper.prometheus; "
        "after = sorted({m.split('.')[0] for m in sys.modules} & {'prometheus_client', 'opentelemetry'}); "
        "print(json.dumps([before, after]))"
    )
    output = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert json.loads(output) == [[], ["prometheus_client"]]


def test_missing_prometheus_client_names_the_extra():
    """Without prometheus-client, importing poolkeeper.prometheus says which extra to install."""
    code = "import sys; sys.modules['prometheus_client'] = None; import poolkeeper.prometheus"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert "pip install 'poolkeeper[prometheus]'" in result.stderr


# -- the shutdown report as a log record (for log pipelines rather than scrapers) ----------------


def test_the_shutdown_report_is_logged_as_a_json_safe_record(make_engine, caplog):
    """Closing logs one record carrying report.to_dict() (a warning when forced), with no password in it."""
    registry = Registry(drain_timeout=0.1)
    engine = registry.wrap(make_engine(password=PASSWORD), name="db")
    held = engine.connect()
    held.execute(sa.text("select 1"))
    with caplog.at_level(logging.INFO, logger="poolkeeper.registry"):
        report = registry.close()
    with contextlib.suppress(sa.exc.DBAPIError):  # its socket was cut by the force-close
        held.close()

    records = [record for record in caplog.records if hasattr(record, "poolkeeper_report")]
    assert len(records) == 1
    record = records[0]
    assert record.levelno == logging.WARNING
    assert record.poolkeeper_report == report.to_dict()  # set through extra=
    assert json.loads(json.dumps(record.poolkeeper_report))["items"][0]["forced"] == 1
    assert PASSWORD not in json.dumps(record.poolkeeper_report)
    assert PASSWORD not in record.getMessage()


def test_a_scrape_that_sees_a_keeper_closed_sees_its_forced_closes_too(make_engine):
    """The state and the report are published together: no scrape reads state=closed with forced=0."""
    registry = Registry(drain_timeout=0)
    engine = registry.wrap(make_engine(), name="db")
    metrics = CollectorRegistry()
    register(metrics, registry=registry)
    held = engine.connect()
    seen: list[tuple[str, float | None]] = []

    class ScrapeOnEachStep(logging.Handler):
        # The keeper logs each state change right after making it: the moment a scrape could come.
        def emit(self, record: logging.LogRecord) -> None:  # noqa: ARG002 -- any record is a moment to scrape
            scrape = Scrape(metrics)
            forced = scrape.value("poolkeeper_forced_closes_total", keeper="db", kind="sqlalchemy")
            seen.append((scrape.state("db", "sqlalchemy"), forced))

    handler = ScrapeOnEachStep()
    keeper_logger = logging.getLogger("poolkeeper.keeper")
    keeper_logger.addHandler(handler)
    previous_level = keeper_logger.level
    keeper_logger.setLevel(logging.INFO)
    try:
        registry.close()
    finally:
        keeper_logger.removeHandler(handler)
        keeper_logger.setLevel(previous_level)
        held.close()
    assert ("closed", 1.0) in seen
    assert ("closed", 0.0) not in seen


def test_two_poolkeeper_registries_are_exposed_through_one_collector_registry(make_engine):
    """A second registry registered in the same CollectorRegistry joins the first collector: no duplicate timeseries."""
    api, worker = Registry(), Registry()
    api_engine = api.wrap(make_engine(), name="api-db")
    worker.wrap(make_engine(), name="worker-db")
    metrics = CollectorRegistry()
    first = register(metrics, registry=api)
    second = register(metrics, registry=worker)
    held = api_engine.connect()

    scrape = Scrape(metrics)
    assert second is first
    assert scrape.connections("api-db", "sqlalchemy", "borrowed") == 1.0
    assert scrape.connections("worker-db", "sqlalchemy", "borrowed") == 0.0
    clashing = Registry()
    clashing.wrap(make_engine(), name="api-db")
    with pytest.raises(ValueError, match="api-db"):
        register(metrics, registry=clashing)
    held.close()
    for registry in (api, worker, clashing):
        registry.close()
