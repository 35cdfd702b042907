"""Augmentation throughput on CUDA: ISFE's batched per-sample augmentation vs torchvision per image.

    python benchmarks/augment_bench.py            # writes benchmarks/results/augment_bench-<device>.json

Times (CUDA events, sampling included) ``training.augment.augment_batch`` for 512 / 4,096 /
16,384 views of 32x32 uint8 images and 256 views of 256x256 -> 224, the compiled
``Augmenter`` at 512 and 4,096 views, and, in the same run, the baseline: torchvision v2
(RandomResizedCrop, ColorJitter, RandomGrayscale, RandomHorizontalFlip) applied image by
image on the same GPU, which is how torchvision gives per-sample parameters.
Without CUDA it prints "needs CUDA" and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/augment_bench.py` from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, device_name, slug, write_result  # noqa: E402


def bench(fn, iters: int = 20, warm: int = 3) -> float:
    import torch

    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters / 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/augment_bench.py", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="output JSON (default benchmarks/results/augment_bench-<device>.json)")
    args = ap.parse_args(argv)

    import torch
    import torchvision
    from torchvision.transforms import v2 as T

    from training.augment import AugmentConfig, Augmenter, augment_batch

    if not torch.cuda.is_available():
        print("augment_bench: needs CUDA (no GPU here)", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    name = device_name(dev)
    res: dict = {"device": name, "torch": torch.__version__, "torchvision": torchvision.__version__}
    cfg = AugmentConfig()
    gen = torch.Generator(device=dev).manual_seed(0)

    for n, h, s in [(512, 32, 32), (4096, 32, 32), (16384, 32, 32), (256, 256, 224)]:
        x = torch.randint(0, 256, (n, h, h, 3), dtype=torch.uint8, device=dev)
        t = bench(lambda: augment_batch(x, s, cfg, gen))
        res[f"eager_{n}x{h}->{s}"] = {"s_per_batch": t, "images_per_s": n / t}
        print(f"eager {n} x {h}->{s}: {n / t:,.0f} views/s", flush=True)

    tv = T.Compose([T.RandomResizedCrop(32, scale=(0.2, 1.0), antialias=True), T.ColorJitter(0.4, 0.4, 0.4, 0.4),
                    T.RandomGrayscale(0.2), T.RandomHorizontalFlip()])
    xf = torch.rand(256, 3, 32, 32, device=dev)
    t_tv = bench(lambda: torch.stack([tv(im) for im in xf]), iters=3, warm=1)
    res["torchvision_per_image_gpu_256x32"] = {"s_per_batch": t_tv, "images_per_s": 256 / t_tv}
    print(f"torchvision per image: {256 / t_tv:,.0f} views/s", flush=True)

    for n in (512, 4096):
        x = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, device=dev)
        aug = Augmenter(32, cfg, gen, compile=True)
        t0 = time.perf_counter()
        aug(x)
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
        t = bench(lambda: aug(x))
        res[f"augmenter_compiled_{n}x32"] = {"first_call_s": compile_s, "s_per_batch": t, "images_per_s": n / t}
        print(f"compiled {n}: {n / t:,.0f} views/s (first call {compile_s:.1f} s)", flush=True)

    res["ratio_eager_4096_over_torchvision"] = res["eager_4096x32->32"]["images_per_s"] / (256 / t_tv)
    out = write_result(Path(args.out) if args.out else RESULTS / f"augment_bench-{slug(name)}.json", res)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
