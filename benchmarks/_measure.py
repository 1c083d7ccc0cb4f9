"""Timing helpers shared by the benchmarks: interleaved rounds, medians, ratios."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable


@dataclass
class Comparison:
    """Per-operation times of the raw library and of poolkeeper, measured in alternating rounds."""

    name: str
    raw: list[float]
    wrapped: list[float]

    @property
    def ratio(self) -> float:
        """Median of the per-round ratios: each round pairs neighbouring raw and wrapped runs."""
        return statistics.median(w / r for r, w in zip(self.raw, self.wrapped, strict=True))

    def row(self, goal: float | None) -> str:
        raw_us = statistics.median(self.raw) * 1e6
        wrapped_us = statistics.median(self.wrapped) * 1e6
        if goal is None:
            verdict = "(no goal)"
        else:
            verdict = f"(goal <= {goal:.2f}x) " + ("ok" if self.ratio <= goal else "OVER GOAL")
        return f"{self.name:<44} {raw_us:>9.2f} us {wrapped_us:>9.2f} us {self.ratio:>7.3f}x  {verdict}"


def per_op(operation: Callable[[], object], count: int) -> float:
    """Seconds per call of ``operation`` over ``count`` calls."""
    started = time.perf_counter()
    for _ in range(count):
        operation()
    return (time.perf_counter() - started) / count


def compare(
    name: str, raw: Callable[[], object], wrapped: Callable[[], object], *, count: int, rounds: int
) -> Comparison:
    """Alternate raw and wrapped rounds so that machine noise hits both alike."""
    result = Comparison(name, [], [])
    per_op(raw, count // 10)  # warm up both paths
    per_op(wrapped, count // 10)
    for _ in range(rounds):
        result.raw.append(per_op(raw, count))
        result.wrapped.append(per_op(wrapped, count))
    return result


def latency_row(name: str, samples: list[float], goal_ms: float) -> str:
    """Median and p90 of ``samples`` (seconds) against a goal in milliseconds."""
    ordered = sorted(samples)
    median_ms = statistics.median(ordered) * 1e3
    p90_ms = ordered[int(len(ordered) * 0.9) - 1] * 1e3
    verdict = "ok" if median_ms < goal_ms else "OVER GOAL"
    return f"{name:<44} median {median_ms:>7.3f} ms  p90 {p90_ms:>7.3f} ms  (goal < {goal_ms:g} ms) {verdict}"
