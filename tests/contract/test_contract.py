"""The shared behaviour suite: refuse, wake, drain, force, report, the same for every adapter.

Each test runs once per case of ``tests/contract/cases`` (every built-in adapter and the
third-party one of ``integrations/socketpool``), against the real server of its library.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from poolkeeper import KeeperState, PoolClosedError, Registry
from tests.conftest import callers_at_checkout
from tests.contract.cases import all_cases
from tests.contract.harness import SIZE, AdapterCase, Subject, settle
from tests.waiting import auntil

pytestmark = pytest.mark.asyncio

CASES = all_cases()
# Generous bounds for a loaded 2-core machine; each is far below the drain timeout it is set
# against, so that meeting it proves an event woke the closer, not a timeout.
LONG_DRAIN = 30.0
PROMPT = 5.0


@pytest.fixture(params=CASES, ids=str)
def case(request: pytest.FixtureRequest) -> AdapterCase:
    adapter_case: AdapterCase = request.param
    return adapter_case


@pytest_asyncio.fixture
async def subject(case: AdapterCase, request: pytest.FixtureRequest) -> AsyncIterator[Subject]:
    """The case's pool for this test, registered adapter included; cleaned up afterwards."""
    if case.register is not None:
        case.register()
    made = await case.make(request)
    try:
        yield made
    finally:
        await made.close()
        if case.unregister is not None:
            case.unregister()


async def start_closing(registry: Registry, name: str) -> asyncio.Future[object]:
    """``registry.aclose()`` in a task, returned once the keeper refuses checkouts."""
    closing: asyncio.Future[object] = asyncio.ensure_future(registry.aclose())
    await auntil(lambda: registry[name].state is not KeeperState.OPEN or closing.done())
    return closing


async def test_a_checkout_is_refused_once_closing_starts(case: AdapterCase, subject: Subject):
    """From closing on, a checkout raises PoolClosedError, which is also the library's own error; held ones finish."""
    registry = Registry(drain_timeout=LONG_DRAIN)
    registry.wrap(subject.resource, name="subject")
    holder = subject.hold()
    await holder.wait_lent()

    closing = await start_closing(registry, "subject")
    refused = await subject.borrow_once().outcome(PROMPT)
    assert isinstance(refused, PoolClosedError), repr(refused)
    assert isinstance(refused, case.library_error)
    assert refused.keeper == "subject"
    assert refused.state == "draining"
    assert registry["subject"].refused >= 1

    holder.release()
    assert await holder.outcome() is None  # the borrow in flight finished normally
    report = await asyncio.wait_for(closing, PROMPT)
    assert report["subject"].outcome == "clean"  # type: ignore[index]
    after = await subject.borrow_once().outcome(PROMPT)
    assert isinstance(after, PoolClosedError)
    assert after.state == "closed"


async def test_borrowers_queued_in_the_library_are_woken_at_once(case: AdapterCase, subject: Subject):
    """With every connection out, a borrower waiting in the library is refused as closing starts, not at a timeout.

    Where the library admitted it before closing (an HTTP request queued for a connection), it
    is drained instead: it completes once a connection comes back, and is counted as returned.
    """
    registry = Registry(drain_timeout=LONG_DRAIN)
    registry.wrap(subject.resource, name="subject")
    holders = [subject.hold() for _ in range(SIZE)]
    for holder in holders:
        await holder.wait_lent()
    waiter = subject.borrow_once()
    await auntil(lambda: subject.queued() == 1)

    started = time.monotonic()
    closing = await start_closing(registry, "subject")
    if case.queued_are_refused:
        error = await waiter.outcome(PROMPT)
        assert isinstance(error, PoolClosedError), repr(error)
        assert isinstance(error, case.library_error)
        assert time.monotonic() - started < PROMPT
        assert not any(holder.done.done() for holder in holders)  # the holders were left alone
    for holder in holders:
        holder.release()
        assert await holder.outcome() is None
    if not case.queued_are_refused:
        assert await waiter.outcome(PROMPT) is None
    report = (await asyncio.wait_for(closing, PROMPT))["subject"]  # type: ignore[index]
    assert report.outcome == "clean"
    assert report.returned == SIZE + (0 if case.queued_are_refused else 1)
    assert report.forced == 0


async def test_a_clean_drain_waits_for_the_last_return_then_closes_every_connection(subject: Subject):
    """The close waits while any borrow is out, returns as soon as the last comes back, and leaves no connection."""
    registry = Registry(drain_timeout=LONG_DRAIN)
    registry.wrap(subject.resource, name="subject")
    first, second = subject.hold(), subject.hold()
    await first.wait_lent()
    await second.wait_lent()
    assert await settle(lambda: subject.server_connections() == SIZE)

    closing = await start_closing(registry, "subject")
    first.release()
    assert await first.outcome() is None
    await auntil(lambda: registry["subject"].borrowed == 1)
    assert not closing.done()  # one borrow is still out: the drain goes on

    second.release()
    returned_at = time.monotonic()
    report = (await asyncio.wait_for(closing, PROMPT))["subject"]  # type: ignore[index]
    assert time.monotonic() - returned_at < PROMPT  # woken by the return, not by the 30 s drain timeout
    assert await second.outcome() is None
    assert (report.outcome, report.borrowed_at_start, report.returned, report.forced) == ("clean", 2, 2, 0)
    assert report.leaks == ()
    assert registry["subject"].state is KeeperState.CLOSED
    assert await settle(lambda: subject.server_connections() == 0), "connections left open on the server"


async def test_the_deadline_force_closes_borrows_on_the_client_and_the_server(case: AdapterCase, subject: Subject):
    """A borrow still out at the drain deadline is force-closed: its borrower fails, nothing is left on the server."""
    drain = 0.5
    registry = Registry(drain_timeout=drain, close_timeout=5.0)
    registry.wrap(subject.resource, name="subject")
    busy = subject.hold_busy()
    await busy.wait_lent()
    assert await settle(lambda: subject.server_busy() == 1), "the operation never ran on the server"

    started = time.monotonic()
    report = (await registry.aclose())["subject"]
    assert time.monotonic() - started < drain + PROMPT
    assert (report.outcome, report.borrowed_at_start, report.returned, report.forced) == ("forced", 1, 0, 1)
    assert len(report.leaks) == 1
    error = await busy.outcome(PROMPT)
    assert error is not None, "the borrower's operation went on as if nothing happened"
    if case.cancels_server_work:
        assert await settle(lambda: subject.server_busy() == 0), "the operation still runs on the server"
    assert await settle(lambda: subject.server_connections() == 0), "connections left open on the server"


@pytest.mark.parametrize("recorded", [True, False], ids=["callers-recorded", "callers-read-later"])
async def test_the_report_names_the_borrow_site_and_no_secret(
    case: AdapterCase, subject: Subject, caplog: pytest.LogCaptureFixture, recorded: bool
):
    """The report shows the keeper's kind, target and the forced borrower's site; no secret in it or in the logs.

    Both ways a tracked checkout can run: recording its callers (the pytest plugin's setting),
    and recording the borrowing line alone (a production process's).
    """
    with callers_at_checkout(on=recorded):
        await _report_names_the_borrow_site_and_no_secret(case, subject, caplog)


async def _report_names_the_borrow_site_and_no_secret(
    case: AdapterCase, subject: Subject, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="poolkeeper")
    registry = Registry(drain_timeout=0.3, close_timeout=5.0)
    registry.wrap(subject.resource, name="reported", track_borrowers=True)
    busy = subject.hold_busy()
    await busy.wait_lent()
    assert await settle(lambda: subject.server_busy() == 1), "the operation never ran on the server"

    report = await registry.aclose()
    await busy.outcome(PROMPT)
    item = report["reported"]
    assert (item.name, item.kind, item.outcome) == ("reported", case.kind, "forced")
    assert not report.ok
    assert item.target
    site = item.leaks[0].site
    assert site is not None
    assert "tests/contract/cases/" in site, site  # where the case's borrower checked out, not library code
    texts = [str(report), json.dumps(report.to_dict()), *(record.getMessage() for record in caplog.records)]
    assert any("reported" in text and case.kind in text for text in texts)
    if subject.secret is not None:
        assert subject.secret in registry["reported"].driver.secrets()  # really in the configuration
        for text in texts:
            assert subject.secret not in text
