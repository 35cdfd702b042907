"""The outermost ASGI layer: header size, Host check, API key, request-body limit and deadline, request metrics.

For every HTTP request, in this order:

1. **Header size**: a request line and headers over ``max_header_bytes``
   (16 KiB in the server) are 400 ``headers_too_large``.  h11 refuses a head
   that is still incomplete past that size, but parses a complete one of any
   size that arrived in one read (up to 256 KiB on loopback); this catches those.
2. **Host** (against DNS rebinding): with an allow-list, a missing or malformed
   ``Host`` header is 400 ``bad_host`` and a name not on the list is 421
   ``host_not_allowed``.  Entries are host names or IP literals (any port),
   ``*.example.com`` for a domain and its subdomains, or ``*`` for any.
3. **Body size**: a ``Content-Length`` over ``max_body_bytes`` is 413 before a
   byte of the body is read; a chunked body is counted while it streams and
   refused with 413 the moment it passes the limit.
4. **Body deadline**: the whole body must arrive within ``timeout_body``
   seconds of the headers, or 408 ``body_timeout``.

Each refusal carries ``Connection: close``; the protocol
(:class:`serving.protocol.GuardedH11Protocol`) then drains what the client is
still sending for a bounded time and closes.  The body is read whole here (it
is at most ``max_body_bytes``, which the endpoints would hold in memory anyway)
and replayed to the application in pieces of :data:`REPLAY_CHUNK` bytes with a
yield to the event loop between pieces, so parsing a large multipart body never
holds the loop for long.

After the Host check, a ``/v1/*`` request needs a valid API key when keys
are configured (:class:`serving.auth.ApiKeys`; 401 before the body is read).

Every request gets an ID: a sane ``X-Request-ID`` header (1..128 visible
ASCII characters) is kept, anything else is replaced by a fresh UUID; the ID
is returned as ``X-Request-ID`` on the response (also on refusals) and written
to the access log line (logger ``serving.access``, see :mod:`serving.logs`)
and to ``scope["state"]["request_id"]``.

Metric labels are bounded: endpoints outside the known list are "other", and
so are HTTP methods outside :data:`serving.metrics.METHODS`.  The request is
counted (``isfe_requests_total``) just before the last byte of its response
is handed to the server, so a client that has its answer also sees it counted.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any, Sequence

from starlette.responses import JSONResponse

from .auth import ApiKeys
from .errors import ApiError
from .metrics import ServingMetrics, method_label

__all__ = ["MAX_HEADER_BYTES", "REPLAY_CHUNK", "GuardedApp", "HostPolicy", "LOOPBACK_HOSTS", "head_bytes", "host_of",
           "request_id"]

access_log = logging.getLogger("serving.access")

#: Size of the pieces in which a buffered body is handed to the application.
REPLAY_CHUNK = 64 * 1024
#: Host names a loopback-bound server answers to by default.
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
#: Longest X-Request-ID kept from a client.
MAX_REQUEST_ID = 128
#: Most bytes of request line and headers (also h11's limit for a head still being received).
MAX_HEADER_BYTES = 16 * 1024


def request_id(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's ``X-Request-ID`` if it is 1..128 visible ASCII characters, else a new UUID (hex)."""
    for k, v in headers:
        if k == b"x-request-id":
            if 0 < len(v) <= MAX_REQUEST_ID and all(0x21 <= c <= 0x7E for c in v):
                return v.decode("ascii")
            break
    return uuid.uuid4().hex


def head_bytes(scope: dict) -> int:
    """Size of a request's line and headers as sent (``METHOD target HTTP/1.1``, ``name: value`` lines)."""
    target = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + 1
    return (len(scope.get("method", "")) + target + 11
            + sum(len(k) + len(v) + 4 for k, v in scope.get("headers", ())) + 2)


def host_of(value: str) -> str | None:
    """``Host`` header value -> lower-case host name or IP literal without port/brackets; None if malformed.

    ``"Example.com:8000"`` -> ``"example.com"``, ``"[::1]:8000"`` -> ``"::1"``, ``"a:b"`` -> None.
    """
    v = value.strip().lower()
    if v.startswith("["):
        end = v.find("]")
        name, rest = (v[1:end], v[end + 1:]) if end > 0 else ("", "")
    else:
        name, sep, port = v.partition(":")
        rest = sep + port
    if rest and not (rest.startswith(":") and rest[1:].isascii() and rest[1:].isdigit()):
        return None
    name = name.rstrip(".")
    if not name or any(c.isspace() or c in "/\\@?#" for c in name):
        return None
    return name


class HostPolicy:
    """An allow-list of Host names (``None`` or a list containing ``*``: any host)."""

    def __init__(self, allowed: Sequence[str] | None):
        entries = [a.strip().lower() for a in (allowed or ["*"]) if a.strip()]
        self.any = not entries or "*" in entries
        self.exact = {host_of(e) or e for e in entries if not e.startswith("*.")}
        self.suffixes = tuple(e[1:] for e in entries if e.startswith("*."))  # ".example.com"
        self.shown = ", ".join(entries) or "*"

    def check(self, headers: list[tuple[bytes, bytes]]) -> None:
        """Raises :class:`ApiError` 400 (missing/malformed/several Host headers) or 421 (not allowed)."""
        if self.any:
            return
        values = [v for k, v in headers if k == b"host"]
        if len(values) != 1:
            raise ApiError(400, "bad_host", f"the request has {len(values)} Host headers; send exactly one")
        raw = values[0].decode("latin-1")
        name = host_of(raw)
        if name is None:
            raise ApiError(400, "bad_host", f"malformed Host header {raw[:100]!r}; send Host: name[:port]")
        if name in self.exact or name.endswith(self.suffixes) or ("." + name) in self.suffixes:
            return
        raise ApiError(421, "host_not_allowed",
                       f"this server does not answer to Host {name[:100]!r} (allowed: {self.shown}); "
                       f"an operator can add it with --allowed-hosts")


def _error(status: int, code: str, detail: str, close: bool = False) -> JSONResponse:
    resp = JSONResponse({"error": code, "detail": detail}, status_code=status)
    if close:
        resp.headers["Connection"] = "close"
    return resp


class _ClientGone(Exception):
    """The client disconnected before its body was complete: nothing to answer."""


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for k, v in headers:
        if k == b"content-length":
            try:
                return int(v)
            except ValueError:
                return None
    return None


class GuardedApp:
    """ASGI wrapper around the FastAPI app (see the module docstring for what it checks)."""

    def __init__(self, app: Any, metrics: ServingMetrics, endpoints: Sequence[str], max_body_bytes: int,
                 timeout_body: float = 60.0, allowed_hosts: Sequence[str] | None = None,
                 api_keys: ApiKeys | None = None, max_header_bytes: int = MAX_HEADER_BYTES):
        self.app = app
        self.max_header_bytes = int(max_header_bytes)
        self.metrics = metrics
        self.endpoints = frozenset(endpoints)
        self.max_body_bytes = int(max_body_bytes)
        self.timeout_body = float(timeout_body)
        self.hosts = HostPolicy(allowed_hosts)
        self.keys = api_keys or ApiKeys()

    def __getattr__(self, name: str) -> Any:  # .state, .router, ... of the FastAPI app
        return getattr(self.app, name)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in self.endpoints else "other"
        method = method_label(scope.get("method", ""))
        rid = request_id(scope.get("headers", []))
        scope.setdefault("state", {})["request_id"] = rid
        status = 500
        counted = False
        t0 = time.perf_counter()
        self.metrics.in_flight.inc()

        def count() -> None:
            nonlocal counted
            if not counted:
                counted = True
                self.metrics.in_flight.dec()
                self.metrics.requests.labels(endpoint, method, str(status)).inc()
                self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)

        async def send_wrapper(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", rid.encode())]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                count()  # before the client can see the end of the response
            await send(message)

        try:
            await self._serve(scope, receive, send_wrapper)
        except _ClientGone:
            status = 499  # nginx's "client closed request"; nothing is sent
        finally:
            count()
            if access_log.isEnabledFor(logging.INFO):
                self._log_access(scope, rid, status, t0)

    @staticmethod
    def _log_access(scope: dict, rid: str, status: int, t0: float) -> None:
        client = scope.get("client")
        peer = f"{client[0]}:{client[1]}" if client else "-"
        ms = round((time.perf_counter() - t0) * 1000, 2)
        method, path = scope.get("method", ""), scope.get("path", "")
        access_log.info('%s "%s %s" %d %.2f ms rid=%s', peer, method[:16], path[:200], status, ms, rid,
                        extra={"request_id": rid, "method": method[:16], "path": path[:200], "status": status,
                               "duration_ms": ms, "client": peer})

    async def _serve(self, scope: dict, receive: Any, send: Any) -> None:
        headers = scope.get("headers", [])
        size = head_bytes(scope)
        if size > self.max_header_bytes:
            await _error(400, "headers_too_large",
                         f"request line and headers are {size:,} bytes, over the limit of {self.max_header_bytes:,}; "
                         f"send fewer or shorter headers (large cookies?)", close=True)(scope, receive, send)
            return
        try:
            self.hosts.check(headers)
            if self.keys.protects(scope.get("path", "")):
                self.keys.check(headers)
        except ApiError as e:
            resp = _error(e.status, e.code, e.detail, close=True)
            if e.status == 401:
                resp.headers["WWW-Authenticate"] = 'Bearer realm="isfe"'
            await resp(scope, receive, send)
            return
        limit = self.max_body_bytes
        length = _content_length(headers)
        if length is not None and length > limit:
            await _error(413, "body_too_large", f"request body is {length:,} bytes, over the limit of {limit:,}; "
                                                "send smaller or fewer images", close=True)(scope, receive, send)
            return
        try:
            body = await self._read_body(receive)
        except ApiError as e:
            await _error(e.status, e.code, e.detail, close=True)(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read_body(self, receive: Any) -> bytes:
        """The whole request body, within the size limit and the deadline (raises ApiError 413/408, _ClientGone)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + self.timeout_body
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, end - loop.time()))
            except asyncio.TimeoutError:
                raise ApiError(408, "body_timeout", f"request body not received within {self.timeout_body:g} s "
                                                    f"(received {size:,} bytes); send the whole request "
                                                    f"at once") from None
            if message["type"] == "http.disconnect":
                raise _ClientGone()
            piece = message.get("body", b"")
            size += len(piece)
            if size > self.max_body_bytes:
                raise ApiError(413, "body_too_large",
                               f"request body is over the limit of {self.max_body_bytes:,} bytes "
                               f"(sent without Content-Length, refused at {size:,}); send smaller or fewer images")
            if piece:
                chunks.append(piece)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive: Any) -> Any:
    """A ``receive`` that hands out ``body`` in pieces (yielding to the loop before each), then defers to
    ``receive``."""
    view = memoryview(body)
    pos = 0
    done = False

    async def replay() -> dict:
        nonlocal pos, done
        if done:
            return await receive()  # waits for the disconnect, as the server's receive does
        await asyncio.sleep(0)
        piece = bytes(view[pos:pos + REPLAY_CHUNK])
        pos += len(piece)
        done = pos >= len(body)
        return {"type": "http.request", "body": piece, "more_body": not done}

    return replay
