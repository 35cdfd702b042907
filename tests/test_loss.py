"""The InvaSpread loss against a plain loop over rows and columns (float64)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from training.loss import invaspread_loss


def loop_loss(f: torch.Tensor, tau: float, neg_weight: float = 1.0, detach_keys: bool = True) -> torch.Tensor:
    """Eq. 3-7 written out one term at a time (float64)."""
    two_n = f.shape[0]
    n = two_n // 2
    keys = f.detach() if detach_keys else f
    total = f.new_zeros(())
    for i in range(two_n):
        pos = (i + n) % two_n
        e = {j: torch.exp(torch.dot(f[i], keys[j]) / tau) for j in range(two_n) if j != i}
        z = e[pos] + neg_weight * sum((e[j] for j in e if j != pos), f.new_zeros(()))
        total = total + torch.log(e[pos] / z)
        for j in e:
            if j != pos:
                total = total + neg_weight * torch.log(1 - e[j] / z)
    return -total / two_n


def unit(two_n: int, d: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(two_n, d, generator=g, dtype=torch.float64), dim=1).to(dtype)


@pytest.mark.parametrize("two_n,d", [(2, 4), (6, 8), (10, 5)])
@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("neg_weight", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("detach_keys", [True, False])
def test_value_and_gradient_match_loop(two_n, d, tau, neg_weight, detach_keys):
    x = unit(two_n, d, seed=two_n + d).requires_grad_()
    y = x.detach().clone().requires_grad_()
    fast = invaspread_loss(x, tau, detach_keys=detach_keys, neg_weight=neg_weight)
    slow = loop_loss(y, tau, neg_weight, detach_keys)
    assert fast.dtype == torch.float64
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)
    fast.backward()
    slow.backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-8, atol=1e-12)


def test_neg_weight_below_one_where_defined():
    """With w < 1 a negative's share exp(s_ij)/Z_i can exceed 1 (log undefined); where it does not, values match."""
    x = unit(8, 6, seed=7).requires_grad_()
    y = x.detach().clone().requires_grad_()
    slow = loop_loss(y, 1.0, 0.5)
    assert torch.isfinite(slow)
    fast = invaspread_loss(x, 1.0, neg_weight=0.5)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)
    fast.backward()
    slow.backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-8, atol=1e-12)


def test_modes_differ_in_gradient_not_value():
    x = unit(8, 6, seed=1)
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    la = invaspread_loss(a, detach_keys=True)
    lb = invaspread_loss(b, detach_keys=False)
    torch.testing.assert_close(la, lb)
    la.backward()
    lb.backward()
    assert not torch.allclose(a.grad, b.grad)


@pytest.mark.parametrize("n", [1, 2, 5, 64])
def test_closed_form_for_identical_embeddings(n):
    two_n = 2 * n
    f = F.normalize(torch.ones(two_n, 16, dtype=torch.float64), dim=1)
    expected = -(math.log(1 / (two_n - 1)) + (two_n - 2) * math.log((two_n - 2) / (two_n - 1))) if two_n > 2 else 0.0
    assert invaspread_loss(f).item() == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_gradient_wrt_logits_sums_to_zero_per_row():
    """The loss depends on each row's logits only through differences (softmax shift invariance)."""
    from training.loss import invaspread_loss_rows

    x = unit(12, 8, seed=3)
    # differentiate with respect to the logits themselves: keys = identity basis trick
    s = (x @ x.t() / 0.1).clone().requires_grad_()
    keys = torch.eye(12, dtype=torch.float64)
    loss = invaspread_loss_rows(s * 0.1, keys, torch.arange(12), temperature=0.1)
    (grad,) = torch.autograd.grad(loss, s)
    grad = grad.clone()
    grad.fill_diagonal_(0)  # self is excluded: its logit has no effect
    torch.testing.assert_close(grad.sum(dim=1), torch.zeros(12, dtype=torch.float64), atol=1e-10, rtol=0)


def test_bf16_small_temperature_large_batch_is_finite():
    x = unit(4096, 128, seed=5, dtype=torch.float32).to(torch.bfloat16).requires_grad_()
    loss = invaspread_loss(x, temperature=0.05)
    loss.backward()
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    assert torch.isfinite(x.grad).all()


def test_neg_weight_zero_and_bad_arguments():
    x = unit(6, 4, seed=2)
    assert invaspread_loss(x, neg_weight=0.0).item() == 0.0
    with pytest.raises(ValueError, match="even number"):
        invaspread_loss(unit(5, 4, seed=0))
    with pytest.raises(ValueError, match="temperature"):
        invaspread_loss(x, temperature=-0.1)
    with pytest.raises(ValueError, match="neg_weight"):
        invaspread_loss(x, neg_weight=-1)
    with pytest.raises(ValueError, match=r"\[2N, D\]"):
        invaspread_loss(torch.zeros(4))


# --------------------------------------------------------------------------- the training criterion (one process)


@pytest.mark.parametrize("detach_keys", [True, False])
@pytest.mark.parametrize("neg_weight", [1.0, 2.0])
def test_criterion_in_one_process_is_the_batch_loss(detach_keys, neg_weight):
    from training.criterion import InvaSpreadCriterion

    x = unit(10, 6, seed=11).requires_grad_()
    y = x.detach().clone().requires_grad_()
    crit = InvaSpreadCriterion(0.2, neg_weight, detach_keys)
    got = crit(x)
    want = loop_loss(y, 0.2, neg_weight, detach_keys)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    got.backward()
    want.backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-8, atol=1e-12)
    assert "backend='reference'" in repr(crit)


def test_criterion_refuses_impossible_settings():
    from training.criterion import InvaSpreadCriterion

    with pytest.raises(ValueError, match="reference backend only"):
        InvaSpreadCriterion(negatives="hard", backend="fused")
    with pytest.raises(ValueError, match="backend must be one of reference, fused"):
        InvaSpreadCriterion(backend="cuda")
    with pytest.raises(ValueError, match="negatives must be one of"):
        InvaSpreadCriterion(negatives="some")
    with pytest.raises(ValueError, match="even number"):
        InvaSpreadCriterion()(unit(5, 4, seed=0))


@pytest.mark.parametrize("detach_keys", [True, False])
def test_fused_criterion_equals_the_reference_criterion(detach_keys):
    """backend="fused" (Triton: CUDA, or the interpreter on a CPU) is a twin of the reference backend."""
    from training.criterion import InvaSpreadCriterion
    from training.fused_loss import fused_loss_available

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ok, why = fused_loss_available(device)
    if not ok:
        pytest.skip(why)
    x = unit(8, 16, seed=12, dtype=torch.float32).to(device).requires_grad_()
    y = x.detach().clone().requires_grad_()
    fused = InvaSpreadCriterion(0.1, 1.0, detach_keys, backend="fused")(x)
    ref = InvaSpreadCriterion(0.1, 1.0, detach_keys, backend="reference")(y)
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
    fused.backward()
    ref.backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-4, atol=1e-5)
