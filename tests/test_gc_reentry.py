"""The garbage collector returning a connection at any point of poolkeeper's own code never deadlocks it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PROGRAM = Path(__file__).parent / "programs" / "gc_every_line_program.py"
SPARES = 20
UNSEEN = 1500


@pytest.mark.parametrize("tracked", [True, False], ids=["tracked", "untracked"])
def test_a_collection_at_every_line_of_borrowers_and_close_never_deadlocks(tmp_path: Path, *, tracked: bool) -> None:
    """A connection collected at any line poolkeeper runs in borrowers() and close() is counted; close() returns."""
    url = f"sqlite:///{tmp_path / 'gc.sqlite'}"
    try:
        done = subprocess.run(
            [sys.executable, str(PROGRAM), url, "1" if tracked else "0", str(SPARES), str(UNSEEN)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except subprocess.TimeoutExpired as expired:
        pytest.fail(f"deadlocked: a finaliser re-entered the keeper's lock\n{expired.stderr!r}"[-4000:])
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["ran_out"] == 0  # every line visited had a fresh connection to collect
    assert result["borrowers_lines"] > 0
    assert result["close_lines"] > 500  # the whole close path: drain, force, close, report
    assert result["state"] == "closed"
    assert result["checked_out"] == 0  # every collected connection went back to the pool
    # Each borrow out at the start of closing was either counted back or force-closed: no
    # return deferred out of a critical section was lost.
    assert result["returned"] + result["forced"] == SPARES + 1
    assert result["forced"] >= 1
    if tracked:  # every collected borrow the keeper lent is reported as a leak, deferred or not
        assert result["leaked"] - result["leaked_unseen"] == result["gc_leaks"]
