"""End-to-end training runs (short) and the command line's handling of bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from training.model import load_encoder
from training.train import main


def test_short_run_writes_config_metrics_and_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["--epochs", "2", "--eval-every", "1", "--batch-size", "64", "--input-size", "8", "--resize-size", "8",
               "--embedding-dim", "32", "--out", str(out), "--seed", "1"])
    assert rc == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["epochs"] == 2 and cfg["loss"] == "reference" and cfg["model"]["preprocess"]["input_size"] == 8
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert all(0 <= r["knn_top1"] <= 100 for r in rows) and "loss" in rows[-1]
    raw = torch.load(out / "checkpoint.pt", weights_only=True)
    assert raw["epoch"] == 2 and raw["config"]["batch_size"] == 64
    model = load_encoder(out / "checkpoint.pt")
    with torch.no_grad():
        z = model(torch.rand(2, 3, 8, 8))
    assert z.shape == (2, 32)
    assert "kNN top-1" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args,message",
    [
        (["--batch-size", "1"], "--batch-size must be >= 2"),
        (["--temperature", "-0.1"], "--temperature must be > 0"),
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--arch", "vgg"], "--arch must be one of"),
        (["--data", "/nonexistent/folder"], "no such file or folder"),
        (["--batch-size", "5000"], "larger than the"),
        (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "nonsense"], "--device"),
    ],
)
def test_bad_options_fail_cleanly_and_write_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    rc = main(args + ["--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (out / "checkpoint.pt").exists()


def test_corrupt_image_is_named(tmp_path, capsys):
    for split in ("train", "test"):
        for c in ("a", "b"):
            d = tmp_path / "data" / split / c
            d.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(d / f"{i}.png")
    (tmp_path / "data" / "train" / "b" / "2.png").write_bytes(b"GIF89a-but-not-really")
    rc = main(["--data", str(tmp_path / "data"), "--batch-size", "2", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "2.png" in err and "Remove or replace" in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_refuses_to_overwrite_a_finished_run(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"x")
    assert main(["--out", str(out)]) == 2
    assert "already holds a finished run" in capsys.readouterr().err


def test_unlabeled_folder_trains_without_the_knn_monitor(tmp_path, capsys):
    """A folder of images without train/test (the unsupervised use case): loss only, then export works."""
    rng = np.random.default_rng(0)
    data = tmp_path / "photos"
    for i in range(24):
        d = data / ("a" if i % 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(d / f"{i}.png")
    out = tmp_path / "run"
    rc = main(["--data", str(data), "--epochs", "2", "--eval-every", "1", "--batch-size", "8", "--input-size", "8",
               "--resize-size", "8", "--embedding-dim", "16", "--out", str(out)])
    assert rc == 0
    log = capsys.readouterr().out
    assert "no test/ split: training without the kNN monitor" in log and "24 train / 0 test images" in log
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert all("knn_top1" not in r for r in rows) and all(np.isfinite(r["loss"]) for r in rows[1:])
    assert (out / "checkpoint.pt").exists() and (out / "curves.png").stat().st_size > 1000
    from export.cli import main as export_main  # parity falls back to the training images

    assert export_main(["--checkpoint", str(out / "checkpoint.pt"), "--onnx", str(tmp_path / "m.onnx")]) == 0
    report = json.loads((tmp_path / "m.onnx.parity.json").read_text())
    assert report["images"] == f"{data}:train" and report["n_images"] == 24  # the checkpoint's own (unlabelled) data


def test_compiled_channels_last_run_matches_eager(tmp_path, capsys):
    """--compile --channels-last on the CPU (inductor): compile time reported apart, the warm-up step leaves
    no trace (weights, BatchNorm statistics, RNG), and the trained weights equal an eager run's within
    float tolerance."""
    common = ["--epochs", "1", "--max-steps-per-epoch", "2", "--batch-size", "16", "--input-size", "16",
              "--embedding-dim", "16", "--eval-every", "0", "--no-amp", "--seed", "3"]
    assert main([*common, "--no-compile", "--no-channels-last", "--out", str(tmp_path / "eager")]) == 0
    assert main([*common, "--compile", "--channels-last", "--out", str(tmp_path / "compiled")]) == 0
    assert "compiled in" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "compiled" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["compile_seconds"] > 0 and rows[-1]["images_per_s"] > 0
    ck = torch.load(tmp_path / "compiled" / "checkpoint.pt", weights_only=True)
    assert ck["compile_seconds"] == rows[0]["compile_seconds"]
    a = torch.load(tmp_path / "eager" / "checkpoint.pt", weights_only=True)["model"]
    b = ck["model"]
    assert a.keys() == b.keys()
    # measured: channels_last/inductor rounding moves conv1 by <= 2.3e-3 after 2 steps (tau = 0.1 and BatchNorm
    # over 16 views amplify it); one SGD step more or less moves it by 5e-2
    for k in a:
        torch.testing.assert_close(b[k].float(), a[k].float(), atol=1e-2, rtol=0, msg=k)
    # 2: no warm-up step
    assert torch.equal(b["backbone.bn1.num_batches_tracked"], a["backbone.bn1.num_batches_tracked"])


def test_progress_lines_reach_a_pipe_while_training_runs(tmp_path):
    """Batch jobs log to files: each progress line is flushed when printed, not when the process exits."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-m", "training", "--epochs", "3", "--max-steps-per-epoch", "4",
                             "--batch-size", "32", "--eval-every", "1", "--out", str(tmp_path / "run")],
                            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"})
    try:
        arrivals = [(time.monotonic(), line) for line in proc.stdout]
        assert proc.wait(timeout=300) == 0
    finally:
        proc.kill()
    assert arrivals[0][1].startswith("data digits") and arrivals[-1][1].startswith("done in")
    # 3 evaluations and 12 steps lie between them; a buffered stdout delivers all lines at exit, within milliseconds
    assert arrivals[-1][0] - arrivals[0][0] > 1.0, "progress lines arrived only at exit"


_TINY = ["--epochs", "2", "--max-steps-per-epoch", "2", "--batch-size", "16", "--input-size", "8", "--resize-size", "8",
         "--embedding-dim", "16", "--eval-every", "0"]


def test_a_diverged_loss_stops_with_one_line_and_keeps_the_last_good_state(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*_TINY, "--temperature", "1e-30", "--out", str(out)]) == 1  # exp(1/tau) overflows: the loss is NaN
    err = capsys.readouterr().err
    assert "loss became nan in epoch 1" in err and "--lr" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (out / "checkpoint.pt").exists()
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 0  # the random encoder's evaluation


def test_out_of_memory_names_the_batch_size(tmp_path, capsys, monkeypatch):
    import training.train as train_mod

    def oom(*_a, **_k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(train_mod.TrainStep, "__call__", oom)
    assert main([*_TINY, "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "out of" in err and "memory with --batch-size 16" in err and "lower --batch-size" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_run_folder_removes_stale_temporaries_and_writes_strict_json(tmp_path):
    """A kill -9 during an atomic write leaves .<name>.<random>.tmp; the next start removes only those, and says so."""
    from training.distributed import DistContext
    from training.run_folder import RunFolder

    run = tmp_path / "run"
    run.mkdir()
    stale = [run / ".last.pt.k2j3h4.tmp", run / ".checkpoint.pt.zz9.tmp", run / ".metrics.jsonl.tmp"]
    kept = [run / "last.pt", run / ".other.abc.tmp", run / "notes.tmp", run / "model.onnx"]
    for p in stale + kept:
        p.write_bytes(b"x")
    (run / ".last.pt.dir.tmp").mkdir()  # not a file: left alone
    lines = []
    folder = RunFolder(run, DistContext(), lines.append, t_begin=0.0, history=[{"epoch": 0, "knn_top1": 10.0}])
    folder.start({"epochs": 2, "augment": {"crop_scale": (0.2, 1.0)}, "time_limit": float("inf")})
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept) and (run / ".last.pt.dir.tmp").is_dir()
    assert len(lines) == 1 and "removed 3 temporary file(s)" in lines[0] and ".last.pt.k2j3h4.tmp" in lines[0]
    assert json.loads((run / "config.json").read_text()) == {"epochs": 2, "augment": {"crop_scale": [0.2, 1.0]},
                                                              "time_limit": None}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"epoch": 0, "knn_top1": 10.0}]
    lines.clear()
    RunFolder(run, DistContext(), lines.append, t_begin=0.0).start({})
    assert lines == []  # nothing stale the second time
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp") and p.name.startswith((".config", ".metrics"))]


def test_run_folder_commit_writes_last_pt_before_the_metrics_line(tmp_path):
    from training.distributed import DistContext
    from training.model import ModelConfig, build_encoder
    from training.run_folder import RunFolder

    cfg = ModelConfig(arch="resnet18", embedding_dim=8)
    model = build_encoder(cfg)
    folder = RunFolder(tmp_path, DistContext(), lambda *_: None, t_begin=0.0)
    folder.start({})
    seen = []

    def state():
        seen.append((tmp_path / "metrics.jsonl").read_text())  # metrics.jsonl not yet updated when last.pt is written
        return {"model": model, "model_cfg": cfg, "config": {}, "step": 7}

    folder.commit({"epoch": 1, "loss": 2.5}, 1, state)
    assert seen == [""] and folder.saved_epoch == 1
    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    assert saved["epoch"] == 1 and saved["step"] == 7 and saved["history"] == [{"epoch": 1, "loss": 2.5}]
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"epoch": 1, "loss": 2.5}
