"""Prometheus metrics without a client library: counters, gauges, histograms.

The exposition is the Prometheus text format, version 0.0.4
(``Content-Type: text/plain; version=0.0.4; charset=utf-8``)::

    # HELP isfe_requests_total HTTP requests by endpoint, method and status.
    # TYPE isfe_requests_total counter
    isfe_requests_total{endpoint="/v1/embed",method="POST",status="200"} 3
    # TYPE isfe_request_duration_seconds histogram
    isfe_request_duration_seconds_bucket{endpoint="/v1/embed",le="0.005"} 1
    ...
    isfe_request_duration_seconds_bucket{endpoint="/v1/embed",le="+Inf"} 3
    isfe_request_duration_seconds_sum{endpoint="/v1/embed"} 0.0123
    isfe_request_duration_seconds_count{endpoint="/v1/embed"} 3

All metric objects are thread-safe: the event loop records requests while the
inference worker thread records batch sizes.

Label values come from bounded sets only, so no client can grow the
exposition: endpoints outside the API's paths are "other", and so are HTTP
methods outside :data:`METHODS` (see :func:`method_label`).
"""

from __future__ import annotations

import math
import threading
from typing import Callable, Iterable, Sequence

__all__ = [
    "CONTENT_TYPE",
    "Counter",
    "Gauge",
    "Histogram",
    "Registry",
    "ServingMetrics",
    "format_value",
    "method_label",
]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Request latency buckets in seconds (1 ms .. 10 s).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Batch size buckets (images per inference call).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

LabelValues = tuple[str, ...]

#: HTTP methods that get their own metrics label; any other method name is counted as "other".
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


def method_label(method: str) -> str:
    """The ``method`` label for a request: the method if it is in :data:`METHODS`, else ``"other"``."""
    return method if method in METHODS else "other"


def format_value(v: float) -> str:
    """A sample value in exposition syntax (``+Inf``, ``-Inf``, ``NaN``, integers without ``.0``)."""
    v = float(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(v)


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labels(names: Sequence[str], values: Sequence[str], extra: tuple[str, str] | None = None) -> str:
    pairs = [f'{n}="{_escape_label(str(v))}"' for n, v in zip(names, values)]
    if extra is not None:
        pairs.append(f'{extra[0]}="{_escape_label(extra[1])}"')
    return "{" + ",".join(pairs) + "}" if pairs else ""


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()):
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labels: Sequence[str]) -> LabelValues:
        key = tuple(str(v) for v in labels)
        if len(key) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {key}")
        return key

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]

    def render(self) -> list[str]:  # pragma: no cover - abstract
        raise NotImplementedError


class Counter(_Metric):
    """A monotonically increasing count per label combination."""

    kind = "counter"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()):
        super().__init__(name, help, labelnames)
        self._values: dict[LabelValues, float] = {}

    def inc(self, labels: Sequence[str] = (), amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, labels: Sequence[str] = ()) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return self.header() + [f"{self.name}{_labels(self.labelnames, k)} {format_value(v)}" for k, v in items]


class Gauge(_Metric):
    """A value that goes up and down; optionally read from a callback at render time."""

    kind = "gauge"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = (), callback: Callable[[], float] | None = None):
        super().__init__(name, help, labelnames)
        if callback is not None and labelnames:
            raise ValueError("callback gauges have no labels")
        self._values: dict[LabelValues, float] = {}
        self._callback = callback

    def set(self, value: float, labels: Sequence[str] = ()) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def inc(self, amount: float = 1.0, labels: Sequence[str] = ()) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def dec(self, amount: float = 1.0, labels: Sequence[str] = ()) -> None:
        self.inc(-amount, labels)

    def value(self, labels: Sequence[str] = ()) -> float:
        if self._callback is not None:
            return float(self._callback())
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        if self._callback is not None:
            return self.header() + [f"{self.name} {format_value(self._callback())}"]
        with self._lock:
            items = sorted(self._values.items())
        return self.header() + [f"{self.name}{_labels(self.labelnames, k)} {format_value(v)}" for k, v in items]


class Histogram(_Metric):
    """Observations counted into cumulative ``le`` buckets, plus ``_sum`` and ``_count``."""

    kind = "histogram"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = (), buckets: Iterable[float] = LATENCY_BUCKETS):
        super().__init__(name, help, labelnames)
        if "le" in self.labelnames:
            raise ValueError("'le' is reserved for histogram buckets")
        bounds = sorted(float(b) for b in buckets)
        if not bounds or len(set(bounds)) != len(bounds):
            raise ValueError("histogram buckets must be non-empty and distinct")
        if not math.isinf(bounds[-1]):
            bounds.append(math.inf)
        self.buckets = tuple(bounds)
        # per label set: [per-bucket (non-cumulative) counts..., sum]
        self._data: dict[LabelValues, tuple[list[int], list[float]]] = {}

    def observe(self, value: float, labels: Sequence[str] = ()) -> None:
        key = self._key(labels)
        value = float(value)
        # first bucket whose upper bound is >= value (le = "less or equal")
        idx = next(i for i, b in enumerate(self.buckets) if value <= b or math.isnan(value) and math.isinf(b))
        with self._lock:
            counts, total = self._data.setdefault(key, ([0] * len(self.buckets), [0.0]))
            counts[idx] += 1
            total[0] += value

    def snapshot(self, labels: Sequence[str] = ()) -> tuple[list[int], float, int]:
        """(cumulative bucket counts, sum, count) for one label set."""
        key = self._key(labels)
        with self._lock:
            counts, total = self._data.get(key, ([0] * len(self.buckets), [0.0]))
            counts = list(counts)
            s = total[0]
        cum, run = [], 0
        for c in counts:
            run += c
            cum.append(run)
        return cum, s, run

    def render(self) -> list[str]:
        with self._lock:
            keys = sorted(self._data)
        lines = self.header()
        for key in keys:
            cum, s, n = self.snapshot(key)
            for bound, c in zip(self.buckets, cum):
                lines.append(f"{self.name}_bucket{_labels(self.labelnames, key, ('le', format_value(bound)))} {c}")
            lines.append(f"{self.name}_sum{_labels(self.labelnames, key)} {format_value(s)}")
            lines.append(f"{self.name}_count{_labels(self.labelnames, key)} {n}")
        return lines


class Registry:
    """An ordered set of metrics rendered together."""

    def __init__(self) -> None:
        self._metrics: list[_Metric] = []
        self._names: set[str] = set()

    def register(self, metric: _Metric) -> _Metric:
        if metric.name in self._names:
            raise ValueError(f"metric {metric.name} registered twice")
        self._names.add(metric.name)
        self._metrics.append(metric)
        return metric

    def render(self) -> str:
        lines: list[str] = []
        for m in self._metrics:
            lines.extend(m.render())
        return "\n".join(lines) + "\n"


class ServingMetrics:
    """The metrics the ISFE server exports (one instance per server process)."""

    def __init__(self, queue_depth: Callable[[], float] | None = None):
        self.registry = Registry()
        r = self.registry
        self.requests = r.register(Counter("isfe_requests_total", "HTTP requests by endpoint, method and status.", ("endpoint", "method", "status")))
        self.latency = r.register(
            Histogram("isfe_request_duration_seconds", "HTTP request latency in seconds, by endpoint.", ("endpoint",), LATENCY_BUCKETS)
        )
        self.in_flight = r.register(Gauge("isfe_requests_in_flight", "HTTP requests being served now."))
        self.batch_size = r.register(Histogram("isfe_batch_size", "Images per inference call (micro-batch size).", (), BATCH_BUCKETS))
        self.inference = r.register(
            Histogram("isfe_inference_duration_seconds", "Duration of one batched inference call in seconds.", (), LATENCY_BUCKETS)
        )
        self.images = r.register(Counter("isfe_images_embedded_total", "Images embedded by the model."))
        self.image_errors = r.register(Counter("isfe_image_errors_total", "Uploads refused, by reason.", ("reason",)))
        self.decode_restarts = r.register(
            Counter("isfe_decode_worker_restarts_total", "Decode worker processes replaced, by reason (timeout, crash, demoted).", ("reason",))
        )
        self.queue_depth = r.register(
            Gauge("isfe_queue_depth", "Images waiting for the inference worker.", callback=queue_depth or (lambda: 0.0))
        )

    def record_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.inference.observe(seconds)
        self.images.inc(amount=size)

    def render(self) -> str:
        return self.registry.render()
