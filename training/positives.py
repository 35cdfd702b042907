"""Positive selection: the augmented view, or the nearest neighbour (``--positive nn-or-aug``).

The paper (Sec. 4.2, unseen categories with a pretrained backbone): "since the
pre-trained network performs well on CUB200, we randomly select the augmented
instance and its corresponding nearest instance as positive".  So:

* once per epoch, the whole training set is embedded with the evaluation
  transform (center crop of the cached images, model in eval mode) into a
  bank of unit rows, and every image gets its nearest neighbour in the bank,
  itself excluded (``nearest_neighbours``);
* in each step, for every anchor, with probability ``p_nn`` (0.5) the image
  that makes the second view is that neighbour, else the anchor itself
  (``choose_positives``); the chosen image is then augmented like any view.

The bank holds either the 128-d embeddings (``features="embedding"``) or the
L2-normalised pooled backbone features (``"backbone"``, the authors' code:
pool5 of the pretrained network, 1024-d for GoogLeNet).

``PositiveSampler`` bundles this for the training loop; in ``"aug"`` mode it
is a no-op that draws no random numbers, so plain runs are unchanged.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from isfe_model.preprocess import PreprocessSpec
from training.model import unwrap

__all__ = [
    "NN_FEATURES",
    "POSITIVE_MODES",
    "PositiveSampler",
    "bank_features",
    "choose_positives",
    "nearest_neighbours",
]

POSITIVE_MODES = ("aug", "nn-or-aug")
NN_FEATURES = ("embedding", "backbone")


def _center_crop_float(chunk: Tensor, size: int) -> Tensor:
    """uint8 [B, R, R', 3] -> float32 [B, 3, S, S] in [0, 1], the central S x S window (as center_crop_array)."""
    top = int(round((chunk.shape[1] - size) / 2.0))
    left = int(round((chunk.shape[2] - size) / 2.0))
    return chunk[:, top : top + size, left : left + size].permute(0, 3, 1, 2).float().div_(255.0)


@torch.no_grad()
def bank_features(
    model: nn.Module,
    images: Tensor | np.ndarray,
    spec: PreprocessSpec,
    features: str = "embedding",
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> Tensor:
    """Features of every training image under the evaluation transform.

    Args:
        model: an EmbeddingNet, or a DDP / compiled wrapper of one (``.features``
            gives the pooled backbone output).
        images: uint8 [N, R, R, 3] (numpy or a tensor on any device).
        spec: the model's preprocessing (center crop to ``spec.input_size``).
        features: ``"embedding"`` (the model output) or ``"backbone"``
            (pooled backbone features, L2-normalised).

    Returns:
        float32 [N, D] unit rows on ``device`` (default: the images' device; CPU for numpy).
    """
    if features not in NN_FEATURES:
        raise ValueError(f"features must be one of {NN_FEATURES}, got {features!r}")
    if device is None:
        device = images.device if isinstance(images, Tensor) else torch.device("cpu")
    device = torch.device(device)
    model = unwrap(model)  # DDP / torch.compile wrappers: every rank embeds the whole set with the same weights
    was_training = model.training
    model.eval()
    out = []
    try:
        for i in range(0, images.shape[0], batch_size):
            chunk = images[i : i + batch_size]
            if not isinstance(chunk, Tensor):  # numpy / read-only memmap: copy one chunk at a time
                chunk = torch.from_numpy(np.array(chunk, dtype=np.uint8))
            x = _center_crop_float(chunk.to(device), spec.input_size)
            f = model(x) if features == "embedding" else F.normalize(model.features(x).float(), dim=1)
            out.append(f.float())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, 0, device=device)


@torch.no_grad()
def nearest_neighbours(feats: Tensor, chunk_size: int = 2048) -> Tensor:
    """Index of each row's most similar other row (cosine = inner product of unit rows).

    Args:
        feats: [N, D] unit rows, N >= 2.

    Returns:
        int64 [N] on feats' device; ``out[i] != i``; ties go to the lower index.
    """
    n = feats.shape[0]
    if n < 2:
        raise ValueError(f"nearest neighbours need at least 2 images, got {n}")
    f = feats.float()
    out = torch.empty(n, dtype=torch.int64, device=f.device)
    for i in range(0, n, chunk_size):
        sims = f[i : i + chunk_size] @ f.t()  # [m, N]
        rows = torch.arange(sims.shape[0], device=f.device)
        sims[rows, rows + i] = float("-inf")  # exclude the image itself
        out[i : i + sims.shape[0]] = sims.argmax(dim=1)  # the first maximal index on ties (documented)
    return out


def choose_positives(anchor_index: Tensor, nn_index: Tensor, p_nn: float, generator: torch.Generator | None = None) -> Tensor:
    """Source image of each anchor's positive view.

    Args:
        anchor_index: int64 [B] indices of the batch's images in the training set.
        nn_index: int64 [N] nearest neighbour of every training image.
        p_nn: probability of taking the neighbour (else the anchor itself).
        generator: random source (drawn on its device; CPU generators work for CUDA indices).

    Returns:
        int64 [B] on anchor_index's device: ``nn_index[a]`` with probability
        ``p_nn``, else ``a``.
    """
    if not 0.0 <= p_nn <= 1.0:
        raise ValueError(f"p_nn must be in [0, 1], got {p_nn}")
    draw_device = generator.device if generator is not None else anchor_index.device
    u = torch.rand(anchor_index.shape[0], generator=generator, device=draw_device).to(anchor_index.device)
    return torch.where(u < p_nn, nn_index.to(anchor_index.device)[anchor_index], anchor_index)


class PositiveSampler:
    """Per-epoch neighbour bank and per-step positive choice for the training loop.

    Usage::

        sampler = PositiveSampler(cfg.positive, cfg.nn_features)
        for epoch ...:
            sampler.refresh(model, images, spec)            # no-op in "aug" mode
            for step ...:
                idx = perm[...]
                second = images[sampler.positives(idx, gen)]  # images[idx] in "aug" mode
    """

    def __init__(self, mode: str = "aug", features: str = "embedding", p_nn: float = 0.5, batch_size: int = 256):
        if mode not in POSITIVE_MODES:
            raise ValueError(f"--positive must be one of {', '.join(POSITIVE_MODES)}, got {mode!r}")
        if features not in NN_FEATURES:
            raise ValueError(f"--nn-features must be one of {', '.join(NN_FEATURES)}, got {features!r}")
        if not 0.0 <= p_nn <= 1.0:
            raise ValueError(f"the neighbour probability must be in [0, 1], got {p_nn}")
        self.mode, self.features, self.p_nn, self.batch_size = mode, features, float(p_nn), int(batch_size)
        self.nn_index: Tensor | None = None
        self.last_refresh_seconds = 0.0

    @property
    def enabled(self) -> bool:
        return self.mode == "nn-or-aug"

    def refresh(self, model: nn.Module, images: Tensor | np.ndarray, spec: PreprocessSpec,
                log: Callable[[str], None] | None = None, device: str | torch.device | None = None, amp: bool = False) -> None:
        """Recompute every training image's nearest neighbour with the current model (no-op for "aug").

        ``images``: uint8 [N, R, R, 3] on any device (or a host array, then
        embedded on ``device`` chunk by chunk); ``amp``: bf16 autocast.
        """
        if not self.enabled:
            return
        t0 = time.time()
        if device is None:
            device = images.device if isinstance(images, Tensor) else next(unwrap(model).parameters()).device
        device = torch.device(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            feats = bank_features(model, images, spec, self.features, self.batch_size, device)
        self.nn_index = nearest_neighbours(feats.float()).cpu()  # per-step choices index it on the host
        self.last_refresh_seconds = time.time() - t0
        if log is not None:
            log(f"neighbour bank: {feats.shape[0]} images, {feats.shape[1]}-d {self.features} features, "
                f"{self.last_refresh_seconds:.1f} s")

    def positives(self, anchor_index: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """int64 [B] source images of the second views (``anchor_index`` itself in "aug" mode)."""
        if not self.enabled:
            return anchor_index
        if self.nn_index is None:
            raise RuntimeError("PositiveSampler.refresh must run before positives (once per epoch)")
        return choose_positives(anchor_index, self.nn_index, self.p_nn, generator)
