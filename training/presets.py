"""Named training recipes (``--preset NAME``); explicit options override them.

With no ``--preset`` and no ``--data``, ``quickstart`` applies (the embedded
digits); with ``--data`` and no preset, the paper's CIFAR recipe applies.
"""

from __future__ import annotations

from typing import Any

PAPER_CIFAR: dict[str, Any] = {
    "epochs": 200,
    "batch_size": 128,
    "lr": 0.03,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "schedule": "step",  # x0.1 at epoch 120, x0.01 at epoch 160
    "temperature": 0.1,
    "neg_weight": 1.0,
    "embedding_dim": 128,
    "arch": "resnet18",
    "eval_every": 10,
    "augment": {},  # the paper's augmentation (AugmentConfig defaults)
}

PRESETS: dict[str, dict[str, Any]] = {
    # 1-3 minutes on 2 CPU cores: digits are small, centred and not mirror-symmetric,
    # so crops keep at least half the image and flips are off.
    "quickstart": {
        "data": None,
        "epochs": 6,
        "batch_size": 64,
        "lr": 0.03,
        "eval_every": 2,
        "augment": {"crop_scale": (0.5, 1.0), "flip": False},
    },
    "cifar10-paper": {"data": "cifar10", **PAPER_CIFAR},
}


def preset_for(name: str | None, data_given: bool) -> dict[str, Any]:
    """The preset's settings; ``None`` picks quickstart (no --data) or the paper recipe."""
    if name is None:
        return dict(PAPER_CIFAR) if data_given else dict(PRESETS["quickstart"])
    if name not in PRESETS:
        raise KeyError(name)
    return dict(PRESETS[name])
