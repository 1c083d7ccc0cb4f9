"""A Celery app with a wrapped engine, for tests/test_celery.py (the recipe of docs/processes.md).

The main process imports this module and runs a query here (the pre-fork trap); each prefork
child starts with its own connections (``worker_process_init``) and closes its registry as it
exits (``worker_process_shutdown``); the main process closes its own at ``worker_shutdown``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import sqlalchemy as sa
from celery import Celery
from celery.signals import worker_process_init, worker_process_shutdown, worker_shutdown

import poolkeeper

APPLICATION_NAME = os.environ["PK_APPLICATION_NAME"]
REDIS_URL = os.environ["POOLKEEPER_REDIS_URL"]

app = Celery("celery_app", broker=REDIS_URL, backend=REDIS_URL)
app.conf.task_default_queue = APPLICATION_NAME

engine = poolkeeper.wrap(
    sa.create_engine(
        sa.make_url(os.environ["POOLKEEPER_POSTGRES_URL"]).set(drivername="postgresql+psycopg"),
        connect_args={"application_name": APPLICATION_NAME},
    ),
    name="db",
)
with engine.connect() as connection:  # in the main process, before it forks its children
    main_backend = connection.exec_driver_sql("select pg_backend_pid()").scalar_one()


@worker_process_init.connect
def start_with_own_connections(**_: Any) -> None:
    """In each prefork child: SQLAlchemy's fork recipe; poolkeeper has forgotten the parent's already."""
    engine.dispose(close=False)


@worker_process_shutdown.connect
def close_child_registry(**_: Any) -> None:
    """In each prefork child, as it exits (it ends with os._exit: no atexit hook runs)."""
    report = poolkeeper.get_registry().close()
    print(f"celery child {os.getpid()} closed: ok={report.ok}", file=sys.stderr, flush=True)  # noqa: T201 -- read by the test


@worker_shutdown.connect
def close_main_registry(**_: Any) -> None:
    """In the main process, once its children are gone: its own connection still works, then it closes."""
    with engine.connect() as connection:
        same = connection.exec_driver_sql("select pg_backend_pid()").scalar_one() == main_backend
    report = poolkeeper.get_registry().close()
    print(f"celery main {os.getpid()} closed: ok={report.ok} same_backend={same}", file=sys.stderr, flush=True)  # noqa: T201 -- read by the test


@app.task
def backend() -> tuple[int, int]:
    """Which child and PostgreSQL backend ran this task."""
    with engine.connect() as connection:
        return os.getpid(), int(connection.exec_driver_sql("select pg_backend_pid()").scalar_one())
