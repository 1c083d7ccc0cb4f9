"""Borrow sites recorded cheaply at checkout are still exact when they are looked at later."""

from __future__ import annotations

import sys
from typing import Any

import sqlalchemy as sa

from poolkeeper import Registry


def borrow_and_move_on(engine: sa.Engine) -> tuple[Any, int]:
    """Check out a connection, then run more lines; returns it and the line of the checkout."""
    connection = engine.connect()
    line = sys._getframe().f_lineno - 1
    total = 0
    for number in range(3):  # the frame moves on past the checkout line
        total += number
    return connection, line


def test_a_borrow_site_names_the_checkout_line_after_the_borrower_moved_on():
    """The recorded site is the line that checked out, not where the borrowing function went next."""
    registry = Registry(track_borrowers=True)
    engine = registry.wrap(sa.create_engine("sqlite://"), name="db")
    connection, line = borrow_and_move_on(engine)
    (borrower,) = registry["db"].borrowers()
    assert borrower.site == f"{__file__}:{line}"
    assert borrower.stack is not None
    assert [frame.function for frame in borrower.stack[-2:]] == [
        "test_a_borrow_site_names_the_checkout_line_after_the_borrower_moved_on",
        "borrow_and_move_on",
    ]
    connection.close()
    registry.close()


def test_the_borrowing_thread_is_named():
    """A tracked borrow names the thread that borrowed, and no task outside an event loop."""
    registry = Registry(track_borrowers=True)
    engine = registry.wrap(sa.create_engine("sqlite://"), name="db")
    with engine.connect():
        (borrower,) = registry["db"].borrowers()
    assert borrower.thread == "MainThread"
    assert borrower.task is None
    registry.close()
