"""multiprocessing with a wrapped engine, for tests/test_fork.py: ``mp_program.py START_METHOD POSTGRES_URL APP_NAME``.

The recipe of docs/processes.md: the parent wraps and uses the engine; each pool worker starts
with its own connections (``engine.dispose(close=False)`` after a fork; a spawned worker builds
its own engine on import) and closes its registry as it exits (a multiprocessing finalizer: a
worker ends with ``os._exit()``, which runs no ``atexit`` hook). Prints one JSON line.
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.util
import os
import sys

import sqlalchemy as sa

import poolkeeper

START_METHOD, POSTGRES_URL, APPLICATION_NAME = sys.argv[1:4]

engine = poolkeeper.wrap(
    sa.create_engine(
        sa.make_url(POSTGRES_URL).set(drivername="postgresql+psycopg"),
        connect_args={"application_name": APPLICATION_NAME},
    ),
    name="db",
)


def close_registry() -> None:
    report = poolkeeper.get_registry().close()
    print(f"worker {os.getpid()} closed: ok={report.ok}", file=sys.stderr, flush=True)  # noqa: T201 -- read by the test


def worker_init() -> None:
    """Each worker: its own connections, and its registry closed when it exits."""
    engine.dispose(close=False)  # SQLAlchemy's recipe after a fork; a no-op in a spawned worker
    multiprocessing.util.Finalize(None, close_registry, exitpriority=10)


def backend(_: int) -> tuple[int, int]:
    with engine.connect() as connection:
        return os.getpid(), int(connection.exec_driver_sql("select pg_backend_pid()").scalar_one())


def main() -> dict[str, object]:
    with engine.connect() as connection:
        before = connection.exec_driver_sql("select pg_backend_pid()").scalar_one()
    context = multiprocessing.get_context(START_METHOD)
    pool = context.Pool(2, initializer=worker_init)
    served = pool.map(backend, range(20), chunksize=1)
    pool.close()
    pool.join()
    with engine.connect() as connection:
        after = connection.exec_driver_sql("select pg_backend_pid()").scalar_one()
    report = poolkeeper.get_registry().close()
    return {
        "parent": [before, after],
        "worker_backends": sorted({backend for _, backend in served}),
        "workers": sorted({pid for pid, _ in served}),
        "ok": report.ok,
    }


if __name__ == "__main__":
    print(json.dumps(main()), flush=True)  # noqa: T201 -- the program's output, read by the test
