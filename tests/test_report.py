"""The shutdown report: counts that add up, a readable table, JSON-safe dictionaries."""

from __future__ import annotations

import json

from poolkeeper import ResourceReport, ShutdownReport
from poolkeeper._borrowers import Borrower, Frame


def sample() -> ShutdownReport:
    leak = Borrower(
        keeper="db",
        borrowed_at=1700000000.0,
        held_seconds=2.5,
        thread="worker-1",
        task=None,
        stack=(Frame("app.py", 10, "main"), Frame("app.py", 42, "handler")),
    )
    return ShutdownReport(
        items=(
            ResourceReport("db", "sqlalchemy", "forced", 2, 1, 1, 1.0, 0.01, None, (leak,), "postgresql://u:***@h/db"),
            ResourceReport("flush", "hook", "clean", close_seconds=0.2),
        ),
        duration=1.25,
        deadline=5.0,
    )


def test_str_is_a_table_with_every_item_and_the_leak_site():
    """str(report) names every item with its outcome, and the force-closed borrower's site."""
    text = str(sample())
    assert text.splitlines()[0] == "poolkeeper shutdown NOT ok in 1.250s"
    rows = [line.split() for line in text.splitlines()[3:5]]
    assert rows[0][:6] == ["db", "sqlalchemy", "forced", "2", "1", "1"]
    assert rows[1][:3] == ["flush", "hook", "clean"]
    assert "app.py:42 in handler" in text


def test_to_dict_round_trips_through_json():
    """to_dict() is JSON-safe and keeps the counts and leak sites."""
    data = json.loads(json.dumps(sample().to_dict()))
    assert data["ok"] is False
    assert data["items"][0]["forced"] == 1
    assert data["items"][0]["leaks"][0]["site"] == "app.py:42"
    assert data["items"][1]["outcome"] == "clean"


def test_lookup_by_name_and_ok():
    """report[name] finds an item; ok is False when anything was forced."""
    report = sample()
    assert report["flush"].ok
    assert not report["db"].ok
    assert not report.ok
    assert len(report) == 2
