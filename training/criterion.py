"""The training loss criterion: one object for every loss setting, in one process or under ``torchrun``.

:class:`InvaSpreadCriterion` (like open_clip's ``ClipLoss``) holds the
temperature, the negative weight, the gradient mode, the negative selection
(:mod:`training.negatives`), the backend (the reference
:func:`training.loss.invaspread_loss_rows` or the fused Triton kernels of
:mod:`training.fused_loss`) and the distributed context (keys all-gathered by
:func:`training.distributed.global_keys`); ``forward(features [2b, D])``
returns the scalar to back-propagate.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

import training.distributed as dist_utils
from training.loss import check_loss_args, invaspread_loss_rows
from training.negatives import NEGATIVE_MODES, num_kept, select_negatives

__all__ = ["InvaSpreadCriterion", "LOSS_BACKENDS"]

LOSS_BACKENDS = ("reference", "fused")


class InvaSpreadCriterion(nn.Module):
    """The training loss: features [2b, D] of this process -> scalar to back-propagate.

    The global batch holds two views of N images; this process (rank r of W,
    ``b = N / W``) holds its rows ``[v1_r (b rows); v2_r (b rows)]``.  With
    the keys all-gathered into the global layout ``[v1_0 .. v1_{W-1}; v2_0 ..
    v2_{W-1}]`` (2N rows, positive of row i at ``(i + N) mod 2N``, the batch
    one process would see), rank r's anchors are its own rows, at global
    indices ``r b + [0, b)`` and ``N + r b + [0, b)``, and::

        S_r     = sum_{i in anchors of r} l_i        (invaspread_loss_rows, over K_i negatives)
        L       = sum_r S_r / 2N                     (the global-batch loss)
        forward = S_r / 2b = W * S_r / 2N

    DDP *averages* parameter gradients over the W ranks, so back-propagating
    ``S_r / 2b`` on every rank gives ``dL/dtheta``; the mean over ranks of the
    returned values is ``L``.  In one process (W = 1) it is ``L`` itself.

    Gradient modes: ``detach_keys=True`` (the authors') detaches every key, so
    no gradient flows through the gather; ``False`` gathers with
    :class:`training.distributed.AllGatherWithGrad`, whose backward sums the key
    gradients of all ranks, so every feature receives the gradient of every
    anchor that used it as a key.

    Args:
        temperature: tau > 0.
        neg_weight: w >= 0 (the authors' ``negM``).
        detach_keys: the authors' gradient (True) or the full gradient.
        negatives: "all", "hard" or "easy" (paper Table 8: keep the ``fraction``
            most / least similar negatives of each anchor; reference backend only),
            or "hard-authors" (the authors' released hard branch with ``negM =
            fraction``: ``int(2N fraction)`` kept, their log terms weighted by
            ``fraction``, the loss divided by kept + 1 instead of 2N; needs
            ``neg_weight = 1``; see :mod:`training.negatives`).
        backend: "reference" (PyTorch, any device) or "fused" (Triton kernels,
            memory linear in the batch; needs CUDA or ``TRITON_INTERPRET=1``).
        dist_ctx: the process group (default: one process).
        fraction: share of the negatives kept by "hard" / "easy".
    """

    def __init__(self, temperature: float = 0.1, neg_weight: float = 1.0, detach_keys: bool = True,
                 negatives: str = "all", backend: str = "reference", dist_ctx: dist_utils.DistContext | None = None,
                 fraction: float = 0.5):
        super().__init__()
        if negatives not in NEGATIVE_MODES:
            raise ValueError(f"negatives must be one of {', '.join(NEGATIVE_MODES)}, got {negatives!r}")
        if backend not in LOSS_BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(LOSS_BACKENDS)}, got {backend!r}")
        if backend == "fused" and negatives != "all":
            raise ValueError(f"negatives={negatives!r} is implemented in the reference backend only; "
                             f"use backend='reference'")
        if negatives == "hard-authors" and neg_weight != 1.0:
            raise ValueError(f"negatives='hard-authors' weights the kept negatives by fraction={fraction} itself "
                             f"(the authors' negM); use neg_weight=1, got {neg_weight}")
        self.temperature, self.neg_weight, self.detach_keys = float(temperature), float(neg_weight), bool(detach_keys)
        self.negatives, self.backend, self.fraction = negatives, backend, fraction
        self.ctx = dist_ctx or dist_utils.DistContext()
        if backend == "fused":  # Triton is optional: imported only when asked for
            from training.fused_loss import fused_invaspread_loss, fused_invaspread_loss_rows

            self._fused_batch, self._fused_rows = fused_invaspread_loss, fused_invaspread_loss_rows

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, neg_weight={self.neg_weight}, detach_keys={self.detach_keys}, "
                f"negatives={self.negatives!r}, backend={self.backend!r}, world_size={self.ctx.world_size}")

    def rows(self, anchors: Tensor, keys: Tensor, anchor_index: Tensor) -> Tensor:
        """Summed loss ``S`` of anchors [M, D] against keys [2N, D] (see :func:`invaspread_loss_rows`).

        "hard-authors": ``S * 2N / (K + 1)`` with the authors' ``Z_i`` and weights, so that
        :meth:`forward`'s division by 2N gives their division by ``K + 1``.
        """
        if self.backend == "fused":
            return self._fused_rows(anchors, keys, anchor_index, self.temperature, self.neg_weight)
        mask = select_negatives(anchors, keys, anchor_index, self.temperature, self.negatives, self.fraction)
        if self.negatives == "hard-authors":
            two_n = keys.shape[0]
            total = invaspread_loss_rows(anchors, keys, anchor_index, self.temperature, self.fraction, neg_mask=mask,
                                         z_weight=1.0)
            return total * (two_n / (num_kept(two_n, "hard-authors", self.fraction) + 1))
        return invaspread_loss_rows(anchors, keys, anchor_index, self.temperature, self.neg_weight, neg_mask=mask)

    def forward(self, features: Tensor) -> Tensor:
        """features [2b, D] (view 1 of this rank's b images, then view 2) -> scalar ``S_r / 2b``."""
        check_loss_args(features, self.temperature, self.neg_weight)
        if not self.ctx.enabled:
            if self.backend == "fused":  # one kernel with the batch as its own keys
                return self._fused_batch(features, self.temperature, self.detach_keys, self.neg_weight)
            keys = features.detach() if self.detach_keys else features
            index = torch.arange(features.shape[0], device=features.device)
            return self.rows(features, keys, index) / features.shape[0]
        b = features.shape[0] // 2
        keys = dist_utils.global_keys(features.detach() if self.detach_keys else features, self.ctx,
                                      with_grad=not self.detach_keys)
        local = torch.arange(b, device=features.device) + self.ctx.rank * b
        index = torch.cat([local, local + self.ctx.world_size * b])
        return self.rows(features, keys, index) / (2 * b)
