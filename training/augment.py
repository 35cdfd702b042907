"""Batched per-sample data augmentation on the device (the paper's training views).

The paper (and the original InvaSpread code) trains on views made by::

    RandomResizedCrop(S, scale=(0.2, 1), ratio=(3/4, 4/3), bilinear)
    -> ColorJitter(0.4, 0.4, 0.4, 0.4)       (the 4 ops in a random order)
    -> RandomGrayscale(p=0.2)
    -> RandomHorizontalFlip(p=0.5)

``torchvision.transforms.v2`` applied to a batched tensor draws ONE parameter
set for the whole batch.  Here every sample gets its own parameters and all
ops are vectorised over the batch: no Python loop over samples, no host
synchronisation (no ``.item()``, no boolean-mask indexing, no tensor built
from host data), so a batch of uint8 images already on the GPU becomes a
batch of views in a fixed number of kernel launches (about 260 eager, about
95 under ``torch.compile``), whatever the batch size.

Speed (H200, 32x32 uint8 -> 32x32 views, sampling included): eager ~170k
views/s at 512 per call (launch-bound: ~3 ms per call whatever B), ~1.3M at
4096 and ~1.8M at 16384 per call; ``Augmenter(compile=True)`` ~270k at 512
and ~1.5-1.9M at 4096; torchvision v2 image by image on the same GPU ~1k/s.
So make many views per call (e.g. the views of several training batches at
once) or compile.  On the CPU (2 cores) the batched path is ~3-5x faster
than the per-image twin.

Pipeline (``apply_params``) for images ``[B, 3, H, W]`` or channels-last
``[B, H, W, 3]`` (uint8 in [0, 255] or float in [0, 1]) -> float32
``[B, 3, S, S]`` in [0, 1]:

1. uint8 -> float32 / 255 (all further arithmetic is float32, nothing is
   re-quantised between ops).
2. Crop + resize + flip as ONE separable resampling: per sample a row
   matrix ``Ry [S, H]`` and a column matrix ``Rx [S, W]`` hold exactly the
   weights of PyTorch's bilinear ``interpolate`` (antialiased triangle
   filter when the crop is larger than S and ``antialias=True``, plain
   bilinear otherwise) restricted to the crop box, so
   ``out = Ry @ img @ Rx^T`` equals ``torchvision.transforms.v2.functional.
   resized_crop`` (same antialias flag) to float rounding.  A horizontal flip
   reverses the rows of ``Rx`` (it commutes with all colour ops).
   With ``crop=False`` the box is the central square of side min(H, W)
   (the whole image when it is square), resized to S (identity when S == H).
3. Colour jitter: brightness, contrast, saturation (all of the form
   ``clamp(x * f + (1 - f) * g)`` with g = 0, the mean grey level, the
   per-pixel grey) and hue (HSV rotation), in a per-sample random order.
   Since hue is applied exactly once per sample, the order is realised as
   "the blend ops before hue (3 masked steps) -> hue (once) -> the blend ops
   after hue (3 masked steps)": 6 cheap steps + 1 hue pass instead of 4
   steps x 4 ops.
4. Grayscale (ITU-R 601 weights, as torchvision) where ``gray`` is set.
5. Optional ``normalize(mean, std)`` (EmbeddingNet normalises internally,
   so training does NOT use it).

``reference_views`` is the slow, obviously-correct twin: it calls the
torchvision functional ops image by image with the same parameters.

Random numbers: ``sample_params`` always draws the same tensors in the same
order whatever the config says, so with one seed switching an op off (for
the ablations) leaves the other ops' parameters unchanged.  The draws happen
on the generator's device (a CUDA generator for CUDA work; a CPU generator
also works and its parameters are copied to ``device``); the same seed gives
different streams on CPU and CUDA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Sequence

import torch
from torch import Tensor

__all__ = [
    "AugmentConfig",
    "Augmenter",
    "AugmentParams",
    "apply_params",
    "augment_batch",
    "normalize",
    "reference_views",
    "sample_params",
    "to_float_chw",
]

# ITU-R 601-2 luma weights, as torchvision.transforms.v2.functional.rgb_to_grayscale.
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
# Number of RandomResizedCrop candidates (torchvision tries 10 times).
_CROP_TRIES = 10
# Uniforms drawn per sample: 2 x 10 crop tries, 2 crop position, 4 jitter, 4 order, gray, flip.
_N_UNIFORMS = 2 * _CROP_TRIES + 12
# Images per chunk when applying on the CPU (keeps intermediates in cache).
_CPU_CHUNK = 64


@dataclass
class AugmentConfig:
    """Which augmentations run and their ranges (defaults: the paper's).

    Every op can be switched off for the ablations; ``AugmentConfig.none()``
    switches all of them off (the view is then the central square resized to
    the output size).

    Attributes:
        crop: RandomResizedCrop; off -> central square of side min(H, W),
            resized to S.
        crop_scale: range of the crop's area as a fraction of the image.
        crop_ratio: range of the crop's aspect ratio width/height
            (sampled log-uniformly).
        antialias: antialiased (triangle filter) downscaling when the crop is
            larger than S, like torchvision's default; upscaling is plain
            bilinear either way.
        color_jitter: ColorJitter with ``brightness``/``contrast``/
            ``saturation`` factors uniform in [max(0, 1 - v), 1 + v] and the
            hue shift uniform in [-hue, hue] (hue <= 0.5); a value of 0
            disables that one op.
        grayscale, grayscale_p: RandomGrayscale probability.
        flip, flip_p: RandomHorizontalFlip probability.
    """

    crop: bool = True
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    color_jitter: bool = True
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.4
    grayscale: bool = True
    grayscale_p: float = 0.2
    flip: bool = True
    flip_p: float = 0.5
    antialias: bool = True

    def __post_init__(self) -> None:
        self.crop_scale = (float(self.crop_scale[0]), float(self.crop_scale[1]))
        self.crop_ratio = (float(self.crop_ratio[0]), float(self.crop_ratio[1]))
        s0, s1 = self.crop_scale
        r0, r1 = self.crop_ratio
        if not (0.0 < s0 <= s1 <= 1.0):
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        if not (0.0 < r0 <= r1) or not all(math.isfinite(r) for r in (r0, r1)):
            raise ValueError(f"crop_ratio must satisfy 0 < min <= max (finite), got {self.crop_ratio}")
        for name in ("brightness", "contrast", "saturation"):
            v = float(getattr(self, name))
            if not (0.0 <= v) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)!r}")
            setattr(self, name, v)
        self.hue = float(self.hue)
        if not (0.0 <= self.hue <= 0.5):
            raise ValueError(f"hue must be in [0, 0.5], got {self.hue!r}")
        for name in ("grayscale_p", "flip_p"):
            p = float(getattr(self, name))
            if not (0.0 <= p <= 1.0):
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
            setattr(self, name, p)

    @classmethod
    def none(cls) -> "AugmentConfig":
        """All augmentations off: central square resized to the output size."""
        return cls(crop=False, color_jitter=False, grayscale=False, flip=False)

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "AugmentConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown augmentation setting(s) {unknown}; known: {sorted(known)}")
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})


@dataclass
class AugmentParams:
    """Per-sample augmentation parameters; every tensor has leading dim B.

    Attributes:
        crop_box: float32 [B, 4] = (top, left, height, width) in input pixels
            (integer-valued, like torchvision's crop parameters).
        flip: bool [B], horizontal flip.
        jitter_factors: float32 [B, 4] = (brightness, contrast, saturation,
            hue); (1, 1, 1, 0) when colour jitter is off.
        jitter_order: int64 [B, 4], a permutation of (0, 1, 2, 3) = the op
            applied at step t (0 brightness, 1 contrast, 2 saturation, 3 hue),
            as torchvision's ``fn_idx``.
        gray: bool [B], convert to grayscale.
    """

    crop_box: Tensor
    flip: Tensor
    jitter_factors: Tensor
    jitter_order: Tensor
    gray: Tensor

    def __len__(self) -> int:
        return int(self.crop_box.shape[0])

    def to(self, device: torch.device | str) -> "AugmentParams":
        return AugmentParams(**{f.name: getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)})

    def select(self, index: Tensor | slice | int) -> "AugmentParams":
        """Parameters of a subset of samples (``index`` as in tensor indexing)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return AugmentParams(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


# --------------------------------------------------------------------------- input handling


def _as_chw(images: Tensor) -> Tensor:
    """Validate a batch and return it as a [B, 3, H, W] view (any dtype check included)."""
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(
            f"images must be a batch [B, 3, H, W] or [B, H, W, 3], got shape {tuple(images.shape)}; "
            f"add a batch dimension with images[None] for a single image"
        )
    if images.shape[1] == 3:
        x = images
    elif images.shape[-1] == 3:
        x = images.permute(0, 3, 1, 2)
    else:
        raise ValueError(f"images must have 3 (RGB) channels in dim 1 or dim 3, got shape {tuple(images.shape)}")
    if x.shape[-2] < 1 or x.shape[-1] < 1:
        raise ValueError(f"images must be at least 1x1 pixels, got shape {tuple(images.shape)}")
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise TypeError(f"images must be uint8 (0..255) or floating point (0..1), got {x.dtype}")
    return x


def to_float_chw(images: Tensor) -> Tensor:
    """[B, 3, H, W] or channels-last [B, H, W, 3], uint8 or float -> float32 [B, 3, H, W].

    uint8 is scaled to [0, 1]; float input is assumed to be in [0, 1]. A
    tensor whose dim 1 is 3 is taken as channels-first, otherwise a last dim
    of 3 means channels-last.
    """
    x = _as_chw(images)
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255.0)
    return x.to(torch.float32)


def _check_out_size(out_size: int) -> int:
    if isinstance(out_size, bool) or int(out_size) != out_size or int(out_size) < 1:
        raise ValueError(f"out_size must be a positive integer, got {out_size!r}")
    return int(out_size)


# --------------------------------------------------------------------------- sampling


def _const_rows(values: Sequence[float], batch: int, device) -> Tensor:
    """float32 [batch, len(values)] with every row = values, built on the device (no host copy)."""
    return torch.stack([torch.full((batch,), float(v), device=device) for v in values], dim=1)


def _ranks(v: Tensor) -> Tensor:
    """Rank of each entry within its row, ties broken by index: int64 [B, n] (a permutation).

    Elementwise comparisons instead of a sort: fuses under torch.compile and
    avoids the segmented-sort launches for rows of 3 or 4 values.
    """
    n = v.shape[1]
    idx = torch.arange(n, device=v.device)
    before = idx[None, :] < idx[:, None]  # [k, j]: j < k
    a, b = v[:, :, None], v[:, None, :]  # [B, k, 1], [B, 1, j]
    return ((b < a) | ((b == a) & before)).sum(dim=2)


def _inverse_perm(perm: Tensor) -> Tensor:
    """Inverse of row permutations [B, n]: out[b, perm[b, i]] = i (== argsort of a permutation)."""
    n = perm.shape[1]
    idx = torch.arange(n, device=perm.device)
    onehot = perm[:, None, :] == idx[None, :, None]  # [B, v, i]: perm[i] == v
    return (onehot * idx).sum(dim=2)


def _center_square(height: int, width: int) -> tuple[int, int, int, int]:
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


def _fallback_crop(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop fallback: central crop with clamped aspect ratio."""
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_params(
    batch: int,
    height: int,
    width: int,
    cfg: AugmentConfig,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> AugmentParams:
    """Draw independent augmentation parameters for ``batch`` images of ``height x width``.

    RandomResizedCrop follows torchvision's algorithm, vectorised: 10
    candidates (area fraction uniform in ``crop_scale``, log aspect ratio
    uniform in log ``crop_ratio``, w/h rounded half-to-even) per sample, the
    first one that fits is taken, else torchvision's central fallback; top and
    left are uniform integers.  Jitter factors are uniform in their ranges and
    the order is a uniform random permutation per sample.

    The random draws are made on the generator's device (or ``device`` when
    no generator is given, with the global RNG) and the result lives on
    ``device`` (default: the generator's device, else CPU).
    """
    batch, height, width = int(batch), int(height), int(width)
    if batch < 0 or height < 1 or width < 1:
        raise ValueError(f"need batch >= 0 and a positive image size, got batch={batch}, {height}x{width}")
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    draw_device = generator.device if generator is not None else device
    # One draw of all uniforms, laid out independently of the switches (same seed -> same
    # crops with or without flip, ...).
    u = torch.rand(batch, _N_UNIFORMS, generator=generator, device=draw_device)
    params = _params_from_uniforms(u, height, width, cfg)
    return params.to(device) if device != draw_device else params


def _params_from_uniforms(u: Tensor, height: int, width: int, cfg: AugmentConfig) -> AugmentParams:
    """Turn uniforms [B, _N_UNIFORMS] into parameters (pure tensor math: no host data, compile-friendly)."""
    B, draw_device = u.shape[0], u.device
    t0, t1 = _CROP_TRIES, 2 * _CROP_TRIES
    area_frac = u[:, :t0] * (cfg.crop_scale[1] - cfg.crop_scale[0]) + cfg.crop_scale[0]
    lr0, lr1 = math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1])
    log_r = u[:, t0:t1] * (lr1 - lr0) + lr0
    pos_u, jit_u, order_u = u[:, t1 : t1 + 2], u[:, t1 + 2 : t1 + 6], u[:, t1 + 6 : t1 + 10]
    gray_u, flip_u = u[:, t1 + 10], u[:, t1 + 11]

    if cfg.crop:
        target = area_frac * float(height * width)
        ratio = torch.exp(log_r)
        w = torch.round(torch.sqrt(target * ratio))
        h = torch.round(torch.sqrt(target / ratio))
        ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)  # index of the first valid try
        w = w.gather(1, first).squeeze(1)
        h = h.gather(1, first).squeeze(1)
        any_ok = ok.any(dim=1)
        ft, fl, fh, fw = _fallback_crop(height, width, cfg.crop_ratio)
        h = torch.where(any_ok, h, torch.full_like(h, fh))
        w = torch.where(any_ok, w, torch.full_like(w, fw))
        # randint(0, n) as floor(u * n); clamp guards u * n rounding up to n.
        top = torch.minimum(torch.floor(pos_u[:, 0] * (height - h + 1)), height - h)
        left = torch.minimum(torch.floor(pos_u[:, 1] * (width - w + 1)), width - w)
        top = torch.where(any_ok, top, torch.full_like(top, ft))
        left = torch.where(any_ok, left, torch.full_like(left, fl))
        crop_box = torch.stack([top, left, h, w], dim=1)
    else:
        crop_box = _const_rows(_center_square(height, width), B, draw_device)

    if cfg.color_jitter:
        lo = (max(0.0, 1.0 - cfg.brightness), max(0.0, 1.0 - cfg.contrast), max(0.0, 1.0 - cfg.saturation), -cfg.hue)
        hi = (1.0 + cfg.brightness, 1.0 + cfg.contrast, 1.0 + cfg.saturation, cfg.hue)
        jitter_factors = torch.stack([jit_u[:, k] * (hi[k] - lo[k]) + lo[k] for k in range(4)], dim=1)
    else:
        jitter_factors = _const_rows((1.0, 1.0, 1.0, 0.0), B, draw_device)
    jitter_order = _inverse_perm(_ranks(order_u))  # == argsort(order_u): a uniform random permutation
    gray = gray_u < cfg.grayscale_p if cfg.grayscale else torch.zeros(B, dtype=torch.bool, device=draw_device)
    flip = flip_u < cfg.flip_p if cfg.flip else torch.zeros(B, dtype=torch.bool, device=draw_device)
    return AugmentParams(
        crop_box=crop_box, flip=flip, jitter_factors=jitter_factors, jitter_order=jitter_order, gray=gray
    )


# --------------------------------------------------------------------------- resampling


def _axis_weights(start: Tensor, length: Tensor, in_size: int, out_size: int, antialias: bool) -> Tensor:
    """Per-sample 1-D resampling matrices [B, out_size, in_size].

    Row o holds the weights PyTorch's bilinear ``interpolate`` (align_corners
    False) gives the input pixels when resizing the segment
    [start, start + length) to ``out_size`` pixels: triangle filter
    ``max(0, 1 - |k + 0.5 - c| / support)`` around ``c = scale * (o + 0.5)``
    (scale = length / out_size), normalised over the segment.  Downscaling
    with antialias widens the filter by ``scale``; otherwise the centre is
    clamped to [0.5, length - 0.5] (== bilinear with edge clamping).
    """
    dev = start.device
    scale = (length / out_size)[:, None, None]  # [B, 1, 1]
    o = torch.arange(out_size, device=dev, dtype=torch.float32)[None, :, None]  # [1, S, 1]
    k = torch.arange(in_size, device=dev, dtype=torch.float32)[None, None, :] - start[:, None, None]  # [B, 1, in]
    center = scale * (o + 0.5)  # [B, S, 1]
    clamped = torch.minimum(torch.clamp(center, min=0.5), length[:, None, None] - 0.5)
    if antialias:
        down = scale > 1.0
        c = torch.where(down, center, clamped)
        inv = torch.where(down, 1.0 / scale, torch.ones_like(scale))
    else:
        c, inv = clamped, torch.ones_like(scale)
    w = torch.clamp(1.0 - (k + 0.5 - c).abs() * inv, min=0.0)
    w = w * ((k >= 0) & (k < length[:, None, None]))
    return w / w.sum(dim=-1, keepdim=True).clamp(min=1e-12)


def _resample(x: Tensor, params: AugmentParams, out_size: int, antialias: bool) -> Tensor:
    """Crop + resize (+ flip) of float [B, 3, H, W] -> [B, 3, S, S] as Ry @ x @ Rx^T."""
    _, _, H, W = x.shape
    box = params.crop_box.to(torch.float32)
    ry = _axis_weights(box[:, 0], box[:, 2], H, out_size, antialias)  # [B, S, H]
    rx = _axis_weights(box[:, 1], box[:, 3], W, out_size, antialias)  # [B, S, W]
    rx = torch.where(params.flip[:, None, None], rx.flip(1), rx)
    return torch.matmul(torch.matmul(ry[:, None], x), rx.transpose(1, 2)[:, None])


# --------------------------------------------------------------------------- colour ops


def _gray(x: Tensor) -> Tensor:
    """[B, 3, S, S] -> luma [B, 1, S, S] (torchvision's weights and arithmetic order)."""
    r, g, b = x.unbind(dim=1)
    return r.mul(_GRAY_WEIGHTS[0]).add_(g, alpha=_GRAY_WEIGHTS[1]).add_(b, alpha=_GRAY_WEIGHTS[2]).unsqueeze(1)


def _blend_step(x: Tensor, op: Tensor, factor: Tensor) -> Tensor:
    """One masked jitter step: per sample op 0 brightness, 1 contrast, 2 saturation.

    ``clamp(x * f + (1 - f) * g, 0, 1)`` with g = 0 / mean grey / grey;
    ``factor`` [B] is 1 for samples that skip this step (exact identity).
    """
    f = factor.view(-1, 1, 1, 1)
    op = op.view(-1, 1, 1, 1)
    gray = _gray(x)
    mean = gray.mean(dim=(1, 2, 3), keepdim=True)
    target = torch.where(op == 1, mean, gray)
    target = torch.where(op == 0, torch.zeros_like(target), target)
    # lerp(g, x, f) = g + f (x - g); exact identity for f == 1.
    return torch.lerp(target, x, f).clamp_(0.0, 1.0)


def _adjust_hue(x: Tensor, hue: Tensor) -> Tensor:
    """Rotate the HSV hue of float [B, 3, S, S] in [0, 1] by ``hue`` [B] (fraction of a turn).

    Same RGB -> HSV as torchvision (Pillow's hexcone); HSV -> RGB via the
    closed form ``c_n = v - v s clamp(min(k, 4 - k), 0, 1)``, k = (n + 6h) mod 6,
    n = 5, 3, 1 for R, G, B (equal to torchvision's sector table).
    """
    r, g, _ = x.unbind(dim=1)
    minc, maxc = torch.aminmax(x, dim=1)
    flat = maxc == minc
    rng = maxc - minc
    one = torch.ones_like(maxc)
    s = rng / torch.where(flat, one, maxc)
    rc, gc, bc = ((maxc.unsqueeze(1) - x) / torch.where(flat, one, rng).unsqueeze(1)).unbind(dim=1)
    is_r = maxc == r
    is_g = (maxc == g) & ~is_r
    h_r = bc - gc
    h_b = (gc + 4.0).sub_(rc)
    h_g = rc.add_(2.0).sub_(bc)
    h = torch.where(is_r, h_r, torch.where(is_g, h_g, h_b))
    h = h.mul_(1.0 / 6.0).add_(1.0).fmod_(1.0)
    h = h.add_(hue.view(-1, 1, 1)).remainder_(1.0).mul_(6.0).unsqueeze(1)
    n = torch.arange(5.0, 0.0, -2.0, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)  # 5, 3, 1
    k = torch.remainder(h + n, 6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    v = maxc.unsqueeze(1)
    return (v - ramp.mul_(v * s.unsqueeze(1))).clamp_(0.0, 1.0)


def _color_jitter(x: Tensor, factors: Tensor, order: Tensor, with_hue: bool) -> Tensor:
    """Apply the 4 jitter ops in each sample's own order (vectorised).

    Hue runs exactly once per sample, so the blend ops are split into those
    before hue (3 masked steps), hue, those after hue (3 masked steps).
    """
    step_of = _inverse_perm(order)  # step_of[:, k] = step at which op k runs
    hue_step = step_of[:, 3]
    blend_steps = step_of[:, :3]  # steps of ops 0, 1, 2
    seq = _inverse_perm(_ranks(blend_steps))  # blend ops in their order of application (argsort)
    seq_steps = blend_steps.gather(1, seq)
    seq_factors = factors[:, :3].gather(1, seq)
    ones = torch.ones_like(seq_factors)
    before = seq_steps < hue_step[:, None]
    phases = [torch.where(before, seq_factors, ones)]
    if with_hue:
        phases.append(torch.where(before, ones, seq_factors))
    else:  # no hue: all three blend ops in order, one phase
        phases = [seq_factors]
    for p, fac in enumerate(phases):
        if p == 1:
            x = _adjust_hue(x, factors[:, 3])
        for i in range(3):
            x = _blend_step(x, seq[:, i], fac[:, i])
    return x


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """(x - mean) / std per channel for float [B, 3, S, S] (not used by training: the model normalises)."""
    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    if m.shape[1] != images.shape[1] or s.shape[1] != images.shape[1]:
        raise ValueError(f"mean and std need {images.shape[1]} values each, got {len(mean)} and {len(std)}")
    if bool((s == 0).any()):
        raise ValueError(f"std must be non-zero, got {list(std)}")
    return (images - m) / s


def _check_params(params: AugmentParams, batch: int) -> None:
    if len(params) != batch:
        raise ValueError(f"params are for {len(params)} images but the batch has {batch}")


def apply_params(images: Tensor, params: AugmentParams, out_size: int, cfg: AugmentConfig | None = None) -> Tensor:
    """Apply per-sample ``params`` to ``images`` -> float32 [B, 3, out_size, out_size] in [0, 1].

    ``images``: [B, 3, H, W] or [B, H, W, 3], uint8 or float in [0, 1], on
    any device (``params`` must be on the same device).  ``cfg`` only lets
    switched-off ops be skipped (and sets ``antialias``); the values come
    from ``params``.  On the CPU the batch is processed in chunks of
    ``_CPU_CHUNK`` images so the intermediates stay in cache (about 2x
    faster); on other devices it is one vectorised pass.
    """
    return _run(_apply_images, images, params, out_size, cfg)


def _apply_images(images: Tensor, params: AugmentParams, out_size: int, cfg: AugmentConfig | None) -> Tensor:
    return _apply(to_float_chw(images), params, out_size, cfg)


def _run(fn, images: Tensor, params: AugmentParams, out_size: int, cfg: AugmentConfig | None) -> Tensor:
    """Validate, then call ``fn(images_chw, params, out_size, cfg)`` on the batch (on the CPU: per chunk)."""
    out_size = _check_out_size(out_size)
    x = _as_chw(images)
    B = x.shape[0]
    _check_params(params, B)
    if x.device.type != "cpu" or B <= _CPU_CHUNK:
        return fn(x, params, out_size, cfg)
    out = torch.empty((B, 3, out_size, out_size))
    for i in range(0, B, _CPU_CHUNK):
        sl = slice(i, min(i + _CPU_CHUNK, B))
        out[sl] = fn(x[sl], params.select(sl), out_size, cfg)
    return out


def _apply(x: Tensor, params: AugmentParams, out_size: int, cfg: AugmentConfig | None) -> Tensor:
    """apply_params on float [B, 3, H, W] (one vectorised pass)."""
    antialias = True if cfg is None else cfg.antialias
    x = _resample(x, params, out_size, antialias)
    if cfg is None or cfg.color_jitter:
        with_hue = cfg is None or cfg.hue > 0
        x = _color_jitter(x, params.jitter_factors.to(torch.float32), params.jitter_order, with_hue)
    if cfg is None or cfg.grayscale:
        x = torch.where(params.gray.view(-1, 1, 1, 1), _gray(x).expand_as(x), x)
    return x


def augment_batch(
    images: Tensor,
    out_size: int,
    cfg: AugmentConfig,
    generator: torch.Generator | None = None,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Tensor:
    """Sample independent parameters per image and apply them -> float32 [B, 3, S, S].

    Output is in [0, 1] unless ``mean``/``std`` are given (then normalised).
    ``generator`` should live on the images' device (a CPU generator also
    works for CUDA images: the parameters are then drawn on the CPU and copied).
    """
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    x = _as_chw(images)
    params = sample_params(x.shape[0], x.shape[2], x.shape[3], cfg, generator, device=x.device)
    out = apply_params(x, params, out_size, cfg)
    return normalize(out, mean, std) if mean is not None else out


def _sample_apply(x: Tensor, u: Tensor, out_size: int, cfg: AugmentConfig) -> tuple[Tensor, AugmentParams]:
    """Parameters from uniforms ``u`` and their views of [B, 3, H, W] ``x`` (one compilable graph)."""
    params = _params_from_uniforms(u, x.shape[2], x.shape[3], cfg)
    return _apply(to_float_chw(x), params, out_size, cfg), params


class Augmenter:
    """``augment_batch`` for a training loop, optionally compiled with ``torch.compile``.

    ``Augmenter(32, cfg, generator, compile=True)(images_uint8)`` -> float32
    [B, 3, 32, 32]; ``last_params`` holds the parameters of the latest call.
    For the same generator state it gives the same views as ``augment_batch``
    (to float rounding when compiled).

    Eager, one call costs ~250 small kernels, so on a GPU it is launch-bound
    up to a few thousand images per call: augment several training batches'
    worth of views in one call where possible.  ``compile=True`` (or a
    ``torch.compile`` mode string such as ``"max-autotune-no-cudagraphs"``)
    compiles parameter derivation and application into one graph (only the
    single ``torch.rand`` stays eager); it costs a one-time compile (~10-15 s
    on a GPU, about a minute on a CPU) plus one per new batch shape.
    """

    def __init__(
        self,
        out_size: int,
        cfg: AugmentConfig | None = None,
        generator: torch.Generator | None = None,
        compile: bool | str = False,
    ):
        self.out_size = _check_out_size(out_size)
        self.cfg = cfg if cfg is not None else AugmentConfig()
        self.generator = generator
        self.compiled = bool(compile)
        if compile:
            mode = compile if isinstance(compile, str) else None
            self._sample_apply = torch.compile(_sample_apply, dynamic=False, mode=mode)
            self._apply = torch.compile(_apply_images, dynamic=False, mode=mode)
        else:
            self._sample_apply, self._apply = _sample_apply, _apply_images
        self.last_params: AugmentParams | None = None

    def __call__(self, images: Tensor, params: AugmentParams | None = None) -> Tensor:
        x = _as_chw(images)
        B = x.shape[0]
        gen_device = self.generator.device if self.generator is not None else x.device
        if params is None and (gen_device != x.device or (x.device.type == "cpu" and B > _CPU_CHUNK)):
            # parameters drawn on another device, or CPU chunking: sample eagerly, apply (compiled) per chunk
            params = sample_params(B, x.shape[2], x.shape[3], self.cfg, self.generator, device=x.device)
        if params is not None:
            self.last_params = params
            return _run(self._apply, x, params, self.out_size, self.cfg)
        u = torch.rand(B, _N_UNIFORMS, generator=self.generator, device=x.device)
        out, self.last_params = self._sample_apply(x, u, self.out_size, self.cfg)
        return out


# --------------------------------------------------------------------------- slow twin


def reference_views(images: Tensor, params: AugmentParams, out_size: int, cfg: AugmentConfig | None = None) -> Tensor:
    """Slow per-image twin of :func:`apply_params` built from torchvision's functional ops.

    Image by image: ``resized_crop`` (bilinear, same antialias flag) ->
    ``adjust_brightness/contrast/saturation/hue`` in ``jitter_order`` ->
    ``rgb_to_grayscale(num_output_channels=3)`` -> ``horizontal_flip``, on
    float32 in [0, 1].
    """
    from torchvision.transforms.v2 import functional as TF

    out_size = _check_out_size(out_size)
    cfg = cfg or AugmentConfig()
    x = to_float_chw(images)
    _check_params(params, x.shape[0])
    p = params.to("cpu")
    views = []
    jitter_fns = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for i in range(x.shape[0]):
        top, left, h, w = (int(v) for v in p.crop_box[i].tolist())
        img = TF.resized_crop(x[i], top, left, h, w, [out_size, out_size], antialias=cfg.antialias)
        if cfg.color_jitter:
            factors = p.jitter_factors[i].tolist()
            for k in p.jitter_order[i].tolist():
                if k == 3 and cfg.hue == 0:
                    continue
                img = jitter_fns[k](img, factors[k])
        if cfg.grayscale and bool(p.gray[i]):
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        if bool(p.flip[i]):
            img = TF.horizontal_flip(img)
        views.append(img)
    if not views:
        return x.new_zeros((0, 3, out_size, out_size))
    return torch.stack(views).to(x.device)
