"""Readiness and liveness, framework-free: answered from state, dependency pings opt-in and cached.

A readiness probe must say whether this process should get traffic, not whether its pools are
idle. So it answers from state (503 once draining, 200 otherwise) in microseconds, even when
every pool connection is borrowed: a busy pool is not a broken one. Dependency pings are
opt-in (``ping=True``); each goes over a side connection of its own (never a pool checkout a
request could use), is bounded by ``ping_timeout``, and its result is cached for
``ping_interval`` seconds, with one ping in flight per keeper shared by every concurrent probe,
so probes cannot load the database. A keeper whose library has no cheap ping reports
``"not checked"``, never ``"ok"``.

A failed ping is cached like a successful one: while a database is down or restarting, every
probe of every pod (the kubelet's, a load balancer's) would otherwise open a new connection to
it, each waiting up to ``ping_timeout``: the storm a recovering server does not need. So a
failure keeps readiness at 503 for ``ping_interval`` seconds and a recovery shows at the first
probe after that. The body says how old each result is (``ping_age``, seconds), so a 503 is
never mistaken for a fresh verdict.

The FastAPI/Starlette routes (``poolkeeper.fastapi``) and any other framework's check use
:class:`HealthCheck`. Only the standard library is imported.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from poolkeeper._redact import redact
from poolkeeper._timeouts import check_timeout

if TYPE_CHECKING:
    from poolkeeper._keeper import Keeper
    from poolkeeper._registry import Registry

__all__ = ["NOT_CHECKED", "PING_INTERVAL", "PING_TIMEOUT", "HealthCheck"]

#: Default seconds a dependency ping may take before it counts as failed.
PING_TIMEOUT = 1.0
#: Default seconds a ping result is reused before the next probe pings again.
PING_INTERVAL = 10.0
#: What a keeper whose library has no cheap ping reports.
NOT_CHECKED = "not checked"
OK = "ok"


class _PingCache:
    """The last ping result of one keeper, and the ping in flight that every probe shares."""

    __slots__ = ("at", "in_flight", "result")

    def __init__(self) -> None:
        self.result: str | None = None
        self.at = 0.0
        self.in_flight: asyncio.Task[str] | None = None


class HealthCheck:
    """Readiness and liveness of one registry.

    Args:
        registry: the registry whose state is reported.
        ping: ping each keeper's server on readiness probes (opt-in).
        ping_timeout: seconds a ping may take before it counts as failed.
        ping_interval: seconds a ping result, failed or not, is reused; probes in between do not ping.

    Raises:
        TypeError: ``ping`` is not a bool, or a timeout is not a number.
        ValueError: ``ping_timeout`` is not positive, or ``ping_interval`` is negative, NaN or infinite.
    """

    def __init__(
        self,
        registry: Registry,
        *,
        ping: bool = False,
        ping_timeout: float = PING_TIMEOUT,
        ping_interval: float = PING_INTERVAL,
    ) -> None:
        if not isinstance(ping, bool):
            raise TypeError(f"ping must be True or False, got {ping!r}")
        timeout = check_timeout("ping_timeout", ping_timeout, allow_none=False)
        if not timeout:
            raise ValueError(f"ping_timeout must be a positive number of seconds, got {ping_timeout!r}")
        self.registry = registry
        self.ping = ping
        self.ping_timeout = timeout
        self.ping_interval: float = check_timeout("ping_interval", ping_interval, allow_none=False)  # type: ignore[assignment]
        self._pings: dict[str, _PingCache] = {}

    def state(self) -> tuple[int, dict[str, Any]]:
        """Readiness from state alone (no I/O): 503 ``"draining"`` once shutdown was requested, else 200."""
        keepers = self.registry.keepers
        body = {k.name: _keeper_body(k) for k in keepers}
        if self.registry.draining:
            return 503, {"status": "draining", "keepers": body}
        return 200, {"status": "ready", "keepers": body}

    async def readiness(self) -> tuple[int, dict[str, Any]]:
        """``(status, body)``: :meth:`state`, plus the cached pings when ``ping`` is on.

        A failed ping makes readiness 503 ``"unavailable"``; ``"not checked"`` does not.
        """
        status, body = self.state()
        if not self.ping or self.registry.draining:
            return status, body
        keepers = self.registry.keepers
        pinged = await asyncio.gather(*(self._cached_ping(k) for k in keepers))
        now = time.monotonic()
        for keeper, (result, at) in zip(keepers, pinged, strict=True):
            shown = body["keepers"][keeper.name]
            shown["ping"] = result
            if at is not None:
                shown["ping_age"] = round(max(0.0, now - at), 3)
        if any(result not in (OK, NOT_CHECKED) for result, _ in pinged):
            return 503, {**body, "status": "unavailable"}
        return status, body

    @staticmethod
    def liveness(registry: Registry) -> tuple[int, dict[str, Any]]:
        """``(200, {"status": "alive", "draining": ...})``: the process lives, draining or not."""
        return 200, {"status": "alive", "draining": registry.draining}

    async def _cached_ping(self, keeper: Keeper) -> tuple[str, float | None]:
        """The keeper's ping result (failures included) and when it was taken, pinging only once it is stale."""
        if not keeper.driver.can_ping:
            return NOT_CHECKED, None
        cache = self._pings.setdefault(keeper.name, _PingCache())
        if cache.result is not None and time.monotonic() - cache.at < self.ping_interval:
            return cache.result, cache.at
        task = cache.in_flight
        if task is None or task.get_loop() is not asyncio.get_running_loop():
            task = asyncio.ensure_future(self._ping(keeper, cache))
            cache.in_flight = task
        # Shielded: a probe whose client hung up must not cancel the ping the others wait for.
        result = await asyncio.shield(task)
        return result, cache.at

    async def _ping(self, keeper: Keeper, cache: _PingCache) -> str:
        try:
            await asyncio.wait_for(keeper.driver.ping(), self.ping_timeout)
        except asyncio.TimeoutError:
            result = f"failed: no answer within {self.ping_timeout:g}s"
        except Exception as error:  # noqa: BLE001 -- any failure means "not ready"; its text is shown redacted
            result = "failed: " + redact(f"{type(error).__name__}: {error}", keeper.driver.secrets())
        else:
            result = OK
        cache.result, cache.at, cache.in_flight = result, time.monotonic(), None
        return result


def _keeper_body(keeper: Keeper) -> dict[str, Any]:
    return {"kind": keeper.kind, "state": keeper.state.value, "borrowed": keeper.borrowed}
