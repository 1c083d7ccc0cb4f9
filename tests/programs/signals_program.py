"""A process with poolkeeper's signal handlers installed, driven by tests/test_signals.py.

Usage: signals_program.py MODE POSTGRES_URL APPLICATION_NAME

chain    a Python-level SIGTERM handler (a server's) is in place; delay 0.5 s.
force    the same with delay 30 s and a connection borrowed by a thread running pg_sleep(60).
default  SIGTERM is SIG_DFL; a borrowed connection runs pg_sleep(60); drain_timeout 0.5 s.
sigint   SIGINT is Python's default handler (KeyboardInterrupt); shutdown delay 30 s, skipped on SIGINT.
sigint-delayed  delay_on_sigint=True and a shutdown delay of 1 s.
"""

# ruff: noqa: T201 -- a test program talks to its test through stdout
from __future__ import annotations

import logging
import signal
import sys
import threading
import time

import sqlalchemy as sa

import poolkeeper

mode, url, application_name = sys.argv[1:4]
logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
registry = poolkeeper.Registry(drain_timeout=30 if mode != "default" else 0.5)
engine = registry.wrap(
    sa.create_engine(
        sa.make_url(url).set(drivername="postgresql+psycopg"), connect_args={"application_name": application_name}
    ),
    name="db",
)
passed_on = threading.Event()
borrowed = threading.Event()


def server_handler(signum: int, _frame: object) -> None:
    """Stands for a server's handler (uvicorn's handle_exit): it records that it ran."""
    print(f"main: the server handler got {signal.Signals(signum).name}; draining={registry.draining}", flush=True)
    passed_on.set()


def borrow_and_sleep() -> None:
    try:
        with engine.connect() as connection:
            borrowed.set()
            connection.execute(sa.text("select pg_sleep(60)"))
    except Exception as error:  # the force-close error is what the test looks for
        print(f"main: the borrower got {type(error).__name__}", flush=True)


def wait_until_draining() -> None:
    while not registry.draining:  # no event exists for "a signal arrived" in this process
        time.sleep(0.005)


if mode in ("chain", "force"):
    signal.signal(signal.SIGTERM, server_handler)
    poolkeeper.install_signal_handlers(registry, shutdown_delay=0.5 if mode == "chain" else 30)
    if mode == "force":
        threading.Thread(target=borrow_and_sleep).start()
        borrowed.wait(10)
    print("main: ready", flush=True)
    wait_until_draining()
    drained_at = time.monotonic()
    print("main: draining", flush=True)
    if mode == "chain":
        with engine.connect() as connection:  # a request arriving during the delay is served
            print(f"main: served during the delay: {connection.execute(sa.text('select 7')).scalar()}", flush=True)
    passed_on.wait(60)
    print(f"main: passed on after {time.monotonic() - drained_at:.3f}s", flush=True)
    report = registry.close()  # what the server's lifespan does once it stops
    print(f"main: outcome {report['db'].outcome}", flush=True)
elif mode == "default":
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    poolkeeper.install_signal_handlers(registry)
    threading.Thread(target=borrow_and_sleep, daemon=True).start()
    borrowed.wait(10)
    print("main: ready", flush=True)
    threading.Event().wait(60)
    print("main: still alive", flush=True)
elif mode in ("sigint", "sigint-delayed"):
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # Ctrl-C skips the shutdown delay unless delay_on_sigint: "sigint-delayed" waits it out.
    delayed = mode == "sigint-delayed"
    poolkeeper.install_signal_handlers(registry, shutdown_delay=1.0 if delayed else 30, delay_on_sigint=delayed)
    print("main: ready", flush=True)
    try:
        threading.Event().wait(60)
    except KeyboardInterrupt:
        print(f"main: KeyboardInterrupt; draining={registry.draining}", flush=True)
        print(f"main: closed ok={registry.close().ok}", flush=True)
