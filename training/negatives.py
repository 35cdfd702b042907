"""Hard-only / easy-only negatives: which negatives each anchor keeps.

The paper's ablation of the negatives (Ye et al., CVPR 2019, Sec. 4 and
Table 8) trains with only the "hard" negatives (the instances most similar to
the anchor) or only the "easy" ones (least similar).  Here, for every anchor
``i`` (row of the global batch of ``2N`` views, positive ``pos(i) = (i + N)
mod 2N``), the ``2N - 2`` other instances' views are ranked by the similarity
``s_ij = f_i . f_j / tau`` (computed without gradient) and only the
``fraction`` (default 50%) most similar (``hard``) or least similar (``easy``)
are kept as ``K_i``; the dropped ones leave the loss entirely (they are
excluded from the denominator ``Z_i`` and from the negative sum, like ``i``
itself)::

    Z_i = w * sum_{j in K_i} exp(s_ij) + exp(s_i,pos)
    l_i = -( log(exp(s_i,pos) / Z_i) + w * sum_{j in K_i} log(1 - exp(s_ij) / Z_i) )

The authors' released code (``BatchCriterion`` of mangye16/Unsupervised_Embedding_Learning,
its branch for ``negM < 1``, run with ``negM = 0.5``) is a different scale of the same
idea, ``hard-authors`` here: it keeps ``K = int(2N * 0.5) = N`` hardest negatives (ours:
``round(0.5 (2N - 2)) = N - 1``), leaves them unweighted in ``Z_i`` but weights their
``log(1 - p)`` terms by 0.5, and divides the sum over the 2N anchors by ``K + 1`` instead
of ``2N``::

    Z_i = sum_{j in K_i} exp(s_ij) + exp(s_i,pos)
    L   = -( sum_i log(exp(s_i,pos) / Z_i) + 0.5 * sum_i sum_{j in K_i} log(1 - exp(s_ij) / Z_i) ) / (K + 1)

So its gradient is about ``2N / (N + 1) ~ 2`` times ours, a little less where the
negative terms carry weight (measured in ``tests/test_fidelity.py``: 1.84-1.98x, direction
within a few degrees).

This module only *selects* (a boolean mask [M, 2N]); the loss itself is
:func:`training.loss.invaspread_loss_rows` with ``neg_mask=``, and
:class:`training.criterion.InvaSpreadCriterion` (``negatives="hard"``) combines
the two, in one process or under DDP (each rank passes its anchors and the
all-gathered keys).  The selection is a per-row ``topk`` (ties broken by
``topk``'s order), so the cost is that of the reference loss plus one
product without gradient and one sort-free selection.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["NEGATIVE_MODES", "kept_negatives", "select_negatives", "num_kept"]

NEGATIVE_MODES = ("all", "hard", "easy", "hard-authors")


def num_kept(two_n: int, negatives: str, fraction: float = 0.5) -> int:
    """Negatives kept per anchor of a batch of ``two_n`` views (at least 1 when any exist).

    hard / easy: ``round(fraction * (2N - 2))``; hard-authors: ``int(2N * fraction)`` (the authors'
    ``negNum``); all: ``2N - 2``.
    """
    total = two_n - 2
    if total <= 0:
        return 0
    if negatives == "all":
        return total
    kept = int(two_n * fraction) if negatives == "hard-authors" else int(math.floor(fraction * total + 0.5))
    return max(1, min(total, kept))


def kept_negatives(sims: Tensor, anchor_index: Tensor, negatives: str, fraction: float = 0.5) -> Tensor:
    """Boolean mask [M, 2N] of the negatives each anchor keeps.

    Args:
        sims: [M, 2N] similarities of the anchors to all keys (any float dtype; not differentiated).
        anchor_index: [M] int64 global row of each anchor.
        negatives: "all", "hard" / "hard-authors" (most similar) or "easy" (least similar); see :func:`num_kept`.
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
    keep = num_kept(two_n, negatives, fraction)
    score = -sims.detach().float() if negatives == "easy" else sims.detach().float()
    score = score.masked_fill(~candidate, float("-inf"))
    top = score.topk(keep, dim=1).indices  # [M, keep]
    mask = torch.zeros_like(candidate)
    mask.scatter_(1, top, True)
    return mask & candidate


def select_negatives(anchors: Tensor, keys: Tensor, anchor_index: Tensor, temperature: float,
                     negatives: str, fraction: float = 0.5) -> Tensor | None:
    """The ``neg_mask`` [M, 2N] of :func:`training.loss.invaspread_loss_rows`, or ``None`` for "all".

    Ranks ``s = anchors @ keys^T / tau`` ([M, D] x [2N, D], float32 or
    float64 as the loss computes it, without gradient) with :func:`kept_negatives`.
    """
    if negatives == "all":
        return None
    cdtype = torch.float64 if anchors.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        sims = (anchors.to(cdtype) @ keys.to(cdtype).t()) / temperature
    return kept_negatives(sims, anchor_index, negatives, fraction)
