"""API keys: ``Authorization: Bearer <key>`` on every ``/v1/*`` request when keys are configured.

Keys come from ``--api-key KEY`` (repeatable), ``ISFE_API_KEY=k1,k2`` and
``--api-key-file FILE`` (one key per line; blank lines and ``#`` comments
skipped).  A request's key is compared with every configured key by
:func:`hmac.compare_digest` (constant time, and all keys are always
compared, so the timing does not tell which one nearly matched).  A missing or
wrong key gets ``401`` with ``WWW-Authenticate: Bearer`` and the JSON error
body.  ``/healthz``, ``/readyz``, ``/metrics``, ``/docs`` and
``/openapi.json`` stay open (probes, scrapers and the API reference need no key).

``POST /v1/admin/reload`` needs a key like every ``/v1`` path when keys are
configured; without keys it is answered only to clients on a loopback address.
"""

from __future__ import annotations

import hmac
import ipaddress
from pathlib import Path
from typing import Iterable, Sequence

from .errors import ApiError

__all__ = ["PROTECTED_PREFIX", "ApiKeys", "KeyFileError", "client_is_loopback", "read_key_file"]

#: Paths under this prefix need a key (when keys are configured).
PROTECTED_PREFIX = "/v1/"
#: Shortest key accepted (a shorter one is a typo or a placeholder, not a secret).
MIN_KEY_CHARS = 16
#: Longest key accepted (bounds the work per request).
MAX_KEY_CHARS = 512


class KeyFileError(ValueError):
    """An API key file that cannot be read or holds an unusable key (names the file and the fix)."""


def check_key(key: str, where: str) -> str:
    """A usable key: printable ASCII without spaces, 16..512 characters (else ValueError naming ``where``)."""
    if not (MIN_KEY_CHARS <= len(key) <= MAX_KEY_CHARS) or not all("!" <= c <= "~" for c in key):
        raise ValueError(f"{where}: an API key must be {MIN_KEY_CHARS}-{MAX_KEY_CHARS} printable ASCII characters "
                         f"without spaces (e.g. from `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    return key


def read_key_file(path: str | Path) -> list[str]:
    """Keys from a file, one per line (blank lines and lines starting with ``#`` are skipped)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise KeyFileError(f"cannot read API key file {path}: {e}") from None
    keys = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise KeyFileError(f"API key file {path} holds no key; write one key per line")
    for i, k in enumerate(keys):
        try:
            check_key(k, f"API key file {path}, key {i + 1}")
        except ValueError as e:
            raise KeyFileError(str(e)) from None
    return keys


def client_is_loopback(client: Sequence | None) -> bool:
    """True when the ASGI ``client`` (host, port) is a loopback address."""
    if not client:
        return False
    try:
        return ipaddress.ip_address(str(client[0])).is_loopback
    except ValueError:
        return False


class ApiKeys:
    """The configured keys (none: the API is open)."""

    def __init__(self, keys: Iterable[str] = ()):
        self._keys = [k.encode() for k in dict.fromkeys(keys)]

    def __bool__(self) -> bool:
        return bool(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def protects(self, path: str) -> bool:
        return bool(self._keys) and path.startswith(PROTECTED_PREFIX)

    def check(self, headers: list[tuple[bytes, bytes]]) -> None:
        """Raises :class:`ApiError` 401 unless the ``Authorization: Bearer`` key is one of the keys."""
        values = [v for k, v in headers if k == b"authorization"]
        if not values:
            raise ApiError(401, "unauthorized", "this API needs a key: send the header Authorization: Bearer <key>")
        scheme, _, token = values[0].strip().partition(b" ")
        token = token.strip()
        if len(values) != 1 or scheme.lower() != b"bearer" or not token:
            raise ApiError(401, "unauthorized",
                           "malformed Authorization header; send exactly one Authorization: Bearer <key>")
        ok = False
        for key in self._keys:  # every key, always: the time taken does not depend on which one matches
            ok |= hmac.compare_digest(token, key)
        if not ok:
            raise ApiError(401, "unauthorized",
                           "invalid API key; send Authorization: Bearer <key> with a key this server accepts")
