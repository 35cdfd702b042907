"""benchmarks/gpu_check.sh rehearsed without a GPU (SMOKE=1).

Device time is scarce (minutes per session, some sessions none), so the
script that spends it must be known to work before it runs there: this
runs every step of it in its smallest configuration on the CPU and checks
the results it writes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def test_gpu_check_script_runs_end_to_end_without_a_gpu(tmp_path):
    out = tmp_path / "out"  # no CIFAR_ARCHIVE: the script makes a tiny one in CIFAR-10's layout
    env = {**os.environ, "SMOKE": "1", "OUT": str(out), "PYTHON": sys.executable,
           "TIME_LIMIT": "60", "ISFE_CACHE": str(tmp_path / "cache"), "CUDA_VISIBLE_DEVICES": ""}
    env.pop("CIFAR_ARCHIVE", None)
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 0, f"{summary}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    for step in ("pytest_gpu", "train_throughput", "loss_bench", "cifar10_fast"):
        assert f"{step} rc=0 " in summary, summary
    assert "failed_steps=0" in summary

    tp = json.loads((out / "train_throughput-cpu-smoke.json").read_text())
    assert tp["baseline_images_per_s"] > 0 and tp["isfe_images_per_s"] > 0 and tp["device"]
    assert (out / "loss_bench-cpu-smoke.json").exists()

    run = json.loads((out / "cifar10_fast-cpu-smoke.json").read_text())
    assert run["device"].startswith("cpu") and run["preset"] == "cifar10-fast"
    assert run["epochs_done"] == 2 and run["epochs_planned"] == 2
    assert [r["epoch"] for r in run["metrics"]] == [0, 1, 2]
    assert 0 <= run["final_knn_top1"] <= 100 and run["best_knn_top1"] >= run["final_knn_top1"]
    assert len(run["steady_images_per_s"]) == 2 and all(v > 0 for v in run["steady_images_per_s"])
    assert (out / "metrics.jsonl").exists() and (out / "config.json").exists()
    # the CUDA-marked tests were collected and skipped with their reason, not errored
    log = (out / "pytest_gpu.log").read_text()
    assert "skipped" in log and "error" not in log.lower().split("skipped")[-1]


def test_gpu_check_refuses_a_machine_without_cuda(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("SMOKE", None)
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no CUDA device" in (tmp_path / "out" / "summary.txt").read_text()
