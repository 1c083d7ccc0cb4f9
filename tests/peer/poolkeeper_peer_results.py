"""pytest plugin loaded into both runs of ``nox -s peer``: records each test's outcome, guards the shared Redis.

It is loaded by module name (``-p poolkeeper_peer_results``) with this folder on ``PYTHONPATH``, not as
``tests.peer...``, because the libraries' own suites have a ``tests`` package of their own.

- Outcomes: one per test id (``passed``, ``failed``, ``error`` for a setup/teardown failure, ``skipped``),
  appended as JSON lines to ``$POOLKEEPER_PEER_RESULTS`` as the tests run, with the last lines of the
  failure so the comparison can show why a test differs.
- Redis guard: the machine's Redis server is shared. When ``$POOLKEEPER_PEER_REDIS_DB`` is set, a
  connection to it on any other database, and every command that reaches beyond one database or changes
  the server (``FLUSHALL``, ``SWAPDB``, ``CONFIG SET``, ``SHUTDOWN``, ``DEBUG`` but for ``DEBUG ERROR``, which
  only answers an error...), fails with ``PeerGuardError``.
  The guard runs in both runs, so a test it stops fails in both and is no difference.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

_LONGREPR_LINES = 12
_SHARED_REDIS_PORT = 6379

# Commands that act on the whole server or on another database than the one the run owns.
_REFUSED_COMMANDS = frozenset(
    {
        "FLUSHALL",
        "SWAPDB",
        "MOVE",
        "MIGRATE",
        "SHUTDOWN",
        "FAILOVER",
        "REPLICAOF",
        "SLAVEOF",
        "SAVE",
        "BGSAVE",
        "BGREWRITEAOF",
        "CONFIG",
        "ACL",
        "MODULE",
        "SCRIPT",
        "FUNCTION",
        "CLUSTER",
        "SYNC",
        "PSYNC",
    }
)
_REFUSED_CLIENT_SUBCOMMANDS = frozenset({"KILL", "PAUSE", "UNPAUSE", "NO-EVICT", "NO-TOUCH"})


class PeerGuardError(RuntimeError):
    """A library test tried to touch more of the shared Redis server than its own database."""


class _Outcomes:
    """Appends one JSON line per event, so a run that dies (a hang killed, a crash) still tells how far it got.

    ``{"start": id}`` when a test starts, ``{"id": id, "outcome": ..., "detail": ..., "seconds": ...}`` when
    it is done, ``{"complete": true}`` at the end of the session.
    """

    def __init__(self, path: str) -> None:
        self.out = open(path, "w", encoding="utf-8")  # noqa: PTH123, SIM115 -- open for the whole session
        self.outcomes: dict[str, dict[str, Any]] = {}

    def _write(self, event: dict[str, Any]) -> None:
        self.out.write(json.dumps(event) + "\n")
        self.out.flush()

    @pytest.hookimpl
    def pytest_runtest_logstart(self, nodeid: str) -> None:
        self._write({"start": nodeid})

    @pytest.hookimpl
    def pytest_runtest_logfinish(self, nodeid: str) -> None:
        entry = self.outcomes.get(nodeid)
        if entry is not None:
            self._write({"id": nodeid, **entry})

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        entry = self.outcomes.setdefault(report.nodeid, {"outcome": "passed", "detail": "", "seconds": 0.0})
        entry["seconds"] += report.duration
        if report.skipped and entry["outcome"] == "passed":
            # An xfail that failed as expected is reported as skipped with wasxfail; keep the two apart.
            entry["outcome"] = "xfailed" if hasattr(report, "wasxfail") else "skipped"
        elif report.failed:
            outcome = "failed" if report.when == "call" else "error"
            if entry["outcome"] in {"passed", "skipped", "xfailed"}:
                entry["outcome"] = outcome
                text = str(report.longrepr)
                entry["detail"] = "\n".join(text.splitlines()[-_LONGREPR_LINES:])
        elif report.when == "call" and hasattr(report, "wasxfail"):
            entry["outcome"] = "xpassed"

    @pytest.hookimpl
    def pytest_sessionfinish(self) -> None:
        self._write({"complete": True})
        self.out.close()


def _check_command(args: tuple[Any, ...], db: int) -> None:
    if not args:
        return
    words = [a.decode(errors="replace") if isinstance(a, bytes) else str(a) for a in args[:2]]
    name = words[0].upper()
    sub = words[1].upper() if len(words) > 1 else ""
    refused_sub = (name == "CLIENT" and sub in _REFUSED_CLIENT_SUBCOMMANDS) or (name == "DEBUG" and sub != "ERROR")
    if name in _REFUSED_COMMANDS or refused_sub:
        raise PeerGuardError(f"the peer run refuses {name} {sub} on the shared Redis server")
    if name == "SELECT" and sub != str(db):
        raise PeerGuardError(f"the peer run owns Redis db {db} only, not {sub}")


def _check_db(connection: Any, db: int) -> None:
    if getattr(connection, "port", None) == _SHARED_REDIS_PORT and int(getattr(connection, "db", 0) or 0) != db:
        raise PeerGuardError(f"the peer run owns Redis db {db} only, not db {getattr(connection, 'db', 0)}")


def _guard_redis(db: int) -> None:
    """Refuse connections to other databases and server-wide commands, for sync and asyncio redis-py."""
    import redis.asyncio.connection  # noqa: PLC0415 -- only when the run is the redis one
    import redis.connection  # noqa: PLC0415

    sync_cls, async_cls = redis.connection.AbstractConnection, redis.asyncio.connection.AbstractConnection
    for cls in (sync_cls, async_cls):
        original_pack = cls.pack_command

        def pack_command(self: Any, *args: Any, _original: Any = original_pack) -> Any:
            _check_command(args, db)
            return _original(self, *args)

        cls.pack_command = pack_command  # type: ignore[method-assign]  # the guard wraps the library's method

    sync_connect: Any = sync_cls.connect
    async_connect: Any = async_cls.connect

    def connect(self: Any, *args: Any, **kwargs: Any) -> Any:
        _check_db(self, db)
        return sync_connect(self, *args, **kwargs)

    async def aconnect(self: Any, *args: Any, **kwargs: Any) -> Any:
        _check_db(self, db)
        return await async_connect(self, *args, **kwargs)

    sync_cls.connect = connect  # type: ignore[method-assign]  # the guard wraps the library's method
    async_cls.connect = aconnect  # type: ignore[method-assign]  # same, asyncio


def pytest_configure(config: pytest.Config) -> None:
    """Start recording outcomes and, for the redis run, guard the shared server."""
    path = os.environ.get("POOLKEEPER_PEER_RESULTS")
    if path:
        config.pluginmanager.register(_Outcomes(path), "poolkeeper_peer_outcomes")
    redis_db = os.environ.get("POOLKEEPER_PEER_REDIS_DB")
    if redis_db:
        _guard_redis(int(redis_db))
