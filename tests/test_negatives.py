"""Hard-only / easy-only negatives (negatives.py selects, loss.py computes) against a per-anchor Python loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from training.criterion import InvaSpreadCriterion
from training.loss import invaspread_loss, invaspread_loss_rows
from training.negatives import kept_negatives, select_negatives


def masked_invaspread_loss(features, temperature=0.1, detach_keys=True, neg_weight=1.0, negatives="hard"):
    """The training criterion in one process: mean over the 2N anchors with the selected negatives."""
    return InvaSpreadCriterion(temperature, neg_weight, detach_keys, negatives)(features)


def masked_invaspread_loss_rows(anchors, keys, anchor_index, temperature, neg_weight, negatives):
    """The rows loss with the mask that training.negatives selects."""
    mask = select_negatives(anchors, keys, anchor_index, temperature, negatives)
    return invaspread_loss_rows(anchors, keys, anchor_index, temperature, neg_weight, neg_mask=mask)


def _loop_loss(feats: torch.Tensor, keys: torch.Tensor, tau: float, w: float, mode: str) -> torch.Tensor:
    """Obviously-correct twin: one anchor at a time, negatives sorted by similarity in Python."""
    two_n = feats.shape[0]
    n = two_n // 2
    total = feats.new_zeros(())
    for i in range(two_n):
        pos = (i + n) % two_n
        sims = {j: (feats[i] @ keys[j]) / tau for j in range(two_n) if j != i}
        negs = sorted((j for j in sims if j != pos), key=lambda j: float(sims[j].detach()), reverse=True)
        if mode == "hard":
            negs = negs[: len(negs) // 2]
        elif mode == "easy":
            negs = negs[len(negs) - len(negs) // 2 :]
        z = torch.exp(sims[pos]) + w * sum(torch.exp(sims[j]) for j in negs)
        li = torch.log(torch.exp(sims[pos]) / z) + w * sum(torch.log(1 - torch.exp(sims[j]) / z) for j in negs)
        total = total - li
    return total / two_n


def _features(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v1 = torch.randn(n, d, generator=g, dtype=torch.float64)
    v2 = v1 + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return F.normalize(torch.cat([v1, v2]), dim=1)


@pytest.mark.parametrize("mode", ["hard", "easy", "all"])
@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("w", [1.0, 0.5])
def test_masked_loss_and_gradient_match_the_loop(mode, detach, w):
    base = _features(5, 4, seed=1)
    f_fast = base.clone().requires_grad_(True)
    f_loop = base.clone().requires_grad_(True)
    fast = masked_invaspread_loss(f_fast, temperature=0.5, detach_keys=detach, neg_weight=w, negatives=mode)
    loop = _loop_loss(f_loop, f_loop.detach() if detach else f_loop, 0.5, w, mode)
    assert torch.allclose(fast, loop, rtol=1e-10, atol=1e-12)
    fast.backward()
    loop.backward()
    assert torch.allclose(f_fast.grad, f_loop.grad, rtol=1e-9, atol=1e-12)


def test_all_negatives_equals_the_reference_loss():
    f = _features(6, 8, seed=2).float()
    ref = invaspread_loss(f, temperature=0.1)
    got = masked_invaspread_loss(f, temperature=0.1, negatives="all")
    assert torch.allclose(got, ref, rtol=1e-6)


def test_hard_and_easy_split_the_negatives_in_halves():
    f = _features(6, 8, seed=3)
    sims = f @ f.t()
    idx = torch.arange(12)
    hard = kept_negatives(sims, idx, "hard")
    easy = kept_negatives(sims, idx, "easy")
    assert hard.sum(1).tolist() == [5] * 12 and easy.sum(1).tolist() == [5] * 12
    assert not (hard & easy).any()
    assert not hard[idx, idx].any() and not hard[idx, (idx + 6) % 12].any()
    # every kept hard negative is at least as similar as every kept easy one
    for i in range(12):
        assert sims[i][hard[i]].min() >= sims[i][easy[i]].max()


def test_rows_form_is_additive_over_anchor_subsets():
    """What the distributed loss relies on: the sum over all anchors = sum over disjoint subsets."""
    f = _features(4, 6, seed=4)
    idx = torch.arange(8)
    whole = masked_invaspread_loss_rows(f, f, idx, 0.2, 1.0, "hard")
    parts = sum(masked_invaspread_loss_rows(f[s], f, idx[s], 0.2, 1.0, "hard") for s in (idx[:3], idx[3:]))
    assert torch.allclose(whole, parts, rtol=1e-12)
    assert math.isclose(float(masked_invaspread_loss_rows(f, f, idx, 0.2, 1.0, "all")),
                        float(invaspread_loss_rows(f, f, idx, 0.2, 1.0)), rel_tol=1e-12)


def test_bad_mode_is_rejected():
    with pytest.raises(ValueError, match="negatives must be one of"):
        masked_invaspread_loss(_features(2, 3, 0), negatives="medium")
    with pytest.raises(ValueError, match="negatives must be one of"):
        select_negatives(_features(2, 3, 0), _features(2, 3, 0), torch.arange(4), 0.1, "medium")


def test_the_mask_drops_exactly_the_unselected_negatives():
    """neg_mask: a dropped negative leaves Z_i and the negative sum (checked against the loop with a random mask)."""
    f = _features(4, 5, seed=6)
    idx = torch.arange(8)
    mask = torch.rand(8, 8, generator=torch.Generator().manual_seed(0)) < 0.5
    got = invaspread_loss_rows(f, f, idx, 0.3, 1.0, neg_mask=mask)
    want = f.new_zeros(())
    for i in range(8):
        pos = (i + 4) % 8
        negs = [j for j in range(8) if j not in (i, pos) and mask[i, j]]
        e = {j: torch.exp(f[i] @ f[j] / 0.3) for j in [pos, *negs]}
        z = sum(e.values())
        want = want - torch.log(e[pos] / z) - sum((torch.log(1 - e[j] / z) for j in negs), f.new_zeros(()))
    assert torch.allclose(got, want, rtol=1e-12)
    full = torch.ones(8, 8, dtype=torch.bool)  # self and positive entries of the mask are ignored
    assert torch.equal(invaspread_loss_rows(f, f, idx, 0.3, 1.0, neg_mask=full),
                       invaspread_loss_rows(f, f, idx, 0.3, 1.0))
