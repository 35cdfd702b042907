"""Log configuration of the server: text or JSON lines, one access-log line per request.

``--log-format text`` (default)::

    2026-12-01 20:30:00,123 INFO serving.access[4242]: 127.0.0.1:50512 "POST /v1/search" 200 4.1 ms rid=3f2a...

``--log-format json`` -- one object per line (for log shippers)::

    {"ts": "2026-12-01T20:30:00.123Z", "level": "INFO", "logger": "serving.access", "pid": 4242,
     "msg": "...", "request_id": "3f2a...", "method": "POST", "path": "/v1/search", "status": 200,
     "duration_ms": 4.1, "client": "127.0.0.1:50512"}

The same configuration is handed to uvicorn (``log_config``), so its own
lines (startup, shutdown, errors) come out in the same format; uvicorn's
access log is off because :class:`serving.guard.GuardedApp` writes one that
carries the request ID.
"""

from __future__ import annotations

import datetime as _dt
import logging
import logging.config
from typing import Any

from isfe_model.jsonsafe import dumps, json_safe

__all__ = ["ACCESS_FIELDS", "JsonFormatter", "configure_logging", "log_config"]

#: The ``extra`` fields of an access-log record (also the JSON keys).
ACCESS_FIELDS = ("request_id", "method", "path", "status", "duration_ms", "client")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"


class JsonFormatter(logging.Formatter):
    """A log record -> one JSON object (``ts``, ``level``, ``logger``, ``pid``, ``msg``, access fields, ``exc``)."""

    def format(self, record: logging.LogRecord) -> str:
        ts = _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc)
        out: dict[str, Any] = {"ts": ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z",
                               "level": record.levelname, "logger": record.name, "pid": record.process,
                               "msg": record.getMessage()}
        for key in ACCESS_FIELDS:
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return dumps(json_safe(out))


def log_config(level: str = "info", fmt: str = "text") -> dict[str, Any]:
    """A :func:`logging.config.dictConfig` dict for our loggers and uvicorn's (``fmt``: text or json)."""
    formatter = {"()": JsonFormatter} if fmt == "json" else {"format": TEXT_FORMAT}
    lvl = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"isfe": formatter},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "isfe", "stream": "ext://sys.stderr"}},
        "loggers": {
            "serving": {"handlers": ["stderr"], "level": lvl, "propagate": False},
            "uvicorn": {"handlers": ["stderr"], "level": lvl, "propagate": False},
            "uvicorn.error": {"level": lvl},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
        },
        "root": {"handlers": ["stderr"], "level": lvl},
    }


def configure_logging(level: str = "info", fmt: str = "text") -> dict[str, Any]:
    """Apply :func:`log_config` to this process; returns the dict (for uvicorn).

    Like :func:`logging.basicConfig`, the root logger is left alone when it
    already has handlers (an embedding application's, or pytest's).
    """
    cfg = log_config(level, fmt)
    if logging.getLogger().handlers:
        cfg = {**cfg, "root": {}}
    logging.config.dictConfig(cfg)
    return cfg
