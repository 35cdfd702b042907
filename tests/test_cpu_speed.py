"""CPU speed switches: ``auto`` from the CPU's flags, the timed trial and what it must leave alone.

* the auto choice from given CPU flags (injected: a written cpuinfo file or a
  flag set), both ways, and explicit flags winning over it;
* paper presets resolve to float32 on every device;
* the timed trial (:func:`training.step.choose_by_trial`) leaves weights, BN
  buffers, optimizer state and every RNG as they were: a step after it equals
  a step of a twin that never ran it, bit for bit; it times at most
  ``TRIAL_MAX_BATCH`` images per step;
* a short bf16 + channels-last CPU run learns (kNN after > before), and its
  checkpoint exports to ONNX (fp32) with the parity gate passing;
* the kNN monitor in bf16 gives the fp32 monitor's accuracy (within 1 point).
"""

from __future__ import annotations

import json

import pytest
import torch

from isfe_model.preprocess import PreprocessSpec
from training.config import TrainConfig, build_parser, config_from_args
from training.distributed import DistContext
from training.model import ModelConfig
from training.presets import PRESETS
from training.step import Speed, build_step, choose_by_trial, cpu_flags, native_bf16, resolve_speed

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
AMX = {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
NO_BF16 = {"sse4_2", "avx", "avx2", "fma", "avx512f"}  # e.g. an AMD EPYC Rome / Milan


def cfg_of(*argv: str) -> TrainConfig:
    cfg, state = config_from_args(build_parser().parse_args(list(argv)))
    assert state is None
    return cfg


def _cpuinfo(tmp_path, flags) -> str:
    p = tmp_path / "cpuinfo"
    p.write_text("processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: " + " ".join(sorted(flags)) + "\n\n")
    return str(p)


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    assert cpu_flags(_cpuinfo(tmp_path, AMX)) == frozenset(AMX)
    assert cpu_flags(tmp_path / "missing") == frozenset()
    assert native_bf16(AMX) and native_bf16({"avx512_bf16"}) and native_bf16({"amx_bf16"})
    assert not native_bf16(NO_BF16) and not native_bf16(set())


@pytest.mark.parametrize("flags", [AMX, {"avx512_bf16"}])
def test_auto_on_a_bf16_cpu_is_left_to_the_timed_trial(flags, tmp_path, monkeypatch):
    import training.step as step_mod

    monkeypatch.setattr(step_mod, "CPUINFO", _cpuinfo(tmp_path, flags))  # the default source, as a run reads it
    for speed in (resolve_speed(TrainConfig(), CPU, flags), resolve_speed(TrainConfig(), CPU)):
        assert speed.timed == ("amp", "channels_last")
        assert (speed.amp, speed.channels_last, speed.compile) == (False, False, False)  # until the trial
        assert "timed trial" in speed.note


def test_auto_on_a_cpu_without_bf16_is_fp32_and_untimed(tmp_path, monkeypatch):
    import training.step as step_mod

    monkeypatch.setattr(step_mod, "CPUINFO", _cpuinfo(tmp_path, NO_BF16))
    for speed in (resolve_speed(TrainConfig(), CPU, NO_BF16), resolve_speed(TrainConfig(), CPU)):
        assert (speed.amp, speed.channels_last, speed.timed) == (False, False, ())
        assert "neither amx_bf16 nor avx512_bf16" in speed.note
    # and build_step then runs no trial: the step is fp32, contiguous
    spec = PreprocessSpec(input_size=8, resize_size=8)
    speed = resolve_speed(TrainConfig(), CPU)
    step, _ = build_step(TrainConfig(batch_size=4, embedding_dim=8), ModelConfig(embedding_dim=8, preprocess=spec),
                         CPU, DistContext(), speed, log=pytest.fail)
    assert speed.trial_ms is None and not step.speed.amp
    assert step.model.backbone.conv1.weight.is_contiguous()


def test_auto_is_not_timed_under_deterministic_or_compile():
    det = resolve_speed(TrainConfig(deterministic=True), CPU, AMX)
    assert (det.amp, det.channels_last, det.timed) == (False, False, ())
    assert "--deterministic" in det.note
    comp = resolve_speed(TrainConfig(compile=True), CPU, AMX)
    assert (comp.amp, comp.channels_last, comp.compile, comp.timed) == (False, False, True, ())


def test_explicit_flags_win_on_every_device():
    for device in (CPU, CUDA):
        for flags in (AMX, NO_BF16):
            off = resolve_speed(cfg_of("--no-amp", "--no-channels-last"), device, flags)
            assert (off.amp, off.channels_last, off.timed) == (False, False, ())
            on = resolve_speed(cfg_of("--amp", "--channels-last"), device, flags)
            assert (on.amp, on.channels_last, on.timed) == (True, True, ())
    # one explicit, the other auto: only the other is timed
    half = resolve_speed(cfg_of("--amp"), CPU, AMX)
    assert half.amp and half.timed == ("channels_last",)
    # CUDA keeps its default: auto = on, never timed
    cuda = resolve_speed(TrainConfig(), CUDA, NO_BF16)
    assert (cuda.amp, cuda.channels_last, cuda.compile, cuda.timed) == (True, True, True, ())


@pytest.mark.parametrize("name", sorted(n for n in PRESETS if n.endswith("-paper")))
def test_paper_presets_resolve_to_fp32_on_every_device(name):
    """No bf16 autocast, and no trial that could pick it; the memory layout (channels_last) may still be timed:
    it changes the speed, not the precision."""
    cfg = cfg_of("--preset", name)
    for device in (CPU, CUDA):
        for flags in (AMX, NO_BF16):
            speed = resolve_speed(cfg, device, flags)
            assert speed.amp is False and "amp" not in speed.timed, (name, device, flags)


def _twin_steps(amp: bool | None = None):
    """Two identically seeded tiny TrainSteps (ResNet-18, 8x8, batch 8) and a uint8 batch."""
    cfg = TrainConfig(batch_size=8, embedding_dim=8, seed=5, amp=amp)
    mc = ModelConfig(embedding_dim=8, preprocess=PreprocessSpec(input_size=8, resize_size=10))
    steps = []
    for _ in range(2):
        torch.manual_seed(0)
        steps.append(build_step(cfg, mc, CPU, DistContext(), Speed(False, False, False))[0])
    batch = torch.randint(0, 256, (8, 10, 10, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    return steps, batch


def test_trial_picks_the_fastest_and_leaves_weights_buffers_optimizer_and_rng_untouched():
    (plain, tried), batch = _twin_steps()
    plain(batch, 0.1)  # both have momentum buffers and trained BN statistics before the trial
    tried(batch, 0.1)
    rng_before = torch.get_rng_state()
    gen_before = tried.augmenter.generator.get_state()
    tried.speed.timed = ("amp", "channels_last")
    lines = []
    speed = choose_by_trial(tried, batch, 0.1, rounds=2, budget_s=0.0, log=lines.append)
    assert speed is tried.speed and speed.timed == ()
    assert set(speed.trial_ms) == {"fp32", "bf16", "channels-last", "bf16+channels-last"}
    assert all(t > 0 for t in speed.trial_ms.values())
    # the choice is the fastest measured, unless it is not 5% faster than fp32
    fastest = min(speed.trial_ms, key=speed.trial_ms.get)
    label = {(False, False): "fp32", (True, False): "bf16", (False, True): "channels-last",
             (True, True): "bf16+channels-last"}[(speed.amp, speed.channels_last)]
    assert label == (fastest if speed.trial_ms[fastest] <= 0.95 * speed.trial_ms["fp32"] else "fp32")
    assert len(lines) == 1 and f"-> {label}" in lines[0] and "not counted in images/s" in speed.note
    assert tried.model.backbone.conv1.weight.is_contiguous(
        memory_format=torch.channels_last if speed.channels_last else torch.contiguous_format)
    # untouched: global and augmentation RNG, weights and BN buffers, momentum buffers
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert torch.equal(tried.augmenter.generator.get_state(), gen_before)
    a, b = plain.model.state_dict(), tried.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = plain.opt.state_dict()["state"], tried.opt.state_dict()["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i]["momentum_buffer"], sb[i]["momentum_buffer"]) for i in sa)
    assert all(p.grad is None for p in tried.model.parameters())
    # the next step of both, in the same numerics, is the same bit for bit
    tried.set_speed(False, False)
    plain(batch, 0.1)
    tried(batch, 0.1)
    a, b = plain.model.state_dict(), tried.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_trial_times_only_the_switch_left_to_it():
    (_, tried), batch = _twin_steps(amp=True)
    tried.speed.amp, tried.speed.timed = True, ("channels_last",)
    speed = choose_by_trial(tried, batch, 0.1, rounds=1)
    assert set(speed.trial_ms) == {"bf16", "bf16+channels-last"} and speed.amp


@pytest.mark.parametrize("batch, cap, timed", [(8, 4, 4), (8, 64, 8)])
def test_trial_times_at_most_trial_max_batch_images(monkeypatch, batch, cap, timed):
    """A big run's trial times a capped batch (minutes -> seconds at 512); the run itself keeps its batch."""
    import training.step as step_mod

    monkeypatch.setattr(step_mod, "TRIAL_MAX_BATCH", cap)
    seen = []
    real = step_mod.choose_by_trial
    monkeypatch.setattr(step_mod, "choose_by_trial", lambda step, b, lr, **kw: seen.append(b.shape) or real(
        step, b, lr, rounds=1, budget_s=0.0, **kw))
    cfg = TrainConfig(batch_size=batch, embedding_dim=8, seed=5)
    mc = ModelConfig(embedding_dim=8, preprocess=PreprocessSpec(input_size=8, resize_size=10))
    speed = Speed(False, False, False, timed=("amp", "channels_last"))
    step, _ = build_step(cfg, mc, CPU, DistContext(), speed)
    assert seen == [(timed, 10, 10, 3)]
    assert speed.trial_batch == timed and f"ms/step at batch {timed} " in speed.note
    assert step.batch_size == batch
    images = torch.randint(0, 256, (batch, 10, 10, 3), dtype=torch.uint8)
    assert torch.isfinite(step(images, 0.1))  # the run's own batch still trains after a smaller trial


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    """A short bf16 + channels-last run on the embedded digits (explicit flags: bf16 on any CPU)."""
    from training.train import main

    out = tmp_path_factory.mktemp("bf16") / "run"
    rc = main(["--epochs", "3", "--eval-every", "0", "--batch-size", "64", "--input-size", "8", "--resize-size", "8",
               "--embedding-dim", "32", "--amp", "--channels-last", "--seed", "1", "--out", str(out)])
    assert rc == 0
    return out


def test_bf16_cpu_run_learns_and_records_its_numerics(bf16_run):
    cfg = json.loads((bf16_run / "config.json").read_text())
    assert cfg["amp"] is True and cfg["channels_last"] is True and cfg["device"] == "cpu"
    rows = [json.loads(line) for line in (bf16_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 3]
    assert rows[-1]["knn_top1"] > rows[0]["knn_top1"], rows
    ck = torch.load(bf16_run / "checkpoint.pt", weights_only=True)
    assert all(v.dtype in (torch.float32, torch.int64) for v in ck["model"].values())  # weights stay float32


def test_bf16_checkpoint_exports_in_fp32_with_the_parity_gate_passing(bf16_run, tmp_path):
    from export.cli import main as export_main

    onnx_path = tmp_path / "m.onnx"
    assert export_main(["--checkpoint", str(bf16_run / "checkpoint.pt"), "--onnx", str(onnx_path)]) == 0
    report = json.loads((tmp_path / "m.onnx.parity.json").read_text())
    assert report["passed"] is True and report["n_images"] > 0
    import onnx

    graph = onnx.load(str(onnx_path)).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert not any(init.data_type == onnx.TensorProto.BFLOAT16 for init in graph.initializer)


def test_knn_monitor_in_bf16_matches_fp32(bf16_run):
    """The monitor follows the run's --amp: measured on the trained encoder, bf16 embeddings move kNN top-1
    by <= 1 point (README: CPU bf16)."""
    from training.data import load_split
    from training.evaluate import monitor_metrics
    from training.model import load_encoder

    model = load_encoder(bf16_run / "checkpoint.pt")
    train, test = load_split(None, "train", resize_size=8), load_split(None, "test", resize_size=8)
    fp32 = monitor_metrics(model, train, test, CPU, k=200, sigma=0.1, amp=False)
    bf16 = monitor_metrics(model, train, test, CPU, k=200, sigma=0.1, amp=True)
    assert abs(fp32["knn_top1"] - bf16["knn_top1"]) <= 1.0, (fp32, bf16)
    assert abs(fp32["knn_top5"] - bf16["knn_top5"]) <= 1.0, (fp32, bf16)

