"""Exact resume: random-number-generator states and the run folder's ``last.pt``.

``last.pt`` is a regular ISFE checkpoint (``training.model.save_checkpoint``:
atomic, ``torch.load(weights_only=True)``-readable, usable by
``load_encoder``) with the training state added:

* ``optimizer``: ``opt.state_dict()`` (SGD momentum buffers);
* ``epoch`` (epochs completed) and ``step`` (optimizer steps taken); the
  learning rate is a pure function of the (fractional) epoch and the
  config (``training.step.lr_at``), so no scheduler object is stored;
* ``rng``: the states of Python's ``random``, NumPy's global generator,
  torch's CPU and CUDA generators and the training's own generators (batch
  order, augmentation), as tensors / lists / ints (see :func:`capture_rng`);
* ``train_config``: the ``TrainConfig`` fields as given (before ``auto``
  settings were resolved), ``history`` (the metrics rows so far),
  ``world_size`` and timing totals.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.model import CheckpointError, load_checkpoint

__all__ = ["ResumeError", "capture_rng", "restore_rng", "load_run_state", "RESUME_KEYS"]

RESUME_KEYS = ("optimizer", "rng", "epoch", "step", "train_config", "history")


class ResumeError(ValueError):
    """A run folder that cannot be resumed (the message says why and what to do)."""


def capture_rng(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """All random states as tensors, ints, floats and lists (weights_only-loadable).

    Args:
        generators: the training's named ``torch.Generator`` objects (any device).
    """
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out: dict[str, Any] = {
        "python": {"version": int(version), "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": (list(torch.cuda.get_rng_state_all())
                 if torch.cuda.is_available() and torch.cuda.is_initialized() else []),
        "generators": {name: g.get_state() for name, g in generators.items()},
    }
    return out


def restore_rng(state: dict[str, Any], generators: dict[str, torch.Generator]) -> list[str]:
    """Inverse of :func:`capture_rng`.

    Returns the names of the generators that could not be restored (missing
    from ``state``, or saved on another kind of device: a CUDA generator's
    state does not fit a CPU one); those keep their fresh seeding.
    """
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    nps = state["numpy"]
    np.random.set_state((nps["kind"], nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"],
                         nps["cached"]))
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    failed = []
    saved = state.get("generators", {})
    for name, g in generators.items():
        try:
            g.set_state(saved[name])
        except (KeyError, RuntimeError, TypeError):
            failed.append(name)
    return failed


def load_run_state(run_dir: str | Path) -> dict[str, Any]:
    """Read and validate ``RUN_DIR/last.pt`` for ``--resume``; raise :class:`ResumeError` with the fix."""
    run = Path(run_dir)
    if not run.exists():
        raise ResumeError(f"--resume {run}: no such run folder; pass the --out folder of an earlier run")
    if run.is_file():
        if run.name in ("last.pt", "checkpoint.pt"):
            run = run.parent
        else:
            raise ResumeError(f"--resume {run}: pass the run folder (the one holding last.pt), not a file")
    path = run / "last.pt"
    if not path.exists():
        raise ResumeError(
            f"--resume {run}: the folder has no last.pt, so there is nothing to resume "
            f"(runs write it at every evaluation, every --save-every epochs and at the end); start a new run"
        )
    try:
        state = load_checkpoint(path)
    except CheckpointError as e:
        raise ResumeError(f"cannot resume: {e}. Resume from an intact copy or start a new run; "
                          f"nothing was changed") from None
    missing = [k for k in RESUME_KEYS if k not in state]
    if missing:
        raise ResumeError(
            f"cannot resume: {path} lacks {', '.join(missing)} (not a resumable training state); start a new run"
        )
    if not isinstance(state["train_config"], dict):
        raise ResumeError(f"cannot resume: {path} has a damaged train_config; start a new run")
    return state
