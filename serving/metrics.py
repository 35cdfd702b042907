"""The server's Prometheus metrics, on ``prometheus_client`` (one process or several).

Exposition: the Prometheus text format 0.0.4
(``Content-Type: text/plain; version=0.0.4; charset=utf-8``)::

    isfe_requests_total{endpoint="/v1/embed",method="POST",status="200"} 3.0
    isfe_request_duration_seconds_bucket{endpoint="/v1/embed",le="0.005"} 1.0
    ...
    isfe_request_duration_seconds_count{endpoint="/v1/embed"} 3.0

plus the library's standard ``process_*`` (CPU seconds, resident memory, open
fds, start time) and ``python_*`` metrics.

**Several workers** (``--workers N``): ``python -m serving`` points
``PROMETHEUS_MULTIPROC_DIR`` at a fresh folder before the workers start, so
every worker keeps its samples in memory-mapped files there and ``/metrics``
on any worker reads all of them through
:class:`prometheus_client.multiprocess.MultiProcessCollector`: counters and
histograms are summed over the workers (including workers that have exited),
``isfe_requests_in_flight`` and ``isfe_queue_depth`` are summed over the live
workers, and the process metrics carry a ``pid`` label, one set per live
worker.  A worker marks itself dead when it stops
(:func:`prometheus_client.multiprocess.mark_process_dead`).

Label values come from bounded sets only, so no client can grow the
exposition: endpoints outside the API's paths are "other", and so are HTTP
methods outside :data:`METHODS` (see :func:`method_label`).
"""

from __future__ import annotations

import glob
import os
from typing import Callable, Iterable

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import Metric

__all__ = ["CONTENT_TYPE", "MULTIPROC_ENV", "METHODS", "ServingMetrics", "mark_worker_dead", "method_label",
           "multiprocess_dir"]

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
#: The environment variable that switches prometheus_client to its multiprocess mode.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: Request latency buckets in seconds (1 ms .. 10 s).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Batch size buckets (images per inference call).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

#: HTTP methods that get their own metrics label; any other method name is counted as "other".
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})

# ``*_created`` samples double the exposition and no dashboard reads them.
prometheus_client.disable_created_metrics()


def method_label(method: str) -> str:
    """The ``method`` label for a request: the method if it is in :data:`METHODS`, else ``"other"``."""
    return method if method in METHODS else "other"


def multiprocess_dir() -> str | None:
    """The multiprocess folder when this process runs in multiprocess mode, else None."""
    return os.environ.get(MULTIPROC_ENV) or None


def mark_worker_dead(pid: int | None = None) -> None:
    """Drop a stopping worker's live gauges (in-flight, queue depth) from the multiprocess folder."""
    if multiprocess_dir():
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid() if pid is None else pid)


class WorkerProcessCollector:
    """``process_*`` metrics of every live worker, labelled ``pid`` (multiprocess mode).

    The workers are the pids that own sample files in the multiprocess folder
    and still run; each is read from ``/proc/<pid>`` by prometheus_client's
    own :class:`~prometheus_client.ProcessCollector`.
    """

    def __init__(self, directory: str):
        self.directory = directory

    def _pids(self) -> list[int]:
        pids = set()
        for path in glob.glob(os.path.join(self.directory, "*.db")):
            tail = os.path.basename(path)[:-3].rsplit("_", 1)[-1]
            if tail.isdigit() and os.path.exists(f"/proc/{tail}"):
                pids.add(int(tail))
        return sorted(pids)

    def collect(self) -> Iterable[Metric]:
        merged: dict[str, Metric] = {}
        for pid in self._pids():
            for m in prometheus_client.ProcessCollector(pid=lambda pid=pid: pid, registry=None).collect():
                out = merged.setdefault(m.name, Metric(m.name, m.documentation, m.type))
                for s in m.samples:
                    out.add_sample(s.name, {**s.labels, "pid": str(pid)}, s.value)
        return list(merged.values())


class ServingMetrics:
    """The metrics of one server process (or, in multiprocess mode, this worker's share of them).

    Attributes are prometheus_client metrics: ``requests`` (labels endpoint,
    method, status), ``latency`` (endpoint), ``in_flight``, ``batch_size``,
    ``inference``, ``images``, ``image_errors`` (reason), ``decode_restarts``
    (reason), ``queue_depth``, ``reloads`` (result: ok, error), and the
    gallery's ``gallery_items``.
    """

    def __init__(self, queue_depth: Callable[[], float] | None = None):
        self.multiprocess = multiprocess_dir()
        own = None if self.multiprocess else CollectorRegistry(auto_describe=True)
        live = {"multiprocess_mode": "livesum"}
        self.requests = Counter("isfe_requests_total", "HTTP requests by endpoint, method and status.",
                                ("endpoint", "method", "status"), registry=own)
        self.latency = Histogram("isfe_request_duration_seconds", "HTTP request latency in seconds, by endpoint.",
                                 ("endpoint",), buckets=LATENCY_BUCKETS, registry=own)
        self.in_flight = Gauge("isfe_requests_in_flight", "HTTP requests being served now.", registry=own, **live)
        self.batch_size = Histogram("isfe_batch_size", "Images per inference call (micro-batch size).",
                                    buckets=BATCH_BUCKETS, registry=own)
        self.inference = Histogram("isfe_inference_duration_seconds",
                                   "Duration of one batched inference call in seconds.",
                                   buckets=LATENCY_BUCKETS, registry=own)
        self.images = Counter("isfe_images_embedded_total", "Images embedded by the model.", registry=own)
        self.image_errors = Counter("isfe_image_errors_total", "Uploads refused, by reason.", ("reason",), registry=own)
        self.decode_restarts = Counter("isfe_decode_worker_restarts_total",
                                       "Decode worker processes replaced, by reason (timeout, crash, demoted).",
                                       ("reason",),
                                       registry=own)
        self.reloads = Counter("isfe_gallery_reload_total", "Gallery reloads per worker, by result (ok, error).",
                               ("result",),
                               registry=own)
        self.gallery_items = Gauge("isfe_gallery_items", "Items in the gallery being served.", registry=own,
                                   multiprocess_mode="max")
        self.queue_depth = Gauge("isfe_queue_depth", "Images waiting for the inference worker.", registry=own, **live)
        self._depth = queue_depth or (lambda: 0.0)
        if own is None:
            self.registry = CollectorRegistry()
            from prometheus_client import multiprocess

            multiprocess.MultiProcessCollector(self.registry)
            self.registry.register(WorkerProcessCollector(self.multiprocess))  # type: ignore[arg-type]
        else:
            self.registry = own
            self.queue_depth.set_function(lambda: float(self._depth()))
            prometheus_client.ProcessCollector(registry=own)
            prometheus_client.PlatformCollector(registry=own)
            prometheus_client.GCCollector(registry=own)

    def record_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.inference.observe(seconds)
        self.images.inc(size)
        if self.multiprocess:
            self.queue_depth.set(self._depth())

    def note_queue(self) -> None:
        """Multiprocess mode: publish this worker's queue depth (a callback cannot be read across processes)."""
        if self.multiprocess:
            self.queue_depth.set(self._depth())

    def render(self) -> bytes:
        return generate_latest(self.registry)
