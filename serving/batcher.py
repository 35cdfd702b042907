"""Micro-batching: concurrent requests share one inference call.

Requests put single preprocessed images (float32 [3, S, S]) on a queue; one
worker thread takes the first waiting image, then keeps collecting until it
has ``max_batch_size`` images or ``max_wait_ms`` have passed since that first
image, stacks them into [B, 3, S, S] and calls the inference function once.
While the worker runs a batch, new requests pile up in the queue and form the
next batch, so the batch size (and throughput) grows with load while a lone
request waits at most ``max_wait_ms``.

Inference runs on the worker thread, never on the asyncio event loop;
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


_STOP = object()


class MicroBatcher:
    """Collect single inputs into batches for ``fn`` on a worker thread.

    Args:
        fn: inference function, float32 [B, *item_shape] -> [B, ...] (row i
            belongs to input i).
        max_batch_size: most inputs per call (1 disables batching).
        max_wait_ms: how long the first input of a batch may wait for company.
        max_queue: most inputs waiting; :meth:`submit` raises
            :class:`BatcherFull` beyond it (backpressure instead of unbounded memory).
        on_batch: called as ``on_batch(batch_size, seconds)`` after each call
            (metrics).
    """

    def __init__(
        self,
        fn: InferenceFn,
        max_batch_size: int = 32,
        max_wait_ms: float = 2.0,
        max_queue: int = 1024,
        on_batch: Callable[[int, float], None] | None = None,
        name: str = "isfe-inference",
    ):
        if int(max_batch_size) < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if float(max_wait_ms) < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        if int(max_queue) < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.fn = fn
        self.max_batch_size = int(max_batch_size)
        self.max_wait_s = float(max_wait_ms) / 1000.0
        self.max_queue = int(max_queue)
        self.on_batch = on_batch
        self.name = name
        self._queue: queue.Queue = queue.Queue()
        self._pending = 0  # inputs submitted and not yet taken by the worker
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.batches = 0  # inference calls made (for tests/diagnostics)

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> "MicroBatcher":
        if self._thread is not None:
            return self
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        """Refuse new inputs, finish the queued ones, and join the worker."""
        with self._lock:
            self._closed = True
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closed

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
            if self._closed or self._thread is None:
                raise BatcherClosed("the inference worker is not running (server starting or shutting down)")
            if self._pending >= self.max_queue:
                raise BatcherFull(f"{self._pending} images are waiting for inference (limit {self.max_queue}); "
                                  f"retry later")
            self._pending += 1
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put(_Item(x, fut))
        return fut

    def submit_many(self, xs: np.ndarray | list[np.ndarray]) -> list[concurrent.futures.Future]:
        """Queue several inputs at once, all or none (they may land in different batches)."""
        n = len(xs)
        with self._lock:
            if self._closed or self._thread is None:
                raise BatcherClosed("the inference worker is not running (server starting or shutting down)")
            if self._pending + n > self.max_queue:
                raise BatcherFull(f"{self._pending} images are waiting for inference (limit {self.max_queue}); "
                                  f"retry later")
            self._pending += n
        futs = []
        for x in xs:
            fut: concurrent.futures.Future = concurrent.futures.Future()
            self._queue.put(_Item(x, fut))
            futs.append(fut)
        return futs

    async def run(self, xs: np.ndarray | list[np.ndarray]) -> np.ndarray:
        """Await the outputs for inputs ``xs`` ([n, *item_shape]) -> [n, ...]."""
        futs = self.submit_many(xs)
        rows = await asyncio.gather(*(asyncio.wrap_future(f) for f in futs))
        return np.stack(rows)

    # ------------------------------------------------------------------ worker
    def _take(self) -> tuple[list[_Item], bool]:
        """Block for the next batch; returns (items, stop_requested)."""
        first = self._queue.get()
        if first is _STOP:
            return [], True
        batch = [first]
        deadline = time.monotonic() + self.max_wait_s
        stop = False
        while len(batch) < self.max_batch_size:
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
        # fail whatever is still queued (should be nothing: submit refuses after stop)
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP and item.future.set_running_or_notify_cancel():
                item.future.set_exception(BatcherClosed("server shutting down"))

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
        self.batches += 1
        if self.on_batch is not None:
            try:
                self.on_batch(len(live), dt)
            except Exception:  # metrics must never break serving
                log.exception("on_batch callback failed")
        for i, it in enumerate(live):
            it.future.set_result(y[i])
