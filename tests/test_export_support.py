"""Support for the export tests (no tests here): small real checkpoints and labelled image folders (no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from isfe_model.preprocess import PreprocessSpec

#: Base colours of the synthetic classes (RGB).
CLASS_COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200), "yellow": (220, 200, 40)}


def small_config(embedding_dim: int = 32, input_size: int = 16, arch: str = "resnet18"):
    from training.model import ModelConfig

    return ModelConfig(
        arch=arch, embedding_dim=embedding_dim, preprocess=PreprocessSpec(input_size=input_size, resize_size=input_size)
    )


def make_checkpoint(
    path: Path, seed: int = 0, embedding_dim: int = 32, input_size: int = 16, arch: str = "resnet18"
) -> Path:
    """A seeded, untrained encoder with non-trivial BatchNorm statistics, saved as a real ISFE checkpoint."""
    import torch

    from training.model import build_encoder, save_checkpoint

    torch.manual_seed(seed)
    cfg = small_config(embedding_dim, input_size, arch)
    model = build_encoder(cfg)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return save_checkpoint(
        path, model, cfg, config={"epochs": 0, "lr": 0.03, "purpose": "export tests", "data": {"name": "synthetic"}}
    )


def colour_image(colour: tuple[int, int, int], size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """uint8 [h, w, 3]: a class colour with a gradient, a random rectangle and noise."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.array(colour, np.float32) * rng.uniform(0.85, 1.05)
    grad = (xx / max(w, 1) * rng.uniform(-30, 30) + yy / max(h, 1) * rng.uniform(-30, 30))[..., None]
    img = base + grad + rng.normal(0, 8, (h, w, 3))
    x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
    img[y0 : y0 + h // 3, x0 : x0 + w // 3] += rng.uniform(-40, 40, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_labelled_folder(
    root: Path, per_class: int, seed: int = 0, size: tuple[int, int] = (22, 18), classes: dict | None = None
) -> list[Path]:
    """root/<class>/<i>.png|.jpg, ``per_class`` images for each class; returns the files."""
    rng = np.random.default_rng(seed)
    files = []
    for name, colour in (classes or CLASS_COLOURS).items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            ext = "png" if i % 2 == 0 else "jpg"
            p = root / name / f"{i:03d}.{ext}"
            Image.fromarray(colour_image(colour, size, rng)).save(p)
            files.append(p)
    return files
