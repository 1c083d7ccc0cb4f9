"""gunicorn configuration for tests/test_gunicorn.py: poolkeeper's hooks, in one line."""

from poolkeeper.gunicorn import *  # noqa: F403 -- the hooks are the point of this file

graceful_timeout = 10
