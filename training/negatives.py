"""Hard-only / easy-only negatives: the InvaSpread loss with half of the negatives kept.

The paper's ablation of the negatives (Ye et al., CVPR 2019, Sec. 4 and
Table 8) trains with only the "hard" negatives (the instances most similar to
the anchor) or only the "easy" ones (least similar).  Here, for every anchor
``i`` (row of the global batch of ``2N`` views, positive ``pos(i) = (i + N)
mod 2N``), the ``2N - 2`` other instances' views are ranked by the similarity
``s_ij = f_i . f_j / tau`` (computed without gradient) and only the
``fraction`` (default 50%) most similar (``hard``) or least similar (``easy``)
are kept; the dropped ones leave the loss entirely (they are excluded from
the denominator ``Z_i`` and from the negative sum, like ``i`` itself)::

    Z_i = w * sum_{j in K_i} exp(s_ij) + exp(s_i,pos)
    l_i = -( log(exp(s_i,pos) / Z_i) + w * sum_{j in K_i} log(1 - exp(s_ij) / Z_i) )

``negatives="all"`` keeps every negative and equals
:func:`training.loss.invaspread_loss_rows`.  The selection is a per-row
``topk`` (ties broken by ``topk``'s order), so the cost is that of the
reference loss plus one sort-free selection; it runs on any device, with or
without DDP (each rank passes its anchors and the all-gathered keys).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from training.loss import log1mexp

__all__ = ["NEGATIVE_MODES", "kept_negatives", "masked_invaspread_loss", "masked_invaspread_loss_rows"]

NEGATIVE_MODES = ("all", "hard", "easy")


def _num_kept(two_n: int, fraction: float) -> int:
    """Negatives kept per anchor: round(fraction * (2N - 2)), at least 1 when any exist."""
    total = two_n - 2
    return 0 if total <= 0 else max(1, min(total, int(math.floor(fraction * total + 0.5))))


def kept_negatives(sims: Tensor, anchor_index: Tensor, negatives: str, fraction: float = 0.5) -> Tensor:
    """Boolean mask [M, 2N] of the negatives each anchor keeps.

    Args:
        sims: [M, 2N] similarities of the anchors to all keys (any float dtype; not differentiated).
        anchor_index: [M] int64 global row of each anchor.
        negatives: "all", "hard" (most similar) or "easy" (least similar).
        fraction: share of the 2N - 2 negatives kept (0 < fraction <= 1).
    """
    if negatives not in NEGATIVE_MODES:
        raise ValueError(f"negatives must be one of {', '.join(NEGATIVE_MODES)}, got {negatives!r}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    m, two_n = sims.shape
    rows = torch.arange(m, device=sims.device)
    candidate = torch.ones_like(sims, dtype=torch.bool)
    candidate[rows, anchor_index] = False
    candidate[rows, (anchor_index + two_n // 2) % two_n] = False
    if negatives == "all":
        return candidate
    keep = _num_kept(two_n, fraction)
    score = sims.detach().float() if negatives == "hard" else -sims.detach().float()
    score = score.masked_fill(~candidate, float("-inf"))
    top = score.topk(keep, dim=1).indices  # [M, keep]
    mask = torch.zeros_like(candidate)
    mask.scatter_(1, top, True)
    return mask & candidate


def masked_invaspread_loss_rows(
    anchors: Tensor,
    keys: Tensor,
    anchor_index: Tensor,
    temperature: float = 0.1,
    neg_weight: float = 1.0,
    negatives: str = "hard",
    fraction: float = 0.5,
) -> Tensor:
    """Summed loss of the anchors with only the selected negatives (not divided by 2N).

    Same arguments as :func:`training.loss.invaspread_loss_rows` plus
    ``negatives``/``fraction`` (see :func:`kept_negatives`).  Computed in
    float32 (float64 for float64 input) with log-sum-exp stabilisation.

    Returns:
        Scalar: ``-sum_i [log P_i + w * sum_{j in K_i} log(1 - p_ij)]``.
    """
    two_n = keys.shape[0]
    n = two_n // 2
    cdtype = torch.float64 if anchors.dtype == torch.float64 else torch.float32
    s = (anchors.to(cdtype) @ keys.to(cdtype).t()) / temperature  # [M, 2N]
    rows = torch.arange(s.shape[0], device=s.device)
    pos_index = (anchor_index + n) % two_n
    s_pos = s[rows, pos_index]
    if neg_weight == 0:
        return s_pos.new_zeros(())
    neg = kept_negatives(s, anchor_index, negatives, fraction)
    pos = torch.zeros_like(neg)
    pos[rows, pos_index] = True
    shift = math.log(neg_weight)
    z_terms = torch.where(neg, s + shift, s).masked_fill(~(neg | pos), float("-inf"))
    log_z = torch.logsumexp(z_terms, dim=1)  # [M]
    log_1m = log1mexp(s - log_z[:, None]).masked_fill(~neg, 0.0)
    return -((s_pos - log_z).sum() + neg_weight * log_1m.sum())


def masked_invaspread_loss(
    features: Tensor,
    temperature: float = 0.1,
    detach_keys: bool = True,
    neg_weight: float = 1.0,
    negatives: str = "hard",
    fraction: float = 0.5,
) -> Tensor:
    """Mean over the 2N anchors of a [2N, D] batch (view 1 rows, then view 2 rows)."""
    keys = features.detach() if detach_keys else features
    index = torch.arange(features.shape[0], device=features.device)
    return masked_invaspread_loss_rows(features, keys, index, temperature, neg_weight, negatives, fraction) / features.shape[0]
