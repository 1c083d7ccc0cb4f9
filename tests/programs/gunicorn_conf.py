"""gunicorn configuration for tests/test_gunicorn.py: poolkeeper's hooks, each worker's connections reported.

The kernel, not the test, chooses which worker accepts a request (one sync worker answered 400
requests in a row while the other sat idle in ``select()``), so the test cannot ask a given
worker for its connections: each worker prints them once it is ready, from a ``post_worker_init`` that calls
poolkeeper's own first, as the docstring of :mod:`poolkeeper.gunicorn` asks.
"""

import sys
from typing import Any

import poolkeeper.gunicorn
from poolkeeper.gunicorn import on_exit, post_fork, worker_exit  # noqa: F401 -- gunicorn reads its hooks here

graceful_timeout = 10


def post_worker_init(worker: Any) -> None:
    """Run poolkeeper's hook, then print ``worker pid=... backend=... redis=...`` for the test."""
    poolkeeper.gunicorn.post_worker_init(worker)
    served = sys.modules["gunicorn_app"].served()  # imported by now: in the master under --preload
    line = f"worker pid={served['pid']} backend={served['backend']} redis={served['redis']}"
    print(line, file=sys.stderr, flush=True)  # noqa: T201 -- read by the test
