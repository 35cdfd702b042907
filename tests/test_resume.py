"""Exact resume (``--resume``), ``--time-limit``, the host-memory batch loader and their bad inputs.

All runs use a tiny generated image folder (64 train / 16 test 8x8 images),
``--batch-size 32 --input-size 8 --resize-size 8 --embedding-dim 16`` and the
developer option ``--max-steps-per-epoch 2``, on the CPU with
``--deterministic``.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers_models import make_split_folder
from training.train import main


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    make_split_folder(root)  # root/data/{train,test}/{a,b}/, seeded
    old = os.environ.get("ISFE_CACHE")
    os.environ["ISFE_CACHE"] = str(root / "cache")
    yield root / "data"
    if old is None:
        os.environ.pop("ISFE_CACHE", None)
    else:
        os.environ["ISFE_CACHE"] = old


def _args(data_dir, out, *extra):
    return ["--data", str(data_dir), "--batch-size", "32", "--input-size", "8", "--resize-size", "8",
            "--embedding-dim", "16", "--max-steps-per-epoch", "2", "--eval-every", "0", "--seed", "3",
            "--knn-k", "10", "--deterministic", "--out", str(out), *extra]


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


def _assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory):
    """Two epochs without interruption (the reference for every resumed variant)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert main(_args(data_dir, out, "--epochs", "2")) == 0
    return out


def test_one_epoch_then_resume_to_two_is_bitwise_equal(data_dir, straight, tmp_path):
    out = tmp_path / "run"
    assert main(_args(data_dir, out, "--epochs", "1")) == 0
    first = _weights(out / "checkpoint.pt")
    assert main(["--resume", str(out), "--epochs", "2"]) == 0
    _assert_bitwise_equal(_weights(straight / "checkpoint.pt"), _weights(out / "checkpoint.pt"))
    assert any(not torch.equal(first[k], _weights(out / "checkpoint.pt")[k]) for k in first)  # it did train on
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    state = torch.load(out / "last.pt", weights_only=True)  # plain tensors/lists: weights_only works
    assert state["epoch"] == 2 and state["step"] == 4
    assert set(state["rng"]) >= {"python", "numpy", "torch", "cuda", "generators"}
    assert state["optimizer"]["state"], "momentum buffers are saved"


def test_time_limit_stops_saves_and_resumes_exactly(data_dir, straight, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(data_dir, out, "--epochs", "2", "--time-limit", "0.001")) == 0
    assert "time limit" in capsys.readouterr().out
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 1 and "time limit" in ck["stopped_early"]
    assert main(["--resume", str(out)]) == 0  # --epochs 2 comes from the run's own config
    _assert_bitwise_equal(_weights(straight / "checkpoint.pt"), _weights(out / "checkpoint.pt"))


def test_host_memory_loader_gives_the_same_training(data_dir, straight, tmp_path):
    """The prefetching host loader (large datasets) is a twin of the on-device batches."""
    out = tmp_path / "run"
    assert main(_args(data_dir, out, "--epochs", "2", "--no-data-on-device", "--workers", "2")) == 0
    assert json.loads((out / "config.json").read_text())["data_on_device"] is False
    _assert_bitwise_equal(_weights(straight / "checkpoint.pt"), _weights(out / "checkpoint.pt"))


@pytest.fixture()
def unfinished(straight, tmp_path):
    """A copy of the straight run as if it had stopped after writing last.pt."""
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    (run / "checkpoint.pt").unlink()
    return run


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage"])
def test_corrupt_last_pt_is_a_clear_error_not_a_restart(unfinished, capsys, damage):
    path = unfinished / "last.pt"
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "empty": b"", "garbage": b"not a checkpoint" * 10}[damage])
    metrics = (unfinished / "metrics.jsonl").read_text()
    assert main(["--resume", str(unfinished), "--epochs", "3"]) == 2
    err = _one_line_error(capsys)
    assert "cannot resume" in err and ("truncated or corrupt" in err or "empty" in err or "not a PyTorch file" in err)
    assert not (unfinished / "checkpoint.pt").exists()
    assert (unfinished / "metrics.jsonl").read_text() == metrics  # nothing was restarted or rewritten


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--batch-size", "16"], "--batch-size 16 (the run has 32)"),
        (["--arch", "resnet34"], "--arch resnet34 (the run has resnet18)"),
        (["--no-flip"], "augmentation"),
        (["--preset", "quickstart"], "--preset cannot be combined with --resume"),
    ],
)
def test_incompatible_resume_options_are_refused(unfinished, capsys, extra, message):
    assert main(["--resume", str(unfinished), *extra]) == 2
    assert message in _one_line_error(capsys)


def test_resume_refusals(straight, unfinished, tmp_path, capsys):
    assert main(["--resume", str(straight), "--epochs", "2"]) == 2  # finished, nothing more to do
    assert "already finished 2 epochs" in _one_line_error(capsys)
    assert main(["--resume", str(tmp_path / "nowhere")]) == 2
    assert "no such run folder" in _one_line_error(capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--resume", str(empty)]) == 2
    assert "no last.pt" in _one_line_error(capsys)
    assert main(["--out", str(unfinished)]) == 2  # a new run must not overwrite an unfinished one
    assert "--resume" in _one_line_error(capsys)


@pytest.mark.gpu
def test_cuda_fast_path_resumes_and_host_loader_matches(data_dir, tmp_path):
    """On CUDA (bf16, channels_last, fused loss; --no-compile to stay short): resume and the pinned host loader."""
    fast = ["--device", "cuda", "--no-compile"]
    straight_run = tmp_path / "straight"
    assert main(_args(data_dir, straight_run, "--epochs", "2", *fast)) == 0
    cfg = json.loads((straight_run / "config.json").read_text())
    assert cfg["amp"] and cfg["channels_last"] and cfg["loss"] == "fused" and cfg["data_on_device"]
    resumed = tmp_path / "resumed"
    assert main(_args(data_dir, resumed, "--epochs", "1", *fast)) == 0
    assert main(["--resume", str(resumed), "--epochs", "2"]) == 0
    host = tmp_path / "host"
    assert main(_args(data_dir, host, "--epochs", "2", "--no-data-on-device", *fast)) == 0
    ref = _weights(straight_run / "checkpoint.pt")
    for run in (resumed, host):
        got = _weights(run / "checkpoint.pt")
        for k in ref:
            assert torch.allclose(got[k].float(), ref[k].float(), rtol=1e-5, atol=1e-6), (run.name, k)


def test_resume_on_changed_data_warns(data_dir, tmp_path, capsys):
    """Resuming after the training folder changed works, but says the continuation is not the original run's."""
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    out = tmp_path / "run"
    assert main(_args(data, out, "--epochs", "1")) == 0
    capsys.readouterr()
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 90 + i, np.uint8)).save(data / "train" / "a" / f"new{i}.png")
    assert main(["--resume", str(out), "--epochs", "2"]) == 0
    assert "now has 68 training images, the run started with 64" in capsys.readouterr().out


def test_run_result_summarises_a_run_folder(straight, tmp_path, capsys):
    """benchmarks/run_result.py: every number it writes comes from the run folder."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "run_result.py"
    spec = importlib.util.spec_from_file_location("run_result", path)
    run_result = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_result)
    out = tmp_path / "res" / "r.json"
    assert run_result.main([str(straight), "--out", str(out), "--preset", "test"]) == 0
    res = json.loads(out.read_text())
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert res["metrics"] == rows and res["preset"] == "test" and res["device"].startswith("cpu-")
    assert res["epochs_done"] == res["epochs_planned"] == 2 and res["finished"] and res["stopped_early"] is None
    assert res["final_knn_top1"] == [r for r in rows if "knn_top1" in r][-1]["knn_top1"]
    assert res["final_loss"] == rows[-1]["loss"] and len(res["steady_images_per_s"]) == len(rows) - 1
    assert res["settings"]["batch_size"] == 32
    assert run_result.main([str(tmp_path), "--out", str(tmp_path / "x.json")]) == 2
    assert "not a training run folder" in capsys.readouterr().err and not (tmp_path / "x.json").exists()


def test_resume_removes_temporaries_a_killed_write_left(unfinished, capsys):
    """kill -9 while last.pt / checkpoint.pt were being written leaves .<name>.<random>.tmp; resuming cleans them."""
    stale = [unfinished / ".last.pt.a1b2c3d4.tmp", unfinished / ".checkpoint.pt.e5f6.tmp"]
    for p in stale:
        p.write_bytes(b"half a checkpoint")
    other = unfinished / ".notes.tmp"
    other.write_bytes(b"not ours")
    assert main(["--resume", str(unfinished)]) == 0
    out = capsys.readouterr().out
    assert "removed 2 temporary file(s)" in out and ".last.pt.a1b2c3d4.tmp" in out
    assert not any(p.exists() for p in stale) and other.exists() and (unfinished / "checkpoint.pt").exists()
