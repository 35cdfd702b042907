"""argparse ``type=`` converters shared by the command-line tools (isfe_model, serving, demo).

Each raises ``argparse.ArgumentTypeError`` with a message that names the bad value,
so argparse prints one clear line and exits with code 2.  :func:`bind_problem` checks
a ``--host``/``--port`` pair the same way before a server loads anything.
"""

from __future__ import annotations

import argparse
import errno
import math
import socket
from collections.abc import Callable

__all__ = ["bind_problem", "nonneg_float", "nonneg_int", "port", "port_or_zero", "positive_float", "positive_int",
           "positive_seconds"]


def _convert(text: str, kind: type, what: str):
    """``kind(text)``, or ``ArgumentTypeError("expected WHAT, got 'TEXT'")``."""
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def _whole(text: str, what: str, least: int) -> int:
    """A whole number >= ``least``; ``what`` names it in the message."""
    v = _convert(text, int, what)
    if v < least:
        raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
    return v


def _finite(text: str, what: str, ok: Callable[[float], bool]) -> float:
    """A finite float with ``ok(v)``; ``what`` ("a number > 0") names it in the messages."""
    v = _convert(text, float, what)
    if not (ok(v) and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected a finite {what.removeprefix('a ')}, got {text}")
    return v


def positive_int(text: str) -> int:
    """A whole number >= 1."""
    return _whole(text, "a positive integer", 1)


def nonneg_int(text: str) -> int:
    """A whole number >= 0."""
    return _whole(text, "a whole number >= 0", 0)


def nonneg_float(text: str) -> float:
    """A finite number >= 0."""
    return _finite(text, "a number >= 0", lambda v: v >= 0)


def positive_float(text: str) -> float:
    """A finite number > 0."""
    return _finite(text, "a number > 0", lambda v: v > 0)


def positive_seconds(text: str) -> float:
    """A finite number of seconds > 0."""
    return _finite(text, "a number of seconds > 0", lambda v: v > 0)


def _port(text: str, lowest: int) -> int:
    v = _convert(text, int, "a port number")
    if not lowest <= v <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in {lowest}..65535, got {v}")
    return v


def port(text: str) -> int:
    """A TCP port 1..65535."""
    return _port(text, 1)


def port_or_zero(text: str) -> int:
    """A TCP port 0..65535 (0: the system picks a free one)."""
    return _port(text, 0)


def bind_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on (port in use, not this machine's address, privileged), or None.

    Tried with the options servers bind with (SO_REUSEADDR), then closed at once: the server and the
    demo call it before the model and gallery load, so that a busy port costs no start-up and gets
    one line naming the fix.  Port 0 (any free port) is not checked.
    """
    if port == 0:
        return None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        return f"--host {host}: cannot resolve it ({e.strerror}); give an address of this machine, e.g. 127.0.0.1"
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            where = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
            if e.errno == errno.EADDRINUSE:
                return f"{where} is already in use (another server?); stop it or choose another --port"
            if e.errno == errno.EADDRNOTAVAIL:
                return f"--host {host} is not an address of this machine; use one of its own, 127.0.0.1 or 0.0.0.0"
            if e.errno == errno.EACCES:
                return f"{where}: permission denied (ports below 1024 need privileges); choose a port of 1024 or more"
            return f"cannot listen on {where} ({e.strerror or e})"
    return None
