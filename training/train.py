"""Training loop: ``python -m training [options]`` (also under ``torchrun``).

Each step draws N images, makes two independently augmented views of each on
the training device, embeds all 2N views and minimises the InvaSpread loss
(:mod:`training.step`).  The run folder (``--out``, :mod:`training.run_folder`)
receives ``config.json`` at the start, one line of ``metrics.jsonl`` per
evaluation (epoch 0 = the random encoder), ``last.pt`` (the full training
state, atomically) at every evaluation, every ``--save-every`` epochs and at
the end, and ``checkpoint.pt`` (atomically) when training finishes (or stops
at ``--time-limit``).

Speed (each on by default on CUDA, each switchable; on the CPU ``--amp`` and
``--channels-last`` are chosen by a short timed trial where the CPU has native
bf16, see :func:`training.step.resolve_speed`):
``--amp`` (bf16 autocast; the loss runs in float32), ``--channels-last``,
``--compile`` (``torch.compile`` of the encoder and the augmentation; the
one-time compile is reported as ``compile_seconds``, apart from the
steady-state ``images_per_s``), the fused SGD, and no host synchronisation
in the step loop (the loss is read back every ``--log-every`` steps).  Small
datasets live on the device (``--data-on-device``; see
:mod:`training.batches`).

Numerics: ``--tf32`` (default on for CUDA) lets TF32 tensor cores run the
float32 matrix products and convolutions; ``--no-tf32`` (every ``*-paper``
preset, with ``--no-amp --no-compile --loss reference``) keeps the whole run,
the kNN monitor included, in IEEE float32 (:func:`resolve_tf32`,
:func:`full_fp32`).

Exact resume: ``--resume RUN_DIR [--epochs E]`` continues from
``RUN_DIR/last.pt`` (weights, optimizer, step counters and every RNG state);
on the CPU with ``--deterministic`` an interrupted-and-resumed run ends with
the same weights, bit for bit, as an uninterrupted one.

Developer option (hidden from ``--help``): ``--max-steps-per-epoch K`` caps
the steps of every epoch (short tests and smoke runs; the learning-rate
schedule uses the capped epoch length).

Where things are: the options in :mod:`training.config`, the device and
numerics in :mod:`training.runtime`, one step in :mod:`training.step`, the
files in :mod:`training.run_folder`; here: data loading, restoring,
:func:`train_one_epoch` and the loop (:func:`fit`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

import training.distributed as dist_utils
from isfe_model.preprocess import PreprocessSpec
from training.batches import DeviceBatches, HostBatches, choose_placement
from training.config import TrainConfig, UsageError, build_parser, config_from_args
from training.data import DataError, ImageDataset, default_spec, has_split, load_split
from training.evaluate import format_metrics, monitor_metrics
from training.model import ModelConfig, PretrainedError, load_pretrained, pretrained_preprocess, unwrap
from training.positives import PositiveSampler
from training.prepare import load_unlabeled
from training.run_folder import RunFolder, prepare_out
from training.run_state import ResumeError, capture_rng, restore_rng
from training.runtime import StepProgress, log, numerics, resolve_device, seed_everything, silent
from training.step import Speed, TrainStep, build_step, lr_at, resolve_speed, select_loss

# names other modules and tests import from here (their homes are training.config / runtime / step)
__all__ = ["main", "train", "train_one_epoch", "fit", "TrainingInterrupted", "TrainConfig", "UsageError", "Speed",
           "TrainStep", "build_step", "build_parser", "config_from_args", "lr_at", "resolve_device", "resolve_speed",
           "select_loss", "resolve_tf32", "full_fp32"]


class TrainingInterrupted(Exception):
    """Ctrl-C during training; the message says how to resume."""


def resolve_tf32(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether TF32 may run float32 matmuls / convolutions: on CUDA unless ``--no-tf32`` (the ``*-paper`` presets)."""
    return device.type == "cuda" and cfg.tf32 is not False


@contextlib.contextmanager
def full_fp32(device: torch.device, enabled: bool) -> Iterator[None]:
    """IEEE float32 matrix products and cuDNN convolutions on CUDA inside the block (TF32 off); restored afterwards.

    Nested inside :func:`training.runtime.numerics` (which turns TF32 matmuls on for CUDA), it sets
    ``torch.set_float32_matmul_precision("highest")`` and ``torch.backends.cudnn.allow_tf32 = False``
    (PyTorch's default lets cuDNN convolutions use TF32).  Nothing changes on the CPU or when not ``enabled``.
    """
    if not enabled or device.type != "cuda":
        yield
        return
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


@dataclass
class TrainData:
    """The decoded training images (uint8 [n, R, R, 3]; labelled first) and the splits the monitor uses."""

    train: ImageDataset
    test: ImageDataset | None  # None: a folder of unlabelled images, no kNN monitor
    images: np.ndarray
    spec: PreprocessSpec  # of the model input
    steps: int  # steps per epoch

    @property
    def n(self) -> int:
        return len(self.images)


@dataclass
class Run:
    """What one training process holds while it trains (built by :func:`build_run`)."""

    cfg: TrainConfig
    ctx: dist_utils.DistContext
    device: torch.device
    speed: Speed
    data: TrainData
    model_cfg: ModelConfig
    step: TrainStep
    sampler: PositiveSampler
    generators: dict[str, torch.Generator]  # data order, augmentation (, positives): saved in last.pt
    source: DeviceBatches | HostBatches
    resolved: dict[str, Any]  # config.json: the settings with every "auto" resolved
    folder: RunFolder
    log: Callable[..., None]
    start_epoch: int = 0
    global_step: int = 0
    compile_seconds: float | None = None

    def state(self) -> dict[str, Any]:
        """What last.pt holds besides the history (see :mod:`training.run_state`)."""
        return dict(model=self.step.model, model_cfg=self.model_cfg, config=self.resolved,
                    optimizer=self.step.opt.state_dict(), rng=capture_rng(self.generators), step=self.global_step,
                    train_config=dataclasses.asdict(self.cfg), world_size=self.ctx.world_size)


def load_data(cfg: TrainConfig, ctx: dist_utils.DistContext) -> TrainData:
    """Decode the training (and test) split; the first process of each node fills the node's cache first."""
    spec = default_spec(cfg.data, cfg.input_size, cfg.resize_size, decode=cfg.decode)
    if ctx.local_rank != 0:
        ctx.barrier()
    train_ds = load_split(cfg.data, "train", resize_size=spec.resize_size, decode=cfg.decode)
    # no test split (a folder of unlabelled images): train without the kNN monitor
    test_ds = (load_split(cfg.data, "test", resize_size=spec.resize_size, decode=cfg.decode)
               if has_split(cfg.data, "test") else None)
    if ctx.local_rank == 0:
        ctx.barrier()
    spec = dataclasses.replace(train_ds.spec, input_size=spec.input_size, resize_size=spec.resize_size)
    if cfg.pretrained:
        spec = pretrained_preprocess(cfg.arch, spec)  # the input normalisation the weights were trained with
    images = train_ds.images
    if cfg.train_split == "train+unlabeled":  # extra images without labels (STL-10); kNN keeps the labelled ones
        images = np.concatenate([np.asarray(train_ds.images), load_unlabeled(cfg.data, spec.resize_size, cfg.decode)])
    if len(images) < cfg.batch_size:
        raise UsageError(f"--batch-size {cfg.batch_size} is larger than the {len(images)} training images; lower it")
    steps = len(images) // cfg.batch_size
    if cfg.max_steps_per_epoch:
        steps = min(steps, cfg.max_steps_per_epoch)
    return TrainData(train_ds, test_ds, images, spec, steps)


@dataclass
class Restored:
    """Where a resumed run continues: epochs and steps done, its history and its seconds so far."""

    epoch: int = 0
    step: int = 0
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    time_seconds: float = 0.0


def restore(state: dict[str, Any], step: TrainStep, generators: dict[str, torch.Generator], data: TrainData,
            data_name: str | None, log: Callable[..., None]) -> Restored:
    """Load a ``last.pt`` state (:func:`training.run_state.load_run_state`) into the model, optimizer and RNGs."""
    try:
        step.model.load_state_dict(state["model"])
        step.opt.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise ResumeError(f"cannot resume: the saved state does not fit this model/optimizer "
                          f"({str(e).splitlines()[0]}); start a new run") from None
    not_restored = restore_rng(state["rng"], generators)
    if not_restored:
        log(f"note: RNG state of {', '.join(not_restored)} not restored (saved on another device type); "
            f"the continuation is not bit-identical to an uninterrupted run")
    before = (state.get("config") or {}).get("train_images")
    if isinstance(before, int) and before != data.n:
        log(f"warning: {data_name} now has {data.n} training images, the run started with {before}: the continuation "
            f"is not what an uninterrupted run would have done (resume with the original data for that)")
    return Restored(int(state["epoch"]), int(state["step"]), [dict(r) for r in state["history"]],
                    float(state.get("time_seconds", 0.0)))


def build_run(cfg: TrainConfig, ctx: dist_utils.DistContext, device: torch.device, speed: Speed, out: Path,
              data: TrainData, log, resume: dict[str, Any] | None, t_begin: float) -> Run:
    """Model, step, generators and data source; the resumed state restored; config.json written."""
    model_cfg = ModelConfig(arch=cfg.arch, embedding_dim=cfg.embedding_dim, preprocess=data.spec, init=cfg.init)
    step, loss_name = build_step(cfg, model_cfg, device, ctx, speed)
    if cfg.pretrained and resume is None:
        try:
            log(load_pretrained(step.model, cfg.pretrained))
        except PretrainedError as e:
            raise UsageError(str(e)) from None
    # Same seeds on every rank: all ranks draw the same global permutation and the same
    # augmentation parameters for the whole global batch and each applies its slice, so a
    # run is the same computation whatever the number of processes (up to BatchNorm
    # statistics, which are per process unless --sync-bn) and resumes exactly on any count.
    sampler = PositiveSampler(cfg.positive, cfg.nn_features)  # --positive nn-or-aug: neighbour bank per epoch
    generators = {"data": torch.Generator(device="cpu").manual_seed(cfg.seed), "augment": step.augmenter.generator}
    if sampler.enabled:
        generators["positive"] = torch.Generator(device="cpu").manual_seed(cfg.seed + 2)
    done = restore(resume, step, generators, data, cfg.data, log) if resume is not None else Restored()
    on_device, why = choose_placement(data.images.nbytes, device, cfg.data_on_device)
    source = DeviceBatches(data.images, device) if on_device else HostBatches(data.images, device, workers=cfg.workers)
    resolved = dataclasses.asdict(cfg) | {
        "out": str(out), "device": str(device), "loss": loss_name, "model": model_cfg.to_dict(),
        "amp": speed.amp, "channels_last": speed.channels_last, "compile": speed.compile,
        # CPU auto: how it was resolved
        "speed_note": speed.note or None, "speed_trial_ms": speed.trial_ms, "speed_trial_batch": speed.trial_batch,
        "tf32": resolve_tf32(cfg, device),
        "world_size": ctx.world_size, "data_on_device": on_device, "steps_per_epoch": data.steps,
        "train_images": data.n,
    }
    folder = RunFolder(out, ctx, log, t_begin, done.history, done.time_seconds, saved_epoch=done.epoch)
    folder.start(resolved)
    _announce(cfg, data, resolved, why, log)
    if resume is not None:
        log(f"resuming {out} after epoch {done.epoch} (step {done.step})")
    return Run(cfg, ctx, device, speed, data, model_cfg, step, sampler, generators, source, resolved, folder, log,
               start_epoch=done.epoch, global_step=done.step)


def _announce(cfg: TrainConfig, data: TrainData, resolved: dict[str, Any], placement: str, log) -> None:
    """The run's one-line summary (data, model, device, loss, speed switches, epochs)."""
    if data.test is None:
        log(f"{cfg.data} has no test/ split: training without the kNN monitor (the loss is logged; add "
            f"test/<class>/ next to train/<class>/ for kNN accuracy)")
    r, world, side = resolved, resolved["world_size"], data.spec.input_size
    log(f"data {data.train.name}: {data.n} train / {len(data.test) if data.test is not None else 0} test images, "
        f"{side}x{side} input{' (JPEGs draft-decoded)' if data.spec.decode == 'draft' else ''} "
        f"({'on the device' if r['data_on_device'] else 'host memory, prefetched'}: {placement}); "
        f"{cfg.arch} ({f'{cfg.pretrained} weights' if cfg.pretrained else f'{cfg.init} init'}) -> "
        f"{cfg.embedding_dim}-d on {r['device']}{f' x {world} processes' if world > 1 else ''}; "
        f"loss {r['loss']}; amp {'bf16' if r['amp'] else 'off'}, "
        f"{('tf32 on, ' if r['tf32'] else 'tf32 off (float32), ') if str(r['device']).startswith('cuda') else ''}"
        f"channels_last {'on' if r['channels_last'] else 'off'}, compile {'on' if r['compile'] else 'off'}"
        f"{f' ({note})' if (note := r.get('speed_note')) else ''}; "
        f"{cfg.epochs} epochs x {data.steps} steps of {cfg.batch_size}")


def compile_step(run: Run) -> None:
    """The one-time torch.compile, timed apart from the steady state (weights and RNG untouched)."""
    if not run.speed.compile:
        return
    t0 = time.time()
    first = run.source.epoch(torch.arange(run.data.n), 1, run.cfg.batch_size, run.ctx.rank, run.ctx.world_size)
    run.step.warmup(next(first))
    run.compile_seconds = round(time.time() - t0, 2)
    run.log(f"compiled in {run.compile_seconds:.1f} s (one-time, not counted in images/s)")


def evaluate(run: Run, epoch: int, **extra: Any) -> dict[str, Any]:
    """The metrics row of ``epoch``: kNN top-1/top-5 (or Recall@1 for unseen test classes) on rank 0, logged."""
    row: dict[str, Any] = {"epoch": epoch}
    if run.ctx.is_main:
        data, cfg = run.data, run.cfg
        bank = run.source.images[: len(data.train)] if isinstance(run.source, DeviceBatches) else None  # the labelled
        metrics = ({} if data.test is None else
                   monitor_metrics(unwrap(run.step.model), data.train, data.test, run.device, cfg.knn_k, cfg.knn_sigma,
                                   bank, amp=run.speed.amp))
        row |= {**metrics, **extra, "time_s": run.folder.elapsed()}
        run.log(f"epoch {epoch:>3}: {format_metrics(row)}")
    run.ctx.barrier()
    return row


def second_views(run: Run, perm: Tensor, i: int) -> Tensor | None:
    """--positive nn-or-aug: the images view 2 of step ``i`` is made from (each anchor itself or its neighbour)."""
    if not run.sampler.enabled:
        return None
    n, world, rank = run.cfg.batch_size, run.ctx.world_size, run.ctx.rank
    pos = run.sampler.positives(perm[i * n : (i + 1) * n], run.generators["positive"])  # the global batch's draw
    pos = pos[rank * (n // world) : (rank + 1) * (n // world)]
    if isinstance(run.source, DeviceBatches):
        return run.source.images[pos.to(run.device)]
    return torch.from_numpy(np.take(run.data.images, pos.numpy(), axis=0)).to(run.device, non_blocking=True)


def train_one_epoch(run: Run, epoch: int) -> tuple[float, float]:
    """One pass over a fresh permutation of the training images -> (mean loss over ranks, images/s)."""
    cfg, data, step_fn = run.cfg, run.data, run.step
    run.sampler.refresh(step_fn.model, run.source.images if isinstance(run.source, DeviceBatches) else data.images,
                        data.spec, run.log, run.device, run.speed.amp)
    step_fn.model.train()
    perm = torch.randperm(data.n, generator=run.generators["data"])
    loss_sum = torch.zeros((), device=run.device)
    progress = StepProgress(data.steps, epoch, cfg.epochs, cfg.batch_size, run.ctx.is_main, cfg.log_every, run.log)
    for i, batch in enumerate(run.source.epoch(perm, data.steps, cfg.batch_size, run.ctx.rank, run.ctx.world_size)):
        lr = lr_at(cfg, epoch - 1 + i / data.steps, data.steps)
        loss = step_fn(batch, lr, second_views(run, perm, i))
        run.global_step += 1
        loss_sum += loss
        progress.update(i, loss, lr)
    progress.close()
    epoch_loss = float(run.ctx.all_mean(loss_sum / data.steps).item())
    images_per_s = 2 * cfg.batch_size * data.steps / (time.time() - progress.t0)
    if not math.isfinite(epoch_loss):
        raise FloatingPointError(f"loss became {epoch_loss} in epoch {epoch}; lower --lr or raise --temperature")
    return epoch_loss, images_per_s


def fit(run: Run) -> dict[str, Any]:
    """Evaluate the random encoder, train epoch by epoch (evaluating and saving), write the checkpoint."""
    cfg, folder, steps = run.cfg, run.folder, run.data.steps
    if not folder.history:
        extra = {"compile_seconds": run.compile_seconds} if run.compile_seconds is not None else {}
        folder.commit(evaluate(run, 0, **extra), 0, run.state)
    epoch, stopped, images_per_s = run.start_epoch, None, float("nan")
    try:
        for epoch in range(run.start_epoch + 1, cfg.epochs + 1):
            loss, images_per_s = train_one_epoch(run, epoch)
            out_of_time = cfg.time_limit is not None and run.ctx.broadcast_flag(
                time.time() - folder.t_begin >= cfg.time_limit, run.device)
            if epoch == cfg.epochs or out_of_time or (cfg.eval_every and epoch % cfg.eval_every == 0):
                row = evaluate(run, epoch, loss=round(loss, 5), lr=lr_at(cfg, epoch - 1, steps),
                               images_per_s=round(images_per_s, 1))
                folder.commit(row, epoch, run.state)
            else:
                run.log(f"epoch {epoch:>3}: loss {loss:.4f}  ({images_per_s:.0f} images/s)")
                if cfg.save_every and epoch % cfg.save_every == 0:
                    folder.save_state(epoch, run.state)
            if out_of_time and epoch < cfg.epochs:
                stopped = f"time limit of {cfg.time_limit:g} s reached after epoch {epoch}"
                run.log(f"stopping: {stopped}")
                break
    except KeyboardInterrupt:
        raise TrainingInterrupted(f"interrupted; {folder.path / 'last.pt'} holds epoch {folder.saved_epoch}: "
                                  f"continue with --resume {folder.path}") from None
    if not folder.history or folder.history[-1]["epoch"] != epoch:  # resumed a run whose final evaluation is missing
        folder.commit(evaluate(run, epoch), epoch, run.state)
    extra = {"stopped_early": stopped} if stopped else {}
    return folder.finish(run.step.model, run.model_cfg, run.resolved, epoch, compile_seconds=run.compile_seconds,
                         images_per_s=round(images_per_s, 1), **extra)


def train(cfg: TrainConfig, log=log, resume: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run training; returns the final metrics row. Raises UsageError/DataError/ResumeError for bad input.

    ``resume`` is the state loaded by :func:`training.run_state.load_run_state`
    (``--resume``); ``cfg.out`` must then be that run's folder.
    Under torchrun (``WORLD_SIZE > 1``) this joins the process group first.
    """
    cfg.validate()
    try:
        ctx, dist_device = dist_utils.setup(cfg.device)
    except dist_utils.DistributedSetupError as e:
        raise UsageError(str(e)) from None
    try:
        device = dist_device or resolve_device(cfg.device)
        with numerics(device, cfg.deterministic), full_fp32(device, not resolve_tf32(cfg, device)):
            return _train(cfg, ctx, device, log if ctx.is_main else silent, resume)
    finally:
        dist_utils.cleanup(ctx)


def _train(cfg: TrainConfig, ctx: dist_utils.DistContext, device: torch.device, log,
           resume: dict[str, Any] | None) -> dict[str, Any]:
    """Check the launch, load the data, build the run, train it (one process of the job)."""
    t_begin = time.time()
    if cfg.batch_size % ctx.world_size:
        raise UsageError(f"--batch-size {cfg.batch_size} is the global batch and must be divisible by the "
                         f"{ctx.world_size} processes")
    if cfg.sync_bn and ctx.world_size > 1 and device.type != "cuda":
        raise UsageError("--sync-bn needs CUDA (PyTorch's SyncBatchNorm has no CPU implementation); drop it on the CPU")
    speed = resolve_speed(cfg, device)
    out = prepare_out(cfg.out, resuming=resume is not None)
    seed_everything(cfg.seed)
    data = load_data(cfg, ctx)
    run = build_run(cfg, ctx, device, speed, out, data, log, resume, t_begin)
    try:
        compile_step(run)
        return fit(run)
    finally:
        run.source.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet = int(os.environ.get("RANK", "0")) != 0  # under torchrun only rank 0 reports
    say = (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr))
    cfg = None
    try:
        cfg, state = config_from_args(args)
        train(cfg, resume=state)
    except (UsageError, DataError, ResumeError) as e:
        say(f"error: {e}")
        return 2
    except FloatingPointError as e:  # the loss diverged: last.pt keeps the last good evaluation
        say(f"error: {e}")
        return 1
    except torch.OutOfMemoryError:
        batch = f" with --batch-size {cfg.batch_size}" if cfg is not None else ""
        say(f"error: out of {'GPU ' if torch.cuda.is_available() else ''}memory{batch}; lower --batch-size (and "
            f"--lr by the same factor) or keep --amp on; an interrupted run keeps its last.pt for --resume")
        return 1
    except TrainingInterrupted as e:
        say(str(e))
        return 130
    except KeyboardInterrupt:
        say("interrupted before the first epoch: no new last.pt or checkpoint.pt was written")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
