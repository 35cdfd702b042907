"""Summarise a training run folder as a benchmark result (JSON).

    python benchmarks/run_result.py runs/paper --out benchmarks/results/cifar10_paper-cpu-2core.json \
        [--device NAME] [--preset cifar10-paper] [--time-limit S]

Reads the run's ``config.json``, ``metrics.jsonl`` (one row per evaluation) and ``checkpoint.pt`` (or, while
the run is unfinished, ``last.pt``: epochs done, training and compile
seconds, why it stopped early), and
writes the kNN curve with the run's throughput and settings next to the
paper's figures for the same recipe.  Nothing is measured here: every number
comes from the run itself.

``final_*`` is the last evaluation, ``best_*`` (with ``best_*_epoch``) the best
evaluated trained epoch, as the authors report; ``epoch_index`` says what an
epoch number means (0 = the random encoder; the authors' "epoch e" is our e + 1).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/run_result.py` from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.common import cores, device_name, host_info, write_result  # noqa: E402

#: The paper's weighted-kNN top-1 on CIFAR-10 (Ye et al. 2019, Table 1 and Fig. 3; the figure is read at its
#: "epoch 2", an index of the authors' log, which calls the first evaluation, after one training epoch, epoch 0).
PAPER_KNN_TOP1 = {"after_200_epochs": 83.6, "after_2_epochs_approx": 60.0}
SETTINGS = ("data", "epochs", "batch_size", "lr", "schedule", "milestones", "warmup_epochs", "temperature",
            "negatives", "init", "seed", "eval_every", "device", "loss", "amp", "channels_last", "compile", "tf32",
            "world_size", "steps_per_epoch", "train_images", "deterministic", "speed_note", "speed_trial_ms",
            "speed_trial_batch")


class RunError(ValueError):
    pass


def _device_name(config: dict) -> str:
    """The CUDA device's name for a run on "cuda[:i]" (here, now), else "cpu-<N>core"."""
    if str(config.get("device", "")).startswith("cuda"):
        try:
            import torch

            if torch.cuda.is_available():
                return device_name(config["device"])
        except ImportError:
            pass
        return "cuda"
    return f"cpu-{cores()}core"


def summarise(run: Path, device: str | None = None, preset: str | None = None, time_limit: float | None = None) -> dict:
    """The result dictionary of the run folder ``run`` (raises RunError when it is not a run folder)."""
    if not (run / "config.json").is_file():
        raise RunError(f"{run} is not a training run folder (no config.json); "
                       "pass the --out folder of python -m training")
    try:
        config = json.loads((run / "config.json").read_text())
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()] \
            if (run / "metrics.jsonl").exists() else []
    except (json.JSONDecodeError, OSError, UnicodeDecodeError) as e:
        raise RunError(f"{run}: config.json or metrics.jsonl is unreadable ({e})") from None
    state: dict = {}
    ck_path = run / ("checkpoint.pt" if (run / "checkpoint.pt").exists() else "last.pt")
    if ck_path.exists():
        import torch

        try:
            ck = torch.load(ck_path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint gets the same message
            raise RunError(f"{ck_path} cannot be read ({e})") from None
        state = {k: ck.get(k) for k in ("epoch", "train_seconds", "compile_seconds", "stopped_early")}
    from training.run_folder import EPOCH_INDEX, best_of  # the run folder's own definition of the best epoch

    epochs_done = state.get("epoch", rows[-1].get("epoch") if rows else None)
    evals = [r for r in rows if "knn_top1" in r]
    recalls = [r for r in rows if "recall@1" in r]
    trained = [r for r in rows if r.get("epoch", 0) > 0]
    best_knn, best_r1 = best_of(rows, "knn_top1"), best_of(rows, "recall@1")
    settings = {k: config.get(k) for k in SETTINGS if k in config}
    # runs from before --init have torchvision's initialisation (their model config has no "init")
    settings["init"] = config.get("init", (config.get("model") or {}).get("init", "torchvision"))
    return {
        "benchmark": "training_run",
        "run": run.name,
        "preset": preset,
        "device": device or _device_name(config),
        "host": host_info(),
        "epochs_planned": config.get("epochs"),
        "epochs_done": epochs_done,
        "finished": epochs_done is not None and epochs_done >= (config.get("epochs") or 0),
        "stopped_early": state.get("stopped_early"),
        "time_limit_s": time_limit if time_limit is not None else config.get("time_limit"),
        "epoch_index": EPOCH_INDEX,
        "final_epoch": rows[-1].get("epoch") if rows else None,
        "final_knn_top1": evals[-1]["knn_top1"] if evals else None,
        "final_knn_top5": evals[-1].get("knn_top5") if evals else None,
        "best_knn_top1": best_knn[0] if best_knn else None,  # over the evaluated trained epochs (not epoch 0)
        "best_knn_top1_epoch": best_knn[1] if best_knn else None,
        "final_recall@1": recalls[-1]["recall@1"] if recalls else None,
        "best_recall@1": best_r1[0] if best_r1 else None,
        "best_recall@1_epoch": best_r1[1] if best_r1 else None,
        "final_loss": trained[-1].get("loss") if trained else None,
        "train_seconds": state.get("train_seconds"),
        "compile_seconds": state.get("compile_seconds"),
        "steady_images_per_s": [r.get("images_per_s") for r in trained if r.get("images_per_s") is not None],
        "paper_knn_top1": PAPER_KNN_TOP1,
        "settings": settings,
        "metrics": rows,
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/run_result.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="the run folder (python -m training --out)")
    ap.add_argument("--out", type=Path, required=True, help="result JSON to write")
    ap.add_argument("--device", help="device name to record (default: the CUDA device name, or cpu-<N>core)")
    ap.add_argument("--preset", help="the --preset the run used, to record (run folders do not store it)")
    ap.add_argument("--time-limit", type=float,
                    help="the time box the run had, if any (default: the run's --time-limit)")
    args = ap.parse_args(argv)
    try:
        res = summarise(args.run, args.device, args.preset, args.time_limit)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_result(args.out, res)
    print(json.dumps({k: v for k, v in res.items() if k not in ("metrics", "settings", "host")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
