"""argparse ``type=`` converters shared by the command-line tools (isfe_model, serving, demo).

Each raises ``argparse.ArgumentTypeError`` with a message that names the bad value,
so argparse prints one clear line and exits with code 2.
"""

from __future__ import annotations

import argparse
import math

__all__ = ["nonneg_float", "port", "port_or_zero", "positive_int"]


def positive_int(text: str) -> int:
    """A whole number >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def nonneg_float(text: str) -> float:
    """A finite number >= 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not (v >= 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return v


def _port(text: str, lowest: int) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not lowest <= v <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in {lowest}..65535, got {v}")
    return v


def port(text: str) -> int:
    """A TCP port 1..65535."""
    return _port(text, 1)


def port_or_zero(text: str) -> int:
    """A TCP port 0..65535 (0: the system picks a free one)."""
    return _port(text, 0)
