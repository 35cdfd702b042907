"""A small progress line on stderr (no tqdm dependency).

On a terminal the line redraws itself in place (``\\r``); when the stream is
not a terminal (a log file, CI) and progress was asked for explicitly, it
prints a full line every few seconds instead.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress", "format_duration", "stderr_is_tty"]


def stderr_is_tty() -> bool:
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):  # closed or replaced stream
        return False


def format_duration(seconds: float) -> str:
    """3 -> '3s', 75 -> '1m15s', 3700 -> '1h01m'."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class Progress:
    """``Progress(total, "embedding")``; ``update(n)`` after each step; ``close()`` at the end.

    Disabled (``enabled=False``) it does nothing, so callers need no ``if``.
    Output looks like ``embedding  1,024/5,000  20%  310.2 img/s  ETA 13s``; with
    ``total=None`` (a stream of unknown length) ``embedding  1,024  310.2 img/s  in 3s``.
    """

    def __init__(self, total: int | None, label: str, enabled: bool = True, stream: TextIO | None = None,
                 unit: str = "img", interval: float | None = None):
        self.total = None if total is None else max(0, int(total))
        self.label = label
        self.enabled = bool(enabled)
        self.stream = stream if stream is not None else sys.stderr
        self.unit = unit
        try:
            self.tty = bool(self.stream.isatty())
        except (AttributeError, ValueError):
            self.tty = False
        self.interval = interval if interval is not None else (0.2 if self.tty else 5.0)
        self.done = 0
        self.start = time.monotonic()
        self._last = 0.0
        self._width = 0
        self._closed = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        if self.total is None:
            return "  ".join([self.label, f"{self.done:,}", f"{rate:.1f} {self.unit}/s",
                              f"in {format_duration(elapsed)}"])
        parts = [self.label, f"{self.done:,}/{self.total:,}"]
        if self.total:
            parts.append(f"{100.0 * self.done / self.total:3.0f}%")
        parts.append(f"{rate:.1f} {self.unit}/s")
        if self.done < self.total and rate > 0:
            parts.append(f"ETA {format_duration((self.total - self.done) / rate)}")
        else:
            parts.append(f"in {format_duration(elapsed)}")
        return "  ".join(parts)

    def update(self, n: int = 1) -> None:
        self.done += int(n)
        if not self.enabled or self._closed:
            return
        now = time.monotonic()
        if now - self._last >= self.interval or (self.total is not None and self.done >= self.total):
            self._last = now
            self._write()

    def _write(self) -> None:
        text = self.line()
        try:
            if self.tty:
                pad = " " * max(0, self._width - len(text))
                self.stream.write("\r" + text + pad)
                self._width = len(text)
            else:
                self.stream.write(text + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed or broken stderr must not stop the work
            self.enabled = False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.enabled:
            return
        try:
            if self.tty:
                self._write_final()
            elif self._last == 0.0 or self.done != self.total:
                self.stream.write(self.line() + "\n")
                self.stream.flush()
        except (OSError, ValueError):
            pass

    def _write_final(self) -> None:
        text = self.line()
        pad = " " * max(0, self._width - len(text))
        self.stream.write("\r" + text + pad + "\n")
        self.stream.flush()
