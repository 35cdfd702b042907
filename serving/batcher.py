"""Micro-batching: concurrent requests share one inference call.

Requests put single preprocessed images (float32 [3, S, S]) on a queue; one
worker thread takes the first waiting image, then keeps collecting until it
has ``max_batch_size`` images or ``max_wait_ms`` have passed since that first
image was *submitted*, stacks them into [B, 3, S, S] and calls the inference
function once.  While the worker runs a batch, new requests pile up in the
queue and form the next batch, so the batch size (and throughput) grows with
load while a lone request waits at most ``max_wait_ms``.  Under load the first
waiting image has usually waited longer than that already (it came in during
the previous batch): the worker then takes what is queued and runs at once,
instead of leaving the cores idle while it waits for a few more.

With ``workers`` > 1 that many worker threads take batches from the one
queue, each running whole batches on its own: with ONNX Runtime at one
intra-op thread each, a batch never waits for a sibling thread that the
event loop has pushed off its core (on a small machine the HTTP work and the
inference share the cores).  Such workers never wait for company: a free
worker takes its share of what is queued (the queue split over the idle
workers, at most ``max_batch_size``) and runs it, so batches form only from a
backlog and ``max_wait_ms`` is not used.

Inference runs on the worker threads, never on the asyncio event loop;
results travel back through :class:`concurrent.futures.Future` objects that
``asyncio.wrap_future`` turns into awaitables.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

__all__ = ["BatcherClosed", "BatcherFull", "MicroBatcher"]

log = logging.getLogger("serving.batcher")

InferenceFn = Callable[[np.ndarray], np.ndarray]


class BatcherFull(RuntimeError):
    """The queue holds ``max_queue`` images already: the server is overloaded."""


class BatcherClosed(RuntimeError):
    """The batcher was stopped (server shutting down)."""


@dataclass
class _Item:
    x: np.ndarray
    future: concurrent.futures.Future
    queued: float  # time.monotonic() at submit


_STOP = object()


class MicroBatcher:
    """Collect single inputs into batches for ``fn`` on a worker thread.

    Args:
        fn: inference function, float32 [B, *item_shape] -> [B, ...] (row i
            belongs to input i).
        max_batch_size: most inputs per call (1 disables batching).
        max_wait_ms: how long the first input of a batch may wait for company, counted from its
            :meth:`submit` (time it spent queued behind the previous batch counts); one worker only.
        max_queue: most inputs waiting; :meth:`submit` raises
            :class:`BatcherFull` beyond it (backpressure instead of unbounded memory).
        on_batch: called as ``on_batch(batch_size, seconds)`` after each call
            (metrics; from any worker thread).
        workers: worker threads, each taking and running whole batches (``fn`` must be
            thread-safe when > 1: ONNX Runtime's ``InferenceSession.run`` is).
    """

    def __init__(
        self,
        fn: InferenceFn,
        max_batch_size: int = 32,
        max_wait_ms: float = 2.0,
        max_queue: int = 1024,
        on_batch: Callable[[int, float], None] | None = None,
        name: str = "isfe-inference",
        workers: int = 1,
    ):
        if int(max_batch_size) < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if float(max_wait_ms) < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        if int(max_queue) < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        if int(workers) < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.fn = fn
        self.max_batch_size = int(max_batch_size)
        self.max_wait_s = float(max_wait_ms) / 1000.0
        self.max_queue = int(max_queue)
        self.on_batch = on_batch
        self.name = name
        self.workers = int(workers)
        self._queue: queue.Queue = queue.Queue()
        self._pending = 0  # inputs submitted and not yet taken by a worker
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._idle = 0  # workers waiting for an input
        self._closed = False
        self.batches = 0  # inference calls made (for tests/diagnostics)

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> "MicroBatcher":
        if self._threads:
            return self
        self._closed = False
        self._threads = [threading.Thread(target=self._run, name=self.name if self.workers == 1 else f"{self.name}-{i}",
                                          daemon=True) for i in range(self.workers)]
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        """Refuse new inputs, finish the queued ones, and join the workers (``timeout`` in all)."""
        with self._lock:
            self._closed = True
        if not self._threads:
            return
        for _ in self._threads:
            self._queue.put(_STOP)  # one each; queued inputs come first
        end = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if end is None else max(0.0, end - time.monotonic()))
        late = sum(t.is_alive() for t in self._threads)  # still in a batch after the timeout
        self._threads = []
        # fail whatever is still queued (inputs the timeout left, or one that slipped in behind the stop
        # signals), then give each late worker its stop signal back
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP and item.future.set_running_or_notify_cancel():
                item.future.set_exception(BatcherClosed("server shutting down"))
        for _ in range(late):
            self._queue.put(_STOP)

    @property
    def alive(self) -> bool:
        return bool(self._threads) and all(t.is_alive() for t in self._threads) and not self._closed

    @property
    def queue_depth(self) -> int:
        return self._pending

    def __enter__(self) -> "MicroBatcher":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ submit
    def submit(self, x: np.ndarray) -> concurrent.futures.Future:
        """Queue one input (thread-safe); the future resolves to its output row."""
        with self._lock:
            if self._closed or not self._threads:
                raise BatcherClosed("the inference worker is not running (server starting or shutting down)")
            if self._pending >= self.max_queue:
                raise BatcherFull(f"{self._pending} images are waiting for inference (limit {self.max_queue}); "
                                  f"retry later")
            self._pending += 1
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put(_Item(x, fut, time.monotonic()))
        return fut

    def submit_many(self, xs: np.ndarray | list[np.ndarray]) -> list[concurrent.futures.Future]:
        """Queue several inputs at once, all or none (they may land in different batches)."""
        n = len(xs)
        with self._lock:
            if self._closed or not self._threads:
                raise BatcherClosed("the inference worker is not running (server starting or shutting down)")
            if self._pending + n > self.max_queue:
                raise BatcherFull(f"{self._pending} images are waiting for inference (limit {self.max_queue}); "
                                  f"retry later")
            self._pending += n
        futs = []
        now = time.monotonic()
        for x in xs:
            fut: concurrent.futures.Future = concurrent.futures.Future()
            self._queue.put(_Item(x, fut, now))
            futs.append(fut)
        return futs

    async def run(self, xs: np.ndarray | list[np.ndarray]) -> np.ndarray:
        """Await the outputs for inputs ``xs`` ([n, *item_shape]) -> [n, ...]."""
        futs = self.submit_many(xs)
        rows = await asyncio.gather(*(asyncio.wrap_future(f) for f in futs))
        return np.stack(rows)

    # ------------------------------------------------------------------ worker
    def _take(self) -> tuple[list[_Item], bool]:
        """Block for the next batch; returns (items, stop_requested).

        One worker collects until ``max_batch_size`` inputs or the first input's ``max_wait_ms``.
        One of several takes its share of what is queued now (the queued inputs split over it and
        the idle workers) without waiting, so that no core idles while a batch fills.
        """
        with self._lock:
            self._idle += 1
        try:
            first = self._queue.get()
        finally:
            with self._lock:
                self._idle -= 1
                idle = self._idle
        if first is _STOP:
            return [], True
        batch = [first]
        limit, deadline = self.max_batch_size, first.queued + self.max_wait_s
        if self.workers > 1:  # no waiting: what is queued now, split over the idle workers
            limit = min(limit, -(-(1 + self._queue.qsize()) // (idle + 1)))
            deadline = 0.0
        stop = False
        while len(batch) < limit:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                stop = True
                break
            batch.append(item)
        with self._lock:
            self._pending -= len(batch)
        return batch, stop

    def _run(self) -> None:
        stop = False
        while not stop:
            batch, stop = self._take()
            if batch:
                self._process(batch)

    def _process(self, batch: list[_Item]) -> None:
        live = [it for it in batch if it.future.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            x = np.stack([it.x for it in live])
            t0 = time.perf_counter()
            y = self.fn(x)
            dt = time.perf_counter() - t0
            if len(y) != len(live):
                raise RuntimeError(f"inference returned {len(y)} rows for a batch of {len(live)}")
        except BaseException as e:  # noqa: BLE001 - every waiter must hear about it
            log.exception("inference failed for a batch of %d", len(live))
            for it in live:
                it.future.set_exception(e)
            if not isinstance(e, Exception):
                raise
            return
        with self._lock:
            self.batches += 1
        if self.on_batch is not None:
            try:
                self.on_batch(len(live), dt)
            except Exception:  # metrics must never break serving
                log.exception("on_batch callback failed")
        for i, it in enumerate(live):
            it.future.set_result(y[i])
