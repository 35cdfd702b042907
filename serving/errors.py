"""The API's error type: every refusal is a JSON body that names the problem.

Body of every error response::

    {"error": "<machine-readable code>", "detail": "<one sentence for humans>"}

Status codes used for client errors: 400 (malformed request, empty upload,
missing/malformed Host header, a URL where an image belongs), 401 (API key
missing or wrong; with ``WWW-Authenticate: Bearer``), 403 (admin endpoint from
another machine without API keys), 404/405 (no such endpoint/method), 408 (headers
or body not received within their deadline; the connection is closed), 413
(too large: body -- the connection is closed --, image count, decoded pixels,
memory a decode needs), 415 (not an image / unsupported content type), 421
(Host not in ``--allowed-hosts``), 422 (undecodable image, decode over
``--decode-timeout``, bad parameter such as k, a bad query vector, a gallery
that fails to reload); 503 when the server is
overloaded or shutting down.
"""

from __future__ import annotations

__all__ = ["ApiError"]


class ApiError(Exception):
    """An HTTP error with a stable ``code`` and a human ``detail``."""

    def __init__(self, status: int, code: str, detail: str):
        super().__init__(detail)
        self.status = int(status)
        self.code = code
        self.detail = detail

    def body(self) -> dict[str, str]:
        return {"error": self.code, "detail": self.detail}
