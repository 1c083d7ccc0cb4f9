"""No DSN password reaches a report, a log record or a repr."""

from __future__ import annotations

import json
import logging
import threading

import sqlalchemy as sa

from poolkeeper import Registry
from poolkeeper._redact import redact

PASSWORD = "pk-Sup3r-s3cret-pw"


def test_password_never_appears_in_reports_logs_or_reprs(make_engine, caplog):
    """A forced shutdown of an engine whose URL has a password shows it nowhere."""
    engine = make_engine(password=PASSWORD)
    registry = Registry(drain_timeout=0.2, track_borrowers=True)
    with caplog.at_level(logging.DEBUG, logger="poolkeeper"):
        registry.wrap(engine, name="db", leak_threshold=0.05)
        checked_out, release = threading.Event(), threading.Event()

        def hold() -> None:
            try:
                with engine.connect() as connection:
                    connection.execute(sa.text("select 1"))
                    checked_out.set()
                    release.wait(10)
            except Exception:  # noqa: S110 -- the forced borrower's error is not under test here
                pass

        thread = threading.Thread(target=hold)
        thread.start()
        assert checked_out.wait(5)
        report = registry.close()
        release.set()
        thread.join(5)

    item = report["db"]
    assert item.outcome == "forced"
    assert item.target is not None
    assert "***" in item.target
    shown = [
        str(report),
        json.dumps(report.to_dict()),
        repr(report),
        repr(registry),
        repr(registry["db"]),
        caplog.text,
        *(str(record.__dict__) for record in caplog.records),
    ]
    for text in shown:
        assert PASSWORD not in text


def test_redact_hides_url_passwords_and_key_values():
    """redact() blanks URL passwords, password= pairs and literal secrets."""
    assert redact("postgresql://u:pw@h/db") == "postgresql://u:***@h/db"
    assert redact("host=h password=pw dbname=x") == "host=h password=*** dbname=x"
    assert redact("redis://:tok@h:6379/1") == "redis://:***@h:6379/1"
    assert redact("error near abc123", ["abc123"]) == "error near ***"
