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
    host = json.loads((out / "host.json").read_text())
    assert host["cores"] >= 1 and host["cpu"] and "numpy" in host["versions"]
    loss = json.loads((out / "loss_bench-cpu-smoke.json").read_text())
    for result in (loss, run):  # written through benchmarks/common.write_result: they carry the machine
        assert result["host"]["cores"] == host["cores"] and result["host"]["cpu_flags"] == host["cpu_flags"]
    # the CUDA-marked tests were collected and skipped with their reason, not errored
    log = (out / "pytest_gpu.log").read_text()
    assert "skipped" in log and "error" not in log.lower().split("skipped")[-1]


def test_gpu_check_refuses_a_machine_without_cuda(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("SMOKE", None)
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no CUDA device" in (tmp_path / "out" / "summary.txt").read_text()


# --------------------------------------------------------------------------- benchmarks/common.py: what results record


def test_write_result_adds_the_machine_and_writes_strict_json(tmp_path):
    from benchmarks.common import cpu_flags, device_tag, slug, write_result

    out = write_result(tmp_path / "r" / "x.json", {"benchmark": "x", "ratio": float("nan"), "sizes": (1, 2)})
    text = out.read_text()
    doc = json.loads(text)  # strict: NaN became null, the tuple a list
    assert "NaN" not in text and doc["ratio"] is None and doc["sizes"] == [1, 2]
    host = doc["host"]
    assert host["cores"] == len(os.sched_getaffinity(0)) and host["cpu"] and host["versions"]["numpy"]
    assert len(host["load_average"]) in (0, 3) and all(v >= 0 for v in host["load_average"])
    assert os.listdir(out.parent) == ["x.json"]  # atomic: no temporary file left behind
    kept = write_result(tmp_path / "y.json", {"host": {"cpu": "given"}})
    assert json.loads(kept.read_text())["host"] == {"cpu": "given"}
    # the flags are the ones the kernel reports (slow twin: read /proc/cpuinfo here)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        lines = [ln for ln in cpuinfo.read_text().splitlines() if ln.startswith(("flags", "Features"))]
        reported = set(lines[0].split(":", 1)[1].split()) if lines else set()
        assert set(cpu_flags()) <= reported and host["cpu_flags"] == cpu_flags()
        assert ("avx2" in reported) == ("avx2" in cpu_flags())
    assert slug("NVIDIA H200 NVL") == "nvidia-h200-nvl" and device_tag() == f"cpu{host['cores']}"
