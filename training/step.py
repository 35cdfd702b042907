"""One optimisation step: speed switches, learning-rate schedule, optimizer, loss criterion, ``TrainStep``.

A step takes uint8 images ``[b, R, R, 3]`` (this process's share of the
global batch N), makes two augmented views of each on the device
(``[2b, 3, S, S]``), embeds them (``[2b, D]``, bf16 autocast when ``amp``)
and minimises the InvaSpread loss of the global batch
(:class:`training.criterion.InvaSpreadCriterion`) with SGD + momentum.

Speed (each on by default on CUDA, off on the CPU, each switchable): bf16
autocast (the loss runs in float32), channels-last, ``torch.compile`` of the
encoder and the augmentation, the fused Triton loss, the fused SGD, and no
host synchronisation inside the step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import training.distributed as dist_utils
from training.augment import AugmentConfig, Augmenter, sample_params
from training.config import TrainConfig, UsageError
from training.criterion import InvaSpreadCriterion
from training.model import ModelConfig, build_encoder

__all__ = ["Speed", "resolve_speed", "lr_at", "make_optimizer", "select_loss", "build_criterion", "TrainStep",
           "build_step"]


@dataclass
class Speed:
    """Resolved speed switches (``None`` in TrainConfig = on for CUDA, off for the CPU)."""

    amp: bool
    channels_last: bool
    compile: bool


def resolve_speed(cfg: TrainConfig, device: torch.device) -> Speed:
    cuda = device.type == "cuda"
    pick = lambda v: cuda if v is None else bool(v)  # noqa: E731
    return Speed(amp=pick(cfg.amp), channels_last=pick(cfg.channels_last), compile=pick(cfg.compile))


def lr_at(cfg: TrainConfig, epoch_float: float, steps_per_epoch: int | None = None) -> float:
    """Learning rate at a (fractional) epoch: warm-up, then step / cosine / constant.

    The warm-up is linear over ``warmup_epochs``: the step that ends at
    fraction ``t`` of the warm-up uses ``t * lr`` (``steps_per_epoch`` makes
    the first step non-zero).  Cosine decays from ``lr`` at the end of the
    warm-up to 0 at ``epochs``.
    """
    w = cfg.warmup_epochs
    if w > 0 and epoch_float < w:
        ahead = 1.0 / steps_per_epoch if steps_per_epoch else 0.0
        return cfg.lr * min(1.0, (epoch_float + ahead) / w)
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        t = (epoch_float - w) / max(cfg.epochs - w, 1e-9)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(max(t, 0.0), 1.0)))
    # the paper: 200 epochs, x0.1 at epoch 120 and x0.01 at 160, i.e. at 60% and 80%
    e = int(epoch_float)
    return cfg.lr * (0.01 if e >= round(0.8 * cfg.epochs) else 0.1 if e >= round(0.6 * cfg.epochs) else 1.0)


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """SGD with momentum: the fused kernel where supported (CUDA, recent CPU builds), else foreach."""
    kw = dict(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if device.type == "cuda":
        try:
            return torch.optim.SGD(model.parameters(), fused=True, **kw)
        except (RuntimeError, TypeError, ValueError):
            pass
    return torch.optim.SGD(model.parameters(), foreach=True, **kw)


def select_loss(cfg: TrainConfig, device: torch.device) -> tuple[str, str]:
    """(criterion backend, name in config.json): the fused Triton kernels on CUDA, else the reference."""
    use_fused = cfg.negatives == "all" and (cfg.loss == "fused" or (cfg.loss == "auto" and device.type == "cuda"))
    if use_fused:
        try:
            from training.fused_loss import fused_loss_available

            ok, why = fused_loss_available(device)
        except ImportError as e:
            ok, why = False, f"Triton is missing ({e})"
        if ok:
            return "fused", "fused"
        if cfg.loss == "fused":
            raise UsageError(f"--loss fused is not available here: {why}; use --loss reference")
    if cfg.negatives != "all":
        return "reference", f"reference-{cfg.negatives}-negatives"
    return "reference", "reference"


def build_criterion(cfg: TrainConfig, device: torch.device,
                    ctx: dist_utils.DistContext) -> tuple[InvaSpreadCriterion, str]:
    """The run's loss criterion (features [2b, D] -> scalar) and its name (see :func:`select_loss`)."""
    backend, name = select_loss(cfg, device)
    criterion = InvaSpreadCriterion(cfg.temperature, cfg.neg_weight, cfg.detach_keys, cfg.negatives, backend, ctx)
    return criterion, name


class TrainStep:
    """One optimisation step: uint8 images -> two views -> embeddings -> loss -> SGD update.

    The training loop calls it once per batch; ``benchmarks/train_throughput.py``
    times the same object (``views`` / ``loss`` / ``__call__`` split the phases).

    Args:
        model: the encoder (plain module; its weights are what gets saved).
        train_model: what the step runs (``model``, or it wrapped in DDP and/or ``torch.compile``).
        opt: the optimizer over ``model``'s parameters.
        augmenter: the batched on-device augmentation (its ``generator`` is the augmentation RNG).
        criterion: features [2b, D] -> loss to back-propagate.
        batch_size: global batch N (this rank embeds b = N / world images).
    """

    def __init__(self, model: nn.Module, train_model: nn.Module, opt: torch.optim.Optimizer, augmenter: Augmenter,
                 criterion: InvaSpreadCriterion, speed: Speed, device: torch.device, batch_size: int,
                 ctx: dist_utils.DistContext):
        self.model, self.train_model, self.opt, self.augmenter = model, train_model, opt, augmenter
        self.criterion, self.speed, self.device, self.batch_size, self.ctx = criterion, speed, device, batch_size, ctx
        b = batch_size // ctx.world_size
        # rows of the global batch's augmentation parameters that belong to this rank (view 1, view 2)
        mine = torch.arange(b) + ctx.rank * b
        self.aug_rows = torch.cat([mine, mine + batch_size]).to(device)

    def views(self, batch: Tensor, second: Tensor | None = None) -> Tensor:
        """uint8 [b, R, R, 3] -> float [2b, 3, S, S]: view 1 of every image, then view 2.

        ``second`` (uint8 [b, R, R, 3]): the images view 2 is made from (the
        nearest-neighbour positives); default: the batch itself.
        """
        x = torch.cat([batch, batch if second is None else second])
        if self.ctx.world_size == 1:
            views = self.augmenter(x)
        else:  # draw the whole global batch's parameters (same on every rank), apply this rank's rows
            params = sample_params(2 * self.batch_size, x.shape[1], x.shape[2], self.augmenter.cfg,
                                   self.augmenter.generator, device=self.device)
            views = self.augmenter(x, params.select(self.aug_rows))
        return views.contiguous(memory_format=torch.channels_last) if self.speed.channels_last else views

    def loss(self, views: Tensor) -> Tensor:
        """Encoder (bf16 autocast when amp) -> float32 features [2b, D] -> loss."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.speed.amp):
            feats = self.train_model(views)
        return self.criterion(feats.float())

    def __call__(self, batch: Tensor, lr: float, second: Tensor | None = None) -> Tensor:
        """One SGD step at learning rate ``lr``; returns the detached loss (no host sync)."""
        for g in self.opt.param_groups:
            g["lr"] = lr
        loss = self.loss(self.views(batch, second))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()

    def warmup(self, batch: Tensor) -> None:
        """Run forward + backward once (compiles) and undo every effect: grads, BN buffers, RNG."""
        saved = [b.detach().clone() for b in self.model.buffers()]
        gen = self.augmenter.generator
        self.augmenter.generator = torch.Generator(device=self.device).manual_seed(12345)
        try:
            self.loss(self.views(batch)).backward()
        finally:
            self.augmenter.generator = gen
            self.opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                for b, s in zip(self.model.buffers(), saved):
                    b.copy_(s)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def build_step(cfg: TrainConfig, model_cfg: ModelConfig, device: torch.device, ctx: dist_utils.DistContext,
               speed: Speed) -> tuple[TrainStep, str]:
    """Encoder (+ SyncBN, channels_last, DDP, compile), loss, fused SGD and augmenter -> (TrainStep, loss name)."""
    model = build_encoder(model_cfg).to(device)
    if cfg.sync_bn and ctx.world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if speed.channels_last:
        model = model.to(memory_format=torch.channels_last)
    criterion, loss_name = build_criterion(cfg, device, ctx)
    opt = make_optimizer(model, cfg, device)
    aug_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    augmenter = Augmenter(model_cfg.preprocess.input_size, AugmentConfig(**cfg.augment), aug_gen, compile=speed.compile)
    train_model: nn.Module = model
    if ctx.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                          gradient_as_bucket_view=True)
    if speed.compile:
        train_model = torch.compile(train_model)
    return TrainStep(model, train_model, opt, augmenter, criterion, speed, device, cfg.batch_size, ctx), loss_name
