"""Training loop: ``python -m training [options]`` (also under ``torchrun``).

Each step draws N images, makes two independently augmented views of each on
the training device, embeds all 2N views and minimises the InvaSpread loss.
The run folder (``--out``) receives ``config.json`` at the start, one line of
``metrics.jsonl`` per evaluation (epoch 0 = the random encoder), ``last.pt``
(the full training state, atomically) at every evaluation, every
``--save-every`` epochs and at the end, and ``checkpoint.pt`` (atomically)
when training finishes (or stops at ``--time-limit``).

Speed (each on by default on CUDA, off on the CPU, each switchable):
``--amp`` (bf16 autocast; the loss runs in float32), ``--channels-last``,
``--compile`` (``torch.compile`` of the encoder and the augmentation; the
one-time compile is reported as ``compile_seconds``, apart from the
steady-state ``images_per_s``), the fused SGD, and no host synchronisation
in the step loop (the loss is read back every ``--log-every`` steps).  Small
datasets live on the device (``--data-on-device``; see
:mod:`training.batches`).

Exact resume: ``--resume RUN_DIR [--epochs E]`` continues from
``RUN_DIR/last.pt`` (weights, optimizer, step counters and every RNG state);
on the CPU with ``--deterministic`` an interrupted-and-resumed run ends with
the same weights, bit for bit, as an uninterrupted one.

Developer option (hidden from ``--help``): ``--max-steps-per-epoch K`` caps
the steps of every epoch (short tests and smoke runs; the learning-rate
schedule uses the capped epoch length).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from training import distributed as D
from training.augment import AugmentConfig, Augmenter, sample_params
from training.batches import DeviceBatches, HostBatches, choose_placement
from training.data import DataError, default_spec, has_split, load_split
from training.evaluate import format_metrics, monitor_metrics
from training.loss import invaspread_loss, invaspread_loss_rows
from training.model import ARCHS, ModelConfig, PretrainedError, build_encoder, load_pretrained, pretrained_preprocess, save_checkpoint, unwrap
from training.negatives import NEGATIVE_MODES, masked_invaspread_loss_rows
from training.positives import NN_FEATURES, POSITIVE_MODES, PositiveSampler
from training.presets import PRESETS, preset_for
from training.run_state import ResumeError, capture_rng, load_run_state, restore_rng


class UsageError(ValueError):
    """A bad option or input: printed as one line, exit code 2."""


class TrainingInterrupted(Exception):
    """Ctrl-C during training; the message says how to resume."""


@dataclass
class TrainConfig:
    data: str | None = None
    epochs: int = 200
    batch_size: int = 128  # global batch (all ranks together)
    lr: float = 0.03
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "step"  # step (paper: x0.1 at 60%, x0.01 at 80% of the epochs) | cosine | constant
    warmup_epochs: float = 0.0  # linear warm-up from ~0 to lr over these epochs (then the schedule)
    temperature: float = 0.1
    neg_weight: float = 1.0
    detach_keys: bool = True
    negatives: str = "all"  # all | hard | easy (the paper's Table 8 ablation)
    embedding_dim: int = 128
    arch: str = "resnet18"
    input_size: int | None = None
    resize_size: int | None = None
    seed: int = 0
    eval_every: int = 10
    knn_k: int = 200
    knn_sigma: float = 0.1
    device: str = "auto"
    loss: str = "auto"  # auto | fused | reference
    amp: bool | None = None  # None: on for CUDA
    channels_last: bool | None = None  # None: on for CUDA
    compile: bool | None = None  # None: on for CUDA
    sync_bn: bool = False
    data_on_device: bool | None = None  # None: by size (training.batches.choose_placement)
    workers: int = 4  # threads gathering batches when the data stays on the host
    log_every: int | None = None  # None: read the loss back every 50 steps for the progress bar only
    save_every: int = 0  # last.pt every N epochs (0: at evaluations and at the end only)
    time_limit: float | None = None  # seconds: stop after the epoch in which it is reached
    max_steps_per_epoch: int | None = None  # developer option (hidden): cap the steps per epoch
    deterministic: bool = False
    positive: str = "aug"  # aug | nn-or-aug: half the time the nearest neighbour is the positive (paper, CUB-200)
    nn_features: str = "embedding"  # neighbour bank for nn-or-aug: embedding | backbone (pooled features)
    pretrained: str | None = None  # imagenet | PATH: initial backbone weights
    train_split: str = "train"  # train | train+unlabeled (a prepared folder's unlabeled/ images too, STL-10)
    augment: dict[str, Any] = field(default_factory=lambda: AugmentConfig().to_dict())
    out: str | None = None

    def validate(self) -> None:
        checks = [
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 2, f"--batch-size must be >= 2 (each image needs other images as negatives), got {self.batch_size}"),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (self.temperature > 0, f"--temperature must be > 0 (the paper uses 0.1), got {self.temperature}"),
            (self.neg_weight >= 0, f"--neg-weight must be >= 0, got {self.neg_weight}"),
            (self.embedding_dim >= 1, f"--embedding-dim must be >= 1, got {self.embedding_dim}"),
            (self.eval_every >= 0, f"--eval-every must be >= 0 (0 = only before and after training), got {self.eval_every}"),
            (self.knn_k >= 1 and self.knn_sigma > 0, "--knn-k must be >= 1 and --knn-sigma > 0"),
            (self.schedule in ("step", "cosine", "constant"), f"--schedule must be step, cosine or constant, got {self.schedule!r}"),
            (0 <= self.warmup_epochs < self.epochs, f"--warmup-epochs must be >= 0 and < --epochs ({self.epochs}), got {self.warmup_epochs:g} "
                                                    f"(a preset may set it); pass a smaller --warmup-epochs, e.g. 0"),
            (self.loss in ("auto", "fused", "reference"), f"--loss must be auto, fused or reference, got {self.loss!r}"),
            (self.negatives in NEGATIVE_MODES, f"--negatives must be one of {', '.join(NEGATIVE_MODES)}, got {self.negatives!r}"),
            (self.negatives == "all" or self.loss != "fused",
             f"--negatives {self.negatives} is implemented in the reference loss only; drop --loss fused"),
            (self.arch in ARCHS, f"--arch must be one of {', '.join(ARCHS)}, got {self.arch!r}"),
            (self.input_size is None or self.input_size >= 8, f"--input-size must be >= 8, got {self.input_size}"),
            (self.resize_size is None or self.input_size is None or self.resize_size >= self.input_size,
             f"--resize-size ({self.resize_size}) must be >= --input-size ({self.input_size})"),
            (self.workers >= 1, f"--workers must be >= 1, got {self.workers}"),
            (self.log_every is None or self.log_every >= 1, f"--log-every must be >= 1, got {self.log_every}"),
            (self.save_every >= 0, f"--save-every must be >= 0 (0: at evaluations and at the end), got {self.save_every}"),
            (self.time_limit is None or self.time_limit > 0, f"--time-limit must be > 0 seconds, got {self.time_limit}"),
            (self.max_steps_per_epoch is None or self.max_steps_per_epoch >= 1,
             f"--max-steps-per-epoch must be >= 1, got {self.max_steps_per_epoch}"),
            (self.positive in POSITIVE_MODES, f"--positive must be one of {', '.join(POSITIVE_MODES)}, got {self.positive!r}"),
            (self.nn_features in NN_FEATURES, f"--nn-features must be one of {', '.join(NN_FEATURES)}, got {self.nn_features!r}"),
            (self.train_split in ("train", "train+unlabeled"), f"--train-split must be train or train+unlabeled, got {self.train_split!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UsageError(msg)


# Options that may differ when a run is resumed; every other one must match the run.
RESUMABLE_CHANGES = frozenset({
    "epochs", "eval_every", "save_every", "log_every", "device", "loss", "amp", "channels_last", "compile",
    "data_on_device", "workers", "time_limit", "knn_k", "knn_sigma", "out", "deterministic",
})


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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return _indexed(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s); use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: only cpu and cuda are supported")
    return _indexed(dev)


def _indexed(dev: torch.device) -> torch.device:
    """cuda -> cuda:N (the current device): generators, tensors and DDP then agree on one device object."""
    return torch.device("cuda", torch.cuda.current_device()) if dev.type == "cuda" and dev.index is None else dev


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


def select_loss(cfg: TrainConfig, device: torch.device):
    """(batch loss function, rows loss function, name): fused Triton kernels on CUDA, else the reference."""
    use_fused = cfg.negatives == "all" and (cfg.loss == "fused" or (cfg.loss == "auto" and device.type == "cuda"))
    if use_fused:
        try:
            from training.fused_loss import fused_invaspread_loss, fused_invaspread_loss_rows, fused_loss_available

            ok, why = fused_loss_available(device)
        except ImportError as e:
            ok, why = False, f"Triton is missing ({e})"
        if ok:
            return fused_invaspread_loss, fused_invaspread_loss_rows, "fused"
        if cfg.loss == "fused":
            raise UsageError(f"--loss fused is not available here: {why}; use --loss reference")
    if cfg.negatives != "all":
        rows = partial(masked_invaspread_loss_rows, negatives=cfg.negatives)
        return None, rows, f"reference-{cfg.negatives}-negatives"
    return invaspread_loss, invaspread_loss_rows, "reference"


def make_criterion(cfg: TrainConfig, ctx: D.DistContext, batch_loss, rows_loss) -> Callable[[Tensor], Tensor]:
    """features [2b, D] (this rank's view 1 rows, then view 2 rows) -> loss to back-propagate.

    A single process with all negatives uses the batch loss directly; with
    several ranks or hard/easy negatives it is the rows form over the global
    keys (see :func:`training.distributed.global_batch_loss`).
    """
    if batch_loss is not None and not ctx.enabled:
        return lambda f: batch_loss(f, temperature=cfg.temperature, detach_keys=cfg.detach_keys, neg_weight=cfg.neg_weight)
    return lambda f: D.global_batch_loss(f, ctx, rows_loss, cfg.temperature, cfg.detach_keys, cfg.neg_weight)


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """SGD with momentum: the fused kernel where supported (CUDA, recent CPU builds), else foreach."""
    kw = dict(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if device.type == "cuda":
        try:
            return torch.optim.SGD(model.parameters(), fused=True, **kw)
        except (RuntimeError, TypeError, ValueError):
            pass
    return torch.optim.SGD(model.parameters(), foreach=True, **kw)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_out(out: str | None, resuming: bool = False) -> Path:
    path = Path(out) if out else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {path} exists and is not a folder; choose another --out")
    if not resuming and (path / "checkpoint.pt").exists():
        raise UsageError(f"--out {path} already holds a finished run (checkpoint.pt); choose another --out, delete it, "
                         f"or continue it with --resume {path} --epochs N")
    if not resuming and (path / "last.pt").exists():
        raise UsageError(f"--out {path} holds an unfinished run (last.pt); continue it with --resume {path}, "
                         f"or choose another --out")
    return path


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def _numerics(device: torch.device, deterministic: bool):
    """cuDNN autotuning / TF32 for speed, or deterministic algorithms; restored afterwards."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.get_float32_matmul_precision())
    try:
        if deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
        elif device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.set_float32_matmul_precision("high")
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2], saved[3]
        torch.set_float32_matmul_precision(saved[4])


def _progress(total: int, desc: str, enabled: bool):
    """tqdm bar on an interactive stderr when tqdm is installed, else None."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=False, disable=None, file=sys.stderr)


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
                 criterion: Callable[[Tensor], Tensor], speed: Speed, device: torch.device, batch_size: int,
                 ctx: D.DistContext):
        self.model, self.train_model, self.opt, self.augmenter = model, train_model, opt, augmenter
        self.criterion, self.speed, self.device, self.batch_size, self.ctx = criterion, speed, device, batch_size, ctx
        b = batch_size // ctx.world_size
        # rows of the global batch's augmentation parameters that belong to this rank (view 1, view 2)
        self.aug_rows = torch.cat([torch.arange(b) + ctx.rank * b, torch.arange(b) + batch_size + ctx.rank * b]).to(device)

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
        """Encoder (bf16 autocast when amp) -> float32 features -> loss."""
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


def build_step(cfg: TrainConfig, model_cfg: ModelConfig, device: torch.device, ctx: D.DistContext,
               speed: Speed) -> tuple[TrainStep, str]:
    """Encoder (+ SyncBN, channels_last, DDP, compile), loss, fused SGD and augmenter -> (TrainStep, loss name)."""
    model = build_encoder(model_cfg).to(device)
    if cfg.sync_bn and ctx.world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if speed.channels_last:
        model = model.to(memory_format=torch.channels_last)
    batch_loss, rows_loss, loss_name = select_loss(cfg, device)
    criterion = make_criterion(cfg, ctx, batch_loss, rows_loss)
    opt = make_optimizer(model, cfg, device)
    aug_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    augmenter = Augmenter(model_cfg.preprocess.input_size, AugmentConfig(**cfg.augment), aug_gen, compile=speed.compile)
    train_model: nn.Module = model
    if ctx.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
    if speed.compile:
        train_model = torch.compile(train_model)
    return TrainStep(model, train_model, opt, augmenter, criterion, speed, device, cfg.batch_size, ctx), loss_name


def _silent(*_a, **_k) -> None:
    pass


def _log(*args: Any) -> None:
    """Progress lines, flushed at once: a log file or pipe (a batch job's ``> train.log``) shows them as they happen."""
    print(*args, flush=True)


def train(cfg: TrainConfig, log=_log, resume: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run training; returns the final metrics row. Raises UsageError/DataError/ResumeError for bad input.

    ``resume`` is the state loaded by :func:`training.run_state.load_run_state`
    (``--resume``); ``cfg.out`` must then be that run's folder.
    Under torchrun (``WORLD_SIZE > 1``) this joins the process group first.
    """
    cfg.validate()
    try:
        ctx, dist_device = D.setup(cfg.device)
    except D.DistributedSetupError as e:
        raise UsageError(str(e)) from None
    try:
        device = dist_device or resolve_device(cfg.device)
        with _numerics(device, cfg.deterministic):
            return _train(cfg, ctx, device, log if ctx.is_main else _silent, resume)
    finally:
        D.cleanup(ctx)


def _train(cfg: TrainConfig, ctx: D.DistContext, device: torch.device, log, resume: dict[str, Any] | None) -> dict[str, Any]:
    t_begin = time.time()
    world, rank = ctx.world_size, ctx.rank
    if cfg.batch_size % world:
        raise UsageError(f"--batch-size {cfg.batch_size} is the global batch and must be divisible by the {world} processes")
    if cfg.sync_bn and world > 1 and device.type != "cuda":
        raise UsageError("--sync-bn needs CUDA (PyTorch's SyncBatchNorm has no CPU implementation); drop it on the CPU")
    speed = resolve_speed(cfg, device)
    out = prepare_out(cfg.out, resuming=resume is not None)
    seed_everything(cfg.seed)

    # ---- data (the first process of every node decodes and fills that node's cache; the others then read it)
    spec = default_spec(cfg.data, cfg.input_size, cfg.resize_size)
    if ctx.local_rank != 0:
        ctx.barrier()
    train_ds = load_split(cfg.data, "train", resize_size=spec.resize_size)
    # no test split (a folder of unlabelled images): train without the kNN monitor
    test_ds = load_split(cfg.data, "test", resize_size=spec.resize_size) if has_split(cfg.data, "test") else None
    if ctx.local_rank == 0:
        ctx.barrier()
    spec = dataclasses.replace(train_ds.spec, input_size=spec.input_size, resize_size=spec.resize_size)
    if cfg.pretrained:
        spec = pretrained_preprocess(cfg.arch, spec)  # the input normalisation the weights were trained with
    train_images = train_ds.images
    if cfg.train_split == "train+unlabeled":  # extra images without labels (STL-10); kNN keeps the labelled ones
        from training.prepare import load_unlabeled

        train_images = np.concatenate([np.asarray(train_ds.images), load_unlabeled(cfg.data, spec.resize_size)])
    n = len(train_images)
    if n < cfg.batch_size:
        raise UsageError(f"--batch-size {cfg.batch_size} is larger than the {n} training images; lower it")
    steps = n // cfg.batch_size
    if cfg.max_steps_per_epoch:
        steps = min(steps, cfg.max_steps_per_epoch)

    # ---- model, loss, optimizer, augmentation (one TrainStep), random generators
    model_cfg = ModelConfig(arch=cfg.arch, embedding_dim=cfg.embedding_dim, preprocess=spec)
    step_fn, loss_name = build_step(cfg, model_cfg, device, ctx, speed)
    model, opt, aug_gen = step_fn.model, step_fn.opt, step_fn.augmenter.generator
    if cfg.pretrained and resume is None:
        try:
            log(load_pretrained(model, cfg.pretrained))
        except PretrainedError as e:
            raise UsageError(str(e)) from None
    # Same seeds on every rank: all ranks draw the same global permutation and the same
    # augmentation parameters for the whole global batch and each applies its slice, so a
    # run is the same computation whatever the number of processes (up to BatchNorm
    # statistics, which are per process unless --sync-bn) and resumes exactly on any count.
    data_gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    sampler = PositiveSampler(cfg.positive, cfg.nn_features)  # --positive nn-or-aug: neighbour bank per epoch
    pos_gen = torch.Generator(device="cpu").manual_seed(cfg.seed + 2)
    generators = {"data": data_gen, "augment": aug_gen} | ({"positive": pos_gen} if sampler.enabled else {})

    start_epoch, global_step, history, time_before = 0, 0, [], 0.0
    if resume is not None:
        try:
            model.load_state_dict(resume["model"])
            opt.load_state_dict(resume["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise ResumeError(f"cannot resume: the saved state does not fit this model/optimizer ({str(e).splitlines()[0]}); start a new run") from None
        not_restored = restore_rng(resume["rng"], generators)
        if not_restored:
            log(f"note: RNG state of {', '.join(not_restored)} not restored (saved on another device type); "
                f"the continuation is not bit-identical to an uninterrupted run")
        start_epoch, global_step = int(resume["epoch"]), int(resume["step"])
        before = (resume.get("config") or {}).get("train_images")
        if isinstance(before, int) and before != n:
            log(f"warning: {cfg.data} now has {n} training images, the run started with {before}: the continuation "
                f"is not what an uninterrupted run would have done (resume with the original data for that)")
        history = [dict(r) for r in resume["history"]]
        time_before = float(resume.get("time_seconds", 0.0))

    # ---- where the images live
    on_device, why = choose_placement(train_images.nbytes, device, cfg.data_on_device)
    source = DeviceBatches(train_images, device) if on_device else HostBatches(train_images, device, workers=cfg.workers)
    bank_images = source.images[: len(train_ds)] if on_device else None  # kNN bank: the labelled images

    resolved = dataclasses.asdict(cfg) | {
        "out": str(out), "device": str(device), "loss": loss_name, "model": model_cfg.to_dict(),
        "amp": speed.amp, "channels_last": speed.channels_last, "compile": speed.compile,
        "world_size": world, "data_on_device": on_device, "steps_per_epoch": steps, "train_images": n,
    }
    metrics_path = out / "metrics.jsonl"
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(out / "config.json", json.dumps(resolved, indent=2))
        _atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in history))
    if test_ds is None:
        log(f"{cfg.data} has no test/ split: training without the kNN monitor (the loss is logged; add "
            f"test/<class>/ next to train/<class>/ for kNN accuracy)")
    log(f"data {train_ds.name}: {n} train / {len(test_ds) if test_ds is not None else 0} test images, {spec.input_size}x{spec.input_size} input "
        f"({'on the device' if on_device else 'host memory, prefetched'}: {why}); "
        f"{cfg.arch} -> {cfg.embedding_dim}-d on {device}{f' x {world} processes' if world > 1 else ''}; loss {loss_name}; "
        f"amp {'bf16' if speed.amp else 'off'}, channels_last {'on' if speed.channels_last else 'off'}, "
        f"compile {'on' if speed.compile else 'off'}; {cfg.epochs} epochs x {steps} steps of {cfg.batch_size}")
    if resume is not None:
        log(f"resuming {out} after epoch {start_epoch} (step {global_step})")

    # ---- one-time compilation, timed apart from the steady state (weights and RNG untouched)
    compile_seconds = None
    if speed.compile:
        t0 = time.time()
        step_fn.warmup(next(source.epoch(torch.arange(n), 1, cfg.batch_size, rank, world)))
        compile_seconds = round(time.time() - t0, 2)
        log(f"compiled in {compile_seconds:.1f} s (one-time, not counted in images/s)")

    def elapsed() -> float:
        return round(time_before + time.time() - t_begin, 2)

    def evaluate(epoch: int, **extra: Any) -> dict[str, Any]:
        row: dict[str, Any] = {"epoch": epoch}
        if ctx.is_main:
            # kNN top-1/top-5, or Recall@1 on the test split when its classes are unseen in training
            metrics = ({} if test_ds is None else
                       monitor_metrics(unwrap(model), train_ds, test_ds, device, cfg.knn_k, cfg.knn_sigma, bank_images, amp=speed.amp))
            row |= {**metrics, **extra, "time_s": elapsed()}
            log(f"epoch {epoch:>3}: {format_metrics(row)}")
        ctx.barrier()
        return row

    saved_epoch = [start_epoch]  # the epoch last.pt holds

    def save_state(epoch: int) -> None:
        """last.pt: everything needed to continue exactly after ``epoch`` (rank 0 writes)."""
        saved_epoch[0] = epoch
        if ctx.is_main:
            save_checkpoint(out / "last.pt", model, model_cfg, resolved, optimizer=opt.state_dict(), rng=capture_rng(generators),
                            epoch=epoch, step=global_step, history=history, train_config=dataclasses.asdict(cfg),
                            world_size=world, time_seconds=elapsed(), metrics=history[-1] if history else {})

    def commit_row(row: dict[str, Any], epoch: int) -> None:
        """State first, then the metrics line (a crash in between re-creates the line on resume)."""
        history.append(row)
        save_state(epoch)
        if ctx.is_main:
            with metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")

    if not history:
        commit_row(evaluate(0, **({"compile_seconds": compile_seconds} if compile_seconds is not None else {})), 0)

    log_every = cfg.log_every or 50
    print_steps = cfg.log_every is not None
    epoch, stopped = start_epoch, None
    images_per_s = float("nan")
    try:
        for epoch in range(start_epoch + 1, cfg.epochs + 1):
            sampler.refresh(model, source.images if on_device else train_images, spec, log, device, speed.amp)
            model.train()
            perm = torch.randperm(n, generator=data_gen)
            loss_sum = torch.zeros((), device=device)
            bar = _progress(steps, f"epoch {epoch}/{cfg.epochs}", ctx.is_main)
            if bar is not None and bar.disable:  # not a terminal: no bar, no read-backs for it
                bar = None
            t0 = time.time()
            for step, batch in enumerate(source.epoch(perm, steps, cfg.batch_size, rank, world)):
                lr = lr_at(cfg, epoch - 1 + step / steps, steps)
                second = None
                if sampler.enabled:  # each anchor's second view: itself or its nearest neighbour (global batch draw)
                    pos = sampler.positives(perm[step * cfg.batch_size : (step + 1) * cfg.batch_size], pos_gen)
                    pos = pos[rank * (cfg.batch_size // world) : (rank + 1) * (cfg.batch_size // world)]
                    second = (source.images[pos.to(device)] if on_device
                              else torch.from_numpy(np.take(train_images, pos.numpy(), axis=0)).to(device, non_blocking=True))
                loss = step_fn(batch, lr, second)
                global_step += 1
                loss_sum += loss
                if bar is not None:
                    bar.update(1)
                if (step + 1) % log_every == 0 or step == steps - 1:
                    if bar is not None or print_steps:  # the only host sync inside the epoch
                        value = loss.item()
                        rate = 2 * cfg.batch_size * (step + 1) / (time.time() - t0)
                        if bar is not None:
                            bar.set_postfix(loss=f"{value:.3f}", img_s=f"{rate:.0f}")
                        elif print_steps:
                            log(f"  epoch {epoch} step {step + 1}/{steps}: loss {value:.4f}  lr {lr:.4g}  ({rate:.0f} images/s)")
            if bar is not None:
                bar.close()
            epoch_loss = float(ctx.all_mean(loss_sum / steps).item())
            images_per_s = 2 * cfg.batch_size * steps / (time.time() - t0)
            if not math.isfinite(epoch_loss):
                raise FloatingPointError(f"loss became {epoch_loss} in epoch {epoch}; lower --lr or raise --temperature")
            out_of_time = cfg.time_limit is not None and ctx.broadcast_flag(time.time() - t_begin >= cfg.time_limit, device)
            if epoch == cfg.epochs or out_of_time or (cfg.eval_every and epoch % cfg.eval_every == 0):
                commit_row(evaluate(epoch, loss=round(epoch_loss, 5), lr=lr_at(cfg, epoch - 1, steps),
                                    images_per_s=round(images_per_s, 1)), epoch)
            else:
                log(f"epoch {epoch:>3}: loss {epoch_loss:.4f}  ({images_per_s:.0f} images/s)")
                if cfg.save_every and epoch % cfg.save_every == 0:
                    save_state(epoch)
            if out_of_time and epoch < cfg.epochs:
                stopped = f"time limit of {cfg.time_limit:g} s reached after epoch {epoch}"
                log(f"stopping: {stopped}")
                break
    except KeyboardInterrupt:
        raise TrainingInterrupted(f"interrupted; {out / 'last.pt'} holds epoch {saved_epoch[0]}: "
                                  f"continue with --resume {out}") from None
    finally:
        source.close()

    if not history or history[-1]["epoch"] != epoch:  # resumed a run whose final evaluation is missing
        commit_row(evaluate(epoch), epoch)
    last = history[-1]
    if ctx.is_main:
        extra = {"stopped_early": stopped} if stopped else {}
        save_checkpoint(out / "checkpoint.pt", model, model_cfg, resolved, epoch=epoch, metrics=last,
                        train_seconds=elapsed(), compile_seconds=compile_seconds, images_per_s=round(images_per_s, 1), **extra)
    if ctx.is_main:
        log(f"done in {elapsed():.0f} s: {format_metrics(last)} -> {out / 'checkpoint.pt'}")
        try:  # learning curves next to the checkpoint; a plotting problem never fails a finished run
            from training.report import write_curves

            write_curves([out], out / "curves.png")
        except Exception as e:  # noqa: BLE001
            print(f"warning: could not write {out / 'curves.png'} ({type(e).__name__}: {e})", file=sys.stderr)
    return last


def build_parser() -> argparse.ArgumentParser:
    S = argparse.SUPPRESS  # only options given on the command line override the preset
    B = argparse.BooleanOptionalAction
    ap = argparse.ArgumentParser(prog="python -m training", description="Train an ISFE encoder without labels (InvaSpread loss).",
                                 argument_default=S)
    ap.add_argument("--preset", default=None, help=f"named recipe: {', '.join(PRESETS)} (default: quickstart without --data, the paper's recipe with it)")
    ap.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last.pt up to --epochs total")
    ap.add_argument("--data", help="digits (embedded default), cifar10, an image folder with train/ and test/ class folders, a folder of "
                         "unlabelled images (neither: no kNN monitor), or a .tar(.gz/.bz2/.xz) or .zip of either")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--batch-size", type=int, help="images per step over all processes (2x views)")
    ap.add_argument("--lr", type=float)
    ap.add_argument("--momentum", type=float)
    ap.add_argument("--weight-decay", type=float)
    ap.add_argument("--schedule", help="step (paper: x0.1 at 60%%, x0.01 at 80%% of the epochs), cosine or constant")
    ap.add_argument("--warmup-epochs", type=float, help="linear learning-rate warm-up (epochs, may be fractional)")
    ap.add_argument("--temperature", type=float)
    ap.add_argument("--neg-weight", type=float, help="weight of the negatives (authors' negM)")
    ap.add_argument("--full-gradient", action="store_true", help="let the gradient flow through the key side too (default: authors' detached keys)")
    ap.add_argument("--negatives", help="all (default), hard (keep the 50%% most similar negatives) or easy (the 50%% least similar)")
    ap.add_argument("--embedding-dim", type=int)
    ap.add_argument("--arch", help=f"one of {', '.join(ARCHS)}")
    ap.add_argument("--input-size", type=int, help="model input side (default: 16 digits, 32 CIFAR/small images, 224 large)")
    ap.add_argument("--resize-size", type=int, help="side images are resized to before cropping")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--eval-every", type=int, help="kNN evaluation every N epochs (0: only before and after training)")
    ap.add_argument("--knn-k", type=int)
    ap.add_argument("--knn-sigma", type=float)
    ap.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    ap.add_argument("--loss", help="auto (fused on CUDA), fused or reference")
    ap.add_argument("--amp", action=B, help="bf16 autocast for the encoder (default: on for CUDA)")
    ap.add_argument("--channels-last", action=B, help="channels-last memory format (default: on for CUDA)")
    ap.add_argument("--compile", action=B, help="torch.compile the encoder and augmentation (default: on for CUDA)")
    ap.add_argument("--sync-bn", action=B, help="synchronise BatchNorm statistics across processes (torchrun, CUDA)")
    ap.add_argument("--data-on-device", action=B, help="copy the decoded training images to the device once (default: when small)")
    ap.add_argument("--workers", type=int, help="threads that prefetch batches when the images stay in host memory")
    ap.add_argument("--log-every", type=int, help="read the loss back (and print it) every N steps (default: 50, progress bar only)")
    ap.add_argument("--save-every", type=int, help="also write last.pt every N epochs (it is always written at evaluations and at the end)")
    ap.add_argument("--time-limit", type=float, metavar="SECONDS", help="stop after the epoch in which SECONDS have passed; evaluate and save")
    ap.add_argument("--deterministic", action="store_true", help="deterministic algorithms (bit-exact resume on CPU; slower on CUDA)")
    ap.add_argument("--max-steps-per-epoch", type=int, help=S)  # developer option: short test runs
    ap.add_argument("--crop-scale", type=float, nargs=2, metavar=("MIN", "MAX"), help="RandomResizedCrop area range (paper: 0.2 1)")
    for op in ("crop", "color-jitter", "grayscale", "flip"):
        ap.add_argument(f"--no-{op}", action="store_true", help=f"ablation: disable {op.replace('-', ' ')}")
    ap.add_argument("--no-augment", action="store_true", help="ablation: no augmentation at all")
    ap.add_argument("--positive", help="aug (default: the image's other augmented view) or nn-or-aug (half the time its nearest "
                                       "neighbour in the current embedding, refreshed every epoch; the paper's CUB-200 setting)")
    ap.add_argument("--nn-features", help="neighbour bank of --positive nn-or-aug: embedding (default) or backbone (pooled features)")
    ap.add_argument("--pretrained", metavar="imagenet|PATH",
                    help="initial backbone weights: imagenet (torchvision's; downloaded where a network exists) or a weights file")
    ap.add_argument("--train-split", help="train (default) or train+unlabeled (also the unlabeled/ images of a prepared STL-10 folder)")
    ap.add_argument("--out", help="run folder (default runs/<timestamp>)")
    return ap


def _merge(values: dict[str, Any], given: dict[str, Any]) -> TrainConfig:
    """Command-line options over a base (a preset or a resumed run's config) -> TrainConfig."""
    values = dict(values)
    aug = dict(values.pop("augment", {}))
    if given.pop("no_augment", False):
        aug.update(crop=False, color_jitter=False, grayscale=False, flip=False)
    for op in ("crop", "color_jitter", "grayscale", "flip"):
        if given.pop(f"no_{op}", False):
            aug[op] = False
    if "crop_scale" in given:
        aug["crop_scale"] = tuple(given.pop("crop_scale"))
    if given.pop("full_gradient", False):
        values["detach_keys"] = False
    values.update(given)
    try:
        values["augment"] = AugmentConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in aug.items()}).to_dict()
    except (TypeError, ValueError) as e:
        raise UsageError(f"augmentation: {e}") from None
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UsageError(f"unknown setting(s) {', '.join(unknown)} (from a newer version?); start a new run")
    return TrainConfig(**values)


def _check_resume_compatible(saved: TrainConfig, new: TrainConfig, run: str) -> None:
    diffs = []
    for f in dataclasses.fields(TrainConfig):
        if f.name in RESUMABLE_CHANGES:
            continue
        a, b = getattr(saved, f.name), getattr(new, f.name)
        if a != b:
            name = "augmentation" if f.name == "augment" else "--" + f.name.replace("_", "-")
            diffs.append(f"{name} {b} (the run has {a})")
    if diffs:
        raise UsageError(f"cannot resume {run} with different settings: {'; '.join(diffs)}. Drop these options "
                         f"(only {', '.join('--' + k.replace('_', '-') for k in sorted(RESUMABLE_CHANGES - {'out'}))} may change), "
                         f"or start a new run with another --out")


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, dict[str, Any] | None]:
    """(config, resume state or None) from parsed options; the preset (or the resumed run) is the base."""
    given = dict(vars(args))
    preset = given.pop("preset", None)
    run = given.pop("resume", None)
    if run is None:
        try:
            values = preset_for(preset, "data" in given)
        except KeyError as e:
            raise UsageError(f"unknown --preset {e.args[0]!r}; choose one of {', '.join(PRESETS)}") from None
        return _merge(values, given), None
    if preset is not None:
        raise UsageError("--preset cannot be combined with --resume: the run's own settings are in its last.pt")
    state = load_run_state(run)
    run_dir = Path(run) if Path(run).is_dir() else Path(run).parent
    if "out" in given and Path(given["out"]).resolve() != run_dir.resolve():
        raise UsageError(f"--out {given['out']} differs from --resume {run}: a resumed run continues in its own folder; drop --out")
    saved_values = dict(state["train_config"])
    saved = _merge(saved_values, {})
    given["out"] = str(run_dir)
    cfg = _merge(saved_values, given)
    _check_resume_compatible(saved, cfg, str(run_dir))
    done = int(state["epoch"])
    if cfg.epochs <= done and (run_dir / "checkpoint.pt").exists():
        raise UsageError(f"--resume {run_dir}: the run already finished {done} epochs; pass --epochs N with N > {done} to train further")
    return cfg, state


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet = int(os.environ.get("RANK", "0")) != 0  # under torchrun only rank 0 reports
    cfg = None
    try:
        cfg, state = config_from_args(args)
        train(cfg, resume=state)
    except (UsageError, DataError, ResumeError) as e:
        if not quiet:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # the loss diverged: last.pt keeps the last good evaluation
        if not quiet:
            print(f"error: {e}", file=sys.stderr)
        return 1
    except torch.OutOfMemoryError:
        if not quiet:
            batch = f" with --batch-size {cfg.batch_size}" if cfg is not None else ""
            print(f"error: out of {'GPU ' if torch.cuda.is_available() else ''}memory{batch}; lower --batch-size (and "
                  f"--lr by the same factor) or keep --amp on; an interrupted run keeps its last.pt for --resume",
                  file=sys.stderr)
        return 1
    except TrainingInterrupted as e:
        if not quiet:
            print(str(e), file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        if not quiet:
            print("interrupted before the first epoch: no new last.pt or checkpoint.pt was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
