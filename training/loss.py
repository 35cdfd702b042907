"""The Invariant and Spreading instance loss (Ye et al., CVPR 2019, Eq. 3-7).

Batched form of the authors' ``BatchCriterion``: a batch holds two augmented
views of N images, ``features = [view1 (N rows); view2 (N rows)]``, every row
L2-normalised.  Row ``i`` is an *anchor*; its positive is row ``(i + N) % 2N``
and the other ``2N - 2`` rows are its negatives.

For anchor i (s_ij = f_i . f_j / tau, self excluded everywhere)::

    Z_i  = w * sum_{j not in {i, pos}} exp(s_ij) + exp(s_i,pos)      (w = neg_weight)
    P_i  = exp(s_i,pos) / Z_i
    L    = -( sum_i log P_i + w * sum_i sum_{j not in {i,pos}} log(1 - exp(s_ij) / Z_i) ) / 2N

With ``w = 1`` ``Z_i`` is the plain softmax denominator over all j != i.

Gradient modes
--------------
``detach_keys=True`` (default) reproduces the authors' code: in every inner
product ``f_i . f_j`` the *key* ``f_j`` is detached, so the gradient reaches a
row only through its role as an anchor.  ``detach_keys=False`` gives the full
gradient implied by the equations (each row also receives gradient as the key
of every other anchor), as the paper's equations imply.

Everything is computed in float32 (or float64 when given float64) with
log-sum-exp stabilisation, so bf16/fp16 inputs and small temperatures are safe.

The training step uses :class:`training.criterion.InvaSpreadCriterion`, which
holds the temperature, negative weight, gradient mode, negative selection
(:mod:`training.negatives`), backend (this reference or the fused Triton
kernels of :mod:`training.fused_loss`) and the distributed context.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["invaspread_loss", "invaspread_loss_rows", "log1mexp", "check_loss_args"]


def check_loss_args(features: Tensor, temperature: float, neg_weight: float) -> None:
    """Raise ``ValueError`` with an actionable message for impossible arguments."""
    if features.dim() != 2:
        raise ValueError(f"features must be a [2N, D] matrix, got shape {tuple(features.shape)}")
    if features.shape[0] < 2 or features.shape[0] % 2:
        raise ValueError(
            f"features must hold two views of N >= 1 images (an even number of rows >= 2), "
            f"got {features.shape[0]} rows"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not neg_weight >= 0:
        raise ValueError(f"neg_weight must be >= 0, got {neg_weight}")


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate near 0 and for very negative x.

    ``x`` is clamped to ``<= -tiny`` so that a probability that rounds to 1
    gives a large finite negative value instead of ``-inf`` (and ``neg_weight
    < 1``, where a negative's share can exceed 1, stays finite).
    """
    x = x.clamp(max=-torch.finfo(x.dtype).tiny)
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def invaspread_loss_rows(
    anchors: Tensor,
    keys: Tensor,
    anchor_index: Tensor,
    temperature: float = 0.1,
    neg_weight: float = 1.0,
    neg_mask: Tensor | None = None,
    z_weight: float | None = None,
) -> Tensor:
    """Sum over the given anchor rows of the per-row InvaSpread loss (not divided by 2N).

    With ``K_i`` the negatives anchor i keeps (all ``2N - 2`` by default)::

        Z_i = v * sum_{j in K_i} exp(s_ij) + exp(s_i,pos)          (v = z_weight, default w)
        l_i = -( log(exp(s_i,pos) / Z_i) + w * sum_{j in K_i} log(1 - exp(s_ij) / Z_i) )

    Args:
        anchors: [M, D] anchor rows (a subset of the global batch, with gradient).
        keys: [2N, D] the whole global batch (detach it for the authors' mode).
        anchor_index: [M] int64, the global row index of each anchor in ``keys``.
        temperature: tau > 0.
        neg_weight: w >= 0.
        neg_mask: optional [M, 2N] bool, the negatives each anchor keeps
            (``training.negatives.select_negatives``); a dropped negative leaves
            ``Z_i`` and the negative sum entirely.  Self and positive entries are
            ignored.  ``None``: every negative.
        z_weight: v > 0, the negatives' weight inside ``Z_i`` when it differs from ``w``
            (the authors' hard branch: v = 1 with w = 0.5); ``None``: ``w`` (the paper).

    Returns:
        A scalar float32 (float64 for float64 inputs) tensor:
        ``-sum_i [log P_i + w * sum_{j in K_i} log(1 - p_ij)]`` over the M anchors.

    This is the building block of :func:`invaspread_loss` and of
    :class:`training.criterion.InvaSpreadCriterion`, where each rank owns some anchors and
    all-gathers keys.
    """
    two_n = keys.shape[0]
    n = two_n // 2
    cdtype = torch.float64 if anchors.dtype == torch.float64 else torch.float32
    a = anchors.to(cdtype)
    k = keys.to(cdtype)
    s = (a @ k.t()) / temperature  # [M, 2N]
    rows = torch.arange(a.shape[0], device=a.device)
    pos_index = (anchor_index + n) % two_n
    self_mask = torch.zeros_like(s, dtype=torch.bool)
    self_mask[rows, anchor_index] = True
    pos_mask = torch.zeros_like(s, dtype=torch.bool)
    pos_mask[rows, pos_index] = True
    neg_mask = ~(self_mask | pos_mask) if neg_mask is None else neg_mask & ~(self_mask | pos_mask)

    s_pos = s[rows, pos_index]  # [M]
    v = neg_weight if z_weight is None else z_weight
    if z_weight is not None and not z_weight > 0:
        raise ValueError(f"z_weight must be > 0, got {z_weight}")
    if v == 0:
        # Z_i = exp(s_pos): P_i = 1 and the negative terms vanish.
        return s_pos.new_zeros(())
    # log Z'_i = logsumexp_j (s_ij + log v [j is a kept negative]), self and dropped negatives excluded.
    shift = s.new_full((), float(torch.log(torch.tensor(float(v), dtype=torch.float64))))
    z_terms = torch.where(neg_mask, s + shift, s).masked_fill(~(neg_mask | pos_mask), float("-inf"))
    log_z = torch.logsumexp(z_terms, dim=1)  # [M]
    log_p_pos = s_pos - log_z
    log_1m = log1mexp(s - log_z[:, None]).masked_fill(~neg_mask, 0.0)  # [M, 2N]
    return -(log_p_pos.sum() + neg_weight * log_1m.sum())


def invaspread_loss(
    features: Tensor,
    temperature: float = 0.1,
    detach_keys: bool = True,
    neg_weight: float = 1.0,
) -> Tensor:
    """InvaSpread loss of a batch of two views.

    Args:
        features: [2N, D] L2-normalised rows: view 1 of N images, then view 2.
            Any floating dtype; computed in float32 (float64 stays float64).
        temperature: tau > 0 (paper: 0.1).
        detach_keys: True = the authors' gradient (keys detached); False = full gradient.
        neg_weight: weight w of the negatives (authors' ``negM``), w >= 0.

    Returns:
        Scalar tensor, the mean over the 2N anchors.
    """
    check_loss_args(features, temperature, neg_weight)
    keys = features.detach() if detach_keys else features
    index = torch.arange(features.shape[0], device=features.device)
    return invaspread_loss_rows(features, keys, index, temperature, neg_weight) / features.shape[0]
