"""Borrow sites recorded cheaply at checkout are still exact when they are looked at later."""

from __future__ import annotations

import sys
import tracemalloc
from pathlib import Path
from typing import Any

import sqlalchemy as sa

import poolkeeper
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


def borrow_at_depth(engine: sa.Engine, depth: int) -> tuple[Any, int]:
    """Recurse ``depth`` calls deep, then check out; returns the connection and the line of the checkout."""
    if depth > 0:
        return borrow_at_depth(engine, depth - 1)
    connection = engine.connect()
    return connection, sys._getframe().f_lineno - 1


def test_a_borrow_made_200_frames_deep_keeps_its_line_and_only_a_few_callers():
    """However deep the stack, a tracked borrow names the checkout line and keeps four frames in all."""
    registry = Registry(track_borrowers=True)
    engine = registry.wrap(sa.create_engine("sqlite://"), name="db")
    connection, line = borrow_at_depth(engine, 200)
    (borrower,) = registry["db"].borrowers()
    assert borrower.site == f"{__file__}:{line}"
    assert borrower.stack is not None
    assert [frame.function for frame in borrower.stack] == ["borrow_at_depth"] * 4
    assert borrower.stack[0].lineno == borrower.stack[1].lineno != line  # the callers' own line, the recursion
    connection.close()
    registry.close()


def test_a_tracked_borrow_made_deep_in_the_stack_costs_under_half_a_kibibyte(tmp_path):
    """A tracked borrow held costs poolkeeper under 512 bytes, whatever the depth it was made at."""
    borrows = 300
    engine = sa.create_engine(
        f"sqlite:///{tmp_path / 'borrows.sqlite'}", poolclass=sa.QueuePool, pool_size=borrows, max_overflow=0
    )
    registry = Registry(track_borrowers=True)
    registry.wrap(engine, name="db")
    for connection in [engine.connect() for _ in range(borrows)]:  # every connection opened before measuring
        connection.close()
    package = str(Path(poolkeeper.__file__).parent)
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        held = [borrow_at_depth(engine, 60)[0] for _ in range(borrows)]
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    own = sum(
        stat.size_diff
        for stat in after.compare_to(before, "filename")
        if stat.traceback[0].filename.startswith(package)
    )
    assert 0 < own / borrows < 512  # about 150 B: the entry, its slot, 4 code objects and offsets
    for connection in held:
        connection.close()
    registry.close()
