"""One JSON policy for every file and response the project writes.

Strict JSON (RFC 8259) has no NaN or Infinity, and Python's ``json`` writes
them unless told not to: a report that says ``NaN`` is unreadable to most
other parsers.  Every writer in the project goes through :func:`json_safe`:

* non-finite floats (NaN, +-Inf) become ``null`` (read it as "not measured /
  not defined"; readers treat ``None`` like a missing number);
* numpy scalars and arrays become Python numbers and lists;
* tuples become lists, ``pathlib`` paths and other non-JSON keys/values strings;

and :func:`dumps` then refuses anything non-finite that is left
(``allow_nan=False``), so a NaN can never slip into a written file.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path, PurePath
from typing import Any

import numpy as np

from .atomic import atomic_write_bytes

__all__ = ["json_safe", "dumps", "write_json"]


def json_safe(obj: Any) -> Any:
    """``obj`` as plain JSON values: non-finite floats -> None, numpy -> Python, tuples -> lists, paths -> str."""
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    if isinstance(obj, dict):
        return {k if isinstance(k, str) else str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, PurePath):
        return str(obj)
    return str(obj)


def dumps(obj: Any, indent: int | None = None) -> str:
    """Strict JSON text of ``obj`` after :func:`json_safe` (never NaN/Infinity)."""
    return json.dumps(json_safe(obj), indent=indent, allow_nan=False, ensure_ascii=False)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as strict JSON (UTF-8, trailing newline) atomically (:mod:`isfe_model.atomic`)."""
    return atomic_write_bytes(path, (dumps(obj, indent=indent) + "\n").encode("utf-8"))
