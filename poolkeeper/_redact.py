"""Keep secrets out of everything poolkeeper prints: logs, reports, reprs and health bodies."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = ["redact"]

# scheme://user:password@host -> scheme://user:***@host
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][\w+.-]*://[^:/@\s]*:)(?P<secret>[^@\s]+)@")
# password=..., passwd=..., pwd=..., token=... in DSNs and query strings
_KEY_VALUE = re.compile(
    r"(?P<head>\b(?:password|passwd|pwd|token|secret)\s*=\s*)(?P<secret>'[^']*'|\"[^\"]*\"|[^\s&;]+)", re.IGNORECASE
)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with URL passwords, ``password=`` values and every literal secret replaced by ``***``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    text = _URL_PASSWORD.sub(r"\g<head>***@", text)
    return _KEY_VALUE.sub(r"\g<head>***", text)
