"""Prometheus metrics: a collector that reads every keeper of a registry at scrape time.

Nothing is counted on the checkout path: each scrape reads what the keepers know (their state,
borrowed and idle connections, refusals, and the report of their close once closed) and builds
the metric families from it. Every family has the labels ``keeper`` (the keeper's name) and
``kind`` (``sqlalchemy``, ``asyncpg``...); never a URL, a host or a password.

- ``poolkeeper_connections`` (gauge): connections by ``state``: ``borrowed``, and ``idle`` where
  the library counts them;
- ``poolkeeper_keeper_state`` (gauge): 1 for the keeper's ``state`` (``open``, ``draining``,
  ``forcing``, ``closed``), 0 for the others;
- ``poolkeeper_refused_checkouts_total`` (counter): checkouts refused since closing started;
- ``poolkeeper_forced_closes_total`` (counter): connections force-closed at the drain deadline;
- ``poolkeeper_drain_duration_seconds`` and ``poolkeeper_close_duration_seconds`` (histograms):
  how long the keeper's drain, and its force-close and close, took (observed once it closed).

``register()`` adds a :class:`PoolkeeperCollector` for :func:`poolkeeper.get_registry` to
``prometheus_client.REGISTRY``; ``register(collector_registry, registry=...)`` picks both.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from poolkeeper._keeper import KeeperState
from poolkeeper._registry import Registry, get_registry

try:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
    from prometheus_client.registry import REGISTRY
    from prometheus_client.utils import floatToGoString
except ImportError as error:  # pragma: no cover -- proven by a subprocess test
    raise ImportError("poolkeeper.prometheus needs prometheus-client: pip install 'poolkeeper[prometheus]'") from error

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry

    from poolkeeper._keeper import Keeper

__all__ = ["DURATION_BUCKETS", "PoolkeeperCollector", "register"]

#: Upper bounds, in seconds, of the duration histograms: shutdowns take milliseconds to a
#: minute (the longest Kubernetes grace periods).
DURATION_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

_LABELS = ("keeper", "kind")


def _check_buckets(buckets: object) -> tuple[float, ...]:
    if isinstance(buckets, (str, bytes)) or not isinstance(buckets, Iterable):
        raise TypeError(f"buckets must be a sequence of seconds, got {buckets!r}")
    bounds = tuple(buckets)
    if not bounds or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds):
        raise TypeError(f"buckets must be a non-empty sequence of numbers, got {buckets!r}")
    if not all(math.isfinite(b) and b > 0 for b in bounds) or list(bounds) != sorted(set(bounds)):
        raise ValueError(f"buckets must be finite positive seconds in increasing order, got {buckets!r}")
    return tuple(float(b) for b in bounds)


class PoolkeeperCollector:
    """A ``prometheus_client`` collector reading a poolkeeper registry's keepers at every scrape.

    Register it in a ``CollectorRegistry`` (or use :func:`register`). It implements
    ``describe()``, so registering it does not scrape, and a clash with metrics already
    registered raises ``ValueError`` there.

    Args:
        registry: the poolkeeper registry to read (default: :func:`poolkeeper.get_registry`).
        buckets: upper bounds, in seconds, of the duration histograms (``+Inf`` is added).

    Raises:
        TypeError: ``registry`` is not a :class:`poolkeeper.Registry`, or ``buckets`` not numbers.
        ValueError: ``buckets`` are not finite positive seconds in increasing order.
    """

    def __init__(self, registry: Registry | None = None, *, buckets: Sequence[float] = DURATION_BUCKETS) -> None:
        if registry is not None and not isinstance(registry, Registry):
            raise TypeError(f"registry must be a poolkeeper.Registry or None, got {registry!r}")
        self._registries = [registry if registry is not None else get_registry()]
        self._buckets = _check_buckets(buckets)

    def __repr__(self) -> str:
        return f"<PoolkeeperCollector keepers={[keeper.name for keeper in self._keepers()]}>"

    def add_registry(self, registry: Registry) -> None:
        """Read ``registry``'s keepers too: one collector for several registries in one process.

        Keeper names must differ across the registries: they are the ``keeper`` label.

        Raises:
            TypeError: ``registry`` is not a :class:`poolkeeper.Registry`.
            ValueError: it is read already, or one of its keepers has the name of a keeper read already.
        """
        if not isinstance(registry, Registry):
            raise TypeError(f"registry must be a poolkeeper.Registry, got {registry!r}")
        if any(registry is known for known in self._registries):
            raise ValueError("registry: read by this collector already (its poolkeeper_connections... are registered)")
        clash = {keeper.name for keeper in registry.keepers} & {keeper.name for keeper in self._keepers()}
        if clash:
            raise ValueError(f"registry: keeper names {sorted(clash)} are in another registry of this collector too")
        self._registries.append(registry)

    def _keepers(self) -> list[Keeper]:
        return [keeper for registry in self._registries for keeper in registry.keepers]

    def describe(self) -> list[Metric]:
        """The metric families this collector exposes, without samples."""
        return _Families(self._buckets).all()

    def collect(self) -> list[Metric]:
        """The metric families with every keeper's numbers as they are now."""
        families = _Families(self._buckets)
        for keeper in self._keepers():
            families.add(keeper)
        return families.all()


class _Families:
    """The metric families of one scrape."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self._buckets = buckets
        self.connections = GaugeMetricFamily(
            "poolkeeper_connections",
            "Connections of each keeper by state: borrowed, and idle where the library counts them.",
            labels=[*_LABELS, "state"],
        )
        self.state = GaugeMetricFamily(
            "poolkeeper_keeper_state",
            "1 for the state each keeper is in (open, draining, forcing, closed), 0 for the others.",
            labels=[*_LABELS, "state"],
        )
        self.refused = CounterMetricFamily(
            "poolkeeper_refused_checkouts",
            "Checkouts refused with PoolClosedError since the keeper started closing.",
            labels=_LABELS,
        )
        self.forced = CounterMetricFamily(
            "poolkeeper_forced_closes",
            "Connections still borrowed at the drain deadline, and force-closed.",
            labels=_LABELS,
        )
        self.drain = HistogramMetricFamily(
            "poolkeeper_drain_duration_seconds",
            "Seconds each keeper waited for its borrowed connections to come back (observed once closed).",
            labels=_LABELS,
            unit="seconds",
        )
        self.close = HistogramMetricFamily(
            "poolkeeper_close_duration_seconds",
            "Seconds each keeper took to force-close and close its connections (observed once closed).",
            labels=_LABELS,
            unit="seconds",
        )

    def all(self) -> list[Metric]:
        return [self.connections, self.state, self.refused, self.forced, self.drain, self.close]

    def add(self, keeper: Keeper) -> None:
        """One keeper's samples."""
        labels = [keeper.name, keeper.kind]
        current, idle, closed = keeper.state, keeper.idle, keeper.close_report
        self.connections.add_metric([*labels, "borrowed"], keeper.borrowed)
        if idle is not None:
            self.connections.add_metric([*labels, "idle"], idle)
        for state in KeeperState:
            self.state.add_metric([*labels, state.value], 1.0 if current is state else 0.0)
        self.refused.add_metric(labels, keeper.refused)
        self.forced.add_metric(labels, 0 if closed is None else closed.forced)
        self._observe(self.drain, labels, None if closed is None else closed.drain_seconds)
        self._observe(self.close, labels, None if closed is None else closed.close_seconds)

    def _observe(self, family: HistogramMetricFamily, labels: list[str], seconds: float | None) -> None:
        # One keeper closes once: its histogram holds that one observation, or none yet.
        count = 0 if seconds is None else 1
        buckets = [
            (_le(bound), float(count if seconds is not None and seconds <= bound else 0)) for bound in self._buckets
        ]
        buckets.append(("+Inf", float(count)))
        family.add_metric(labels, buckets, sum_value=seconds or 0.0)


def _le(bound: float) -> str:
    """A bucket bound as Prometheus spells it, the way prometheus_client's own histograms do."""
    return str(floatToGoString(bound))  # type: ignore[no-untyped-call]  # prometheus_client leaves it unannotated


def register(
    collector_registry: CollectorRegistry | None = None,
    *,
    registry: Registry | None = None,
    buckets: Sequence[float] = DURATION_BUCKETS,
) -> PoolkeeperCollector:
    """Register a :class:`PoolkeeperCollector` for ``registry`` in ``collector_registry``.

    Args:
        collector_registry: where to register (default: ``prometheus_client.REGISTRY``).
        registry: the poolkeeper registry to read (default: :func:`poolkeeper.get_registry`).
        buckets: upper bounds, in seconds, of the duration histograms.

    A second poolkeeper registry registered in the same ``collector_registry`` is added to the
    collector already there (:meth:`PoolkeeperCollector.add_registry`): two collectors would
    expose the same metric names, which ``prometheus_client`` refuses.

    Returns:
        The collector (``collector_registry.unregister(collector)`` removes it).

    Raises:
        TypeError: ``collector_registry`` cannot register collectors, or a bad ``registry``/``buckets``.
        ValueError: the metric names are already registered there by something else, or this
            poolkeeper registry is registered there already, or its keeper names clash.
    """
    target = REGISTRY if collector_registry is None else collector_registry
    if not callable(getattr(target, "register", None)):
        raise TypeError(f"collector_registry must be a prometheus_client CollectorRegistry, got {target!r}")
    existing = _registered.get(target)
    if existing is not None and _still_registered(target, existing):
        existing.add_registry(registry if registry is not None else get_registry())
        return existing
    collector = PoolkeeperCollector(registry, buckets=buckets)
    target.register(collector)
    _registered[target] = collector
    return collector


# The collector register() put in each CollectorRegistry: a second poolkeeper registry joins it.
_registered: weakref.WeakKeyDictionary[CollectorRegistry, PoolkeeperCollector] = weakref.WeakKeyDictionary()


def _still_registered(target: CollectorRegistry, collector: PoolkeeperCollector) -> bool:
    # unregister() leaves no trace we are told about: ask prometheus_client's own table.
    return collector in getattr(target, "_collector_to_names", {collector: None})
