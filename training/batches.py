"""Feeding uint8 image batches to the training device.

Two sources with the same contract — given this epoch's permutation, yield
for every step this rank's ``uint8 [b, R, R, 3]`` batch on the training
device (rows ``perm[step*B + rank*b : step*B + (rank+1)*b]``) — so the same
seed gives the same batches whichever is used:

* :class:`DeviceBatches`: the whole decoded split is copied to the device
  once; a step is one gather kernel, with no host round trip.
* :class:`HostBatches`: for splits too large for the device (e.g. 256 px
  caches): a small thread pool gathers each batch from the (memory-mapped)
  host array into pinned memory ahead of time and the copy to the device is
  asynchronous.  NumPy's ``take`` releases the GIL, so threads overlap with
  the training step; there are no worker processes to start or to pickle the
  array into.

:func:`choose_placement` decides between them (``--data-on-device`` /
``--no-data-on-device`` override it).
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

__all__ = ["DeviceBatches", "HostBatches", "choose_placement", "DEVICE_FRACTION"]

# Auto placement: the dataset goes to the GPU when it takes at most this share of
# the free GPU memory (the rest is for activations; ResNet-18 at batch 512 of 32 px
# needs a few GB), on the CPU when it takes at most this share of the RAM.
DEVICE_FRACTION = 0.25


def _ram_bytes() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def choose_placement(nbytes: int, device: torch.device, requested: bool | None) -> tuple[bool, str]:
    """(on_device, reason): whether to copy a dataset of ``nbytes`` to ``device`` once."""
    if requested is not None:
        return requested, "--data-on-device" if requested else "--no-data-on-device"
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        ok = nbytes <= DEVICE_FRACTION * free
        return ok, (
            f"{nbytes / 2**30:.2f} GiB {'<=' if ok else '>'} {DEVICE_FRACTION:.0%} "
            f"of {free / 2**30:.1f} GiB free GPU memory"
        )
    ram = _ram_bytes()
    ok = nbytes <= DEVICE_FRACTION * ram
    return ok, f"{nbytes / 2**30:.2f} GiB {'<=' if ok else '>'} {DEVICE_FRACTION:.0%} of {ram / 2**30:.1f} GiB RAM"


def _rank_rows(perm: Tensor, step: int, batch: int, rank: int, world: int) -> Tensor:
    b = batch // world
    start = step * batch + rank * b
    return perm[start : start + b]


class DeviceBatches:
    """The split lives on the device: ``images`` uint8 [N, R, R, 3] (copied once)."""

    on_device = True

    def __init__(self, images: np.ndarray | Tensor, device: torch.device):
        if isinstance(images, Tensor):
            self.images = images.to(device)
        else:
            arr = np.ascontiguousarray(images)
            if not arr.flags.writeable:  # a read-only memmap of the cache: copy (torch wants writable memory)
                arr = np.array(arr)
            self.images = torch.from_numpy(arr).to(device)
        self.device = device

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def epoch(self, perm: Tensor, steps: int, batch: int, rank: int = 0, world: int = 1) -> Iterator[Tensor]:
        perm = perm.to(self.device, non_blocking=True)
        for step in range(steps):
            yield self.images[_rank_rows(perm, step, batch, rank, world)]

    def close(self) -> None:
        pass


class HostBatches:
    """The split stays in host memory (a memmap is fine); batches are prefetched by threads.

    Args:
        images: uint8 [N, R, R, 3] host array.
        device: training device (pinned memory + asynchronous copies on CUDA).
        workers: gathering threads (>= 1).
        prefetch: batches gathered ahead of the one being trained on.
    """

    on_device = False

    def __init__(self, images: np.ndarray, device: torch.device, workers: int = 4, prefetch: int = 4):
        self.images = images
        self.device = device
        self.pin = device.type == "cuda"
        self.prefetch = max(1, int(prefetch))
        self.pool = ThreadPoolExecutor(max_workers=max(1, int(workers)), thread_name_prefix="isfe-batches")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def _gather(self, rows: np.ndarray) -> Tensor:
        t = torch.from_numpy(np.take(self.images, rows, axis=0))
        return t.pin_memory() if self.pin else t

    def epoch(self, perm: Tensor, steps: int, batch: int, rank: int = 0, world: int = 1) -> Iterator[Tensor]:
        perm_np = perm.cpu().numpy()
        pending: deque = deque()
        nxt = 0
        try:
            for step in range(steps):
                while nxt < steps and len(pending) <= self.prefetch:
                    pending.append(self.pool.submit(self._gather, _rank_rows(perm_np, nxt, batch, rank, world)))
                    nxt += 1
                host = pending.popleft().result()
                yield host.to(self.device, non_blocking=True) if self.device.type != "cpu" else host
        finally:
            for f in pending:
                f.cancel()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
