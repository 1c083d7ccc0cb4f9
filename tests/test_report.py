"""The shutdown report: counts that add up, a readable table, JSON-safe dictionaries."""

from __future__ import annotations

import contextlib
import json
import logging
import threading

import pytest
import sqlalchemy as sa

from poolkeeper import Registry, ResourceReport, ShutdownReport
from poolkeeper._borrowers import Borrower, Frame
from poolkeeper._budget import Budget, Plan
from tests.waiting import until


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


def forced(leaks: tuple[Borrower, ...]) -> ShutdownReport:
    """A report of one keeper that force-closed ``leaks``."""
    count = len(leaks)
    item = ResourceReport("http", "aiohttp", "forced", count, 0, count, 0.0, 0.2, None, leaks, None, "drain_timeout")
    return ShutdownReport(items=(item,), duration=0.2)


def test_thousands_of_alike_untracked_borrowers_are_one_entry_of_the_text_with_their_count():
    """5,000 forced borrowers with nothing to tell them apart but how long they were held: one entry, not 5,000.

    The text is what the shutdown logs; the report itself keeps every borrower.
    """
    leaks = tuple(
        Borrower("http", 1700000000.0, 1.25 + index / 10_000, None, None, None, forced_by="drain_timeout")
        for index in range(5000)
    )
    report = forced(leaks)
    text = str(report)

    assert text.splitlines()[-2:] == [
        "http: 5000 borrowers, held for 1.250-1.750s; forced by its drain_timeout",
        "  borrow site unknown: enable track_borrowers=True to record it",
    ]
    assert len(report["http"].leaks) == len(report.to_dict()["items"][0]["leaks"]) == 5000


def test_the_text_lists_twenty_entries_of_force_closed_borrowers_and_counts_the_rest():
    """Borrowers that differ (each its own task) are listed up to twenty; the others are counted, not dropped."""
    tasks = [f"request-{index}" for index in range(25)] + ["request-0"]  # the first task borrowed twice
    leaks = tuple(
        Borrower("http", 1700000000.0, 1.0, "MainThread", task, (Frame("app.py", 7, "handler"),)) for task in tasks
    )
    lines = str(forced(leaks)).split("force-closed borrowers:\n", 1)[1].splitlines()

    assert [line for line in lines if not line.startswith("  ")] == [
        "http: 2 borrowers, held for 1.000s by thread MainThread, task request-0",
        *(f"http: held for 1.000s by thread MainThread, task request-{index}" for index in range(1, 20)),
        "... and 5 more in 5 more entries (every one is in the report's leaks and in to_dict())",
    ]


def forced_by_budget() -> ShutdownReport:
    leak = Borrower("db", 1700000000.0, 5.0, "worker-1", None, (Frame("app.py", 42, "handler"),), forced_by="budget")
    return ShutdownReport(
        items=(
            ResourceReport("db", "sqlalchemy", "forced", 1, 0, 1, 0.0, 0.01, None, (leak,), None, "budget"),
            ResourceReport("cache", "redis", "clean"),
        ),
        duration=0.05,
    )


def test_a_borrower_forced_by_the_grace_budget_is_marked_in_the_table_the_borrower_line_and_to_dict():
    """The table gets a 'forced by' column, the borrower's line says 'forced by the grace budget', to_dict says why."""
    report = forced_by_budget()
    lines = str(report).splitlines()
    assert lines[1].split() == [
        "name",
        "kind",
        "outcome",
        "borrowed",
        "returned",
        "forced",
        "forced",
        "by",
        "drain",
        "s",
        "close",
        "s",
        "error",
    ]
    assert lines[3].split()[:7] == ["db", "sqlalchemy", "forced", "1", "0", "1", "budget"]
    assert "db: held for 5.000s by thread worker-1; forced by the grace budget" in lines
    assert "    app.py:42 in handler" in lines
    data = json.loads(json.dumps(report.to_dict()))
    assert (data["items"][0]["forced_by"], data["items"][0]["leaks"][0]["forced_by"]) == ("budget", "budget")
    assert data["items"][1]["forced_by"] is None


def test_a_report_with_nothing_forced_keeps_its_columns():
    """No 'forced by' column when nothing was forced: the table most shutdowns print is unchanged."""
    report = ShutdownReport(items=(ResourceReport("db", "sqlalchemy", "clean"),), duration=0.01)
    assert str(report).splitlines()[1].split() == [
        "name",
        "kind",
        "outcome",
        "borrowed",
        "returned",
        "forced",
        "drain",
        "s",
        "close",
        "s",
        "error",
    ]


def test_a_registry_with_nothing_registered_closes_with_a_printable_report():
    """An empty registry (nothing wrapped, or everything collected) still gives a printable report, ok."""
    report = Registry().close()
    assert report.ok
    assert report.items == ()
    lines = str(report).splitlines()
    assert lines[0].startswith("poolkeeper shutdown ok in ")
    assert lines[1].split()[:3] == ["name", "kind", "outcome"]
    assert lines[3:] == ["(nothing to close)"]


@pytest.mark.parametrize("cause", ["drain_timeout", "deadline", "force_close", "budget"])
def test_the_report_says_what_forced_a_borrowed_connection_closed(make_engine, cause):
    """A connection held on PostgreSQL past the drain is force-closed; the report names the cause and borrow site."""
    registry = Registry(drain_timeout=0.2 if cause == "drain_timeout" else 30.0, close_timeout=2.0)
    engine = registry.wrap(make_engine(), name="db", track_borrowers=True)
    connection = engine.connect()  # held until the end: only a force ends the drain
    connection.execute(sa.text("select 1"))
    budget = None
    report: ShutdownReport | None
    try:
        if cause == "drain_timeout":
            report = registry.close()
        elif cause == "deadline":
            report = registry.close(deadline=0.3)
        elif cause == "force_close":
            report = registry.force_close()
        else:  # grace 3 s - close_timeout 2 s - margin 1 s: the force point is the first signal itself
            budget = Budget(registry, Plan(grace_period=3.0, shutdown_delay=0.0, close_timeout=2.0), lambda: None)
            budget.start()
            until(lambda: registry.report is not None)
            report = registry.report
    finally:
        if budget is not None:
            budget.stop()
        with contextlib.suppress(sa.exc.DBAPIError):
            connection.close()
    assert report is not None
    item = report["db"]
    # "forced", or "failed" when a loaded server did not confirm the cancel within a forced close's 0.1 s: either
    # way the connection was force-closed, and the report says why.
    assert (item.outcome in ("forced", "failed"), item.forced, item.forced_by) == (True, 1, cause)
    assert [leak.forced_by for leak in item.leaks] == [cause]
    assert item.leaks[0].site is not None
    assert "test_report.py" in item.leaks[0].site
    assert "; forced by " in str(report)


def test_a_second_caller_gets_the_report_only_once_it_is_logged():
    """close() from a second thread returns only after the report was logged.

    run() ends the process as soon as its close returns; when a second signal's force-close owns
    the shutdown (a daemon thread, killed by that exit), the report must be logged by then.
    """
    registry = Registry()
    engine = sa.create_engine("sqlite://")  # held: a dropped engine is collected, and its keeper unlisted
    registry.wrap(engine, name="db")
    logging_report = threading.Event()
    release = threading.Event()

    class Holding(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("poolkeeper shutdown"):
                logging_report.set()
                release.wait(10)

    registry_logger = logging.getLogger("poolkeeper.registry")
    handler, level = Holding(), registry_logger.level
    registry_logger.addHandler(handler)
    registry_logger.setLevel(logging.INFO)
    try:
        owner = threading.Thread(target=registry.close)
        owner.start()
        assert logging_report.wait(10)  # the owner is inside the log call now
        second = threading.Thread(target=registry.close)
        second.start()
        second.join(0.5)
        assert second.is_alive()  # it has not got the report: it is not logged yet
        release.set()
        second.join(10)
        owner.join(10)
        assert not second.is_alive()
        assert not owner.is_alive()
    finally:
        release.set()
        registry_logger.removeHandler(handler)
        registry_logger.setLevel(level)
    assert registry.report is not None
    assert registry.report.ok
