"""Force a garbage collection at every line poolkeeper runs, with a fresh leaked connection to collect.

Usage: gc_every_line_program.py ENGINE_URL TRACKED(0|1) SPARES UNSEEN

During ``keeper.borrowers()`` and ``registry.close()`` (``drain_timeout=0``, one connection held
to the end so that the close goes through the force path), at every line event in a file of
the poolkeeper package, in any thread, a connection is dropped into a reference cycle and the
youngest generation is collected: its finaliser (SQLAlchemy's ``_finalize_fairy``) returns the
connection to the keeper right where the traced code stands, lock held or not. The connection
is a fresh checkout while the keeper lends, then one of ``SPARES`` borrowed before the close,
then one of ``UNSEEN`` checked out before ``wrap()``: a forced borrow costs the force-close
many lines, so spares borrowed through the keeper would never be enough. A regression
deadlocks here; the test bounds the run.

Prints one JSON line: the lines visited per phase, the distinct lines, the spares used, and
what the keeper and report counted.
"""

# ruff: noqa: T201 -- a test program talks to its test through stdout
from __future__ import annotations

import gc
import json
import pathlib
import sys
import threading
import time
import warnings
from typing import Any

import sqlalchemy as sa

import poolkeeper

url, tracked, spare_count, unseen_count = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4])
PACKAGE = str(pathlib.Path(poolkeeper.__file__).parent)
warnings.simplefilter("ignore")  # SQLAlchemy warns at each connection the collector returns

size = spare_count + unseen_count + 2
engine = sa.create_engine(url, poolclass=sa.QueuePool, pool_size=size, max_overflow=0, pool_timeout=5)
# Checked out before wrap(): the keeper never saw them lent, but their return still goes
# through the keeper (an unknown connection), the same way and under the same lock.
unseen = [engine.connect() for _ in range(unseen_count)]
registry = poolkeeper.Registry()
pool = engine.pool
assert isinstance(pool, sa.QueuePool)
registry.wrap(engine, name="db", drain_timeout=0, track_borrowers=tracked)
keeper = registry.keepers[0]
held = engine.connect()  # never returned: force-closed at the deadline
spares: list[Any] = []  # borrowed before the close, one leaked per line of it

visits = {"borrowers": 0, "close": 0}
distinct: set[tuple[str, int]] = set()
phase = "borrowers"
leaked = 0
leaked_unseen = 0
ran_out = 0


def leak_and_collect(frame: Any) -> None:
    global leaked, leaked_unseen, ran_out  # noqa: PLW0603 -- counters of this one-shot program
    visits[phase] += 1
    distinct.add((frame.f_code.co_filename, frame.f_lineno))
    if keeper.lending:  # borrowers(): checkouts still open, borrow a fresh one here
        connection = engine.connect()
    elif spares:
        connection = spares.pop()
    elif unseen:
        connection = unseen.pop()
        leaked_unseen += 1
    else:
        ran_out += 1
        connection = None
    if connection is not None:
        cycle: dict[str, Any] = {"connection": connection}
        cycle["cycle"] = cycle
        leaked += 1
        del connection, cycle
    # The youngest generation holds the new cycle: collecting it frees the connection, and
    # costs microseconds where a full collection costs milliseconds at every line.
    gc.collect(0)


def trace_lines(frame: Any, event: str, arg: Any) -> Any:  # noqa: ARG001 -- sys.settrace's signature
    if event == "line":
        leak_and_collect(frame)
    return trace_lines


def trace_calls(frame: Any, event: str, arg: Any) -> Any:  # noqa: ARG001 -- sys.settrace's signature
    # Only poolkeeper's own frames get the line tracer; tracing is off while a tracer runs, so
    # the finalisers it triggers run untraced.
    if frame.f_code.co_filename.startswith(PACKAGE):
        return trace_lines
    return None


started = time.monotonic()
threading.settrace(trace_calls)
sys.settrace(trace_calls)
borrowers = keeper.borrowers()
phase = "close"
sys.settrace(None)
spares.extend(engine.connect() for _ in range(spare_count))
sys.settrace(trace_calls)
report = registry.close()
sys.settrace(None)
threading.settrace(None)
seconds = time.monotonic() - started
gc_leaks = len(keeper.gc_leaks())
item = report["db"]
print(
    json.dumps(
        {
            "borrowers_lines": visits["borrowers"],
            "close_lines": visits["close"],
            "distinct_lines": len(distinct),
            "leaked": leaked,
            "leaked_unseen": leaked_unseen,
            "ran_out": ran_out,
            "borrowers_seen": len(borrowers),
            "gc_leaks": gc_leaks,
            "outcome": item.outcome,
            "forced": item.forced,
            "returned": item.returned,
            "state": keeper.state.value,
            "checked_out": pool.checkedout(),
            "seconds": round(seconds, 2),
        }
    ),
    flush=True,
)
