"""uvicorn's h11 HTTP protocol with deadlines for slow clients, a lingering close, and one write per response.

Stock uvicorn (h11) arms its keep-alive timer only after a response, and any
byte received cancels it, so a client that connects and sends nothing, or
sends its request line and headers one byte at a time, holds a connection
(and a ``--limit-concurrency`` slot, and a file descriptor) forever.
:class:`GuardedH11Protocol` adds, per connection:

* idle timeout (``timeout_keep_alive``): also armed when the connection opens,
  so a connection that never sends a byte is closed like an idle keep-alive one;
* header deadline (``timeout_headers``): from the first byte of a request, its
  request line and headers must be complete within this many seconds, or the
  client gets ``408`` (JSON body) and the connection is closed;
* lingering close: when the server closes a connection whose request body was
  not read to the end (413 for an over-limit body, 408 for a slow body), it
  sends the response, half-closes (FIN), and then reads and discards what the
  client still sends for at most :data:`LINGER_S` seconds /
  :data:`LINGER_BYTES` bytes before closing.  Without this, the kernel answers
  the unread data with a reset and the client may never see the 413.

It also holds each response's status line and headers back until the first
piece of its body, so that a small response leaves in one ``send`` (one TCP
segment) instead of two; the bytes are unchanged (measured under serve_bench:
1,500 -> 1,002 ``sendto`` calls for 500 responses, the rest being the event
loop's own wake-ups).

The body deadline is enforced by :class:`serving.guard.GuardedApp` (the ASGI
layer reads the body); header size is bounded by h11's
``h11_max_incomplete_event_size`` while a head is incomplete (uvicorn answers
400 and closes) and by GuardedApp once it is complete.

Use as ``uvicorn.Config(..., http=functools.partial(GuardedH11Protocol, timeout_headers=10))``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from isfe_model.jsonsafe import dumps

__all__ = ["LINGER_BYTES", "LINGER_S", "GuardedH11Protocol"]

#: Longest a closing connection keeps reading (and discarding) an unread request body.
LINGER_S = 2.0
#: Most bytes a closing connection reads and discards before closing anyway.
LINGER_BYTES = 64 << 20


def _timeout_response(seconds: float) -> bytes:
    body = dumps({"error": "header_timeout",
                  "detail": f"request line and headers not received within {seconds:g} s; send the whole "
                            f"request at once"}).encode()
    head = (f"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n\r\n").encode()
    return head + body


class _LingeringTransport:
    """Proxy of an asyncio transport: a response's head goes out with its body, and ``close()`` lingers.

    uvicorn writes a response's status line and headers, then its body, as two
    writes: two ``send`` calls and two TCP segments per response.  The head is
    held back here and joined to the next write (the body's first piece), so a
    whole small response is one ``send``.  Anything else the protocol does with
    the transport (close, half-close, abort) sends a held head first.
    """

    def __init__(self, transport: asyncio.Transport, protocol: "GuardedH11Protocol"):
        self._transport = transport
        self._protocol = protocol
        self._held = b""
        self._headed: Any = None  # the request-response cycle whose head was seen last

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def write(self, data: bytes) -> None:
        cycle = self._protocol.cycle
        if (cycle is not None and cycle is not self._headed and cycle.response_started
                and not cycle.response_complete):
            self._headed = cycle  # the first write of a started response: its head
            self._held += data
            return
        if self._held:
            data, self._held = self._held + data, b""
        if data:
            self._transport.write(data)

    def flush(self) -> None:
        """Send a held response head now."""
        if self._held:
            held, self._held = self._held, b""
            self._transport.write(held)

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._held = b""
        self._transport.abort()

    def close(self) -> None:
        self.flush()
        self._protocol.close_lingering()


class GuardedH11Protocol(H11Protocol):
    """:class:`uvicorn.protocols.http.h11_impl.H11Protocol` plus idle/header deadlines and a lingering close."""

    def __init__(self, *args: Any, timeout_headers: float = 10.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.timeout_headers = float(timeout_headers)
        self._header_timer: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        self._lingering = False
        self._lingered_bytes = 0
        self._raw: asyncio.Transport | None = None
        self._proxy: _LingeringTransport | None = None

    # ------------------------------------------------------------ connection
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._raw = transport
        self._proxy = _LingeringTransport(transport, self)
        super().connection_made(self._proxy)  # type: ignore[arg-type]
        # idle from the start: a connection that never sends a byte is closed like an idle keep-alive one
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            self._lingered_bytes += len(data)
            if self._lingered_bytes > LINGER_BYTES:
                self._close_now()
            return
        if self._header_timer is None and self.conn.their_state is h11.IDLE:
            self._header_timer = self.loop.call_later(self.timeout_headers, self._header_timeout)
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # request line and headers are in
            self._cancel_header_timer()

    def eof_received(self) -> bool | None:
        if self._lingering:
            self._close_now()
        return super().eof_received()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # a pipelined request already partly buffered: its headers are on the clock too
        if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0] and self._header_timer is None:
            self._header_timer = self.loop.call_later(self.timeout_headers, self._header_timeout)

    # ---------------------------------------------------------------- timers
    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self._raw is None or self._raw.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        self.logger.warning("closing a connection from %s: request headers not complete within %g s",
                            "%s:%d" % self.client if self.client else "?", self.timeout_headers)
        if self._proxy is not None:
            self._proxy.flush()
        self._raw.write(_timeout_response(self.timeout_headers))
        self._close_now()

    # ----------------------------------------------------------------- close
    def close_lingering(self) -> None:
        """Close; if the client may still be sending a request body, half-close and drain it first."""
        raw = self._raw
        if raw is None or raw.is_closing() or self._lingering:
            return
        if self.conn.their_state is not h11.SEND_BODY or not raw.can_write_eof():
            raw.close()
            return
        self._lingering = True
        self._unset_keepalive_if_required()
        self._cancel_header_timer()
        raw.write_eof()  # the response is flushed first, then FIN
        self.flow.resume_reading()
        self._linger_timer = self.loop.call_later(LINGER_S, self._close_now)

    def _close_now(self) -> None:
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        if self._raw is not None and not self._raw.is_closing():
            if self._proxy is not None:
                self._proxy.flush()
            self._raw.close()
