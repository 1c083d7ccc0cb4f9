"""Fork scenarios for tests/test_fork.py: a parent with wrapped pools forks, the child closes.

Usage: ``python fork_program.py SCENARIO POSTGRES_URL REDIS_URL APPLICATION_NAME``. The parent
prints one JSON line (its findings and the child's, which the child writes to a pipe) and exits.
Forking happens here, in a process of its own, never in the pytest process with its threads.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from typing import Any

import aiohttp
import asyncpg
import psycopg
import redis
import redis.asyncio
import sqlalchemy as sa
from aiohttp import web
from sqlalchemy.ext.asyncio import create_async_engine

import poolkeeper

SCENARIO, POSTGRES_URL, REDIS_URL, APPLICATION_NAME = sys.argv[1:5]


def make_engine(**options: Any) -> sa.Engine:
    url = sa.make_url(POSTGRES_URL).set(drivername="postgresql+psycopg")
    return sa.create_engine(url, connect_args={"application_name": APPLICATION_NAME}, **options)


def wait_until_running(fragment: str) -> None:
    """Return once one of this program's backends runs a query containing ``fragment``."""
    with psycopg.connect(POSTGRES_URL, autocommit=True) as side:
        end = time.monotonic() + 10
        while time.monotonic() < end:
            rows = side.execute(
                "select 1 from pg_stat_activity where application_name = %s and state = 'active' and query like %s",
                (APPLICATION_NAME, f"%{fragment}%"),
            ).fetchall()
            if rows:
                return
            time.sleep(0.01)  # the server offers no event for "a query started"
    raise RuntimeError(f"no backend started {fragment!r}")


def fork(child: Any) -> dict[str, Any]:
    """Run ``child()`` in a forked child; return what it returned (a JSON object) once it exited."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            result = child()
        except BaseException as error:
            result = {"child_error": repr(error)}
        with os.fdopen(write_end, "w") as pipe:
            json.dump(result, pipe)
        os._exit(0)  # the child's own exit path is not what these scenarios test (except "exit_net")
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        text = pipe.read()
    os.waitpid(pid, 0)
    return dict(json.loads(text))


def report_of(report: poolkeeper.ShutdownReport) -> dict[str, Any]:
    return {"ok": report.ok, "items": report.to_dict()["items"]}


def idle() -> dict[str, Any]:
    """The parent's idle pooled connection survives the child's close (child follows SQLAlchemy's recipe)."""
    engine = poolkeeper.wrap(make_engine(), name="db")
    with engine.connect() as connection:
        parent_backend = connection.exec_driver_sql("select pg_backend_pid()").scalar()

    def child() -> dict[str, Any]:
        engine.dispose(close=False)  # SQLAlchemy's recipe for a forked child
        with engine.connect() as connection:
            child_backend = connection.exec_driver_sql("select pg_backend_pid()").scalar()
        return {"child_backend": child_backend, "report": report_of(poolkeeper.get_registry().close())}

    result = fork(child)
    try:
        with engine.connect() as connection:
            result["parent_after"] = connection.exec_driver_sql("select pg_backend_pid()").scalar()
    except Exception as error:
        result["parent_error"] = repr(error)
    result["parent_backend"] = parent_backend
    result["parent_report"] = report_of(poolkeeper.get_registry().close())
    return result


def running() -> dict[str, Any]:
    """The parent's running pg_sleep is not cancelled by the child's close, nor counted in its report."""
    engine = poolkeeper.wrap(make_engine(), name="db", drain_timeout=0.5, close_timeout=2.0)
    outcome: dict[str, Any] = {}

    def sleep() -> None:
        try:
            with engine.connect() as connection:
                outcome["slept"] = connection.exec_driver_sql("select pg_sleep(1.5)::text").scalar()
        except Exception as error:
            outcome["parent_error"] = repr(error)

    sleeper = threading.Thread(target=sleep)
    sleeper.start()
    wait_until_running("pg_sleep")
    result = fork(lambda: {"report": report_of(poolkeeper.get_registry().close())})
    sleeper.join()
    result.update(outcome)
    result["parent_report"] = report_of(poolkeeper.get_registry().close())
    return result


def blpop() -> dict[str, Any]:
    """The parent's BLPOP survives the child's close."""
    key = f"{APPLICATION_NAME}:queue"
    client = poolkeeper.wrap(redis.Redis.from_url(REDIS_URL, client_name=APPLICATION_NAME), name="cache")
    side = redis.Redis.from_url(REDIS_URL)
    outcome: dict[str, Any] = {}

    def pop() -> None:
        try:
            popped = client.blpop([key], timeout=10)
            outcome["popped"] = None if popped is None else str(popped[1], "utf-8")  # type: ignore[arg-type]  # redis-py types replies as bytes | str
        except Exception as error:
            outcome["parent_error"] = repr(error)

    popper = threading.Thread(target=pop)
    popper.start()
    end = time.monotonic() + 10
    while not any(c.get("name") == APPLICATION_NAME and c.get("cmd") == "blpop" for c in side.client_list()):
        if time.monotonic() > end:
            raise RuntimeError("the BLPOP never started")
        time.sleep(0.01)  # the server offers no event for "a client blocked"
    result = fork(lambda: {"report": report_of(poolkeeper.get_registry().close())})
    side.rpush(key, "hello")
    popper.join()
    result.update(outcome)
    result["parent_report"] = report_of(poolkeeper.get_registry().close())
    side.delete(key)
    side.close()
    return result


def exit_net() -> dict[str, Any]:
    """A child that exits with its own query still running has it force-closed by its exit-time net."""
    poolkeeper.wrap(make_engine(), name="parent-db")  # the parent armed the net first

    pid = os.fork()
    if pid == 0:
        engine = poolkeeper.wrap(make_engine(), name="child-db")
        threading.Thread(
            target=lambda: engine.connect().exec_driver_sql("select pg_sleep(20)"),
            daemon=True,
        ).start()
        wait_until_running("pg_sleep")
        sys.exit(0)  # leaves the query running: the exit-time net must cancel it
    _, status = os.waitpid(pid, 0)
    with psycopg.connect(POSTGRES_URL, autocommit=True) as side:
        end = time.monotonic() + 2
        while True:
            left = side.execute(
                "select count(*) from pg_stat_activity where application_name = %s and query like %s",
                (APPLICATION_NAME, "%pg_sleep(20)%"),
            ).fetchone()[0]  # type: ignore[index]
            if left == 0 or time.monotonic() > end:
                break
            time.sleep(0.01)  # the server offers no event for "a backend has exited"
    report = poolkeeper.get_registry().close()
    return {"child_status": os.waitstatus_to_exitcode(status), "left_running": left, "parent_report": report_of(report)}


def async_adapters() -> dict[str, Any]:
    """Forked inside a running loop: the child's close leaves the parent's async connections working."""

    async def peer_port(request: web.Request) -> web.Response:
        return web.Response(text=str(request.transport.get_extra_info("peername")[1]))  # type: ignore[union-attr]

    async def main() -> dict[str, Any]:
        app = web.Application()
        app.router.add_get("/", peer_port)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        url = sa.make_url(POSTGRES_URL).set(drivername="postgresql+asyncpg")
        settings = {"server_settings": {"application_name": APPLICATION_NAME}}
        registry = poolkeeper.Registry(drain_timeout=0.5, close_timeout=1.0)
        engine = registry.wrap(create_async_engine(url, connect_args=settings), name="sa-async")
        pool = registry.wrap(await asyncpg.create_pool(POSTGRES_URL, min_size=1, max_size=1, **settings))
        cache = registry.wrap(redis.asyncio.Redis.from_url(REDIS_URL), name="redis-async")
        http = registry.wrap(aiohttp.ClientSession(f"http://127.0.0.1:{port}"), name="http")

        async def identities() -> list[Any]:
            async with engine.connect() as connection:
                sa_backend = (await connection.exec_driver_sql("select pg_backend_pid()")).scalar()
            async with http.get("/") as response:
                http_port = await response.text()
            return [sa_backend, await pool.fetchval("select pg_backend_pid()"), await cache.client_id(), http_port]

        before = await identities()
        result = fork(lambda: {"report": report_of(registry.close())})
        try:
            result["same"] = await identities() == before
        except Exception as error:
            result["parent_error"] = repr(error)
        result["parent_report"] = report_of(await registry.aclose())
        await runner.cleanup()
        return result

    return asyncio.run(main())


def state() -> dict[str, Any]:
    """The child's registries start afresh: not draining, not closed, no report; closed keepers stay refused."""
    # Held here: a wrapped engine dropped by its program is collected with its keeper.
    engines = [sa.create_engine("sqlite://"), sa.create_engine("sqlite://")]
    draining = poolkeeper.Registry()
    draining.wrap(engines[0], name="db")
    draining.start_draining()
    closed = poolkeeper.Registry()
    closed.wrap(engines[1], name="db")
    closed.close()

    def child() -> dict[str, Any]:
        assert all(engine.pool is not None for engine in engines)
        return {
            "draining": draining.draining,
            "closed": closed.closed,
            "report": closed.report is not None,
            "keeper_state": closed["db"].state.value,
            "child_close": closed.close()["db"].outcome,
        }

    return fork(child)


SCENARIOS = {
    "idle": idle,
    "running": running,
    "blpop": blpop,
    "exit_net": exit_net,
    "async": async_adapters,
    "state": state,
}

if __name__ == "__main__":
    print(json.dumps(SCENARIOS[SCENARIO]()), flush=True)  # noqa: T201 -- the program's output, read by the test
