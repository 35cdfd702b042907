"""The fused Triton InvaSpread loss against the reference PyTorch loss.

Without CUDA the real kernels run in Triton's interpreter (tests/conftest.py
sets TRITON_INTERPRET=1 before triton is imported); with CUDA the same tests
run natively and the ``gpu``-marked ones add larger and memory checks.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

from training import fused_loss
from training.fused_loss import (
    FusedLossConfig,
    TileConfig,
    fused_invaspread_loss,
    fused_invaspread_loss_rows,
)
from training.loss import invaspread_loss, invaspread_loss_rows

# every test here runs the real kernels: natively on CUDA, in Triton's interpreter on the CPU
pytestmark = pytest.mark.kernels

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

try:  # the interpreter's numpy products crawl when BLAS threads fight over 2 cores
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    threadpool_limits = None


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    ctx = threadpool_limits(1) if threadpool_limits is not None else contextlib.nullcontext()
    with ctx:
        yield


def _batch(two_n: int, dim: int, seed: int = 0, noise: float = 0.6) -> torch.Tensor:
    """[2N, D] float32 unit rows: view 2 is a noisy copy of view 1 (like augmentations)."""
    g = torch.Generator().manual_seed(seed)
    v1 = F.normalize(torch.randn(two_n // 2, dim, generator=g), dim=1)
    v2 = F.normalize(v1 + noise * torch.randn(two_n // 2, dim, generator=g), dim=1)
    return torch.cat([v1, v2]).to(DEVICE)


def _loss_and_grad(fn, features: torch.Tensor, *args, **kwargs) -> tuple[float, torch.Tensor]:
    x = features.clone().requires_grad_()
    loss = fn(x, *args, **kwargs)
    loss.backward()
    assert loss.dtype == torch.float32 or loss.dtype == torch.float64
    return float(loss.detach()), x.grad.double()


def _assert_close(value, grad, ref_value, ref_grad, value_tol=1e-5, grad_tol=1e-4) -> None:
    assert math.isfinite(value) and torch.isfinite(grad).all()
    assert abs(value - ref_value) <= value_tol * abs(ref_value) + 1e-7, (value, ref_value)
    err = float((grad - ref_grad).abs().max())
    scale = float(ref_grad.abs().max())
    # 2N = 2 has only the positive: loss and gradient are exactly 0.  The backward pass
    # recomputes s on the GPU with another tiling, so q_pos = exp(s_pos - log Z) may miss 1
    # by an ulp: allow a rounding-sized absolute error there.
    atol = 1e-5 if scale == 0.0 else 1e-9
    assert err <= grad_tol * scale + atol, (err, scale)


def _clamps(f: torch.Tensor, tau: float, w: float) -> bool:
    """Whether some negative has p_ij >= 1 - 1e-6, where the reference clamps (float32 and
    float64 clamp to different tinies, so only the float32 reference is comparable)."""
    f = f.double().cpu()
    two_n = f.shape[0]
    s = f @ f.t() / tau
    idx = torch.arange(two_n)
    pos = (idx + two_n // 2) % two_n
    neg = ~torch.eye(two_n, dtype=torch.bool)
    neg[idx, pos] = False
    z = torch.where(neg, s + math.log(w), s).masked_fill(torch.eye(two_n, dtype=torch.bool), -math.inf)
    x = s - torch.logsumexp(z, 1, keepdim=True)
    return bool((x[neg] > -1e-6).any())


def _check_against_reference(two_n, dim, detach, tau, w, config=None, features=None) -> None:
    f = _batch(two_n, dim) if features is None else features
    value, grad = _loss_and_grad(fused_invaspread_loss, f, tau, detach, w, config=config)
    # the spec'd float32 reference, and the exact float64 one where the clamp does not bite
    dtypes = (torch.float32,) if _clamps(f, tau, w) else (torch.float32, torch.float64)
    for dtype in dtypes:
        ref_value, ref_grad = _loss_and_grad(invaspread_loss, f.to(dtype), tau, detach, w)
        _assert_close(value, grad, ref_value, ref_grad)


# --------------------------------------------------------------------------- the derivation


def _dense_gradient(f: torch.Tensor, tau: float, detach: bool, w: float) -> torch.Tensor:
    """dL/df from the closed form the kernels use, on a dense float64 matrix (slow twin)."""
    two_n = f.shape[0]
    n = two_n // 2
    idx = torch.arange(two_n)
    s = f @ f.t() / tau
    pos = torch.zeros_like(s, dtype=torch.bool)
    pos[idx, (idx + n) % two_n] = True
    valid = ~torch.eye(two_n, dtype=torch.bool)
    neg = valid & ~pos
    log_z = torch.logsumexp(torch.where(neg, s + math.log(w), s).masked_fill(~valid, -math.inf), 1)
    x = s - log_z[:, None]
    q = torch.where(neg, w * x.exp(), x.exp()) * valid
    tiny = torch.finfo(f.dtype).tiny
    r = torch.where(neg & (x <= -tiny), x.exp() / -torch.expm1(x.clamp(max=-tiny)), 0.0)
    t = r.sum(1, keepdim=True)
    g = (q * (1 - w * t) - pos.double() + w * r) / two_n  # dL/ds
    grad = g @ f / tau
    if not detach:
        grad = grad + g.t() @ f / tau
    return grad


@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("tau,w", [(0.1, 1.0), (0.05, 1.0), (0.5, 2.0), (1.0, 0.5), (0.2, 0.05)])
def test_gradient_formula_matches_autograd_in_float64(detach, tau, w):
    f = _batch(12, 8, seed=3).cpu().double()
    x = f.clone().requires_grad_()
    invaspread_loss(x, tau, detach, w).backward()
    torch.testing.assert_close(_dense_gradient(f, tau, detach, w), x.grad, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- kernels vs reference


@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("dim", [16, 128])
@pytest.mark.parametrize("two_n", [2, 6, 130, 1000])
def test_matches_reference(two_n, dim, detach):
    _check_against_reference(two_n, dim, detach, 0.1, 1.0)


@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("tau,w", [(0.05, 1.0), (0.5, 2.0), (1.0, 0.5), (1.0, 0.1), (0.2, 16.0)])
@pytest.mark.parametrize("two_n", [6, 130])
def test_temperatures_and_negative_weights(two_n, tau, w, detach):
    # w < 1 can push a negative's p_ij above 1 (clamped by the reference); near that edge
    # dl/ds ~ 1/(1 - p) is unbounded, so these settings keep every p_ij <= 0.9
    # (test_clamped_probabilities_mirror_reference covers the clamp itself).
    _check_against_reference(two_n, 16, detach, tau, w)


@pytest.mark.parametrize(
    "two_n,dim,block,block_d",
    [
        (50, 100, 16, 32),  # 4 x 4 tiles, masked tails in rows and D, 4 D chunks
        (66, 300, 32, 128),  # D > 128: chunked products (3 chunks), D tail
        (18, 512, 16, 128),  # the largest supported D
    ],
)
def test_small_tiles_and_feature_chunks(two_n, dim, block, block_d):
    t = TileConfig(block, block)
    cfg = FusedLossConfig(t, t, t, block_d=block_d, dot_precision="ieee")
    for detach in (True, False):
        _check_against_reference(two_n, dim, detach, 0.1, 1.0, config=cfg)


def test_clamped_probabilities_mirror_reference():
    """A duplicated image with w << 1 gives p > 1 for a negative: the reference clamps it."""
    f = _batch(16, 16, seed=5, noise=2.0)
    f[1] = f[0]
    for detach in (True, False):
        value, grad = _loss_and_grad(fused_invaspread_loss, f, 0.05, detach, 0.01)
        ref_value, ref_grad = _loss_and_grad(invaspread_loss, f, 0.05, detach, 0.01)
        _assert_close(value, grad, ref_value, ref_grad)


def test_non_contiguous_inputs():
    base = _batch(130, 64)
    strided = torch.zeros(130, 128, device=DEVICE)
    strided[:, ::2] = base
    transposed = base.t().contiguous().t()
    for f in (strided[:, ::2], transposed):
        assert not f.is_contiguous()
        _check_against_reference(130, 64, False, 0.1, 1.0, features=f)


def test_zero_negative_weight_is_zero_like_reference():
    f = _batch(6, 16).requires_grad_()
    out = fused_invaspread_loss(f, 0.1, True, 0.0)
    ref = invaspread_loss(f, 0.1, True, 0.0)
    assert float(out) == float(ref) == 0.0
    assert out.requires_grad == ref.requires_grad
    assert out.dtype == ref.dtype and out.device == ref.device


@pytest.mark.parametrize("keys_grad", [False, True])
def test_rows_entry_matches_reference_rows(keys_grad):
    f = _batch(130, 32, seed=7)
    index = torch.tensor([0, 3, 64, 65, 99, 129, 7], device=DEVICE)
    out = {}
    for name, fn in (("fused", fused_invaspread_loss_rows), ("ref", invaspread_loss_rows)):
        anchors = f[index].clone().requires_grad_()
        keys = f.clone().requires_grad_(keys_grad)
        loss = fn(anchors, keys, index, 0.2, 0.7)
        loss.backward()
        out[name] = (float(loss.detach()), anchors.grad, keys.grad)
    _assert_close(out["fused"][0], out["fused"][1].double(), out["ref"][0], out["ref"][1].double())
    if keys_grad:
        _assert_close(0.0, out["fused"][2].double(), 0.0, out["ref"][2].double())
    else:
        assert out["fused"][2] is None and out["ref"][2] is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("detach", [True, False])
def test_half_precision_close_to_reference(dtype, detach):
    f = _batch(130, 128, seed=11).to(dtype)
    value, grad = _loss_and_grad(fused_invaspread_loss, f, 0.1, detach, 1.0)
    ref_value, ref_grad = _loss_and_grad(invaspread_loss, f.float(), 0.1, detach, 1.0)
    # the value sees the same rounded inputs; gradients pass through one half-precision product
    _assert_close(value, grad, ref_value, ref_grad, value_tol=1e-4, grad_tol=2e-2)


def test_bf16_small_temperature_has_no_nan():
    """tau = 0.05 in bfloat16 (2N = 1024 here; the gpu test below runs 2N = 4096)."""
    f = _batch(1024, 128, seed=13).to(torch.bfloat16)
    t = TileConfig(256, 256) if DEVICE.type == "cpu" else TileConfig(64, 64)
    cfg = FusedLossConfig(t, t, t) if DEVICE.type == "cpu" else None
    for detach in (True, False):
        value, grad = _loss_and_grad(fused_invaspread_loss, f, 0.05, detach, 1.0, config=cfg)
        ref_value, ref_grad = _loss_and_grad(invaspread_loss, f.float(), 0.05, detach, 1.0)
        _assert_close(value, grad, ref_value, ref_grad, value_tol=1e-4, grad_tol=2e-2)


# --------------------------------------------------------------------------- bad input


def test_rejects_bad_input():
    f = _batch(6, 16)
    with pytest.raises(ValueError, match="even number of rows"):
        fused_invaspread_loss(f[:5])
    with pytest.raises(ValueError, match=r"\[2N, D\]"):
        fused_invaspread_loss(f[0])
    with pytest.raises(ValueError, match="temperature"):
        fused_invaspread_loss(f, temperature=0.0)
    with pytest.raises(ValueError, match="finite"):
        fused_invaspread_loss(f, temperature=math.inf)
    with pytest.raises(ValueError, match="neg_weight"):
        fused_invaspread_loss(f, neg_weight=-1.0)
    with pytest.raises(ValueError, match="D <= 512"):
        fused_invaspread_loss(torch.zeros(4, 513, device=DEVICE))
    with pytest.raises(ValueError, match="reference"):
        fused_invaspread_loss(f.double())
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        fused_invaspread_loss(torch.ones(4, 8, dtype=torch.int64, device=DEVICE))
    keys = f
    with pytest.raises(ValueError, match="anchor_index values"):
        fused_invaspread_loss_rows(f[:2], keys, torch.tensor([0, 6], device=DEVICE))
    with pytest.raises(ValueError, match="anchor_index must be"):
        fused_invaspread_loss_rows(f[:2], keys, torch.tensor([0], device=DEVICE))
    bad = FusedLossConfig(TileConfig(24, 16), TileConfig(16, 16), TileConfig(16, 16))
    with pytest.raises(ValueError, match="powers of two"):
        fused_invaspread_loss(f, config=bad)
    with pytest.raises(ValueError, match="anchors must be"):
        fused_invaspread_loss_rows(f[:2, :8], keys, torch.tensor([0, 1], device=DEVICE))


def test_cpu_without_interpreter_names_the_fix(monkeypatch):
    monkeypatch.setattr(fused_loss, "_is_interpreted", lambda: False)
    with pytest.raises(RuntimeError, match="--loss reference") as info:
        fused_invaspread_loss(torch.zeros(4, 8))
    assert "TRITON_INTERPRET=1" in str(info.value)
    ok, why = fused_loss.fused_loss_available("cpu")
    assert not ok and "CUDA" in why


# --------------------------------------------------------------------------- CUDA only


@pytest.mark.gpu
@pytest.mark.parametrize("detach", [True, False])
def test_gpu_bf16_4096_small_temperature(detach):
    f = _batch(4096, 128, seed=17).to(torch.bfloat16)
    value, grad = _loss_and_grad(fused_invaspread_loss, f, 0.05, detach, 1.0)
    ref_value, ref_grad = _loss_and_grad(invaspread_loss, f.float(), 0.05, detach, 1.0)
    _assert_close(value, grad, ref_value, ref_grad, value_tol=1e-4, grad_tol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [128, 512])
def test_gpu_float32_large_batch(dim):
    for detach in (True, False):
        _check_against_reference(4096, dim, detach, 0.1, 1.0)


@pytest.mark.gpu
def test_gpu_memory_is_linear_in_the_batch():
    """2N = 16384: the reference needs GBs; the fused loss a few [2N] and [2N, D] buffers."""
    f = _batch(16384, 128, seed=19).requires_grad_()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fused_invaspread_loss(f, 0.1, False, 1.0).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 4 * f.numel() * 4, extra  # < 4x the features; one 2N x 2N matrix is 1 GiB


# --------------------------------------------------------------------------- the benchmark


def _load_bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "loss_bench.py"
    spec = importlib.util.spec_from_file_location("loss_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_quick_smoke(tmp_path):
    """``--quick`` runs the real kernels (interpreter on CPU) and writes a complete JSON."""
    import json

    out = tmp_path / "bench.json"
    assert _load_bench().main(["--quick", "--modes", "detach", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["device"] and report["results"]
    for row in report["results"]:
        assert row["fused"]["status"] == "ok" and row["reference"]["status"] == "ok"
        assert row["loss_rel_diff"] < 1e-5


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_benchmark_without_cuda_says_so(capsys):
    assert _load_bench().main([]) == 2
    assert "needs CUDA" in capsys.readouterr().err


def test_benchmark_rejects_bad_flags(capsys):
    with pytest.raises(SystemExit) as info:
        _load_bench().main(["--sizes", "7"])
    assert info.value.code == 2
    assert "even" in capsys.readouterr().err
