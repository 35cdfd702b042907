"""Where and how training runs: the device, the numerics switches, seeding, progress output.

* :func:`resolve_device`: ``--device`` (auto, cpu, cuda, cuda:N) -> a
  ``torch.device`` with an explicit index on CUDA, or a :class:`UsageError`.
* :func:`numerics`: cuDNN autotuning and TF32 matrix products on CUDA, or
  deterministic algorithms (``--deterministic``), restored afterwards.
* :func:`seed_everything`: Python's, NumPy's and torch's global generators.
* :class:`StepProgress`: one epoch's tqdm bar (interactive stderr) or printed
  step lines (``--log-every``); the loss is read back from the device, a host
  synchronisation, only every ``log_every`` steps and only when it is shown.
"""

from __future__ import annotations

import contextlib
import random
import sys
import time
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from training.config import UsageError

__all__ = ["resolve_device", "numerics", "seed_everything", "StepProgress", "log", "silent"]


def resolve_device(name: str) -> torch.device:
    """``--device`` -> torch.device (``cuda`` becomes ``cuda:N``, the current device); UsageError with the fix."""
    if name == "auto":
        return _indexed(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise UsageError(f"--device {name}: this machine has {count} GPU(s); use cuda:0 .. cuda:{count - 1}")
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: only cpu and cuda are supported")
    return _indexed(dev)


def _indexed(dev: torch.device) -> torch.device:
    """cuda -> cuda:N (the current device): generators, tensors and DDP then agree on one device object."""
    return torch.device("cuda", torch.cuda.current_device()) if dev.type == "cuda" and dev.index is None else dev


@contextlib.contextmanager
def numerics(device: torch.device, deterministic: bool) -> Iterator[None]:
    """cuDNN autotuning / TF32 for speed, or deterministic algorithms; restored afterwards."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.get_float32_matmul_precision())
    try:
        if deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
        elif device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.set_float32_matmul_precision("high")
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2], saved[3]
        torch.set_float32_matmul_precision(saved[4])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def log(*args: Any) -> None:
    """Progress lines, flushed at once: a log file or pipe (a batch job's ``> train.log``) shows them as they happen."""
    print(*args, flush=True)


def silent(*_a: Any, **_k: Any) -> None:
    """The log of the processes other than rank 0."""


def progress_bar(total: int, desc: str, enabled: bool):
    """tqdm bar on an interactive stderr when tqdm is installed, else None."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    bar = tqdm(total=total, desc=desc, leave=False, disable=None, file=sys.stderr)
    if bar.disable:  # not a terminal: no bar, no read-backs for it
        return None
    return bar


class StepProgress:
    """The steps of one epoch as a bar and/or printed lines; ``t0`` is when the epoch started.

    Args:
        steps: steps in the epoch.
        epoch, epochs: shown in the bar and the lines.
        batch_size: global batch N (a step embeds 2N views: the rate counts views).
        shown: whether this process shows anything (rank 0).
        log_every: ``--log-every`` (None: read the loss back every 50 steps, for the bar only).
        log: where the printed lines go.
    """

    def __init__(self, steps: int, epoch: int, epochs: int, batch_size: int, shown: bool, log_every: int | None,
                 log: Callable[..., None]):
        self.steps, self.epoch, self.batch_size, self.log = steps, epoch, batch_size, log
        self.every, self.print_steps = log_every or 50, log_every is not None
        self.bar = progress_bar(steps, f"epoch {epoch}/{epochs}", shown)
        self.t0 = time.time()

    def update(self, step: int, loss: Tensor, lr: float) -> None:
        """After step ``step`` (0-based) with its detached ``loss`` (read back only when shown)."""
        if self.bar is not None:
            self.bar.update(1)
        if (step + 1) % self.every and step != self.steps - 1:
            return
        if self.bar is None and not self.print_steps:
            return
        value = loss.item()  # the only host sync inside the epoch
        rate = 2 * self.batch_size * (step + 1) / (time.time() - self.t0)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{value:.3f}", img_s=f"{rate:.0f}")
        else:
            self.log(f"  epoch {self.epoch} step {step + 1}/{self.steps}: loss {value:.4f}  lr {lr:.4g}  "
                     f"({rate:.0f} images/s)")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
