"""No DSN password reaches a report, a log record or a repr."""

from __future__ import annotations

import json
import logging
import threading

import pytest
import redis
import sqlalchemy as sa

from poolkeeper import Registry
from poolkeeper._redact import redact
from tests.conftest import sqlalchemy_url

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


PASSPHRASE = "Key-Passphrase-42"


@pytest.mark.parametrize(
    "text",
    [
        # libpq URLs: the password in the authority, secrets in the query string
        f"postgresql://u:{PASSWORD}@h/db?sslmode=disable&sslpassword={PASSPHRASE}",
        f"postgresql://u@h/db?password={PASSWORD}&sslpassword={PASSPHRASE}&sslkey=/k.pem",
        f"postgresql+psycopg://u:{PASSWORD}@h:5432/db?sslpassword={PASSPHRASE}",
        # libpq key=value DSNs, bare and quoted
        f"host=h password={PASSWORD} sslpassword={PASSPHRASE} dbname=x",
        f"host=h password='{PASSWORD} x' sslpassword = '{PASSPHRASE}' dbname=x",
        # redis URLs: password alone, username and password, password in the query
        f"redis://:{PASSWORD}@h:6379/0",
        f"rediss://default:{PASSWORD}@h:6380/1?ssl_password={PASSPHRASE}",
        f"redis://h:6379/0?password={PASSWORD}",
        # other secret-bearing names
        f"ssl_password={PASSPHRASE} client_secret={PASSWORD}",
        f"api_key={PASSWORD}; access_token={PASSPHRASE}",
    ],
)
def test_redact_hides_every_secret_parameter_of_every_dsn_form(text):
    """Passwords, sslpassword, ssl_password, tokens and keys are blanked in URLs, query strings and key=value DSNs."""
    shown = redact(text)
    assert PASSWORD not in shown
    assert PASSPHRASE not in shown
    assert "***" in shown


def test_redact_keeps_what_is_no_secret():
    """File paths (sslkey, passfile), hosts, users and databases stay visible."""
    text = "host=h user=app dbname=x sslkey=/etc/k.pem passfile=/home/app/.pgpass sslmode=verify-full"
    assert redact(text) == text


def test_sslpassword_in_an_engine_url_never_appears_in_reports_or_logs(pg_url, application_name, caplog):
    """With sslpassword and a password in the URL: the table, to_dict() (the report endpoint) and logs show neither."""
    url = sqlalchemy_url(pg_url, "psycopg", password=PASSWORD).update_query_dict(
        {"sslmode": "disable", "sslpassword": PASSPHRASE}
    )
    engine = sa.create_engine(url, connect_args={"application_name": application_name})
    registry = Registry(drain_timeout=0.1)
    with caplog.at_level(logging.DEBUG, logger="poolkeeper"):
        registry.wrap(engine, name="db")
        connection = engine.connect()  # held across close: forced
        report = registry.close()
    connection.close()
    engine.dispose()

    assert report["db"].outcome == "forced"
    assert report["db"].target is not None
    assert "sslpassword=***" in report["db"].target
    shown = [str(report), json.dumps(report.to_dict()), repr(registry["db"]), caplog.text]
    shown += [str(record.__dict__) for record in caplog.records]
    for text in shown:
        assert PASSWORD not in text
        assert PASSPHRASE not in text


def test_asyncpg_and_redis_secrets_include_sslpassword_and_ssl_password():
    """The literal secrets scrubbed from error texts include asyncpg's sslpassword and redis-py's ssl_password."""
    from poolkeeper.adapters.asyncpg import _configured_target  # noqa: PLC0415 -- imports asyncpg

    target, secrets = _configured_target(
        [f"postgresql://u:{PASSWORD}@h:5432/db?sslpassword={PASSPHRASE}"], {"password": "kw-" + PASSWORD}
    )
    assert (target, set(secrets)) == ("h:5432/db", {PASSWORD, PASSPHRASE, "kw-" + PASSWORD})

    client = redis.Redis.from_url(f"rediss://default:{PASSWORD}@h:6380/1", ssl_password=PASSPHRASE)
    registry = Registry()
    registry.wrap(client, name="cache")
    assert set(registry["cache"].driver.secrets()) == {PASSWORD, PASSPHRASE}
    assert registry["cache"].driver.describe() == "rediss://h:6380/1"
    registry.close()
