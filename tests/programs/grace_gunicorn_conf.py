"""gunicorn settings for the grace-budget test: 2 uvicorn workers, poolkeeper's hooks, graceful_timeout from the env.

No grace_period is configured: each worker's budget comes from ``graceful_timeout`` (``PK_GRACEFUL_TIMEOUT``).
"""

import os

from poolkeeper.gunicorn import *  # noqa: F403 -- post_fork, post_worker_init, worker_exit, on_exit

workers = 2
try:
    import uvicorn_worker  # noqa: F401 -- the maintained worker class, for uvicorn 0.30 and later
except ImportError:  # uvicorn 0.29 (the compat floor): uvicorn_worker needs a newer uvicorn
    worker_class = "uvicorn.workers.UvicornWorker"
else:
    worker_class = "uvicorn_worker.UvicornWorker"
graceful_timeout = int(os.environ["PK_GRACEFUL_TIMEOUT"])
loglevel = "info"
