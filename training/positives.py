"""Positive selection: the augmented view, or the nearest neighbour (``--positive nn-or-aug``).

The paper (Sec. 4.2, unseen categories with a pretrained backbone): "since the
pre-trained network performs well on CUB200, we randomly select the augmented
instance and its corresponding nearest instance as positive".  So:

* once per epoch, the whole training set is embedded with the evaluation
  transform (center crop of the cached images, model in eval mode) into a
  bank of unit rows, and every image gets its nearest neighbour in the bank,
  itself excluded (``neighbour_index``, on :func:`training.retrieval.topk_similar`);
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
from torch import Tensor, nn

from isfe_model.preprocess import PreprocessSpec
from training.model import unwrap
from training.retrieval import BANK_FEATURES, embed_images, topk_similar

__all__ = [
    "NN_FEATURES",
    "POSITIVE_MODES",
    "PositiveSampler",
    "bank_features",
    "choose_positives",
    "neighbour_index",
]

POSITIVE_MODES = ("aug", "nn-or-aug")
NN_FEATURES = BANK_FEATURES


def bank_features(
    model: nn.Module,
    images: Tensor | np.ndarray,
    spec: PreprocessSpec,
    features: str = "embedding",
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> Tensor:
    """Features of every training image under the evaluation transform (:func:`training.retrieval.embed_images`).

    Args:
        model: an EmbeddingNet, or a DDP / compiled wrapper of one.
        images: uint8 [N, R, R, 3] (numpy or a tensor on any device).
        spec: the model's preprocessing (center crop to ``spec.input_size``).
        features: ``"embedding"`` (the model output) or ``"backbone"``
            (pooled backbone features, L2-normalised).

    Returns:
        float32 [N, D] unit rows on ``device`` (default: the model's device).
    """
    return embed_images(model, images, spec, batch_size, device, features=features)


def neighbour_index(feats: Tensor, chunk_size: int = 2048) -> Tensor:
    """Index of each row's most similar other row: argmax_{j != i} <f_i, f_j> (cosine for unit rows).

    Args:
        feats: [N, D] unit rows, N >= 2.

    Returns:
        int64 [N] on feats' device; ``out[i] != i``; ties go to the lower index.
    """
    n = feats.shape[0]
    if n < 2:
        raise ValueError(f"nearest neighbours need at least 2 images, got {n}")
    return topk_similar(feats, feats, 1, exclude_self=True, chunk_size=chunk_size)[1][:, 0]


def choose_positives(anchor_index: Tensor, nn_index: Tensor, p_nn: float,
                     generator: torch.Generator | None = None) -> Tensor:
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
                log: Callable[[str], None] | None = None, device: str | torch.device | None = None,
                amp: bool = False) -> None:
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
        feats = embed_images(model, images, spec, self.batch_size, device, features=self.features, amp=amp)
        self.nn_index = neighbour_index(feats).cpu()  # per-step choices index it on the host
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
