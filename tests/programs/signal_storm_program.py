"""A process under a storm of signals, driven by tests/test_faults_hooks_and_signals.py.

Usage: signal_storm_program.py MODE POSTGRES_URL APPLICATION_NAME

A thread borrows a connection and runs pg_sleep(60) on it; the test then sends many SIGTERMs.

chain    a Python-level SIGTERM handler (a server's) is in place, poolkeeper's delay is 0.2 s; once
         the server handler has run, the main thread closes the registry, as a lifespan would,
         and exits when the test writes a line to its stdin (a SIGTERM arriving while Python
         finalizes meets the default disposition and would end the process with -SIGTERM).
default  SIGTERM is SIG_DFL: poolkeeper closes the registry itself, then the signal ends the process.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading

import sqlalchemy as sa

import poolkeeper

mode, url, application_name = sys.argv[1:4]
logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
# What the program says goes through logging's one handler, like poolkeeper's own lines: each
# line is written whole under the handler's lock. A print() writes its text and its newline
# apart, and a log line from a signal-handling thread could land between the two.
say = logging.getLogger("program").info
registry = poolkeeper.Registry(drain_timeout=30)
engine = registry.wrap(
    sa.create_engine(
        sa.make_url(url).set(drivername="postgresql+psycopg"), connect_args={"application_name": application_name}
    ),
    name="db",
)
borrowed = threading.Event()
server_stopping = threading.Event()
handler_calls = 0


def server_handler(_signum: int, _frame: object) -> None:
    """Stands for a server's handler (uvicorn's handle_exit): counts its calls, asks the server to stop."""
    global handler_calls  # noqa: PLW0603 -- a signal handler's only way to count in this program
    handler_calls += 1
    server_stopping.set()


def borrow_and_sleep() -> None:
    try:
        with engine.connect() as connection:
            borrowed.set()
            connection.execute(sa.text("select pg_sleep(60)"))
    except Exception as error:  # the force-close error is what the test looks for
        say("main: the borrower got %s", type(error).__name__)


if mode == "chain":
    signal.signal(signal.SIGTERM, server_handler)
    poolkeeper.install_signal_handlers(registry, shutdown_delay=0.2)
elif mode == "default":
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    poolkeeper.install_signal_handlers(registry)
else:
    raise SystemExit(f"unknown mode {mode!r}")

borrower = threading.Thread(target=borrow_and_sleep, daemon=True)
borrower.start()
borrowed.wait(10)
say("main: ready")
if mode == "chain":
    server_stopping.wait(60)
    report = registry.close()  # what the server's lifespan does once it stops
    borrower.join(10)
    say("main: outcome %s; server handler calls %d", report["db"].outcome, handler_calls)
    sys.stdin.readline()
else:
    threading.Event().wait(60)
    say("main: still alive")
