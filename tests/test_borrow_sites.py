"""Borrow sites recorded cheaply at checkout are still exact when they are looked at later."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import threading
import time
import tracemalloc
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import redis.asyncio
import sqlalchemy as sa
from sqlalchemy.orm import Session

import poolkeeper
from poolkeeper import Registry
from tests.conftest import callers_at_checkout
from tests.faults.fake_driver import FakePool, fake_adapter
from tests.test_redis_keeper import CHECKOUT_ARGS

if TYPE_CHECKING:
    from collections.abc import Iterator


@pytest.fixture
def callers_recorded() -> Iterator[None]:
    """Tracked checkouts record their callers too, as under the pytest plugin, whatever plugins run."""
    with callers_at_checkout(on=True):
        yield


def borrow_and_move_on(engine: sa.Engine) -> tuple[Any, int]:
    """Check out a connection, then run more lines; returns it and the line of the checkout."""
    connection = engine.connect()
    line = sys._getframe().f_lineno - 1
    total = 0
    for number in range(3):  # the frame moves on past the checkout line
        total += number
    return connection, line


@pytest.mark.parametrize(
    ("recorded", "functions"),
    [
        (True, ["test_a_borrow_site_names_the_checkout_line_after_the_borrower_moved_on", "borrow_and_move_on"]),
        (False, ["borrow_and_move_on"]),
    ],
    ids=["callers-recorded", "callers-read-later"],
)
def test_a_borrow_site_names_the_checkout_line_after_the_borrower_moved_on(recorded, functions):
    """The recorded site is the line that checked out, not where the borrowing function went next.

    Its callers are gone from every stack by the time it is looked at: they are shown only if the
    checkout recorded them (record_callers, the pytest plugin's setting).
    """
    registry = Registry(track_borrowers=True)
    engine = registry.wrap(sa.create_engine("sqlite://"), name="db")
    with callers_at_checkout(on=recorded):
        connection, line = borrow_and_move_on(engine)
    (borrower,) = registry["db"].borrowers()
    assert borrower.site == f"{__file__}:{line}"
    assert [frame.function for frame in borrower.stack or ()][-2:] == functions
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


def test_borrow_sites_stay_exact_when_checkouts_alternate_between_library_call_chains():
    """Core checkouts (engine frames), ORM ones (session, then engine frames) and the pool's own, in turns.

    Whichever chain of library frames came before, every borrow names its own line, also one
    made right above the pool, with no library frame in between (nothing judged about the
    frames of one checkout may carry over to the next).
    """
    registry = Registry(track_borrowers=True)
    engine = registry.wrap(sa.create_engine("sqlite://", poolclass=sa.QueuePool, pool_size=6), name="db")
    held: list[tuple[Any, int]] = []
    for _ in range(2):
        held.append((engine.connect(), sys._getframe().f_lineno))
        held.append((engine.pool.connect(), sys._getframe().f_lineno))
        session = Session(engine)
        held.append((session, sys._getframe().f_lineno + 1))
        session.connection()  # the ORM's checkout: Session, then Engine, frames above the pool
    sites = sorted(str(borrower.site) for borrower in registry["db"].borrowers())
    assert sites == sorted(f"{__file__}:{line}" for _, line in held)
    for borrowed, _ in held:
        borrowed.close()
    registry.close()


def borrow_at_depth(engine: sa.Engine, depth: int) -> tuple[Any, int]:
    """Recurse ``depth`` calls deep, then check out; returns the connection and the line of the checkout."""
    if depth > 0:
        return borrow_at_depth(engine, depth - 1)
    connection = engine.connect()
    return connection, sys._getframe().f_lineno - 1


@pytest.mark.usefixtures("callers_recorded")
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


@pytest.mark.usefixtures("callers_recorded")
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


# -- callers read when the borrow is looked at (record_callers off: a production process) --------


@pytest.fixture
def callers_read_later() -> Iterator[None]:
    """Tracked checkouts record their borrowing line alone, as outside pytest (the plugin turns it on)."""
    with callers_at_checkout(on=False):
        yield


def hold_in_thread(engine: sa.Engine, held: threading.Event, release: threading.Event, lines: list[int]) -> None:
    """Check out, say so, and keep the connection until told to give it back."""
    with engine.connect():
        lines.append(sys._getframe().f_lineno - 1)
        held.set()
        release.wait(timeout=30)


def thread_target(engine: sa.Engine, held: threading.Event, release: threading.Event, lines: list[int]) -> None:
    hold_in_thread(engine, held, release, lines)


@pytest.mark.usefixtures("callers_read_later")
def test_a_thread_still_holding_shows_its_callers_read_from_its_stack():
    """Looked at from another thread while the borrower is inside the borrowing function: the callers are there."""
    registry = Registry(track_borrowers=True)
    engine = registry.wrap(sa.create_engine("sqlite://"), name="db")
    held, release = threading.Event(), threading.Event()
    lines: list[int] = []
    borrower_thread = threading.Thread(
        target=thread_target, args=(engine, held, release, lines), name="holder", daemon=True
    )
    borrower_thread.start()
    try:
        assert held.wait(timeout=30)
        (borrower,) = registry["db"].borrowers()
    finally:
        release.set()
        borrower_thread.join(timeout=30)
    assert borrower.thread == "holder"
    assert borrower.site == f"{__file__}:{lines[0]}"  # the checkout line, not the line waiting now
    assert [frame.function for frame in borrower.stack or ()] == ["thread_target", "hold_in_thread"]
    registry.close()


@pytest.mark.usefixtures("callers_read_later")
def test_a_borrower_looking_at_its_own_borrow_sees_its_callers():
    """The borrowing thread's own stack, from inside the borrowing function, gives the callers."""
    registry = Registry(track_borrowers=True)
    engine = registry.wrap(sa.create_engine("sqlite://"), name="db")

    def look_while_holding() -> tuple[Any, int]:
        with engine.connect():
            line = sys._getframe().f_lineno - 1
            (borrower,) = registry["db"].borrowers()
        return borrower, line

    borrower, line = look_while_holding()
    assert borrower.site == f"{__file__}:{line}"
    assert [frame.function for frame in borrower.stack or ()][-2:] == [
        "test_a_borrower_looking_at_its_own_borrow_sees_its_callers",
        "look_while_holding",
    ]
    registry.close()


@pytest.mark.usefixtures("callers_read_later")
def test_a_borrow_held_200_frames_deep_shows_its_line_and_three_callers():
    """However deep the borrower's stack, the view keeps the borrowing line and three callers."""
    registry = Registry(track_borrowers=True)
    engine = registry.wrap(sa.create_engine("sqlite://"), name="db")
    seen: list[Any] = []

    def look(depth: int) -> None:
        if depth > 0:
            look(depth - 1)
            return
        with engine.connect():
            seen.append(sys._getframe().f_lineno - 1)
            seen.extend(registry["db"].borrowers())

    look(200)
    line, borrower = seen
    assert borrower.site == f"{__file__}:{line}"
    assert [frame.function for frame in borrower.stack] == ["look"] * 4
    registry.close()


async def hold_in_task(pool: Any, held: asyncio.Event, release: asyncio.Event, lines: list[int]) -> None:
    """Check out of a redis.asyncio pool, say so, and keep the connection until told to give it back."""
    connection = await pool.get_connection(*CHECKOUT_ARGS)
    lines.append(sys._getframe().f_lineno - 1)
    try:
        held.set()
        await release.wait()
    finally:
        await pool.release(connection)


async def task_body(pool: Any, held: asyncio.Event, release: asyncio.Event, lines: list[int]) -> None:
    await hold_in_task(pool, held, release, lines)


@pytest.mark.asyncio
@pytest.mark.usefixtures("callers_read_later")
async def test_a_task_still_holding_shows_its_callers_read_from_its_awaits(redis_url):
    """A suspended task's borrow shows the coroutines that led to the borrowing line, outermost first."""
    registry = Registry(track_borrowers=True)
    client = registry.wrap(redis.asyncio.Redis.from_url(redis_url), name="cache")
    held, release = asyncio.Event(), asyncio.Event()
    lines: list[int] = []
    task = asyncio.create_task(task_body(client.connection_pool, held, release, lines), name="holder-task")
    try:
        await asyncio.wait_for(held.wait(), timeout=30)
        (borrower,) = registry["cache"].borrowers()
    finally:
        release.set()
        await task
    assert borrower.task == "holder-task"
    assert borrower.site == f"{__file__}:{lines[0]}"
    assert [frame.function for frame in borrower.stack or ()] == ["task_body", "hold_in_task"]
    await registry.aclose()
    await client.aclose()


class Parking:
    """Where borrowing threads wait, holding their connections, until released.

    :meth:`wait_all_parked` returns once every one of them is blocked in its wait, not merely
    past a barrier: 2,000 threads woken together by a barrier take the GIL from each other (and
    from the closer being timed) for seconds before they are all waiting again.
    """

    def __init__(self, count: int) -> None:
        self.count = count
        self._lock = threading.Lock()
        self._all_parked = threading.Condition(self._lock)
        self._released = threading.Condition(self._lock)
        self._parked = 0
        self._go = False

    def park(self) -> None:
        """Wait until :meth:`release`; counted as parked only once the lock is given up by the wait."""
        with self._lock:
            self._parked += 1
            if self._parked == self.count:
                self._all_parked.notify()
            self._released.wait_for(lambda: self._go)

    def wait_all_parked(self, timeout: float) -> bool:
        # The lock is free only while every thread counted is inside its wait.
        with self._lock:
            return self._all_parked.wait_for(lambda: self._parked == self.count, timeout)

    def release(self) -> None:
        with self._lock:
            self._go = True
            self._released.notify_all()


def hold_until(pool: FakePool, parking: Parking) -> None:
    """Borrow, and hold the connection, parked, until released."""
    handle = pool.checkout()
    parking.park()
    handle.give_back()


@pytest.mark.usefixtures("callers_read_later")
def test_force_closing_the_borrows_of_2000_threads_reads_their_stacks_once():
    """Each view of a thread's borrow reads that thread's stack; one forced close reads them all at once.

    Read per borrow, the stacks of every thread (``sys._current_frames()``) made the force-close
    of n borrowing threads cost n²: 1.73 s for 2,000 threads here, before it returned.
    """
    threads = 2000
    with fake_adapter():
        registry = Registry(track_borrowers=True, drain_timeout=0)
        pool = registry.wrap(FakePool(), name="fake")
        parking = Parking(threads)
        borrowers = [
            threading.Thread(target=hold_until, args=(pool, parking), name=f"worker-{n}", daemon=True)
            for n in range(threads)
        ]
        try:
            for borrower in borrowers:
                borrower.start()
            assert parking.wait_all_parked(timeout=60)
            started = time.monotonic()
            report = registry.close()
            took = time.monotonic() - started
        finally:
            parking.release()
            for borrower in borrowers:
                borrower.join(timeout=60)
    (item,) = report.items
    assert item.forced == threads
    # Every forced borrower still names its thread and the caller read from that thread's stack.
    assert {leak.thread for leak in item.leaks} == {f"worker-{n}" for n in range(threads)}
    assert all([frame.function for frame in leak.stack or ()] == ["hold_until"] for leak in item.leaks)
    assert took < 1.0, f"the forced close of {threads} borrowing threads took {took:.2f} s"


# -- which task borrowed: the event loop running in the borrowing thread, whatever ran before ------


def borrowing_task(registry: Registry) -> str | None:
    """The task named by the one borrow out of the keeper named ``fake``."""
    (borrower,) = registry["fake"].borrowers()
    return borrower.task


def borrow_in_a_new_loop(registry: Registry, pool: FakePool, task_name: str) -> str | None:
    """In a new event loop of this thread, borrow inside a task named ``task_name``; the task the borrow names."""

    async def borrow() -> str | None:
        handle = pool.checkout()
        try:
            return borrowing_task(registry)
        finally:
            handle.give_back()

    async def main() -> str | None:
        return await asyncio.create_task(borrow(), name=task_name)

    return asyncio.run(main())


def test_two_threads_taking_turns_with_their_own_event_loops_each_name_their_own_task():
    """Borrows alternating between two threads' event loops each name the task that borrowed."""
    with fake_adapter():
        registry = Registry(track_borrowers=True)
        pool = registry.wrap(FakePool(), name="fake")
        turns = [threading.Semaphore(0), threading.Semaphore(0)]
        named: list[tuple[int, str | None]] = []

        async def borrow_each_turn(me: int) -> None:
            for _ in range(3):
                assert turns[me].acquire(timeout=30), "the other thread never handed over"
                handle = pool.checkout()  # in this task's step: this thread's loop runs it
                named.append((me, borrowing_task(registry)))
                handle.give_back()
                turns[1 - me].release()

        def run(me: int) -> None:
            async def main() -> None:
                await asyncio.create_task(borrow_each_turn(me), name=f"thread-{me}-task")

            asyncio.run(main())

        threads = [threading.Thread(target=run, args=(me,)) for me in (0, 1)]
        for thread in threads:
            thread.start()
        turns[0].release()
        for thread in threads:
            thread.join(timeout=60)
        registry.close()
    assert named == [(me, f"thread-{me}-task") for _ in range(3) for me in (0, 1)]


def test_a_thread_borrowing_while_another_threads_loop_runs_a_task_names_no_task():
    """A plain thread's borrow names no task, even while a task runs on another thread's loop."""
    with fake_adapter():
        registry = Registry(track_borrowers=True)
        pool = registry.wrap(FakePool(), name="fake")
        named: list[str | None] = []

        def borrow_in_thread() -> None:
            handle = pool.checkout()
            named.append(borrowing_task(registry))
            handle.give_back()

        async def main() -> None:
            pool.checkout().give_back()  # a borrow on this loop first: the one a later borrow may find
            other = threading.Thread(target=borrow_in_thread)
            other.start()
            other.join(timeout=30)  # blocks inside this task's step: its task runs all along

        asyncio.run(main())
        registry.close()
    assert named == [None]


def test_a_borrow_on_a_later_event_loop_of_the_same_thread_names_that_loops_task():
    """``asyncio.run()`` twice in one thread: each borrow names the task of the loop running then."""
    with fake_adapter():
        registry = Registry(track_borrowers=True)
        pool = registry.wrap(FakePool(), name="fake")
        first = borrow_in_a_new_loop(registry, pool, "first-run")
        second = borrow_in_a_new_loop(registry, pool, "second-run")
        handle = pool.checkout()  # and no loop at all after them
        after = borrowing_task(registry)
        handle.give_back()
        registry.close()
    assert (first, second, after) == ("first-run", "second-run", None)


def test_an_event_loop_a_tracked_borrow_ran_on_is_not_kept_alive_once_dropped():
    """The loop a tracked checkout last saw is not kept: dropped, it is freed (and warns if left unclosed)."""
    with fake_adapter():
        registry = Registry(track_borrowers=True)
        pool = registry.wrap(FakePool(), name="fake")
        loop = asyncio.new_event_loop()

        async def borrow() -> None:
            pool.checkout().give_back()

        loop.run_until_complete(loop.create_task(borrow(), name="on-a-loop-dropped-later"))
        gone = weakref.ref(loop)
        del loop  # left unclosed, as a careless program does: asyncio's ResourceWarning says so
        with pytest.warns(ResourceWarning, match="unclosed event loop"):
            gc.collect()
        registry.close()
    assert gone() is None


FORKED_BORROW = """
import asyncio, os, sys
from poolkeeper import Registry
from tests.faults.fake_driver import FakePool, fake_adapter
from tests.test_borrow_sites import borrow_in_a_new_loop, borrowing_task

with fake_adapter():
    registry = Registry(track_borrowers=True)
    pool = registry.wrap(FakePool(), name="fake")

    async def parent() -> None:
        handle = pool.checkout()
        assert borrowing_task(registry) == "parent-task"
        handle.give_back()
        pid = os.fork()  # inside the parent task's step, its loop running
        if pid == 0:
            named = borrow_in_a_new_loop(registry, pool, "child-task")
            os.write(1, f"child borrow named {named}\\n".encode())
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, status

    async def main() -> None:
        await asyncio.create_task(parent(), name="parent-task")

    asyncio.run(main())
"""


def run_program(source: str) -> subprocess.CompletedProcess[str]:
    """Run ``source`` in a Python process of its own, from the repository's root; a hang of 60 s fails the test."""
    try:
        return subprocess.run(
            [sys.executable, "-c", source],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent.parent,
            timeout=60,
            check=False,
        )
    except subprocess.TimeoutExpired as timed_out:
        pytest.fail(f"the program hung for 60 s; its output: {timed_out.stdout!r} {timed_out.stderr!r}")


def test_a_child_forked_inside_a_task_names_its_own_task_not_the_parents():
    """The child of a fork made inside a running task borrows in a loop of its own and names that loop's task."""
    completed = run_program(FORKED_BORROW)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.splitlines() == ["child borrow named child-task"], completed.stdout + completed.stderr


# A collection inside sys._current_frames() that frees a threading.local deadlocks CPython before
# 3.11.9 and 3.12.3 (python/cpython#106883): the function holds the interpreter's thread-list lock
# while it makes a frame object per thread, and the local's deallocation takes that lock again.
# Each collection here leaves such a local behind for the next, and a threshold of 1 starts one
# at the first allocation: inside sys._current_frames() itself, unless the collector is paused.
COLLECTION_DURING_THE_STACK_READ = """
import gc, threading
from poolkeeper import Registry
from tests.faults.fake_driver import FakePool, fake_adapter

def cyclic_local(phase, info):
    if phase == "stop":
        local = threading.local()
        local.itself = local  # garbage once this returns: for the next collection to free

def hold(pool, held, release):
    handle = pool.checkout()
    held.wait()
    release.wait()
    handle.give_back()

with fake_adapter():
    registry = Registry(track_borrowers=True, drain_timeout=0)
    pool = registry.wrap(FakePool(), name="fake")
    held, release = threading.Barrier(21), threading.Event()
    threads = [threading.Thread(target=hold, args=(pool, held, release), daemon=True) for _ in range(20)]
    for thread in threads:
        thread.start()
    held.wait()
    gc.callbacks.append(cyclic_local)
    gc.set_threshold(1)
    report = registry.close()  # the views of the forced borrows read every thread's stack
    gc.set_threshold(700)
    gc.callbacks.remove(cyclic_local)
    release.set()
    print("forced", report.items[0].forced, "stacks", sum(1 for leak in report.items[0].leaks if leak.stack))
"""


def test_a_garbage_collection_while_the_stacks_of_forced_borrowers_are_read_does_not_deadlock():
    """The force-close reads every thread's stack with the collector paused: no collection can deadlock it."""
    completed = run_program(COLLECTION_DURING_THE_STACK_READ)  # hung in sys._current_frames() before the fix
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.splitlines() == ["forced 20 stacks 20"], completed.stdout + completed.stderr
