"""One optimisation step: speed switches, learning-rate schedule, optimizer, loss criterion, ``TrainStep``.

A step takes uint8 images ``[b, R, R, 3]`` (this process's share of the
global batch N), makes two augmented views of each on the device
(``[2b, 3, S, S]``), embeds them (``[2b, D]``, bf16 autocast when ``amp``)
and minimises the InvaSpread loss of the global batch
(:class:`training.criterion.InvaSpreadCriterion`) with SGD + momentum.

Speed (each switchable): bf16 autocast (the loss runs in float32),
channels-last, ``torch.compile`` of the encoder and the augmentation, the
fused Triton loss, the fused SGD, and no host synchronisation inside the step.
On CUDA each is on by default.  On the CPU ``--amp`` / ``--channels-last``
left unset are ``auto`` (:func:`resolve_speed`, :func:`choose_by_trial`):
off where the CPU has no native bf16 matrix instructions (neither
``amx_bf16`` nor ``avx512_bf16`` in /proc/cpuinfo), under
``--deterministic``, with ``--compile`` or with several processes; otherwise
:func:`build_step` times a few real steps of each candidate (fp32, bf16,
channels-last, both) at the run's input shape and batch (capped at
:data:`TRIAL_MAX_BATCH` images, so that the trial costs seconds, not
minutes, at batch 512) and keeps the fastest (fp32 unless another is >= 5%
faster).  The trial leaves weights,
BatchNorm buffers, optimizer state and every RNG as they were.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

import training.distributed as dist_utils
from training.augment import AugmentConfig, Augmenter, sample_params
from training.config import TrainConfig, UsageError, step_milestones
from training.criterion import InvaSpreadCriterion
from training.model import ModelConfig, build_encoder

__all__ = ["BF16_FLAGS", "cpu_flags", "native_bf16", "Speed", "resolve_speed", "choose_by_trial", "lr_at",
           "make_optimizer", "select_loss", "build_criterion", "TrainStep", "build_step", "TRIAL_MAX_BATCH",
           "speed_label"]


# CPU flags of native bf16 matrix instructions (oneDNN runs bf16 convolutions on them; elsewhere bf16 is emulated)
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
TRIAL_MARGIN = 0.95  # a candidate other than fp32 must take <= 95% of fp32's step time to be chosen
TRIAL_MAX_BATCH = 64  # the trial times at most this many images per step (same choice at 16-512: speed_trial_batches)
CPUINFO = Path("/proc/cpuinfo")  # where cpu_flags() reads by default (tests point it at a written file)


def cpu_flags(cpuinfo: str | Path | None = None) -> frozenset[str]:
    """The CPU's feature flags (the ``flags`` / ``Features`` line of :data:`CPUINFO`); empty where unreadable."""
    try:
        text = Path(CPUINFO if cpuinfo is None else cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def native_bf16(flags: Iterable[str]) -> bool:
    """Whether ``flags`` include AMX-BF16 or AVX512-BF16 (bf16 matrix products in hardware)."""
    return any(f in set(flags) for f in BF16_FLAGS)


@dataclass
class Speed:
    """Resolved speed switches (``None`` in TrainConfig = auto: on for CUDA; on the CPU see :func:`resolve_speed`).

    ``timed``: the switches ("amp", "channels_last") still to be chosen by the
    timed trial in :func:`build_step` (their values until then: off);
    ``note``: how auto was resolved on the CPU, for the start line;
    ``trial_ms``: candidate -> measured milliseconds per step, once timed;
    ``trial_batch``: the images per step the trial timed (at most :data:`TRIAL_MAX_BATCH`).
    """

    amp: bool
    channels_last: bool
    compile: bool
    timed: tuple[str, ...] = ()
    note: str = ""
    trial_ms: dict[str, float] | None = None
    trial_batch: int | None = None


def resolve_speed(cfg: TrainConfig, device: torch.device, flags: Iterable[str] | None = None) -> Speed:
    """Explicit flags win; unset ones: on for CUDA; on the CPU off, or left to the timed trial.

    The CPU trial is left to :func:`build_step` (``Speed.timed``) only where
    ``flags`` (default: this CPU's, :func:`cpu_flags`) have native bf16, the
    run is not ``--deterministic`` (a timed choice would make the numerics
    depend on the timing) and not compiled (every candidate would compile).
    """
    cuda = device.type == "cuda"
    pick = lambda v: cuda if v is None else bool(v)  # noqa: E731
    speed = Speed(amp=pick(cfg.amp), channels_last=pick(cfg.channels_last), compile=pick(cfg.compile))
    auto = tuple(n for n in ("amp", "channels_last") if getattr(cfg, n) is None)
    if cuda or not auto:
        return speed
    flags = cpu_flags() if flags is None else frozenset(flags)
    if not native_bf16(flags):
        speed.note = "auto: off, this CPU has neither amx_bf16 nor avx512_bf16"
    elif cfg.deterministic:
        speed.note = "auto: off under --deterministic, a timed choice would make the numerics depend on timing"
    elif speed.compile:
        speed.note = "auto: off with --compile, pass --amp / --channels-last to choose"
    else:
        speed.timed = auto
        speed.note = f"auto: timed trial, this CPU has {' and '.join(f for f in BF16_FLAGS if f in flags)}"
    return speed


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
    # x0.1 at each milestone: --milestones, or the paper's 60% and 80% of the epochs (120 and 160 of 200)
    e = int(epoch_float)
    return cfg.lr * 10.0 ** -sum(e >= m for m in step_milestones(cfg))


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
        """One SGD step of the training loop at learning rate ``lr``; returns the detached loss (no host sync)."""
        return self.update(batch, lr, second)

    def update(self, batch: Tensor, lr: float, second: Tensor | None = None) -> Tensor:
        """The step itself (also timed by the CPU speed trial, which undoes it: see :meth:`untouched`)."""
        for g in self.opt.param_groups:
            g["lr"] = lr
        loss = self.loss(self.views(batch, second))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()

    def warmup(self, batch: Tensor) -> None:
        """Run forward + backward once (compiles) and undo every effect: grads, BN buffers, RNG."""
        with self.untouched():
            self.loss(self.views(batch)).backward()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def set_speed(self, amp: bool, channels_last: bool) -> None:
        """Switch autocast and the weights' memory format in place (same Parameters: the optimizer keeps them)."""
        self.speed.amp, self.speed.channels_last = bool(amp), bool(channels_last)
        self.model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    @contextlib.contextmanager
    def untouched(self) -> Iterator[None]:
        """Steps run inside leave no trace: weights, BN buffers, grads, optimizer state and every RNG restored.

        The augmentation draws from a throw-away generator meanwhile; torch's
        global CPU (and CUDA) generator states are put back afterwards.
        """
        weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        opt_state = copy.deepcopy(self.opt.state_dict())
        gen, cpu_rng = self.augmenter.generator, torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        self.augmenter.generator = torch.Generator(device=self.device).manual_seed(12345)
        try:
            yield
        finally:
            self.augmenter.generator = gen
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, self.device)
            self.opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                for k, v in self.model.state_dict().items():
                    v.copy_(weights[k])
            self.opt.load_state_dict(opt_state)


def speed_label(amp: bool, channels_last: bool) -> str:
    """The trial's name of a candidate: fp32, bf16, channels-last or bf16+channels-last."""
    return {(False, False): "fp32", (True, False): "bf16", (False, True): "channels-last",
            (True, True): "bf16+channels-last"}[(amp, channels_last)]


def choose_by_trial(step: TrainStep, batch: Tensor, lr: float, rounds: int = 3, budget_s: float = 6.0,
                    log: Callable[..., None] | None = None) -> Speed:
    """Time the real step on each candidate of ``step.speed.timed`` and switch ``step`` to the fastest.

    ``batch``: uint8 [b, R, R, 3] at the run's shape.  One untimed round (each
    candidate's first step builds its oneDNN kernels), then timed rounds, the
    candidates interleaved (order reversed every round) so that other work on
    shared cores hits them alike: at least one, more while the trial has taken
    less than ``budget_s`` seconds, at most ``rounds``.  A candidate's time is
    its fastest step; fp32 (the first candidate) is kept unless another takes
    <= :data:`TRIAL_MARGIN` of its time.  Everything runs under
    :meth:`TrainStep.untouched`.  Returns ``step.speed`` (``trial_ms``, ``note``
    filled, ``timed`` emptied).
    """
    speed = step.speed
    amps = (False, True) if "amp" in speed.timed else (speed.amp,)
    layouts = (False, True) if "channels_last" in speed.timed else (speed.channels_last,)
    cands = [(a, c) for a in amps for c in layouts]
    best: dict[tuple[bool, bool], float] = {}
    t_start = time.perf_counter()
    step.model.train()
    timed_rounds = 0
    with step.untouched():
        for r in range(rounds + 1):
            if r > 1 and time.perf_counter() - t_start > budget_s:
                break
            timed_rounds = r
            for cand in cands if r % 2 else cands[::-1]:
                step.set_speed(*cand)
                t0 = time.perf_counter()
                step.update(batch, lr)  # not step(...): the trial is no training step
                if step.device.type == "cuda":
                    torch.cuda.synchronize(step.device)
                if r:
                    best[cand] = min(best.get(cand, math.inf), time.perf_counter() - t0)
    base = cands[0]
    fastest = min(best, key=best.get)
    chosen = fastest if best[fastest] <= TRIAL_MARGIN * best[base] else base
    step.set_speed(*chosen)
    speed.timed = ()
    speed.trial_ms = {speed_label(*c): round(1000 * t, 1) for c, t in best.items()}
    speed.trial_batch = int(batch.shape[0])
    times = ", ".join(f"{k} {v:.0f}" for k, v in speed.trial_ms.items())
    speed.note = (f"{speed.note}: ms/step at batch {speed.trial_batch} {times} -> {speed_label(*chosen)} "
                  f"({timed_rounds} timed round(s), {time.perf_counter() - t_start:.1f} s, not counted in images/s)")
    if log is not None:
        side = step.augmenter.out_size
        log(f"speed trial at batch {speed.trial_batch}, {side}x{side} input: {speed.note}")
    return speed


def build_step(cfg: TrainConfig, model_cfg: ModelConfig, device: torch.device, ctx: dist_utils.DistContext,
               speed: Speed, log: Callable[..., None] | None = None) -> tuple[TrainStep, str]:
    """Encoder (+ SyncBN, channels_last, DDP, compile), loss, fused SGD and augmenter -> (TrainStep, loss name).

    Where ``speed.timed`` is set (CPU auto), the timed trial (:func:`choose_by_trial`)
    picks amp / channels_last on random uint8 images of the run's shape (this rank's
    batch capped at :data:`TRIAL_MAX_BATCH`, ``resize_size`` side) and updates ``speed`` in place (``note``,
    ``trial_ms``; the training loop's start line says ``speed.note``); ``log``, if
    given, also receives it as a line of its own.
    """
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
    step = TrainStep(model, train_model, opt, augmenter, criterion, speed, device, cfg.batch_size, ctx)
    if speed.timed and ctx.world_size > 1:  # every rank would have to agree on the choice: keep fp32
        speed.timed, speed.note = (), "auto: off with several processes, pass --amp / --channels-last to choose"
    if speed.timed:
        spec, b = model_cfg.preprocess, min(cfg.batch_size // ctx.world_size, TRIAL_MAX_BATCH)
        gen = torch.Generator().manual_seed(0)  # its own generator: the run's RNG streams are not touched
        batch = torch.randint(0, 256, (b, spec.resize_size, spec.resize_size, 3), dtype=torch.uint8, generator=gen)
        choose_by_trial(step, batch.to(device), cfg.lr, log=log)
    return step, loss_name
