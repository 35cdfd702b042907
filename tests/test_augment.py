"""Batched per-sample augmentation (training/augment.py) against torchvision.

Tolerances (float32, images in [0, 1]):
- resize/crop: the batched path builds exactly PyTorch's bilinear weights
  (antialiased triangle filter when downscaling with antialias=True, plain
  bilinear otherwise) as matrices, so it matches ``resized_crop`` with the
  SAME antialias flag to float rounding: 1e-5 (observed ~2e-6). It is tested
  with antialias=True (torchvision's default) and antialias=False.
- brightness / contrast / saturation / grayscale: same formulas, only the
  summation order differs: 2e-6.
- hue: same RGB->HSV, closed-form HSV->RGB instead of torchvision's sector
  table: 1e-5 (observed ~6e-7).
- flip: a permutation, exact.
- full pipeline vs ``reference_views``: errors of the steps add up: 2e-5.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from training.augment import (
    AugmentConfig,
    Augmenter,
    AugmentParams,
    apply_params,
    augment_batch,
    normalize,
    reference_views,
    sample_params,
    to_float_chw,
)


def _stats():
    """scipy.stats for the distribution tests (scipy comes with scikit-learn in the dev extra; the GPU
    machine may lack it, and the other tests of this module must still run there)."""
    return pytest.importorskip("scipy.stats", reason="scipy is not installed (pip install -e '.[dev]')")


@pytest.fixture(autouse=True)
def _one_thread():
    """The per-image reference works on tiny tensors: with intra-op threads on a busy 2-core
    machine each op waits on the thread pool (50x slower), so run this module on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """uint8 [B, 3, H, W] with smooth structure, flat regions, saturated and grey pixels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, h, w, generator=g)
    x[:, :, : h // 4] = x[:, :, : h // 4].round()  # pure primaries / black / white
    x[:, 1:, h // 4 : h // 2] = x[:, :1, h // 4 : h // 2]  # grey pixels (hue undefined)
    return (x * 255).round().to(torch.uint8)


def _fixed_params(
    b: int, crop_box, *, factors=(1.0, 1.0, 1.0, 0.0), order=(0, 1, 2, 3), gray=False, flip=False
) -> AugmentParams:
    """The same crop/factors/order for all b samples; gray/flip a bool or a [b] tensor."""
    return AugmentParams(
        crop_box=torch.tensor(crop_box, dtype=torch.float32).expand(b, 4).clone(),
        flip=torch.as_tensor(flip, dtype=torch.bool).expand(b).clone(),
        jitter_factors=torch.tensor(factors, dtype=torch.float32).expand(b, 4).clone(),
        jitter_order=torch.tensor(order, dtype=torch.long).expand(b, 4).clone(),
        gray=torch.as_tensor(gray, dtype=torch.bool).expand(b).clone(),
    )


ONLY = dict(crop=False, grayscale=False, flip=False)


# ---------------------------------------------------------------- single ops vs torchvision


@pytest.mark.parametrize("antialias", [True, False])
@pytest.mark.parametrize(
    "h,w,s",
    [(32, 32, 32), (32, 32, 24), (32, 32, 48), (40, 28, 20), (17, 23, 31)],
)
def test_resized_crop_matches_torchvision(antialias, h, w, s):
    b = 12
    x = _images(b, h, w, seed=h * w + s).float() / 255
    g = torch.Generator().manual_seed(s)
    params = sample_params(b, h, w, AugmentConfig(), g)
    # Add boxes that are exactly the output size, the whole image and a 1-pixel box.
    extra = torch.tensor(
        [[0, 0, h, w], [1, 2, min(s, h - 1), min(s, w - 2)], [h // 2, w // 2, 1, 1]], dtype=torch.float32
    )
    params.crop_box[: len(extra)] = extra
    cfg = AugmentConfig(antialias=antialias, color_jitter=False, grayscale=False)
    params.flip[:] = False
    out = apply_params(x, params, s, cfg)
    for i in range(b):
        t, left, hh, ww = (int(v) for v in params.crop_box[i])
        ref = TF.resized_crop(x[i], t, left, hh, ww, [s, s], antialias=antialias)
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0, msg=lambda m: f"box {t, left, hh, ww}: {m}")


@pytest.mark.parametrize(
    "op,factor,fn",
    [
        (0, 0.6, TF.adjust_brightness),
        (0, 1.4, TF.adjust_brightness),
        (1, 0.6, TF.adjust_contrast),
        (1, 1.4, TF.adjust_contrast),
        (2, 0.6, TF.adjust_saturation),
        (2, 1.4, TF.adjust_saturation),
        (3, -0.4, TF.adjust_hue),
        (3, 0.0, TF.adjust_hue),
        (3, 0.13, TF.adjust_hue),
        (3, 0.4, TF.adjust_hue),
    ],
)
def test_single_jitter_op_matches_torchvision(op, factor, fn):
    b, h = 6, 16
    x = _images(b, h, h, seed=op).float() / 255
    names = ("brightness", "contrast", "saturation", "hue")
    cfg = AugmentConfig(**ONLY, **{n: (0.4 if k == op else 0.0) for k, n in enumerate(names)})
    factors = [1.0, 1.0, 1.0, 0.0]
    factors[op] = factor
    params = _fixed_params(b, (0, 0, h, h), factors=factors, order=(3, 2, 1, 0))
    out = apply_params(x, params, h, cfg)
    ref = torch.stack([fn(x[i], factor) for i in range(b)])
    tol = 1e-5 if op == 3 else 2e-6
    torch.testing.assert_close(out, ref, atol=tol, rtol=0)


def test_grayscale_and_flip_match_torchvision():
    b, h = 8, 12
    x = _images(b, h, h).float() / 255
    gray = torch.tensor([True, False] * 4)
    flip = torch.tensor([True, True, False, False] * 2)
    cfg = AugmentConfig(crop=False, color_jitter=False)
    out = apply_params(x, _fixed_params(b, (0, 0, h, h), gray=gray, flip=flip), h, cfg)
    for i in range(b):
        ref = x[i]
        if gray[i]:
            ref = TF.rgb_to_grayscale(ref, num_output_channels=3)
        if flip[i]:
            ref = TF.horizontal_flip(ref)
        if gray[i]:
            torch.testing.assert_close(out[i], ref, atol=2e-6, rtol=0)
        else:  # flip alone is a permutation of pixels: exact
            assert torch.equal(out[i], ref)


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (3, 2, 1, 0), (1, 3, 0, 2), (2, 0, 3, 1)])
def test_jitter_order_is_respected(order):
    """Each fixed order equals torchvision's ops applied in that order (and orders differ)."""
    b, h = 4, 16
    x = _images(b, h, h, seed=7).float() / 255
    factors = (1.35, 0.62, 1.3, 0.31)
    cfg = AugmentConfig(**ONLY)
    out = apply_params(x, _fixed_params(b, (0, 0, h, h), factors=factors, order=order), h, cfg)
    fns = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    ref = x.clone()
    for k in order:
        ref = torch.stack([fns[k](ref[i], factors[k]) for i in range(b)])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    other = apply_params(x, _fixed_params(b, (0, 0, h, h), factors=factors, order=order[::-1]), h, cfg)
    assert (other - out).abs().max() > 1e-2


# ---------------------------------------------------------------- full pipeline vs the slow twin


@pytest.mark.parametrize("antialias", [True, False])
@pytest.mark.parametrize("h,w,s,channels_last", [(32, 32, 32, True), (40, 28, 24, False), (16, 16, 32, True)])
def test_full_pipeline_matches_reference_views(antialias, h, w, s, channels_last):
    b = 70  # > the CPU chunk size: covers the chunked path
    x = _images(b, h, w, seed=s)
    if channels_last:
        x = x.permute(0, 2, 3, 1).contiguous()
    cfg = AugmentConfig(antialias=antialias)
    params = sample_params(b, h, w, cfg, torch.Generator().manual_seed(123))
    assert params.gray.any() and (~params.gray).any() and params.flip.any() and (~params.flip).any()
    out = apply_params(x, params, s, cfg)
    ref = reference_views(x, params, s, cfg)
    assert out.shape == ref.shape == (b, 3, s, s)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)


def test_ablation_configs_match_reference_views():
    b, h = 20, 24
    x = _images(b, h, h, seed=3)
    for cfg in (
        AugmentConfig(crop=False),
        AugmentConfig(color_jitter=False),
        AugmentConfig(grayscale=False),
        AugmentConfig(flip=False),
        AugmentConfig(hue=0.0),
        AugmentConfig.none(),
    ):
        params = sample_params(b, h, h, cfg, torch.Generator().manual_seed(5))
        torch.testing.assert_close(
            apply_params(x, params, 20, cfg), reference_views(x, params, 20, cfg), atol=2e-5, rtol=0
        )


# ---------------------------------------------------------------- switches


def test_switches_zero_their_parameters_and_keep_the_others():
    b, h = 256, 32
    full = sample_params(b, h, h, AugmentConfig(), torch.Generator().manual_seed(9))
    assert full.flip.any() and full.gray.any()
    no_flip = sample_params(b, h, h, AugmentConfig(flip=False), torch.Generator().manual_seed(9))
    assert not no_flip.flip.any()
    assert torch.equal(no_flip.crop_box, full.crop_box) and torch.equal(no_flip.jitter_factors, full.jitter_factors)
    no_gray = sample_params(b, h, h, AugmentConfig(grayscale=False), torch.Generator().manual_seed(9))
    assert not no_gray.gray.any() and torch.equal(no_gray.flip, full.flip)
    no_jit = sample_params(b, h, h, AugmentConfig(color_jitter=False), torch.Generator().manual_seed(9))
    assert torch.equal(no_jit.jitter_factors, torch.tensor([[1.0, 1.0, 1.0, 0.0]]).expand(b, 4))
    assert torch.equal(no_jit.crop_box, full.crop_box)
    no_crop = sample_params(b, 30, 40, AugmentConfig(crop=False), torch.Generator().manual_seed(9))
    assert torch.equal(no_crop.crop_box, torch.tensor([[0.0, 5.0, 30.0, 30.0]]).expand(b, 4))


def test_no_augmentation_is_identity_or_center_square_resize():
    x = _images(5, 16, 16)
    out = augment_batch(x, 16, AugmentConfig.none(), torch.Generator().manual_seed(0))
    assert torch.equal(out, x.float() / 255)
    x = _images(5, 20, 30)
    out = augment_batch(x, 12, AugmentConfig.none(), torch.Generator().manual_seed(0))
    ref = TF.resize(TF.center_crop(x.float() / 255, [20, 20]), [12, 12], antialias=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- parameter statistics


def test_crop_boxes_fit_and_follow_torchvision_distribution():
    stats = _stats()
    n, h, w = 6000, 32, 32
    cfg = AugmentConfig()
    box = sample_params(n, h, w, cfg, torch.Generator().manual_seed(1)).crop_box
    top, left, bh, bw = box.unbind(1)
    assert torch.equal(box, box.round())
    assert (top >= 0).all() and (left >= 0).all() and (bh >= 1).all() and (bw >= 1).all()
    assert (top + bh <= h).all() and (left + bw <= w).all()
    # torchvision's own sampler (RandomResizedCrop.make_params), same image size.
    torch.manual_seed(0)
    rrc = T.RandomResizedCrop(w, scale=cfg.crop_scale, ratio=cfg.crop_ratio)
    img = torch.zeros(3, h, w)
    tv = np.array([[p["top"], p["left"], p["height"], p["width"]] for p in (rrc.make_params([img]) for _ in range(n))],
                  dtype=float)
    ours = box.numpy().astype(float)
    for name, a, b in (
        ("area", ours[:, 2] * ours[:, 3], tv[:, 2] * tv[:, 3]),
        ("log ratio", np.log(ours[:, 3] / ours[:, 2]), np.log(tv[:, 3] / tv[:, 2])),
        ("top", ours[:, 0], tv[:, 0]),
        ("left", ours[:, 1], tv[:, 1]),
    ):
        # two-sample KS; fixed seeds make this deterministic, so it cannot flake.
        assert stats.ks_2samp(a, b).pvalue > 1e-3, name
    # rounding to whole pixels keeps area and ratio within their ranges up to one pixel
    area = ours[:, 2] * ours[:, 3] / (h * w)
    assert area.min() >= 0.2 - 2 * 32 / (h * w) and area.max() <= 1.0
    ratio = ours[:, 3] / ours[:, 2]
    assert ratio.min() >= 0.75 * (1 - 1 / 8) and ratio.max() <= 4 / 3 * (1 + 1 / 8)


def test_crop_area_and_ratio_are_uniform_where_nothing_is_rejected():
    stats = _stats()
    n, side = 4000, 1000
    cfg = AugmentConfig(crop_scale=(0.2, 0.5))  # w, h <= sqrt(0.5 * 4/3) * side < side: every first try fits
    box = sample_params(n, side, side, cfg, torch.Generator().manual_seed(2)).crop_box.double()
    area = (box[:, 2] * box[:, 3] / side**2).numpy()
    logr = torch.log(box[:, 3] / box[:, 2]).numpy()
    assert stats.kstest(area, stats.uniform(0.2, 0.3).cdf).pvalue > 1e-3
    lo, hi = math.log(3 / 4), math.log(4 / 3)
    assert stats.kstest(logr, stats.uniform(lo, hi - lo).cdf).pvalue > 1e-3
    assert area.min() >= 0.199 and area.max() <= 0.501 and logr.min() >= lo - 0.01 and logr.max() <= hi + 0.01


def test_crop_fallback_is_torchvisions_central_crop():
    cfg = AugmentConfig(crop_scale=(0.9, 1.0))  # 10 x 1000: no candidate fits
    box = sample_params(16, 10, 1000, cfg, torch.Generator().manual_seed(0)).crop_box
    p = T.RandomResizedCrop(8, scale=cfg.crop_scale, ratio=cfg.crop_ratio).make_params([torch.zeros(3, 10, 1000)])
    assert torch.equal(
        box, torch.tensor([[p["top"], p["left"], p["height"], p["width"]]], dtype=torch.float32).expand(16, 4)
    )


def test_flip_gray_jitter_statistics():
    stats = _stats()
    n = 40000
    p = sample_params(n, 8, 8, AugmentConfig(), torch.Generator().manual_seed(4))
    for rate, target in ((p.flip.float().mean().item(), 0.5), (p.gray.float().mean().item(), 0.2)):
        assert abs(rate - target) < 4 * math.sqrt(target * (1 - target) / n)
    f = p.jitter_factors.double().numpy()
    for k in range(3):
        assert 0.6 <= f[:, k].min() and f[:, k].max() <= 1.4
        assert stats.kstest(f[:, k], stats.uniform(0.6, 0.8).cdf).pvalue > 1e-3
    assert -0.4 <= f[:, 3].min() and f[:, 3].max() <= 0.4
    assert stats.kstest(f[:, 3], stats.uniform(-0.4, 0.8).cdf).pvalue > 1e-3
    # the 4 factors of one sample are independent
    assert abs(np.corrcoef(f.T)[np.triu_indices(4, 1)]).max() < 0.03
    order = p.jitter_order
    assert torch.equal(order.sort(dim=1).values, torch.arange(4).expand(n, 4))
    codes = (order * torch.tensor([64, 16, 4, 1])).sum(1)
    counts = torch.bincount(codes, minlength=256)
    counts = counts[counts > 0].numpy()
    assert len(counts) == 24
    assert stats.chisquare(counts).pvalue > 1e-3


def test_ranges_follow_the_config():
    cfg = AugmentConfig(brightness=1.5, contrast=0.1, saturation=0.0, hue=0.05, grayscale_p=0.0, flip_p=1.0)
    p = sample_params(2000, 8, 8, cfg, torch.Generator().manual_seed(0))
    f = p.jitter_factors
    assert f[:, 0].min() >= 0 and f[:, 0].max() <= 2.5 and f[:, 0].min() < 0.05  # 1 - 1.5 clipped at 0
    assert f[:, 1].min() >= 0.9 and f[:, 1].max() <= 1.1
    assert (f[:, 2] == 1).all() and f[:, 3].abs().max() <= 0.05
    assert not p.gray.any() and p.flip.all()


# ---------------------------------------------------------------- randomness, dtypes, shapes


def test_same_image_twice_in_a_batch_gets_different_views():
    x = _images(1, 32, 32).expand(8, 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    p = sample_params(8, 32, 32, AugmentConfig(), g)
    assert len({tuple(r) for r in p.crop_box.tolist()}) == 8
    assert len({tuple(r) for r in p.jitter_factors.tolist()}) == 8
    out = apply_params(x, p, 32, AugmentConfig())
    for i in range(8):
        for j in range(i + 1, 8):
            assert (out[i] - out[j]).abs().max() > 1e-2


def test_seed_reproducibility():
    x = _images(16, 24, 24)
    a = augment_batch(x, 20, AugmentConfig(), torch.Generator().manual_seed(42))
    b = augment_batch(x, 20, AugmentConfig(), torch.Generator().manual_seed(42))
    c = augment_batch(x, 20, AugmentConfig(), torch.Generator().manual_seed(43))
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-2
    g = torch.Generator().manual_seed(42)  # a generator advances: two calls differ
    assert not torch.equal(augment_batch(x, 20, AugmentConfig(), g), augment_batch(x, 20, AugmentConfig(), g))


def test_uint8_float_and_layouts_agree():
    x = _images(6, 20, 14)
    p = sample_params(6, 20, 14, AugmentConfig(), torch.Generator().manual_seed(0))
    cfg = AugmentConfig()
    a = apply_params(x, p, 16, cfg)
    assert torch.equal(a, apply_params(x.float() / 255, p, 16, cfg))
    assert torch.equal(a, apply_params(x.permute(0, 2, 3, 1), p, 16, cfg))  # channels-last uint8 (the cache layout)
    cache = np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy())  # uint8 [N, R, R, 3] like the training cache
    assert torch.equal(a, apply_params(torch.from_numpy(cache), p, 16, cfg))
    torch.testing.assert_close(apply_params(x.double() / 255, p, 16, cfg), a, atol=1e-6, rtol=0)
    assert a.dtype == torch.float32 and a.shape == (6, 3, 16, 16)
    assert a.min() >= 0 and a.max() <= 1


@pytest.mark.parametrize("s", [1, 7, 32, 64])
def test_output_size_and_range(s):
    x = _images(3, 32, 24)
    out = augment_batch(x, s, AugmentConfig(), torch.Generator().manual_seed(s))
    assert out.shape == (3, 3, s, s) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def test_empty_batch():
    x = torch.zeros(0, 8, 8, 3, dtype=torch.uint8)
    assert augment_batch(x, 4, AugmentConfig()).shape == (0, 3, 4, 4)


def test_normalize():
    x = _images(4, 8, 8)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    plain = augment_batch(x, 8, AugmentConfig(), g())
    normed = augment_batch(x, 8, AugmentConfig(), g(), mean=mean, std=std)
    ref = TF.normalize(plain, list(mean), list(std))
    torch.testing.assert_close(normed, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(normalize(plain, mean, std), ref, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="both mean and std"):
        augment_batch(x, 8, AugmentConfig(), mean=mean)
    with pytest.raises(ValueError, match="non-zero"):
        normalize(plain, mean, (1.0, 0.0, 1.0))


def test_config_round_trip_and_validation():
    cfg = AugmentConfig(crop=False, hue=0.1, crop_scale=(0.3, 0.9))
    assert AugmentConfig.from_dict(cfg.to_dict()) == cfg
    none = AugmentConfig.none()
    assert not (none.crop or none.color_jitter or none.grayscale or none.flip)
    for bad, match in (
        (dict(crop_scale=(0.5, 0.2)), "crop_scale"),
        (dict(crop_scale=(0.0, 1.0)), "crop_scale"),
        (dict(crop_ratio=(-1.0, 2.0)), "crop_ratio"),
        (dict(hue=0.6), "hue"),
        (dict(brightness=-0.1), "brightness"),
        (dict(flip_p=1.5), "flip_p"),
        (dict(grayscale_p=float("nan")), "grayscale_p"),
    ):
        with pytest.raises(ValueError, match=match):
            AugmentConfig(**bad)
    with pytest.raises(ValueError, match="unknown augmentation setting"):
        AugmentConfig.from_dict({"crop": True, "colour": 1})


def test_bad_input_is_rejected_clearly():
    cfg = AugmentConfig()
    with pytest.raises(ValueError, match="batch"):
        augment_batch(torch.zeros(3, 8, 8, dtype=torch.uint8), 8, cfg)
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        augment_batch(torch.zeros(2, 4, 8, 8, dtype=torch.uint8), 8, cfg)
    with pytest.raises(TypeError, match="uint8"):
        augment_batch(torch.zeros(2, 3, 8, 8, dtype=torch.int32), 8, cfg)
    with pytest.raises(TypeError, match="torch.Tensor"):
        augment_batch(np.zeros((2, 8, 8, 3), np.uint8), 8, cfg)
    with pytest.raises(ValueError, match="out_size"):
        augment_batch(torch.zeros(2, 3, 8, 8), 0, cfg)
    p = sample_params(3, 8, 8, cfg)
    with pytest.raises(ValueError, match="params are for 3 images but the batch has 2"):
        apply_params(torch.zeros(2, 3, 8, 8), p, 8, cfg)
    with pytest.raises(ValueError, match="positive image size"):
        sample_params(2, 0, 8, cfg)
    assert to_float_chw(torch.zeros(2, 8, 8, 3, dtype=torch.uint8)).shape == (2, 3, 8, 8)


# ---------------------------------------------------------------- CUDA


def test_augmenter_samples_then_applies():
    x = _images(100, 16, 16).permute(0, 2, 3, 1)  # > CPU chunk size
    aug = Augmenter(12, AugmentConfig(), torch.Generator().manual_seed(8))
    out = aug(x)
    assert out.shape == (100, 3, 12, 12)
    p = sample_params(100, 16, 16, AugmentConfig(), torch.Generator().manual_seed(8))
    assert torch.equal(aug.last_params.crop_box, p.crop_box)
    assert torch.equal(out, apply_params(x, p, 12, AugmentConfig()))
    assert torch.equal(aug(x, params=p), out)  # explicit params are used as given
    # small batch: the one-graph path (uniforms -> params -> views) gives augment_batch's views
    small = Augmenter(12, AugmentConfig(), torch.Generator().manual_seed(5))(x[:10])
    assert torch.equal(small, augment_batch(x[:10], 12, AugmentConfig(), torch.Generator().manual_seed(5)))


@pytest.mark.gpu
def test_cuda_matches_cpu_without_host_sync():
    dev = torch.device("cuda")
    cfg = AugmentConfig()
    x = _images(300, 32, 32).permute(0, 2, 3, 1).contiguous()
    p = sample_params(300, 32, 32, cfg, torch.Generator().manual_seed(0))
    cpu = apply_params(x, p, 32, cfg)
    xd, pd_ = x.to(dev), p.to(dev)
    g = torch.Generator(device=dev).manual_seed(0)
    aug = Augmenter(32, cfg, g)
    sample_params(300, 32, 32, cfg, g, device=dev)  # warm-up (lazy CUDA init may sync)
    apply_params(xd, pd_, 32, cfg)
    aug(xd)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising CUDA call below raises
    try:
        pd = sample_params(300, 32, 32, cfg, g, device=dev)
        out = apply_params(xd, pd_, 32, cfg)
        views = augment_batch(xd, 32, cfg, g)
        views2 = aug(xd)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert pd.crop_box.device.type == "cuda" and views.device.type == "cuda" and views2.shape == views.shape
    torch.testing.assert_close(out.cpu(), cpu, atol=2e-5, rtol=0)
    # a CPU generator also works for CUDA images
    a = augment_batch(xd, 24, cfg, torch.Generator().manual_seed(3))
    b = augment_batch(x, 24, cfg, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a.cpu(), b, atol=2e-5, rtol=0)


@pytest.mark.gpu
def test_compiled_augmenter_matches_eager_on_cuda():
    dev = torch.device("cuda")
    cfg = AugmentConfig()
    x = _images(256, 32, 32).permute(0, 2, 3, 1).contiguous().to(dev)
    p = sample_params(256, 32, 32, cfg, torch.Generator(device=dev).manual_seed(0), device=dev)
    compiled = Augmenter(32, cfg, torch.Generator(device=dev).manual_seed(1), compile=True)
    torch.testing.assert_close(compiled(x, params=p), apply_params(x, p, 32, cfg), atol=1e-5, rtol=0)
    views = compiled(x)  # compiled uniforms -> params -> views
    ref = augment_batch(x, 32, cfg, torch.Generator(device=dev).manual_seed(1))
    torch.testing.assert_close(views, ref, atol=1e-5, rtol=0)


def test_sort_free_ranks_match_argsort():
    from training.augment import _inverse_perm, _ranks

    u = torch.rand(5000, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(_inverse_perm(_ranks(u)), torch.argsort(u, dim=1))
    perms = torch.argsort(torch.rand(5000, 4), dim=1)
    assert torch.equal(_inverse_perm(perms), torch.argsort(perms, dim=1))
    ties = torch.tensor([[0.5, 0.5, 0.1, 0.5], [1.0, 1.0, 1.0, 1.0]])
    assert torch.equal(_ranks(ties), torch.tensor([[1, 2, 0, 3], [0, 1, 2, 3]]))  # ties by index: still permutations
