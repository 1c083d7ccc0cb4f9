"""gunicorn settings for the Flask and Django examples: poolkeeper's hooks in one line."""

import os

import poolkeeper.gunicorn
from poolkeeper.gunicorn import *  # noqa: F403 -- post_fork, post_worker_init, worker_exit, on_exit

poolkeeper.gunicorn.configure(shutdown_delay=float(os.environ.get("POOLKEEPER_SHUTDOWN_DELAY", "1.0")))

workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
graceful_timeout = 30
