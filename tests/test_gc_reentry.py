"""The garbage collector returning a connection at any point of poolkeeper's own code never deadlocks it."""

from __future__ import annotations

import gc
import json
import queue
import subprocess
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
import redis

from poolkeeper import Registry, ShutdownReport, _keeper
from poolkeeper.adapters import redis as redis_adapter

PROGRAM = Path(__file__).parent / "programs" / "gc_every_line_program.py"
SPARES = 20
UNSEEN = 4000  # tracked borrow sites are rendered lazily, at report time: about 2,800 lines of close()
SPARES_REDIS = 200


@pytest.mark.parametrize("tracked", [True, False], ids=["tracked", "untracked"])
def test_a_collection_at_every_line_of_borrowers_and_close_never_deadlocks(tmp_path: Path, *, tracked: bool) -> None:
    """A connection collected at any line poolkeeper runs in borrowers() and close() is counted; close() returns."""
    url = f"sqlite:///{tmp_path / 'gc.sqlite'}"
    try:
        done = subprocess.run(
            [sys.executable, str(PROGRAM), url, "1" if tracked else "0", str(SPARES), str(UNSEEN)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except subprocess.TimeoutExpired as expired:
        pytest.fail(f"deadlocked: a finaliser re-entered the keeper's lock\n{expired.stderr!r}"[-4000:])
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["ran_out"] == 0  # every line visited had a fresh connection to collect
    assert result["borrowers_lines"] > 0
    assert result["close_lines"] > 500  # the whole close path: drain, force, close, report
    assert result["state"] == "closed"
    assert result["checked_out"] == 0  # every collected connection went back to the pool
    # Each borrow out at the start of closing was either counted back or force-closed: no
    # return deferred out of a critical section was lost.
    assert result["returned"] + result["forced"] == SPARES + 1
    assert result["forced"] >= 1
    if tracked:  # every collected borrow the keeper lent is reported as a leak, deferred or not
        assert result["leaked"] - result["leaked_unseen"] == result["gc_leaks"]


_CONDITION_METHODS = frozenset(name for name, value in vars(threading.Condition).items() if callable(value))


def _traced(frame: FrameType, pool_class: type[redis.ConnectionPool]) -> bool:
    """Where a collection is forced: every line of the keeper, or of the blocking pool's refuse path.

    For a ``BlockingConnectionPool``: the Redis adapter, ``queue``, and ``threading``'s
    ``Condition`` methods, which ``_refuse_queue`` runs holding the queue's plain lock
    (``notify_all()`` allocates). The keeper's lines are covered by the plain pool's run.
    """
    code = frame.f_code
    if pool_class is not redis.BlockingConnectionPool:
        return code.co_filename == _keeper.__file__
    if code.co_filename in (redis_adapter.__file__, queue.__file__):
        return True
    return code.co_filename == threading.__file__ and code.co_name in _CONDITION_METHODS


@pytest.mark.parametrize(
    "pool_class", [redis.ConnectionPool, redis.BlockingConnectionPool], ids=lambda cls: cls.__name__
)
def test_a_redis_pipeline_collected_inside_the_keepers_lock_is_returned_not_deadlocked(
    redis_url: str, pool_class: type[redis.ConnectionPool]
) -> None:
    """redis-py's Pipeline.__del__ giving its connection back at any line of the keeper or refuse path never blocks."""
    registry = Registry(drain_timeout=0)
    pool = pool_class.from_url(redis_url, max_connections=400)
    client = registry.wrap(redis.Redis(connection_pool=pool), name="cache", track_borrowers=True)
    keeper = registry["cache"]
    spares = []
    for _ in range(SPARES_REDIS):  # borrowed before the close: a closing keeper lends nothing new
        pipeline = client.pipeline()
        # WATCH holds the pipeline's connection. redis-py leaves Pipeline.watch unannotated.
        pipeline.watch("poolkeeper-gc-test")  # type: ignore[no-untyped-call]
        spares.append(pipeline)
    held = client.pipeline()
    held.watch("poolkeeper-gc-test")  # type: ignore[no-untyped-call]  # never given back: force-closed
    visited = [0, 0]  # lines visited; lines of _refuse_queue visited with a spare left to collect

    def leak_and_collect() -> None:
        visited[0] += 1
        if keeper.lending:
            pipeline = client.pipeline()
            pipeline.watch("poolkeeper-gc-test")  # type: ignore[no-untyped-call]
        elif spares:
            pipeline = spares.pop()
        else:
            return
        cycle: list[object] = [pipeline]
        cycle.append(cycle)
        del pipeline, cycle
        gc.collect(0)

    def trace(frame: FrameType, event: str, _arg: Any) -> Any:
        if not _traced(frame, pool_class):
            return None
        if event == "line":
            visited[1] += frame.f_code.co_name == "_refuse_queue" and bool(spares)
            leak_and_collect()
        return trace

    outcome: list[object] = []

    def close() -> None:
        sys.settrace(trace)
        try:
            outcome.append(keeper.borrowers())
            outcome.append(registry.close())
        finally:
            sys.settrace(None)

    closer = threading.Thread(target=close, daemon=True)
    closer.start()
    closer.join(60)
    assert not closer.is_alive(), "deadlocked: a finaliser re-entered the keeper's lock"
    report = outcome[1]
    assert isinstance(report, ShutdownReport)
    assert visited[0] > 20
    # Blocking pool: every line of _refuse_queue had a connection to collect, its queue's lock held.
    assert visited[1] >= (5 if pool_class is redis.BlockingConnectionPool else 0)
    assert report["cache"].forced >= 1
    assert keeper.state.value == "closed"
    # Each of the 201 borrows out when closing began came back (collected) or was force-closed:
    # no return deferred out of a critical section was lost.
    assert report["cache"].returned + report["cache"].forced == SPARES_REDIS + 1
    held.reset()
