"""Training throughput: the authors' per-image CPU augmentation vs ISFE's on-device pipeline.

Usage::

    python benchmarks/train_throughput.py            # full: batch 512, ResNet-18 32x32 (CUDA: ~1-2 min)
    python benchmarks/train_throughput.py --quick    # small smoke run (< 2 min on 2 CPU cores)

In one run, with the same encoder (ResNet-18, CIFAR stem, 128-d), batch and
images (uint8 32x32 RGB; random by default, ``--data`` for a real split), it
measures training images/s (two views of an image count as two images) of:

* ``baseline`` — the authors' pipeline: torchvision per-image transforms
  ``RandomResizedCrop(32, scale=(0.2, 1)) -> ColorJitter(0.4, 0.4, 0.4, 0.4)
  -> RandomGrayscale(0.2) -> RandomHorizontalFlip -> ToTensor -> Normalize``
  applied twice per PIL image in a ``DataLoader`` with worker processes, then
  a float32 eager step (reference loss, plain SGD);
* ``baseline_fast_model`` (CUDA only) — the same per-image data pipeline
  feeding ISFE's model step (bf16, channels_last, compiled, fused loss and
  SGD): isolates what the data pipeline costs;
* ``isfe`` — ``training.step.TrainStep``, the training loop's own step:
  uint8 images on the device, a random batch gathered there, both views made
  by the batched augmentation, bf16 / channels_last / ``torch.compile`` /
  fused loss and SGD where on (``auto``: on for CUDA; on a CPU with AMX-BF16 /
  AVX512-BF16 the training loop's own timed trial picks them, reported as
  ``auto_choice`` and ``speed_trial_ms``);
* ``variants`` (default on the CPU without ``--quick``; ``--variants`` elsewhere) — the same step in
  float32, bf16 autocast, channels-last and both, built side by side and
  timed interleaved (one step of each in turn, the order rotating), so that
  other work on shared cores slows them alike; ``ratio_over_fp32`` per
  variant and ``ratio_auto_over_fp32`` (the auto choice's variant).

Each is warmed up first (worker start-up and compilation are reported as
``setup_seconds`` / ``compile_seconds``, not counted), then ``--steps`` steps
are timed end to end with one synchronisation at the end.  A second,
instrumented pass synchronises between phases to split a step's time into
data/augmentation, forward (+ loss) and backward (+ optimizer step).

Writes ``benchmarks/results/train_throughput-<device>.json`` (``<device>``:
:func:`benchmarks.common.device_tag`, e.g. ``nvidia-h200`` or ``cpu2``) with
``device``, ``baseline_images_per_s``, ``isfe_images_per_s``,
``ratio_isfe_over_baseline``, ``cpu_model`` / ``cpu_flags`` and the machine
(``host``, see :mod:`benchmarks.common`).  ``--no-baseline`` skips the
authors' pipeline (its keys are then null).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/train_throughput.py` from anywhere
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import RESULTS, cpu_flags, cpu_model, device_name, device_tag, load_average, write_result  # noqa: E402,E501
from isfe_model.preprocess import PreprocessSpec  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.data import CIFAR_MEAN, CIFAR_STD  # noqa: E402
from training.distributed import DistContext  # noqa: E402
from training.loss import invaspread_loss  # noqa: E402
from training.model import ModelConfig, build_encoder  # noqa: E402
from training.runtime import numerics, resolve_device  # noqa: E402
from training.step import Speed, TrainStep, build_step, resolve_speed  # noqa: E402

TARGET_IMAGES_PER_S = 100_000  # issue 3: one H100, end to end


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PairDataset(torch.utils.data.Dataset):
    """The authors' data path: uint8 array -> PIL image -> two independent per-image views."""

    def __init__(self, images: np.ndarray, size: int):
        import torchvision.transforms as T

        self.images = images
        self.transform = T.Compose([
            T.RandomResizedCrop(size, scale=(0.2, 1.0)),
            T.ColorJitter(0.4, 0.4, 0.4, 0.4),
            T.RandomGrayscale(p=0.2),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(CIFAR_MEAN, CIFAR_STD),
        ])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image

        img = Image.fromarray(self.images[i])
        return self.transform(img), self.transform(img)


def _images(args) -> np.ndarray:
    if args.data:
        from training.data import load_split

        return np.asarray(load_split(args.data, "train", resize_size=args.size).images)
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (args.num_images, args.size, args.size, 3), dtype=np.uint8)


def _model_cfg(args) -> ModelConfig:
    spec = PreprocessSpec(input_size=args.size, resize_size=args.size, mean=CIFAR_MEAN, std=CIFAR_STD)
    return ModelConfig(arch=args.arch, embedding_dim=128, preprocess=spec)


def _per_step_ms(split: dict[str, float], steps: int) -> dict[str, float]:
    """{"data_s": total seconds, ...} over ``steps`` instrumented steps -> {"data": ms per step, ...}."""
    return {k.replace("_s", ""): round(1000 * v / max(steps, 1), 2) for k, v in split.items()}


def bench_baseline(args, images: np.ndarray, device: torch.device, fast_step=None) -> dict:
    """Per-image torchvision transforms in DataLoader workers -> (plain or ISFE) model step."""
    loader = torch.utils.data.DataLoader(
        PairDataset(images, args.size), batch_size=args.batch_size, shuffle=True, drop_last=True,
        num_workers=args.workers, pin_memory=device.type == "cuda", persistent_workers=args.workers > 0,
        prefetch_factor=4 if args.workers > 0 else None,
    )
    if fast_step is None:  # the authors' model step: float32, eager, reference loss, plain SGD
        torch.manual_seed(0)
        model = build_encoder(_model_cfg(args)).to(device).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9, weight_decay=5e-4)

        def forward(views):
            return invaspread_loss(model(views))

        def backward(loss):
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    else:
        def forward(views):
            if fast_step.speed.channels_last:
                views = views.contiguous(memory_format=torch.channels_last)
            return fast_step.loss(views)

        def backward(loss):
            fast_step.opt.zero_grad(set_to_none=True)
            loss.backward()
            fast_step.opt.step()

    def batches():
        while True:
            for v1, v2 in loader:
                yield v1, v2

    it = batches()
    t0 = time.perf_counter()
    for _ in range(args.warmup):  # starts the workers (and compiles the fast model)
        v1, v2 = next(it)
        backward(forward(torch.cat([v1, v2]).to(device, non_blocking=True)))
    _sync(device)
    setup = time.perf_counter() - t0

    t0 = time.perf_counter()
    for _ in range(args.steps):
        v1, v2 = next(it)
        backward(forward(torch.cat([v1, v2]).to(device, non_blocking=True)))
    _sync(device)
    elapsed = time.perf_counter() - t0

    split = {"data_s": 0.0, "forward_s": 0.0, "backward_s": 0.0}
    for _ in range(args.split_steps):
        a = time.perf_counter()
        v1, v2 = next(it)
        views = torch.cat([v1, v2]).to(device, non_blocking=True)
        _sync(device)
        b = time.perf_counter()
        loss = forward(views)
        _sync(device)
        c = time.perf_counter()
        backward(loss)
        _sync(device)
        d = time.perf_counter()
        split["data_s"] += b - a
        split["forward_s"] += c - b
        split["backward_s"] += d - c
    del it
    loader = None  # stops the persistent workers before the next measurement
    return {
        "images_per_s": round(2 * args.batch_size * args.steps / elapsed, 1),
        "setup_seconds": round(setup, 2),
        "ms_per_step": round(1000 * elapsed / args.steps, 2),
        "split_ms_per_step": _per_step_ms(split, args.split_steps),
        "workers": args.workers,
    }


VARIANTS = {"fp32": (False, False), "bf16": (True, False), "channels-last": (False, True),
            "bf16+channels-last": (True, True)}


def _step_cfg(args, speed: Speed) -> TrainConfig:
    return TrainConfig(batch_size=args.batch_size, arch=args.arch, embedding_dim=128, loss=args.loss,
                       amp=None if "amp" in speed.timed else speed.amp,
                       channels_last=None if "channels_last" in speed.timed else speed.channels_last,
                       compile=speed.compile, seed=0)


def bench_variants(args, images: np.ndarray, device: torch.device, compile_: bool) -> dict:
    """fp32 / bf16 / channels-last / both: one TrainStep each (same seed), timed interleaved step by step."""
    data = torch.from_numpy(images).to(device)
    gen = torch.Generator(device=device).manual_seed(1)

    def batch():
        return data[torch.randint(0, len(data), (args.batch_size,), generator=gen, device=device)]

    steps: dict[str, TrainStep] = {}
    for name, (amp, cl) in VARIANTS.items():
        speed = Speed(amp=amp, channels_last=cl, compile=compile_)
        torch.manual_seed(0)
        steps[name] = build_step(_step_cfg(args, speed), _model_cfg(args), device, DistContext(), speed)[0]
        if compile_:
            steps[name].warmup(batch())
    names = list(steps)
    for _ in range(args.warmup):
        for name in names:
            steps[name](batch(), 0.03)
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(args.steps):
        order = names[i % len(names):] + names[: i % len(names)]  # rotate: no variant always follows another
        for name in order:
            x = batch()
            _sync(device)
            t0 = time.perf_counter()
            steps[name](x, 0.03)
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    views = 2 * args.batch_size
    out = {name: {"images_per_s": round(views * len(t) / sum(t), 1), "ms_per_step": round(1000 * sum(t) / len(t), 1),
                  "min_ms_per_step": round(1000 * min(t), 1)} for name, t in times.items()}
    for name in out:
        out[name]["ratio_over_fp32"] = round(out[name]["images_per_s"] / out["fp32"]["images_per_s"], 2)
    return out


def bench_isfe(args, images: np.ndarray, device: torch.device, speed: Speed) -> tuple[dict, object]:
    """The training loop's TrainStep on device-resident uint8 images (a CPU auto choice: its timed trial first)."""
    cfg = _step_cfg(args, speed)
    torch.manual_seed(0)
    step, loss_name = build_step(cfg, _model_cfg(args), device, DistContext(), speed, log=print)
    data = torch.from_numpy(images).to(device)
    gen = torch.Generator(device=device).manual_seed(1)
    n = data.shape[0]

    def batch():
        return data[torch.randint(0, n, (args.batch_size,), generator=gen, device=device)]

    compile_seconds = None
    if speed.compile:
        t0 = time.perf_counter()
        step.warmup(batch())
        compile_seconds = round(time.perf_counter() - t0, 2)
    step.model.train()
    for _ in range(args.warmup):
        step(batch(), 0.03)
    _sync(device)

    t0 = time.perf_counter()
    for _ in range(args.steps):
        step(batch(), 0.03)
    _sync(device)
    elapsed = time.perf_counter() - t0

    split = {"augment_s": 0.0, "forward_s": 0.0, "backward_s": 0.0}
    for _ in range(args.split_steps):
        a = time.perf_counter()
        views = step.views(batch())
        _sync(device)
        b = time.perf_counter()
        loss = step.loss(views)
        _sync(device)
        c = time.perf_counter()
        step.opt.zero_grad(set_to_none=True)
        loss.backward()
        step.opt.step()
        _sync(device)
        d = time.perf_counter()
        split["augment_s"] += b - a
        split["forward_s"] += c - b
        split["backward_s"] += d - c
    return {
        "images_per_s": round(2 * args.batch_size * args.steps / elapsed, 1),
        "compile_seconds": compile_seconds,
        "ms_per_step": round(1000 * elapsed / args.steps, 2),
        "split_ms_per_step": _per_step_ms(split, args.split_steps),
        "loss": loss_name,
        "amp": speed.amp, "channels_last": speed.channels_last, "compile": speed.compile,
        "speed_note": speed.note or None, "speed_trial_ms": speed.trial_ms, "speed_trial_batch": speed.trial_batch,
    }, step


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="train_throughput", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small smoke configuration (< 2 min on 2 CPU cores)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=None, help="images per step (default 512; quick: 32)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 50; quick: 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; quick: 1)")
    ap.add_argument("--split-steps", type=int, default=None,
                    help="instrumented steps for the time split (default 10; quick: 1)")
    ap.add_argument("--workers", type=int, default=None,
                    help="baseline DataLoader workers (default: all CPU cores, at most 16)")
    ap.add_argument("--num-images", type=int, default=None, help="random images (default 50000; quick: 512)")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--loss", default="auto", help="ISFE loss: auto (fused on CUDA), fused, reference")
    ap.add_argument("--data", default=None, help="use a real training split instead of random images")
    ap.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--no-baseline-fast-model", action="store_true",
                    help="skip the per-image pipeline + ISFE model variant")
    ap.add_argument("--no-baseline", action="store_true", help="skip the authors' per-image pipeline")
    ap.add_argument("--variants", action=argparse.BooleanOptionalAction, default=None,
                    help="also time fp32 / bf16 / channels-last / both interleaved (default: on the CPU, "
                         "not with --quick)")
    ap.add_argument("--shared", default=None, metavar="NOTE",
                    help="say in the JSON that the cores were shared (e.g. 'with other engineers\' jobs')")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/train_throughput-<device>.json)")
    args = ap.parse_args(argv)
    q = args.quick
    defaults = dict(batch_size=(32, 512), steps=(3, 50), warmup=(1, 5), split_steps=(1, 10), num_images=(512, 50_000))
    for k, (quick, full) in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, quick if q else full)
    if args.workers is None:
        args.workers = min(16, os.cpu_count() or 1)
    return args


def main(argv=None) -> int:
    args = parse(argv)
    device = resolve_device(args.device)
    cfg = TrainConfig(amp=args.amp, channels_last=args.channels_last, compile=args.compile)
    speed = resolve_speed(cfg, device)
    images = _images(args)
    if len(images) < args.batch_size:
        print(f"error: {len(images)} images < batch {args.batch_size}", file=sys.stderr)
        return 2
    tag = device_tag(device)
    print(f"train_throughput on {device_name(device)}: batch {args.batch_size} ({2 * args.batch_size} views), "
          f"{args.arch} {args.size}x{args.size}, {args.steps} timed steps; ISFE amp={speed.amp} "
          f"channels_last={speed.channels_last} compile={speed.compile}"
          + (f" ({speed.note})" if speed.note else ""), flush=True)
    t_all = time.perf_counter()
    load_start = (load_average() or [None])[0]
    with numerics(device, deterministic=False):  # cuDNN autotuning and TF32 on CUDA, as the training loop runs
        results = _run_all(args, images, device, speed)
    result = {
        "benchmark": "train_throughput",
        "device": tag,
        "device_detail": device_name(device),
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "torch": str(torch.__version__),
        "quick": bool(args.quick),
        "config": {"batch_size": args.batch_size, "views_per_step": 2 * args.batch_size, "arch": args.arch,
                   "input_size": args.size, "embedding_dim": 128, "steps": args.steps, "warmup": args.warmup,
                   "images": "real: " + args.data if args.data else f"{args.num_images} random uint8 images"},
        **results,
        "target_images_per_s": TARGET_IMAGES_PER_S,
        "meets_target": bool(device.type == "cuda" and results["isfe_images_per_s"] >= TARGET_IMAGES_PER_S),
        "cores_shared": args.shared or None,
        "seconds": round(time.perf_counter() - t_all, 1),
        # other work on the machine during the run (both pipelines share it; CPU numbers are only comparable at ~0)
        "load_average_1m": {"start": load_start, "end": (load_average() or [None])[0]},
    }
    out = write_result(Path(args.out) if args.out else RESULTS / f"train_throughput-{tag}.json", result)
    print(f"ISFE / baseline = {result['ratio_isfe_over_baseline']}x; auto choice {result.get('auto_choice')} "
          f"= {result.get('ratio_auto_over_fp32')}x fp32 -> {out}")
    return 0


def _run_all(args, images: np.ndarray, device: torch.device, speed: Speed) -> dict:
    """ISFE's step (auto), the variants, the baseline pipeline and (CUDA) the baseline data with ISFE's model."""
    isfe, step = bench_isfe(args, images, device, speed)
    print(f"  isfe:     {isfe['images_per_s']:>10.0f} images/s  split {isfe['split_ms_per_step']} ms"
          + (f"  (compile {isfe['compile_seconds']} s)" if isfe["compile_seconds"] is not None else ""), flush=True)
    auto = next(k for k, v in VARIANTS.items() if v == (speed.amp, speed.channels_last))
    out: dict = {"auto_choice": auto, "isfe_images_per_s": isfe["images_per_s"], "isfe": isfe}
    if args.variants if args.variants is not None else device.type == "cpu" and not args.quick:
        variants = bench_variants(args, images, device, speed.compile)
        for name, v in variants.items():
            print(f"  {name:<19} {v['images_per_s']:>8.1f} images/s  {v['ms_per_step']:>8.1f} ms/step  "
                  f"{v['ratio_over_fp32']:.2f}x fp32", flush=True)
        out |= {"variants": variants, "ratio_auto_over_fp32": variants[auto]["ratio_over_fp32"]}
    if args.no_baseline:
        return out | {"baseline_images_per_s": None, "ratio_isfe_over_baseline": None}
    baseline = bench_baseline(args, images, device)
    print(f"  baseline: {baseline['images_per_s']:>10.0f} images/s  split {baseline['split_ms_per_step']} ms",
          flush=True)
    out |= {
        "baseline_images_per_s": baseline["images_per_s"],
        "ratio_isfe_over_baseline": round(isfe["images_per_s"] / baseline["images_per_s"], 2),
        "baseline": baseline,
    }
    if device.type == "cuda" and not args.no_baseline_fast_model:
        fast_model = bench_baseline(args, images, device, fast_step=step)
        print(f"  baseline data + ISFE model: {fast_model['images_per_s']:>10.0f} images/s", flush=True)
        out |= {"baseline_fast_model_images_per_s": fast_model["images_per_s"], "baseline_fast_model": fast_model}
    return out


if __name__ == "__main__":
    sys.exit(main())
