"""Validation of timeout arguments and the monotonic deadline every wait is measured against."""

from __future__ import annotations

import math
import time

__all__ = ["DEFAULT_CLOSE_TIMEOUT", "DEFAULT_DRAIN_TIMEOUT", "Deadline", "check_name", "check_timeout"]

# The defaults fit Kubernetes' default 30 s grace period with room for a 5 s shutdown delay:
# 5 (delay) + 15 (drain) + 5 (force-close and close) + 3 (margin: a tenth of the grace period) = 28.
#: Default seconds a keeper waits for borrowed connections to come back.
DEFAULT_DRAIN_TIMEOUT = 15.0
#: Default seconds a keeper gets to force-close and close its connections (and a hook to run).
DEFAULT_CLOSE_TIMEOUT = 5.0


def check_timeout(argument: str, value: object, *, allow_none: bool = True) -> float | None:
    """Return ``value`` as a float of seconds, or raise naming ``argument``.

    Args:
        argument: the parameter's name, used in the error message.
        value: what the caller passed.
        allow_none: whether ``None`` ("use the default") is accepted.

    Raises:
        TypeError: ``value`` is not a number (``bool`` is refused too).
        ValueError: ``value`` is negative, NaN or infinite (or an integer too large for a float).
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        expected = "a number of seconds or None" if allow_none else "a number of seconds"
        raise TypeError(f"{argument} must be {expected}, got {value!r}")
    try:
        seconds = float(value)
    except OverflowError:  # an int too large for a float (10**400) is not a usable number of seconds
        seconds = math.inf
    if math.isnan(seconds) or math.isinf(seconds) or seconds < 0:
        raise ValueError(f"{argument} must be a finite number of seconds >= 0, got {value!r}")
    return seconds


def check_name(argument: str, value: object) -> str | None:
    """Return ``value`` if it is ``None`` or a usable name, else raise naming ``argument``.

    A name is shown in one cell of the report table and in log lines: a newline, a tab or any
    other non-printable character would break them (or forge a line), so it is refused.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{argument} must be a string or None, got {value!r}")
    if not value.strip():
        raise ValueError(f"{argument} must not be empty or blank")
    if not value.replace(" ", "x").isprintable():
        raise ValueError(
            f"{argument} must contain only printable characters (no newline, tab or control character), got {value!r}"
        )
    return value


class Deadline:
    """A point on the monotonic clock; ``None`` seconds means "never"."""

    __slots__ = ("at",)

    def __init__(self, seconds: float | None) -> None:
        self.at = None if seconds is None else time.monotonic() + seconds

    @classmethod
    def at_time(cls, at: float | None) -> Deadline:
        """A deadline at an absolute ``time.monotonic()`` value."""
        deadline = cls(None)
        deadline.at = at
        return deadline

    def remaining(self) -> float | None:
        """Seconds left (never negative), or ``None`` for no deadline."""
        if self.at is None:
            return None
        return max(0.0, self.at - time.monotonic())

    def earlier(self, seconds: float | None) -> Deadline:
        """The earlier of this deadline and ``seconds`` from now."""
        other = Deadline(seconds)
        if other.at is None:
            return self
        if self.at is None or other.at < self.at:
            return other
        return self

    def shifted(self, seconds: float) -> Deadline:
        """This deadline moved ``seconds`` earlier (never before now)."""
        if self.at is None:
            return self
        return Deadline.at_time(max(time.monotonic(), self.at - seconds))

    @property
    def expired(self) -> bool:
        """True once the deadline has passed."""
        return self.at is not None and time.monotonic() >= self.at
