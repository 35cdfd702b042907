"""Sample artifacts for tests, benchmarks and trying the service without training.

* :func:`make_images` writes a small image folder (class sub-folders of
  generated pictures: coloured shapes on noisy backgrounds).
* :func:`build_model` saves a randomly initialised encoder as a checkpoint
  and exports it to ONNX with ISFE metadata (needs torch and ``export``).
  Random weights embed images deterministically, which is all serving,
  latency and parity checks need; use a trained checkpoint for real results.

Nothing here is imported by the server itself.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["CLASSES", "build_model", "make_images"]

CLASSES = ("circle", "square", "stripes")


def _picture(kind: str, rng: np.random.Generator, size: int) -> Image.Image:
    bg = rng.integers(0, 256, size=3)
    noise = rng.integers(-30, 31, size=(size, size, 3))
    arr = np.clip(bg[None, None, :] + noise, 0, 255).astype(np.uint8)
    im = Image.fromarray(arr, "RGB")
    d = ImageDraw.Draw(im)
    fg = tuple(int(v) for v in rng.integers(0, 256, size=3))
    a, b = int(rng.integers(1, size // 4 + 1)), int(rng.integers(size // 2, size))
    if kind == "circle":
        d.ellipse([a, a, b, b], fill=fg)
    elif kind == "square":
        d.rectangle([a, a, b, b], fill=fg)
    else:
        step = max(2, size // 6)
        for x in range(0, size, 2 * step):
            d.rectangle([x, 0, x + step - 1, size], fill=fg)
    return im


def make_images(folder: str | os.PathLike, per_class: int = 8, size: int = 24, seed: int = 0, classes: tuple[str, ...] = CLASSES) -> list[Path]:
    """Write ``per_class`` images into ``folder/<class>/NNN.png|jpg`` and return their paths (sorted)."""
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    paths: list[Path] = []
    for cls in classes:
        (folder / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            im = _picture(cls, rng, size)
            ext = "png" if i % 2 == 0 else "jpg"
            p = folder / cls / f"{i:03d}.{ext}"
            im.save(p, quality=95) if ext == "jpg" else im.save(p)
            paths.append(p)
    return sorted(paths)


def build_model(
    onnx_path: str | os.PathLike,
    arch: str = "resnet18",
    embedding_dim: int = 32,
    input_size: int = 16,
    resize_size: int | None = None,
    seed: int = 0,
    max_batch: int = 8,
) -> Path:
    """Random-init encoder -> checkpoint next to ``onnx_path`` -> ONNX with ISFE metadata.

    The checkpoint (``<onnx stem>.pt``) gives the model a real fingerprint, as
    a trained one would. Returns the ONNX path.
    """
    import torch

    from export.to_onnx import export_onnx, metadata_for_encoder
    from isfe_model.preprocess import PreprocessSpec
    from training.model import ModelConfig, build_encoder, load_encoder, save_checkpoint

    onnx_path = Path(onnx_path)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    spec = PreprocessSpec(input_size=input_size, resize_size=resize_size or input_size)
    cfg = ModelConfig(arch=arch, embedding_dim=embedding_dim, preprocess=spec)
    ckpt = onnx_path.with_suffix(".pt")
    save_checkpoint(ckpt, build_encoder(cfg).eval(), cfg, {"note": "random initialisation (serving.sample)", "seed": seed})
    model = load_encoder(ckpt)
    return export_onnx(model, onnx_path, metadata_for_encoder(model, model_version="0-random"), max_batch=max_batch)
