"""Helpers of the fault-injection suite: a blackholing proxy, and ways to see what was left open.

What "nothing is left open" means here, checked from outside the code under test:

* no socket of this process is still connected to a given port (read from ``/proc``);
* no thread that started during the test is still alive a bounded time after it ended;
* the servers' own view (``pg_stat_activity``, ``CLIENT LIST``), through the suite's fixtures.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from tests.faults.proxy import BlackholeProxy
from tests.waiting import auntil, until

__all__ = [
    "BlackholeProxy",
    "ThreadWatch",
    "auntil",
    "local_ports_to",
    "redis_default_backoff",
    "sockets_to",
    "until",
]


def redis_default_backoff() -> float:
    """The longest sleep of the installed redis-py's default ``Retry`` between two attempts.

    redis-py 6.0 to 7.x back off with base 1 s and cap 10 s, jittered: up to 8 s before the third
    retry, and a force-closed borrower meets the refusal only after its sleep. redis-py 8 backs
    off at most 0.512 s (within the suite's slack); before 6.0 nothing is retried by default.
    """
    import redis  # noqa: PLC0415 -- the helpers of the other suites need no redis

    version = tuple(int(part) for part in redis.__version__.split(".")[:2])
    return 8.0 if (6, 0) <= version < (8, 0) else 0.0


def _socket_inodes() -> set[str]:
    """The inodes of every socket this process has open."""
    inodes = set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = str(fd.readlink())
        except OSError:  # closed while we looked
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


def local_ports_to(port: int) -> set[int]:
    """The local ports of the sockets this process still holds open to ``port`` (any TCP state).

    Read from ``/proc/self/net/tcp{,6}`` and this process's file descriptors: a socket counts as
    long as a descriptor refers to it, whatever its TCP state, which is what "left open" means.
    """
    mine = _socket_inodes()
    found = set()
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if int(remote.rsplit(":", 1)[1], 16) == port and inode in mine:
                found.add(int(local.rsplit(":", 1)[1], 16))
    return found


def sockets_to(port: int) -> int:
    """How many sockets this process still holds open to ``port`` on the loopback (see :func:`local_ports_to`)."""
    return len(local_ports_to(port))


class ThreadWatch:
    """The threads started since it was made: none of them may outlive a fault by much."""

    def __init__(self) -> None:
        self._before = set(threading.enumerate())

    def started(self) -> list[threading.Thread]:
        """Threads started since, still alive."""
        return [thread for thread in threading.enumerate() if thread not in self._before and thread.is_alive()]

    def wait_all_ended(self, timeout: float, *, ignore: Callable[[threading.Thread], bool] = lambda _t: False) -> None:
        """Fail unless every thread started since (but those ``ignore`` picks) ends within ``timeout``."""
        end = time.monotonic() + timeout
        while left := [thread for thread in self.started() if not ignore(thread)]:
            if time.monotonic() > end:
                names = ", ".join(sorted(thread.name for thread in left))
                raise AssertionError(f"threads still alive {timeout}s after the fault: {names}")
            left[0].join(0.01)
