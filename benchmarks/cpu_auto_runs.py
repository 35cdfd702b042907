"""Real training runs on the CPU, auto speed switches vs float32, one after the other (issue: CPU bf16 auto).

    python benchmarks/cpu_auto_runs.py --data ../shared/data/cifar10-jpeg.tar.gz \
        [--max-steps-per-epoch N] [--no-quickstart] [--no-cifar] [--out benchmarks/results/cpu_auto_runs-<device>.json]

Arms, each a ``python -m training`` process with the same seed, run sequentially (never side by side):

* ``cifar``: ``--preset cifar10-fast --data DATA --device cpu --epochs 1 --warmup-epochs 0 --eval-every 0``
  (the preset's batch 512, lr 0.12, cosine, in one epoch without its 5 warm-up epochs; kNN before and after),
  once with the automatic choice (``--amp`` / ``--channels-last`` unset: on a CPU with AMX-BF16 or
  AVX512-BF16 a timed trial of the real step picks fp32 / bf16 / channels-last / both) and once with
  ``--no-amp --no-channels-last`` (plain float32);
* ``quickstart``: the default recipe (embedded digits, 6 epochs) both ways, timed end to end.

Reported per arm: what auto chose and the trial's ms/step (from the run's ``config.json``), images/s of the
epoch (the trial excluded, as the trainer counts it), wall seconds of the process, kNN top-1 before and after;
and the ratios auto / fp32 computed in this run.  Nothing is measured here but the runs themselves: every
number comes from their ``metrics.jsonl`` and ``config.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, device_tag, load_average, write_result  # noqa: E402

FP32_FLAGS = ["--no-amp", "--no-channels-last"]
CONFIG_KEYS = ("preset", "batch_size", "lr", "schedule", "warmup_epochs", "epochs", "max_steps_per_epoch", "seed",
               "amp", "channels_last", "compile", "loss", "speed_note", "speed_trial_ms", "speed_trial_batch")


def run_arm(args_: list[str], out: Path) -> dict[str, Any]:
    """One training process -> its wall time, resolved speed switches, images/s and kNN rows."""
    cmd = [sys.executable, "-m", "training", *args_, "--out", str(out)]
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"training failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    config = json.loads((out / "config.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    trained = [r for r in rows if r.get("epoch", 0) > 0 and "images_per_s" in r]
    result = {
        "command": " ".join(["python", "-m", "training", *args_]),
        "wall_s": round(wall, 1),
        "resolved": {k: config.get(k) for k in CONFIG_KEYS if k in config},
        "images_per_s": [r["images_per_s"] for r in trained],
        "knn_top1": {str(r["epoch"]): r.get("knn_top1") for r in rows if r.get("knn_top1") is not None},
        "final_knn_top1": next((r["knn_top1"] for r in reversed(rows) if r.get("knn_top1") is not None), None),
        "start_line": next((ln for ln in proc.stdout.splitlines() if ln.startswith("data ")), ""),
    }
    print(f"  {result['wall_s']} s, images/s {result['images_per_s']}, kNN {result['knn_top1']}", flush=True)
    return result


def compare(auto: dict[str, Any], fp32: dict[str, Any]) -> dict[str, Any]:
    """auto / fp32 ratios and the kNN difference (points) of one pair of arms."""
    ips = (auto["images_per_s"][-1] / fp32["images_per_s"][-1]
           if auto["images_per_s"] and fp32["images_per_s"] else None)
    knn = (None if auto["final_knn_top1"] is None or fp32["final_knn_top1"] is None
           else round(auto["final_knn_top1"] - fp32["final_knn_top1"], 2))
    return {"images_per_s_ratio": None if ips is None else round(ips, 2),
            "wall_ratio_fp32_over_auto": round(fp32["wall_s"] / auto["wall_s"], 2),
            "knn_top1_auto_minus_fp32": knn}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=None, help="CIFAR-10 (image folder or archive), e.g. the JPEG copy")
    ap.add_argument("--max-steps-per-epoch", type=int, default=None,
                    help="shorten the CIFAR epoch to N steps of 512 (default: the whole epoch, 97 steps)")
    ap.add_argument("--no-quickstart", action="store_true", help="skip the two quickstart runs")
    ap.add_argument("--no-cifar", action="store_true", help="skip the two CIFAR-10 runs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="result JSON (default benchmarks/results/cpu_auto_runs-<device>.json)")
    args = ap.parse_args(argv)
    if not args.no_cifar and not args.data:
        ap.error("--data is required for the CIFAR-10 runs (or pass --no-cifar)")
    load_before = load_average()
    cifar = ["--preset", "cifar10-fast", "--data", args.data, "--device", "cpu", "--epochs", "1",
             "--warmup-epochs", "0", "--eval-every", "0", "--seed", str(args.seed)]
    if args.max_steps_per_epoch:
        cifar += ["--max-steps-per-epoch", str(args.max_steps_per_epoch)]
    quick = ["--device", "cpu", "--seed", str(args.seed)]
    pairs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="cpu_auto_runs-") as tmp:
        work = Path(tmp)
        todo = ([] if args.no_cifar else [("cifar", cifar)]) + ([] if args.no_quickstart else [("quickstart", quick)])
        for name, base in todo:
            auto = run_arm(base, work / f"{name}-auto")
            fp32 = run_arm(base + FP32_FLAGS, work / f"{name}-fp32")
            pairs[name] = {"auto": auto, "fp32": fp32, "auto_vs_fp32": compare(auto, fp32)}
            print(f"{name}: {json.dumps(pairs[name]['auto_vs_fp32'])}", flush=True)
    doc = {
        "benchmark": "cpu_auto_runs",
        "device": device_tag(None),
        "data": args.data,
        "order": "sequential: cifar auto, cifar fp32, quickstart auto, quickstart fp32 (never side by side)",
        "runs": pairs,
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "goal": {"knn_top1_within_points": 1.0},
    }
    out = Path(args.out) if args.out else RESULTS / f"cpu_auto_runs-{device_tag(None)}.json"
    write_result(out, doc)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
