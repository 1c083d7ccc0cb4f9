"""The asyncpg, redis-py and aiohttp adapters against the library versions users run.

A library version that lacks what an adapter needs fails at wrap time, never in a shutdown; a
name that disappears after wrapping makes a close step "failed", never an exception; patches
of the libraries' classes made after wrapping (what mock.patch and aioresponses do) apply to
wrapped objects; and every refusal is also the error the library itself raises after close.
Real servers throughout: a library attribute is removed only to simulate another version.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any
from unittest import mock

import aiohttp
import asyncpg
import pytest
import redis
import redis.asyncio
import sqlalchemy as sa
from aiohttp.connector import Connection

import poolkeeper.adapters.aiohttp as aiohttp_adapter
import poolkeeper.adapters.asyncpg as asyncpg_adapter
import poolkeeper.adapters.redis as redis_adapter
from poolkeeper import KeeperState, PoolClosedError, Registry, UnsupportedResourceError
from tests.conftest import Server
from tests.test_aiohttp_keeper import HttpServer, http_server, make_session
from tests.test_asyncpg_keeper import make_pool
from tests.test_redis_keeper import client_name, make_client
from tests.waiting import auntil

__all__ = ["client_name", "http_server", "make_client", "make_pool", "make_session"]  # fixtures, used by name


def monkeypatch_context() -> Any:
    """A monkeypatch undone at the end of a ``with`` block."""
    return pytest.MonkeyPatch.context()


def remove(monkeypatch: pytest.MonkeyPatch, target: Any, name: str) -> None:
    """Make ``target.name`` missing, wherever it is defined (instance or class), until the test ends."""
    owners = [target] if not isinstance(target, type) and name in vars(target) else []
    owners += [klass for klass in (target if isinstance(target, type) else type(target)).__mro__ if name in vars(klass)]
    assert owners, f"{name} is not defined on {target!r}"
    for owner in owners:
        monkeypatch.delattr(owner, name)


def unsupported(library: str, version: str, supported: str, missing: str) -> str:
    """The pattern of the UnsupportedResourceError that names all four."""
    name, version, missing, supported = (re.escape(text) for text in (library, version, missing, supported))
    return rf"{name} {version} lacks .*{missing}.*supports {name} {supported}"


# -- a missing internal fails at wrap time ---------------------------------------------------------


@pytest.mark.asyncio
async def test_asyncpg_without_a_needed_internal_is_refused_at_wrap_time(make_pool, monkeypatch):
    """An asyncpg lacking a name the adapter needs: wrap() raises naming asyncpg, its version and the range."""
    pool = await make_pool()
    registry = Registry()
    with monkeypatch.context() as patched:
        remove(patched, asyncpg.Pool, "_get_new_connection")
        expected = unsupported("asyncpg", asyncpg.__version__, ">=0.29.0", "Pool._get_new_connection")
        with pytest.raises(UnsupportedResourceError, match=expected):
            registry.wrap(pool, name="db")
    assert type(pool) is asyncpg.Pool  # left as it was
    assert registry.keepers == ()
    assert await pool.fetchval("select 1") == 1


def test_redis_without_a_needed_internal_is_refused_at_wrap_time(make_client, monkeypatch):
    """A redis-py lacking the reconnect door the adapter seals: wrap() raises naming it, its version and the range."""
    client = make_client()
    door = redis_adapter._RECONNECT_DOOR
    registry = Registry()
    with monkeypatch.context() as patched:
        remove(patched, client.connection_pool.connection_class, door)
        with pytest.raises(UnsupportedResourceError, match=unsupported("redis-py", redis.__version__, ">=5.0.8", door)):
            registry.wrap(client, name="cache")
    assert type(client.connection_pool) is redis.ConnectionPool
    assert client.ping() is True


@pytest.mark.asyncio
async def test_aiohttp_without_a_needed_internal_is_refused_at_wrap_time(make_session, http_server, monkeypatch):
    """An aiohttp lacking a name the adapter needs: wrap() raises naming aiohttp, its version and the range."""
    session = make_session()
    registry = Registry()
    with monkeypatch.context() as patched:
        remove(patched, Connection, "add_callback")
        expected = unsupported("aiohttp", aiohttp.__version__, ">=3.9.5", "Connection.add_callback")
        with pytest.raises(UnsupportedResourceError, match=expected):
            registry.wrap(session, name="http")
    assert "_request" not in vars(session)  # not guarded
    async with session.get(f"{http_server.url}/fast") as response:
        assert await response.text() == "fast"


# -- a name gone after wrapping: the close reports it, never raises --------------------------------


@pytest.mark.asyncio
async def test_asyncpg_internal_gone_during_close_is_reported_failed(make_pool, server: Server):
    """The pool's connect arguments gone after wrap: aclose() still closes every connection, reports the failed step."""
    pool = await make_pool()
    registry = Registry()
    registry.wrap(pool, name="db")
    assert server.settle(lambda: len(server.backends()) == 1)
    with monkeypatch_context() as patched:
        remove(patched, asyncpg.Pool, "_connect_kwargs")
        report = await registry.aclose()
    item = report["db"]
    assert (item.outcome, item.target) == ("failed", None)
    assert item.error is not None
    assert item.error.startswith("secrets: AttributeError")
    assert server.settle(lambda: server.backends() == [])


def test_redis_internal_gone_during_close_is_reported_failed(make_client, monkeypatch):
    """The pool's connection_kwargs gone after wrap: close() still closes the connections, reports the failed step."""
    client = make_client()
    assert client.ping() is True
    registry = Registry()
    registry.wrap(client, name="cache")
    with monkeypatch.context() as patched:
        remove(patched, client.connection_pool, "connection_kwargs")
        report = registry.close()
        assert registry["cache"].idle == 0  # metrics still read: the idle connection was closed
    item = report["cache"]
    assert (item.outcome, item.target) == ("failed", None)
    assert item.error is not None
    assert item.error.startswith("secrets: AttributeError")


@pytest.mark.asyncio
async def test_aiohttp_internal_gone_during_close_is_reported_failed(make_session, monkeypatch):
    """The session's _base_url gone after wrap: aclose() still reports, naming the failed step; the session closes."""
    session = make_session()
    registry = Registry()
    registry.wrap(session, name="http")
    monkeypatch.delattr(session, "_base_url")
    report = await registry.aclose()
    item = report["http"]
    assert (item.outcome, item.target) == ("failed", None)
    assert item.error is not None
    assert item.error.startswith("secrets: AttributeError")
    assert session.closed


# -- class patches made after wrapping apply ----------------------------------------------------


@pytest.mark.asyncio
async def test_a_patch_of_client_session_request_after_wrapping_is_what_runs(make_session, http_server: HttpServer):
    """mock.patch of ClientSession._request made after wrap answers the request (called with the session, autospec)."""
    session = make_session()
    registry = Registry()
    registry.wrap(session, name="http")
    with mock.patch("aiohttp.ClientSession._request", autospec=True) as request:
        request.return_value = "mocked"
        assert await session.get(f"{http_server.url}/fast") == "mocked"
    request.assert_called_once_with(session, "GET", f"{http_server.url}/fast", allow_redirects=True)
    assert registry["http"].borrowed == 0  # a mocked answer holds no connection
    assert (await registry.aclose())["http"].outcome == "clean"


@pytest.mark.asyncio
async def test_a_plain_mock_of_client_session_request_is_called_as_on_an_unwrapped_session(make_session, http_server):
    """A non-autospec mock (not a descriptor) gets the same arguments as on an unwrapped session: no session."""
    wrapped, plain = make_session(), make_session()
    Registry().wrap(wrapped, name="http")
    with mock.patch("aiohttp.ClientSession._request", new=mock.AsyncMock(return_value="mocked")) as request:
        assert await plain.get(f"{http_server.url}/fast") == "mocked"
        assert await wrapped.get(f"{http_server.url}/fast") == "mocked"
    assert request.call_args_list[0] == request.call_args_list[1]


@pytest.mark.asyncio
async def test_a_synchronous_mock_of_client_session_request_is_called_without_an_await(make_session):
    """A MagicMock patched on ClientSession._request is called by session.get() itself, as on an unwrapped session."""
    wrapped, plain = make_session(), make_session()
    Registry().wrap(wrapped, name="http")
    for session in (plain, wrapped):
        with mock.patch("aiohttp.ClientSession._request", new_callable=mock.MagicMock) as request:
            session.get("http://test.invalid/", params={"x": 1})  # never awaited, as in aiohttp's test_http_GET
        assert request.called, f"the mock was not called for the {'wrapped' if session is wrapped else 'plain'} session"
        assert request.call_args == mock.call("GET", "http://test.invalid/", params={"x": 1}, allow_redirects=True)


@pytest.mark.asyncio
async def test_a_session_whose_request_class_is_a_factory_can_be_wrapped(make_session, http_server: HttpServer):
    """A request_class that is a callable, not a class (a mock, a factory), is kept as it is and still called."""
    factory = mock.Mock(side_effect=aiohttp.ClientRequest)
    session = make_session(request_class=factory)
    Registry().wrap(session, name="http")
    async with session.get(f"{http_server.url}/fast") as response:
        assert response.status == 200
    assert factory.called


async def answer_under_aioresponses(session: aiohttp.ClientSession) -> object:
    """What a GET answers with aioresponses mocking it: the JSON body, or the error, as text."""
    from aioresponses import aioresponses  # noqa: PLC0415 -- a test dependency only these tests use

    with aioresponses() as mocked:
        mocked.get("http://mocked.invalid/answer", payload={"ok": True})
        try:
            async with session.get("http://mocked.invalid/answer") as response:
                return await response.json()
        except Exception as error:
            return f"{type(error).__name__}: {error}"


@pytest.mark.asyncio
async def test_aioresponses_answers_a_wrapped_session_as_an_unwrapped_one(make_session):
    """Aioresponses (it patches ClientSession._request) answers a wrapped session exactly as an unwrapped one."""
    plain, wrapped = make_session(), make_session()
    registry = Registry()
    registry.wrap(wrapped, name="http")
    expected = await answer_under_aioresponses(plain)
    assert await answer_under_aioresponses(wrapped) == expected
    assert registry["http"].borrowed == 0
    assert (await registry.aclose())["http"].outcome == "clean"


def test_a_patch_of_redis_classes_after_wrapping_is_what_runs(make_client):
    """Patches of ConnectionPool.get_connection and Redis.execute_command made after wrap run for the wrapped client."""
    client = make_client()
    registry = Registry()
    registry.wrap(client, name="cache")
    library_get = redis.ConnectionPool.get_connection
    with mock.patch.object(redis.ConnectionPool, "get_connection", autospec=True, side_effect=library_get) as get:
        assert client.ping() is True
    assert get.call_count == 1
    with mock.patch.object(redis.Redis, "execute_command", return_value="mocked") as execute:
        assert client.get("key") == "mocked"
    execute.assert_called_once()
    assert execute.call_args.args == ("GET", "key")
    assert registry.close()["cache"].outcome == "clean"


def test_a_patch_of_the_sqlalchemy_pool_class_after_wrapping_is_what_runs(make_engine):
    """A patch of QueuePool.connect made after wrap runs for the wrapped engine, whose checkout is still a borrow."""
    engine = make_engine(pool_size=1)
    registry = Registry()
    registry.wrap(engine, name="db")
    library_connect = sa.pool.QueuePool.connect
    with (
        mock.patch.object(sa.pool.QueuePool, "connect", autospec=True, side_effect=library_connect) as connect,
        engine.connect() as connection,
    ):
        assert connection.exec_driver_sql("select 1").scalar() == 1
        assert registry["db"].borrowed == 1
    assert connect.call_count == 1
    assert registry["db"].borrowed == 0
    assert registry.close()["db"].outcome == "clean"


@pytest.mark.asyncio
async def test_a_patch_of_asyncpg_pool_after_wrapping_is_what_runs(make_pool):
    """Patches of asyncpg.Pool methods made after wrap (a query shortcut, the init check) run for the wrapped pool."""
    pool = await make_pool()
    registry = Registry()
    registry.wrap(pool, name="db")
    with mock.patch.object(asyncpg.Pool, "fetchval", return_value=42):
        assert await pool.fetchval("select 1") == 42
    library_check = asyncpg.Pool._check_init
    with mock.patch.object(asyncpg.Pool, "_check_init", autospec=True, side_effect=library_check) as check:
        pool._closed = True  # what the guarded check hands to the library's: a closed pool, still lending
        with pytest.raises(asyncpg.InterfaceError, match="pool is closed"):
            await pool.fetchval("select 1")
        pool._closed = False
    assert check.call_count == 1
    assert (await registry.aclose())["db"].outcome == "clean"


# -- asyncpg's own contract ------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_asyncpg_is_closing_while_a_wrapped_close_waits_for_a_borrowed_connection(make_pool):
    """pool.is_closing() is True while pool.close() waits for a borrowed connection, as asyncpg says."""
    pool = await make_pool()
    registry = Registry(drain_timeout=5)
    registry.wrap(pool, name="db")
    connection = await pool.acquire()
    closing = asyncio.ensure_future(pool.close())
    await auntil(lambda: registry["db"].state is KeeperState.DRAINING)  # close() now waits for the borrowed one
    assert not closing.done()
    assert pool.is_closing() is True
    await pool.release(connection)
    await closing
    assert pool.is_closing() is True  # closed


@pytest.mark.asyncio
async def test_asyncpg_close_of_a_never_initialised_wrapped_pool_raises_as_asyncpg(make_pool):
    """close() on a wrapped pool that was never initialised raises asyncpg's InterfaceError, as unwrapped."""
    unwrapped = await make_pool(initialize=False)
    with pytest.raises(asyncpg.InterfaceError) as expected:
        await unwrapped.close()
    await unwrapped  # initialised after all, so that the fixture can terminate it
    pool = await make_pool(initialize=False)
    registry = Registry()
    registry.wrap(pool, name="db")
    with pytest.raises(asyncpg.InterfaceError) as raised:
        await pool.close()
    assert str(raised.value) == str(expected.value)
    assert (await registry.aclose())["db"].outcome == "clean"


# -- refusals are the library's own error too ------------------------------------------------------


@pytest.mark.asyncio
async def test_an_asyncpg_refusal_is_an_interface_error(make_pool):
    """Once closed, acquire() and the pool shortcuts raise a PoolClosedError that is an asyncpg.InterfaceError."""
    pool = await make_pool()
    registry = Registry()
    registry.wrap(pool, name="db")
    await registry.aclose()
    for use in (pool.acquire, lambda: pool.fetchval("select 1")):
        with pytest.raises(asyncpg.InterfaceError) as raised:
            await use()
        assert isinstance(raised.value, PoolClosedError)
    assert isinstance(raised.value, asyncpg_adapter.AsyncpgPoolClosedError)


def test_a_sync_redis_refusal_is_a_redis_error_not_a_retried_connection_error(make_client):
    """Once closed, a sync command raises a PoolClosedError and a redis.RedisError, not a retried ConnectionError."""
    client = make_client()
    registry = Registry()
    registry.wrap(client, name="cache")
    registry.close()
    with pytest.raises(redis.RedisError) as raised:
        client.ping()
    refusal: Any = raised.value  # Any: mypy finds the multiple inheritance below impossible
    assert isinstance(refusal, PoolClosedError)
    assert not isinstance(refusal, redis.ConnectionError)
    assert isinstance(refusal, redis_adapter.RedisPoolClosedError)


@pytest.mark.asyncio
async def test_an_asyncio_redis_refusal_is_a_redis_error(redis_url):
    """Once closed, an asyncio command raises a PoolClosedError that is a redis.RedisError."""
    client = redis.asyncio.Redis.from_url(redis_url)
    registry = Registry()
    registry.wrap(client, name="cache")
    assert await client.ping() is True
    await registry.aclose()
    with pytest.raises(redis.RedisError) as raised:
        await client.ping()
    assert isinstance(raised.value, PoolClosedError)
    await client.connection_pool.disconnect()


@pytest.mark.asyncio
async def test_an_aiohttp_refusal_is_a_runtime_error_as_for_a_closed_session(make_session, http_server):
    """A refused request is a PoolClosedError and a RuntimeError, what aiohttp raises on a closed session."""
    session = make_session()
    registry = Registry(drain_timeout=5)
    registry.wrap(session, name="http")
    response = await session.get(f"{http_server.url}/stream")  # borrowed: the close waits for it
    closing = asyncio.ensure_future(registry.aclose())
    await auntil(lambda: registry["http"].state is KeeperState.DRAINING)
    with pytest.raises(RuntimeError) as raised:
        await session.get(f"{http_server.url}/fast")
    refusal: Any = raised.value  # Any: mypy finds the multiple inheritance below impossible
    assert isinstance(refusal, PoolClosedError)
    assert isinstance(refusal, aiohttp_adapter.AiohttpPoolClosedError)
    http_server.finish.set()
    await response.read()
    response.release()
    assert (await closing)["http"].outcome == "clean"
