"""OpenTelemetry metrics: observable instruments that read every keeper of a registry at collection.

Needs ``opentelemetry-api`` only (``pip install 'poolkeeper[otel]'``); the application brings
the SDK and its exporters. Nothing is counted on the checkout path: each collection reads what
the keepers know (their state, borrowed and idle connections, refusals, and the report of their
close once closed).

For database keepers (SQLAlchemy, asyncpg, redis-py), the semantic-convention instrument
``db.client.connection.count`` (``{connection}``), with the attributes
``db.client.connection.pool.name`` (the keeper's name) and ``db.client.connection.state``
(``used``, and ``idle`` where the library counts them).

For every keeper, with the attributes ``poolkeeper.keeper.name`` and ``poolkeeper.keeper.kind``:

- ``poolkeeper.keeper.state`` (up-down counter, ``1``): 1 for the ``poolkeeper.keeper.state``
  the keeper is in, 0 for the other states;
- ``poolkeeper.refused_checkouts`` (counter, ``{checkout}``): checkouts refused since closing
  started;
- ``poolkeeper.forced_closes`` (counter, ``{connection}``): connections force-closed at the
  drain deadline;
- ``poolkeeper.drain.duration`` and ``poolkeeper.close.duration`` (histograms, ``s``): how long
  the keeper's drain, and its force-close and close, took.

A keeper's durations are recorded once, by the first collection after it closed (OpenTelemetry
has no observable histogram). Exported to Prometheus these instruments become
``poolkeeper_refused_checkouts_total``, ``poolkeeper_drain_duration_seconds``...: the names
:mod:`poolkeeper.prometheus` uses. No URL, host or password is ever an attribute.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

from poolkeeper import __version__
from poolkeeper._keeper import KeeperState
from poolkeeper._registry import Registry, get_registry

try:
    from opentelemetry.metrics import Observation, get_meter
except ImportError as error:  # pragma: no cover -- proven by a subprocess test
    raise ImportError("poolkeeper.otel needs opentelemetry-api: pip install 'poolkeeper[otel]'") from error

if TYPE_CHECKING:
    from collections.abc import Iterator

    from opentelemetry.metrics import CallbackOptions, Histogram, MeterProvider

    from poolkeeper._keeper import Keeper

__all__ = ["DATABASE_KINDS", "instrument"]

#: Keeper kinds whose connections are database connections (``db.client.connection.*``).
DATABASE_KINDS = frozenset({"sqlalchemy", "asyncpg", "redis"})

# The same bounds as poolkeeper.prometheus.DURATION_BUCKETS: milliseconds to a minute.
_DURATION_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def instrument(registry: Registry | None = None, meter_provider: MeterProvider | None = None) -> None:
    """Create poolkeeper's instruments on a meter of ``meter_provider``, observing ``registry``.

    Call it once per meter provider: OpenTelemetry keeps the first instruments of a name on a
    meter and ignores the callbacks of a second call.

    Args:
        registry: the poolkeeper registry to observe (default: :func:`poolkeeper.get_registry`).
        meter_provider: where to create the meter (default: the global meter provider).

    Raises:
        TypeError: ``registry`` is not a :class:`poolkeeper.Registry`.
    """
    if registry is not None and not isinstance(registry, Registry):
        raise TypeError(f"registry must be a poolkeeper.Registry or None, got {registry!r}")
    meter = get_meter("poolkeeper", __version__, meter_provider)
    observer = _Observer(
        registry if registry is not None else get_registry(),
        drain=meter.create_histogram(
            "poolkeeper.drain.duration",
            unit="s",
            description="How long a keeper waited for its borrowed connections to come back.",
            explicit_bucket_boundaries_advisory=_DURATION_BOUNDS,
        ),
        close=meter.create_histogram(
            "poolkeeper.close.duration",
            unit="s",
            description="How long a keeper took to force-close and close its connections.",
            explicit_bucket_boundaries_advisory=_DURATION_BOUNDS,
        ),
    )
    # Created first, so that its callback (which records the durations) runs first in a collection.
    meter.create_observable_up_down_counter(
        "poolkeeper.keeper.state",
        callbacks=[observer.states],
        unit="1",
        description="1 for the state a keeper is in, 0 for the other states.",
    )
    meter.create_observable_up_down_counter(
        "db.client.connection.count",
        callbacks=[observer.database_connections],
        unit="{connection}",
        description="The number of connections that are currently in state described by the `state` attribute.",
    )
    meter.create_observable_counter(
        "poolkeeper.refused_checkouts",
        callbacks=[observer.refused],
        unit="{checkout}",
        description="Checkouts refused with PoolClosedError since the keeper started closing.",
    )
    meter.create_observable_counter(
        "poolkeeper.forced_closes",
        callbacks=[observer.forced],
        unit="{connection}",
        description="Connections still borrowed at the drain deadline, and force-closed.",
    )


def _attributes(keeper: Keeper) -> dict[str, str]:
    return {"poolkeeper.keeper.name": keeper.name, "poolkeeper.keeper.kind": keeper.kind}


class _Observer:
    """The callbacks of one :func:`instrument` call (run on the collecting thread)."""

    def __init__(self, registry: Registry, *, drain: Histogram, close: Histogram) -> None:
        self._registry = registry
        self._drain = drain
        self._close = close
        self._recorded: weakref.WeakSet[Keeper] = weakref.WeakSet()

    def states(self, options: CallbackOptions) -> Iterator[Observation]:  # noqa: ARG002 -- the callback signature
        """``poolkeeper.keeper.state``; records the durations of keepers closed since the last collection."""
        for keeper in self._registry.keepers:
            closed = keeper.close_report
            if closed is not None and keeper not in self._recorded:
                self._recorded.add(keeper)
                self._drain.record(closed.drain_seconds, _attributes(keeper))
                self._close.record(closed.close_seconds, _attributes(keeper))
            current = keeper.state
            for state in KeeperState:
                yield Observation(
                    1 if current is state else 0, {**_attributes(keeper), "poolkeeper.keeper.state": state.value}
                )

    def database_connections(self, options: CallbackOptions) -> Iterator[Observation]:  # noqa: ARG002
        """``db.client.connection.count`` of the database keepers, by state (``used``, ``idle``)."""
        for keeper in self._registry.keepers:
            if keeper.kind not in DATABASE_KINDS:
                continue
            pool = {"db.client.connection.pool.name": keeper.name}
            yield Observation(keeper.borrowed, {**pool, "db.client.connection.state": "used"})
            idle = keeper.idle
            if idle is not None:
                yield Observation(idle, {**pool, "db.client.connection.state": "idle"})

    def refused(self, options: CallbackOptions) -> Iterator[Observation]:  # noqa: ARG002
        """``poolkeeper.refused_checkouts``."""
        for keeper in self._registry.keepers:
            yield Observation(keeper.refused, _attributes(keeper))

    def forced(self, options: CallbackOptions) -> Iterator[Observation]:  # noqa: ARG002
        """``poolkeeper.forced_closes``."""
        for keeper in self._registry.keepers:
            closed = keeper.close_report
            yield Observation(0 if closed is None else closed.forced, _attributes(keeper))
