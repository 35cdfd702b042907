"""Does the CPU speed trial pick the same candidate at a small batch as at the run's batch?

    python benchmarks/speed_trial_batches.py [--side 32] [--resize 32] [--batches 16 32 64 128] [--out OUT]

For each batch size, a fresh ResNet18 (128-d, seed 0) TrainStep at ``side`` x ``side`` input runs
:func:`training.step.choose_by_trial` over fp32 / bf16 / channels-last / both (one untimed and
one timed round) and the JSON records the ms/step of each candidate, their speed-ups over fp32,
the choice and the trial's wall time.  This is the measurement behind ``TRIAL_MAX_BATCH``: the
trial of a run with a larger batch times a step of that many images.  Run it on idle cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, device_name, device_tag, load_average, result_header, write_result  # noqa: E402


def trial_at(side: int, resize: int, batch: int) -> dict:
    """One fresh step at ``batch`` images -> its trial's ms/step, speed-ups, choice and wall seconds."""
    import torch

    from isfe_model.preprocess import PreprocessSpec
    from training.config import TrainConfig
    from training.distributed import DistContext
    from training.model import ModelConfig
    from training.step import Speed, build_step, choose_by_trial, speed_label

    cfg = TrainConfig(batch_size=batch, embedding_dim=128, seed=0)
    mc = ModelConfig(embedding_dim=128, preprocess=PreprocessSpec(input_size=side, resize_size=resize))
    torch.manual_seed(0)
    step = build_step(cfg, mc, torch.device("cpu"), DistContext(), Speed(False, False, False))[0]
    step.speed.timed = ("amp", "channels_last")
    images = torch.randint(0, 256, (batch, resize, resize, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    speed = choose_by_trial(step, images, cfg.lr, rounds=1, budget_s=0.0)
    ms = speed.trial_ms
    speedup = {k: round(ms["fp32"] / v, 2) for k, v in ms.items()}
    return {"batch": batch, "ms_per_step": ms, "speedup_over_fp32": speedup,
            "chosen": speed_label(speed.amp, speed.channels_last), "trial_s": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="speed_trial_batches", description=__doc__.split("\n\n")[0])
    ap.add_argument("--side", type=int, default=32, help="input size (default 32)")
    ap.add_argument("--resize", type=int, default=None, help="resize size (default: --side)")
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--out", default=None, help="result JSON (default benchmarks/results/speed_trial_batches-...)")
    args = ap.parse_args(argv)
    if min(args.batches) < 2 or args.side < 8:
        ap.error("batches must be >= 2 and --side >= 8")
    resize = args.resize or args.side
    rows = []
    for b in args.batches:
        rows.append(trial_at(args.side, resize, b))
        print(rows[-1], flush=True)
    result = {**result_header("speed_trial_batches", device_name()), "input_size": args.side,
              "resize_size": resize, "rows": rows, "load_average_at_end": load_average(),
              "same_choice_at_every_batch": len({r["chosen"] for r in rows}) == 1}
    out = Path(args.out) if args.out else RESULTS / f"speed_trial_batches-{device_tag()}-{args.side}px.json"
    write_result(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
