"""Running blocking calls from the shutdown's loop: a failed call leaves nothing alive behind it."""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref

import pytest

from poolkeeper._concurrency import run_blocking

pytestmark = pytest.mark.asyncio


class Resource:
    """Stands for what a failed call still references when it raises (a cancel request's socket)."""


def _join(name: str) -> None:
    for thread in threading.enumerate():
        if thread.name == name:
            thread.join()


@pytest.mark.parametrize("outcome", ["awaited", "abandoned"])
async def test_a_failed_blocking_call_frees_what_its_error_references_without_the_garbage_collector(outcome):
    """Once a failed call's error is handled (or its wait abandoned), what the call's frames held is freed at once."""
    resources: list[weakref.ref[Resource]] = []
    started = threading.Event()
    release = threading.Event()

    def fail() -> None:
        resource = Resource()
        resources.append(weakref.ref(resource))
        started.set()
        release.wait()
        raise TimeoutError("the server did not answer")

    gc.collect()
    gc.disable()
    try:
        future = run_blocking(fail, name="test-failing-call")
        await asyncio.to_thread(started.wait)
        if outcome == "abandoned":
            future.cancel()
            release.set()
            await asyncio.to_thread(_join, "test-failing-call")
            await asyncio.sleep(0)  # the thread's hand-over runs on the loop
        else:
            release.set()
            with pytest.raises(TimeoutError) as caught:
                await future
            del caught  # the test's own frame must not keep the error alive
            await asyncio.to_thread(_join, "test-failing-call")
        del future
        alive = resources[0]() is not None
    finally:
        gc.enable()
    assert not alive
