"""Keep secrets out of everything poolkeeper prints: logs, reports, reprs and health bodies."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

__all__ = ["is_secret_key", "redact", "secret_values"]

# Names of connection parameters whose value is a secret, wherever they appear: libpq's
# password and sslpassword (the passphrase of the client key), redis-py's ssl_password, MySQL's
# passwd, ODBC's pwd, tokens and API keys. sslkey, sslcert and passfile name files: paths,
# not secrets, so they stay visible (issue 13, item 10).
_SECRET_KEY = r"[a-z_]*?(?:password|passwd|pwd|passphrase|secret|token|api_?key|credentials?)[a-z_]*"  # noqa: S105 -- names
_SECRET_KEY_NAME = re.compile(rf"^{_SECRET_KEY}$", re.IGNORECASE)
# scheme://user:password@host -> scheme://user:***@host
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][\w+.-]*://[^:/@\s]*:)(?P<secret>[^@\s]+)@")
# password=..., sslpassword=..., ssl_password=..., token=... in key=value DSNs and query strings
_KEY_VALUE = re.compile(
    rf"(?P<head>\b{_SECRET_KEY}\s*=\s*)(?P<secret>'(?:[^'\\]|\\.)*'|\"[^\"]*\"|[^\s&;,]+)", re.IGNORECASE
)


def is_secret_key(name: str) -> bool:
    """True if a connection parameter called ``name`` carries a secret (``password``, ``sslpassword``...)."""
    return bool(_SECRET_KEY_NAME.match(name))


def secret_values(parameters: Mapping[str, object]) -> list[str]:
    """The values of the secret-bearing entries of ``parameters`` (a URL query, connect kwargs)."""
    found: list[str] = []
    for key, value in parameters.items():
        if not is_secret_key(str(key)) or value is None:
            continue
        values = value if isinstance(value, (list, tuple)) else (value,)
        found.extend(item for item in values if isinstance(item, str) and item)
    return found


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with URL passwords, secret ``key=value`` pairs and every literal secret replaced by ``***``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    text = _URL_PASSWORD.sub(r"\g<head>***@", text)
    return _KEY_VALUE.sub(r"\g<head>***", text)
