"""Training loop: ``python -m training [options]``.

Each step draws N images, makes two independently augmented views of each on
the training device, embeds all 2N views and minimises the InvaSpread loss.
The run folder (``--out``) receives ``config.json`` at the start, one line of
``metrics.jsonl`` per evaluation (epoch 0 = the random encoder) and
``checkpoint.pt`` (atomically) when training finishes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from training.augment import AugmentConfig, augment_batch
from training.data import DataError, ImageDataset, default_spec, load_split
from training.evaluate import embed_images, knn_accuracy
from training.loss import invaspread_loss
from training.model import ARCHS, ModelConfig, build_encoder, save_checkpoint
from training.presets import PRESETS, preset_for


class UsageError(ValueError):
    """A bad option or input: printed as one line, exit code 2."""


@dataclass
class TrainConfig:
    data: str | None = None
    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.03
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "step"  # step (paper: x0.1 at 60%, x0.01 at 80% of the epochs) | cosine | constant
    temperature: float = 0.1
    neg_weight: float = 1.0
    detach_keys: bool = True
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
            (self.loss in ("auto", "fused", "reference"), f"--loss must be auto, fused or reference, got {self.loss!r}"),
            (self.arch in ARCHS, f"--arch must be one of {', '.join(ARCHS)}, got {self.arch!r}"),
            (self.input_size is None or self.input_size >= 8, f"--input-size must be >= 8, got {self.input_size}"),
            (self.resize_size is None or self.input_size is None or self.resize_size >= self.input_size,
             f"--resize-size ({self.resize_size}) must be >= --input-size ({self.input_size})"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UsageError(msg)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return dev


def lr_at(cfg: TrainConfig, epoch_float: float) -> float:
    """Learning rate at a (fractional) epoch."""
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(epoch_float / cfg.epochs, 1.0)))
    # the paper: 200 epochs, x0.1 at epoch 120 and x0.01 at 160, i.e. at 60% and 80%
    e = int(epoch_float)
    return cfg.lr * (0.01 if e >= round(0.8 * cfg.epochs) else 0.1 if e >= round(0.6 * cfg.epochs) else 1.0)


def select_loss(cfg: TrainConfig, device: torch.device):
    use_fused = cfg.loss == "fused" or (cfg.loss == "auto" and device.type == "cuda")
    if use_fused:
        try:
            from training.fused_loss import fused_invaspread_loss
        except ImportError as e:
            if cfg.loss == "fused":
                raise UsageError(f"--loss fused needs Triton ({e}); use --loss reference") from None
            return invaspread_loss, "reference"
        return fused_invaspread_loss, "fused"
    return invaspread_loss, "reference"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def knn_monitor(model, train: ImageDataset, test: ImageDataset, cfg: TrainConfig, device: torch.device,
                train_images_dev: torch.Tensor | None = None) -> tuple[float, float]:
    spec = model.cfg.preprocess
    ftr = embed_images(model, train_images_dev if train_images_dev is not None else train.images, spec, 512, device)
    fte = embed_images(model, test.images, spec, 512, device)
    ytr = torch.from_numpy(np.asarray(train.labels)).to(device)
    yte = torch.from_numpy(np.asarray(test.labels)).to(device)
    return knn_accuracy(ftr, ytr, fte, yte, len(train.classes), cfg.knn_k, cfg.knn_sigma)


def prepare_out(out: str | None) -> Path:
    path = Path(out) if out else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {path} exists and is not a folder; choose another --out")
    if (path / "checkpoint.pt").exists():
        raise UsageError(f"--out {path} already holds a finished run (checkpoint.pt); choose another --out or delete it")
    return path


def train(cfg: TrainConfig, log=print) -> dict[str, Any]:
    """Run training; returns the final metrics. Raises UsageError/DataError for bad input."""
    cfg.validate()
    device = resolve_device(cfg.device)
    out = prepare_out(cfg.out)
    seed_everything(cfg.seed)

    spec = default_spec(cfg.data, cfg.input_size, cfg.resize_size)
    train_ds = load_split(cfg.data, "train", resize_size=spec.resize_size)
    test_ds = load_split(cfg.data, "test", resize_size=spec.resize_size)
    spec = dataclasses.replace(train_ds.spec, input_size=spec.input_size, resize_size=spec.resize_size)
    if len(train_ds) < cfg.batch_size:
        raise UsageError(f"--batch-size {cfg.batch_size} is larger than the {len(train_ds)} training images; lower it")
    model_cfg = ModelConfig(arch=cfg.arch, embedding_dim=cfg.embedding_dim, preprocess=spec)
    model = build_encoder(model_cfg).to(device)
    loss_fn, loss_name = select_loss(cfg, device)
    aug = AugmentConfig(**cfg.augment)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    out.mkdir(parents=True, exist_ok=True)
    resolved = dataclasses.asdict(cfg) | {"out": str(out), "device": str(device), "loss": loss_name, "model": model_cfg.to_dict()}
    (out / "config.json").write_text(json.dumps(resolved, indent=2))
    metrics_path = out / "metrics.jsonl"
    metrics_path.write_text("")

    images = torch.from_numpy(np.ascontiguousarray(train_ds.images)).to(device)  # uint8 [N, R, R, 3], once
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    n = images.shape[0]
    steps = n // cfg.batch_size
    log(f"data {train_ds.name}: {n} train / {len(test_ds)} test images, {spec.input_size}x{spec.input_size} input; "
        f"{cfg.arch} -> {cfg.embedding_dim}-d on {device}; loss {loss_name}; {cfg.epochs} epochs x {steps} steps of {cfg.batch_size}")

    def record(epoch: int, **extra: Any) -> dict[str, Any]:
        top1, top5 = knn_monitor(model, train_ds, test_ds, cfg, device, images)
        row = {"epoch": epoch, "knn_top1": round(top1, 3), "knn_top5": round(top5, 3), **extra}
        with metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        log(f"epoch {epoch:>3}: kNN top-1 {top1:6.2f}%  top-5 {top5:6.2f}%" + (f"  loss {extra['loss']:.4f}" if "loss" in extra else ""))
        return row

    last = record(0)
    from tqdm import tqdm

    t_start = time.time()
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        perm = torch.randperm(n, generator=gen, device=device)
        loss_sum = torch.zeros((), device=device)
        bar = tqdm(range(steps), desc=f"epoch {epoch}/{cfg.epochs}", leave=False, disable=None, file=sys.stderr)
        t0 = time.time()
        for step in bar:
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, epoch - 1 + step / steps)
            batch = images[perm[step * cfg.batch_size : (step + 1) * cfg.batch_size]]
            views = torch.cat([augment_batch(batch, spec.input_size, aug, gen), augment_batch(batch, spec.input_size, aug, gen)])
            feats = model(views)
            loss = loss_fn(feats, temperature=cfg.temperature, detach_keys=cfg.detach_keys, neg_weight=cfg.neg_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
            if step % 10 == 0 or step == steps - 1:
                bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{2 * cfg.batch_size * (step + 1) / (time.time() - t0):.0f}")
        epoch_loss = (loss_sum / steps).item()
        if not math.isfinite(epoch_loss):
            raise FloatingPointError(f"loss became {epoch_loss} in epoch {epoch}; lower --lr or raise --temperature")
        images_per_s = 2 * cfg.batch_size * steps / (time.time() - t0)
        if epoch == cfg.epochs or (cfg.eval_every and epoch % cfg.eval_every == 0):
            last = record(epoch, loss=round(epoch_loss, 5), lr=lr_at(cfg, epoch - 1), images_per_s=round(images_per_s, 1))
        else:
            log(f"epoch {epoch:>3}: loss {epoch_loss:.4f}  ({images_per_s:.0f} images/s)")

    save_checkpoint(out / "checkpoint.pt", model, model_cfg, resolved, epoch=cfg.epochs, metrics=last,
                    train_seconds=round(time.time() - t_start, 2))
    log(f"done in {time.time() - t_start:.0f} s: kNN top-1 {last['knn_top1']:.2f}% -> {out / 'checkpoint.pt'}")
    return last


def build_parser() -> argparse.ArgumentParser:
    S = argparse.SUPPRESS  # only options given on the command line override the preset
    ap = argparse.ArgumentParser(prog="python -m training", description="Train an ISFE encoder without labels (InvaSpread loss).",
                                 argument_default=S)
    ap.add_argument("--preset", default=None, help=f"named recipe: {', '.join(PRESETS)} (default: quickstart without --data, the paper's recipe with it)")
    ap.add_argument("--data", help="digits (embedded default), cifar10, an image folder with train/ and test/, or a .tar.gz of one")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--batch-size", type=int, help="images per step (2x views)")
    ap.add_argument("--lr", type=float)
    ap.add_argument("--momentum", type=float)
    ap.add_argument("--weight-decay", type=float)
    ap.add_argument("--schedule", help="step (paper: x0.1 at 60%%, x0.01 at 80%% of the epochs), cosine or constant")
    ap.add_argument("--temperature", type=float)
    ap.add_argument("--neg-weight", type=float, help="weight of the negatives (authors' negM)")
    ap.add_argument("--full-gradient", action="store_true", help="let the gradient flow through the key side too (default: authors' detached keys)")
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
    ap.add_argument("--crop-scale", type=float, nargs=2, metavar=("MIN", "MAX"), help="RandomResizedCrop area range (paper: 0.2 1)")
    for op in ("crop", "color-jitter", "grayscale", "flip"):
        ap.add_argument(f"--no-{op}", action="store_true", help=f"ablation: disable {op.replace('-', ' ')}")
    ap.add_argument("--no-augment", action="store_true", help="ablation: no augmentation at all")
    ap.add_argument("--out", help="run folder (default runs/<timestamp>)")
    return ap


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    given = vars(args)
    try:
        values = preset_for(given.pop("preset"), "data" in given)
    except KeyError as e:
        raise UsageError(f"unknown --preset {e.args[0]!r}; choose one of {', '.join(PRESETS)}") from None
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
        values["augment"] = AugmentConfig(**aug).to_dict()
    except ValueError as e:
        raise UsageError(f"augmentation: {e}") from None
    return TrainConfig(**values)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        train(config_from_args(args))
    except (UsageError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no checkpoint.pt was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
