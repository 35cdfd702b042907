"""Presets, option resolution, the learning-rate schedule and the ablation flags (no training)."""

from __future__ import annotations

import math

import pytest
import torch

from training.augment import AugmentConfig
from training.config import TrainConfig, UsageError, build_parser, config_from_args
from training.distributed import DistContext
from training.presets import PRESETS
from training.step import build_criterion, lr_at, resolve_speed, select_loss


def cfg_of(*argv: str) -> TrainConfig:
    cfg, state = config_from_args(build_parser().parse_args(list(argv)))
    assert state is None
    return cfg


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_is_a_valid_config(name):
    cfg = cfg_of("--preset", name)
    cfg.validate()
    AugmentConfig(**cfg.augment)


def test_defaults_quickstart_without_data_and_paper_recipe_with_data():
    q = cfg_of()
    assert (q.data, q.epochs, q.batch_size, q.eval_every) == (None, 6, 64, 2)
    assert tuple(q.augment["crop_scale"]) == (0.5, 1.0) and q.augment["flip"] is False
    p = cfg_of("--data", "some/folder")
    assert (p.data, p.epochs, p.batch_size, p.lr, p.schedule) == ("some/folder", 200, 128, 0.03, "step")


def test_cifar10_paper_is_the_papers_recipe():
    c = cfg_of("--preset", "cifar10-paper")
    assert (c.data, c.epochs, c.batch_size, c.lr, c.momentum, c.weight_decay) == ("cifar10", 200, 128, 0.03, 0.9, 5e-4)
    assert (c.schedule, c.warmup_epochs, c.temperature, c.neg_weight, c.detach_keys) == ("step", 0.0, 0.1, 1.0, True)
    assert (c.arch, c.embedding_dim, c.negatives) == ("resnet18", 128, "all")
    assert c.augment == AugmentConfig().to_dict()  # RandomResizedCrop(0.2, 1), jitter 0.4, gray 0.2, flip
    assert tuple(c.augment["crop_scale"]) == (0.2, 1.0) and c.augment["grayscale_p"] == 0.2


def test_cifar10_fast_scales_the_learning_rate_linearly_and_warms_up():
    f = cfg_of("--preset", "cifar10-fast")
    p = cfg_of("--preset", "cifar10-paper")
    assert f.batch_size > p.batch_size
    assert math.isclose(f.lr, p.lr * f.batch_size / p.batch_size)  # linear scaling rule
    assert f.schedule == "cosine" and f.warmup_epochs > 0
    assert f.augment == p.augment and f.temperature == p.temperature  # same method, faster recipe
    fast = resolve_speed(f, torch.device("cuda"))
    assert fast.amp and fast.channels_last and fast.compile  # bf16, channels_last, compiled on CUDA
    cpu = resolve_speed(f, torch.device("cpu"))
    assert not (cpu.amp or cpu.channels_last or cpu.compile)
    assert f.loss == "auto"  # fused Triton loss on CUDA


def test_command_line_overrides_the_preset_and_switches_speed_options():
    c = cfg_of("--preset", "cifar10-fast", "--epochs", "3", "--no-amp", "--compile", "--no-channels-last")
    assert c.epochs == 3 and c.batch_size == 512
    s = resolve_speed(c, torch.device("cuda"))
    assert (s.amp, s.compile, s.channels_last) == (False, True, False)


def test_unknown_preset_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown --preset 'nope'"):
        cfg_of("--preset", "nope")


@pytest.mark.parametrize(
    "flag,changes",
    [
        ("--no-crop", {"crop": False}),
        ("--no-color-jitter", {"color_jitter": False}),
        ("--no-grayscale", {"grayscale": False}),
        ("--no-flip", {"flip": False}),
        ("--no-augment", {"crop": False, "color_jitter": False, "grayscale": False, "flip": False}),
    ],
)
def test_table7_augmentation_ablations(flag, changes):
    c = cfg_of("--preset", "cifar10-paper", flag)
    expected = AugmentConfig().to_dict() | changes
    assert c.augment == expected


@pytest.mark.parametrize("mode", ["hard", "easy"])
def test_table8_negative_ablations_use_the_reference_loss(mode):
    c = cfg_of("--preset", "cifar10-paper", "--negatives", mode)
    assert c.negatives == mode
    backend, name = select_loss(c, torch.device("cpu"))
    assert backend == "reference" and name == f"reference-{mode}-negatives"
    criterion, _ = build_criterion(c, torch.device("cpu"), DistContext())
    assert (criterion.negatives, criterion.backend) == (mode, "reference")
    with pytest.raises(UsageError, match="reference loss only"):
        cfg_of("--negatives", mode, "--loss", "fused").validate()


def test_step_schedule_is_the_papers():
    c = TrainConfig(epochs=200, lr=0.03, schedule="step")
    assert lr_at(c, 0) == 0.03 and lr_at(c, 119.9) == 0.03
    assert math.isclose(lr_at(c, 120), 0.003) and math.isclose(lr_at(c, 160), 0.0003)


def test_warmup_then_cosine():
    c = TrainConfig(epochs=100, lr=0.12, schedule="cosine", warmup_epochs=5)
    steps = 10
    assert math.isclose(lr_at(c, 0, steps), 0.12 * (1 / steps) / 5)  # first step is not wasted at lr 0
    assert math.isclose(lr_at(c, 2.5 - 1 / steps, steps), 0.12 * 0.5)
    assert math.isclose(lr_at(c, 5, steps), 0.12)  # warm-up ends at the peak, cosine starts there
    assert math.isclose(lr_at(c, 52.5, steps), 0.06)
    assert lr_at(c, 100, steps) < 1e-12
    values = [lr_at(c, e / steps, steps) for e in range(100 * steps)]
    peak = values.index(max(values))
    assert all(a <= b for a, b in zip(values[:peak], values[1 : peak + 1]))
    assert all(a >= b for a, b in zip(values[peak:], values[peak + 1 :]))


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--warmup-epochs", "10", "--epochs", "5"], "--warmup-epochs"),
        (["--negatives", "some"], "--negatives must be one of"),
        (["--log-every", "0"], "--log-every"),
        (["--time-limit", "-1"], "--time-limit"),
        (["--workers", "0"], "--workers"),
    ],
)
def test_bad_new_options(argv, message):
    with pytest.raises(UsageError, match=message):
        cfg_of(*argv).validate()


# --------------------------------------------------------------------------- options declared once (training.config)


def test_every_option_is_generated_from_its_field():
    """One flag per TrainConfig field (augment: the ablation flags), help from the field, hidden developer option."""
    import dataclasses

    from training.config import flag_of

    ap = build_parser()
    flags = {s for a in ap._actions for s in a.option_strings}
    for f in dataclasses.fields(TrainConfig):
        if f.name != "augment":
            assert flag_of(f) in flags, f.name
    assert {"--crop-scale", "--no-crop", "--no-color-jitter", "--no-grayscale", "--no-flip", "--no-augment"} <= flags
    assert {"--no-amp", "--no-compile", "--no-channels-last", "--no-sync-bn", "--no-data-on-device"} <= flags
    text = ap.format_help()
    assert "--max-steps-per-epoch" not in text and "--full-gradient" in text and "--time-limit SECONDS" in text
    assert cfg_of("--max-steps-per-epoch", "3").max_steps_per_epoch == 3
    assert cfg_of("--full-gradient").detach_keys is False and cfg_of().detach_keys is True
    assert cfg_of("--deterministic").deterministic is True


def test_resumable_changes_are_the_declared_ones():
    from training.config import RESUMABLE_CHANGES

    assert RESUMABLE_CHANGES == {
        "epochs", "eval_every", "save_every", "log_every", "device", "loss", "amp", "channels_last", "compile",
        "data_on_device", "workers", "time_limit", "knn_k", "knn_sigma", "out", "deterministic",
    }


@pytest.mark.parametrize("flag,field_name", [("--schedule", "schedule"), ("--loss", "loss"), ("--arch", "arch"),
                                             ("--negatives", "negatives"), ("--positive", "positive"),
                                             ("--nn-features", "nn_features"), ("--train-split", "train_split")])
def test_every_choice_option_refuses_other_values_with_its_choices(flag, field_name):
    import dataclasses

    field = {f.name: f for f in dataclasses.fields(TrainConfig)}[field_name]
    choices = field.metadata["choices"]
    with pytest.raises(UsageError) as e:
        cfg_of(flag, "bogus").validate()
    assert str(e.value) == f"{flag} must be one of {', '.join(choices)}, got 'bogus'"
    for value in choices:
        if not (field_name == "negatives" and value != "all"):  # hard/easy: fine with the default --loss auto
            cfg_of(flag, value).validate()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--lr", "0"], "--lr must be > 0, got 0.0"),
        (["--neg-weight", "-1"], "--neg-weight must be >= 0, got -1.0"),
        (["--embedding-dim", "0"], "--embedding-dim must be >= 1, got 0"),
        (["--eval-every", "-1"], "--eval-every must be >= 0 (0 = only before and after training), got -1"),
        (["--knn-k", "0"], "--knn-k must be >= 1, got 0"),
        (["--knn-sigma", "0"], "--knn-sigma must be > 0, got 0.0"),
        (["--input-size", "4"], "--input-size must be >= 8, got 4"),
        (["--input-size", "32", "--resize-size", "16"], "--resize-size (16) must be >= --input-size (32)"),
        (["--save-every", "-2"], "--save-every must be >= 0 (0: at evaluations and at the end), got -2"),
        (["--max-steps-per-epoch", "0"], "--max-steps-per-epoch must be >= 1, got 0"),
        (["--time-limit", "0"], "--time-limit must be > 0 seconds, got 0.0"),
    ],
)
def test_bounds_name_the_option_and_the_value(argv, message):
    with pytest.raises(UsageError) as e:
        cfg_of(*argv).validate()
    assert str(e.value) == message


def test_options_left_unset_keep_the_preset_and_none_passes_optional_bounds():
    c = cfg_of("--preset", "cub200-paper")
    assert (c.input_size, c.resize_size, c.lr) == (227, 256, 0.001)
    TrainConfig(input_size=None, log_every=None, time_limit=None, max_steps_per_epoch=None).validate()
