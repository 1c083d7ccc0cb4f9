"""A script that ends with its keepers still open, driven by tests/test_exit.py.

Usage: exit_program.py MODE POSTGRES_URL APPLICATION_NAME

leak     a thread still runs pg_sleep(60) on a borrowed connection when the main thread ends.
hang     the same, plus a shutdown hook that never returns.
closed   the registry is closed before the end: nothing to warn about.

Prints "main: ready" once the connection is borrowed, then waits for a line on stdin before ending.
"""

# ruff: noqa: T201 -- a test program talks to its test through stdout
from __future__ import annotations

import sys
import threading
import time

import sqlalchemy as sa

import poolkeeper

mode, url, application_name = sys.argv[1:4]
registry = poolkeeper.Registry()
engine = registry.wrap(
    sa.create_engine(
        sa.make_url(url).set(drivername="postgresql+psycopg"), connect_args={"application_name": application_name}
    ),
    name="db",
)
borrowed = threading.Event()


def borrow_and_sleep() -> None:
    try:
        with engine.connect() as connection:
            borrowed.set()
            connection.execute(sa.text("select pg_sleep(60)"))
    except Exception as error:  # shown for the test's diagnostics
        print(f"main: the borrower got {type(error).__name__}", flush=True)


if mode == "hang":
    registry.on_shutdown(lambda: time.sleep(60), name="hangs", depends_on=["db"])
if mode != "closed":
    threading.Thread(target=borrow_and_sleep, daemon=True).start()
    borrowed.wait(10)
print("main: ready", flush=True)
sys.stdin.readline()
if mode == "closed":
    registry.close()
print("main: exiting", flush=True)
