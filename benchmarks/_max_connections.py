"""Room for many PostgreSQL connections: raise ``max_connections`` for one measurement, then restore it.

The force-close at scale borrows 500 connections; PostgreSQL's default ``max_connections`` is
100, and the setting takes effect only when the server restarts. When the server is a local
Debian cluster this process may restart (``pg_ctlcluster``, run as root or as the cluster's
owner), the measurement raises the setting with ``ALTER SYSTEM``, restarts the server, and on the
way out, whatever happened, puts the setting back as it was and restarts it again. Elsewhere it
changes nothing, and the caller scales the measurement down to what fits (and says so).

A restart drops every connection to the server, this process's own side connections included:
open them inside the block.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import subprocess
import time
from typing import TYPE_CHECKING

import psycopg

if TYPE_CHECKING:
    from collections.abc import Iterator

#: How long a restarted server may take to accept connections again.
RESTART_TIMEOUT = 60.0


def _settings(url: str) -> tuple[int, str | None]:
    """(max_connections, the file that sets it, when that is postgresql.auto.conf's ALTER SYSTEM)."""
    with psycopg.connect(url, autocommit=True) as connection:
        row = connection.execute(
            "select setting, sourcefile from pg_settings where name = 'max_connections'"
        ).fetchone()
    assert row is not None
    sourcefile = row[1] if row[1] and str(row[1]).endswith("postgresql.auto.conf") else None
    return int(row[0]), sourcefile


def _cluster(url: str) -> tuple[str, str, str] | None:
    """(pg_ctlcluster's path, version, name) of the local cluster behind ``url``, if this process can restart it."""
    host = psycopg.conninfo.conninfo_to_dict(url).get("host") or "localhost"
    if host not in {"127.0.0.1", "localhost", "::1"} and not str(host).startswith("/"):
        return None
    control, listing = shutil.which("pg_ctlcluster"), shutil.which("pg_lsclusters")
    if control is None or listing is None:
        return None
    listed = subprocess.run([listing, "--no-header"], capture_output=True, text=True, check=False)  # noqa: S603 -- a fixed command, by its full path
    clusters = [line.split() for line in listed.stdout.splitlines() if line.split()]
    online = [fields for fields in clusters if len(fields) >= 4 and fields[3] == "online"]
    if len(online) != 1:  # none, or several: which one serves the URL is not known here
        return None
    version, name, _port, _status, owner = online[0][:5]
    if os.geteuid() != 0 and getpass.getuser() != owner:  # pg_ctlcluster needs root or the owner
        return None
    return control, version, name


def _restart(url: str, cluster: tuple[str, str, str]) -> None:
    control, version, name = cluster
    subprocess.run(  # noqa: S603 -- pg_ctlcluster by its full path, on the cluster pg_lsclusters named
        [control, "--skip-systemctl-redirect", version, name, "restart"],
        check=True,
        capture_output=True,
        timeout=RESTART_TIMEOUT,
    )
    end = time.monotonic() + RESTART_TIMEOUT
    while True:
        try:
            with psycopg.connect(url, connect_timeout=2):
                return
        except psycopg.OperationalError:
            if time.monotonic() > end:
                raise
            time.sleep(0.1)


@contextlib.contextmanager
def max_connections_at_least(url: str, wanted: int) -> Iterator[str]:
    """Within the block the server at ``url`` allows ``wanted`` connections, if it can be made to.

    Yields what was done, for the report: ``"max_connections N"`` (enough already), ``"max_connections
    raised from N to M for this measurement, then restored"``, or why it was left as it is.
    """
    current, sourcefile = _settings(url)
    if current >= wanted:
        yield f"max_connections {current}"
        return
    cluster = _cluster(url)
    if cluster is None:
        yield f"max_connections {current}, not raised: the server is not a local cluster this process can restart"
        return
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(f"alter system set max_connections = {int(wanted)}")
    try:
        _restart(url, cluster)
        yield f"max_connections raised from {current} to {wanted} for this measurement (a restart), then restored"
    finally:
        with psycopg.connect(url, autocommit=True) as connection:
            if sourcefile is None:
                connection.execute("alter system reset max_connections")
            else:  # it came from an earlier ALTER SYSTEM: put that value back
                connection.execute(f"alter system set max_connections = {int(current)}")
        _restart(url, cluster)
