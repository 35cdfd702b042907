"""The encoder: shapes, unit norm, stems, the input contract, initialisation and checkpoints."""

from __future__ import annotations

import pytest
import torch
import torchvision

from isfe_model.preprocess import PreprocessSpec
from training.model import (
    INITS,
    CheckpointError,
    ModelConfig,
    build_encoder,
    load_checkpoint,
    load_encoder,
    load_pretrained,
    save_checkpoint,
)


def small_cfg(**kw) -> ModelConfig:
    return ModelConfig(
        embedding_dim=kw.pop("embedding_dim", 32), preprocess=PreprocessSpec(input_size=16, resize_size=16), **kw
    )


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_shapes_and_unit_norm(arch):
    m = build_encoder(small_cfg(arch=arch)).eval()
    with torch.no_grad():
        z = m(torch.rand(3, 3, 16, 16))
    assert z.shape == (3, 32) and z.dtype == torch.float32
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))


def test_stems_follow_input_size():
    cifar = build_encoder(ModelConfig(preprocess=PreprocessSpec(32, 32)))
    assert cifar.cfg.cifar_stem and cifar.backbone.conv1.kernel_size == (3, 3)
    assert isinstance(cifar.backbone.maxpool, torch.nn.Identity)
    big = build_encoder(ModelConfig(preprocess=PreprocessSpec(224, 256)))
    assert not big.cfg.cifar_stem and big.backbone.conv1.kernel_size == (7, 7)


def test_normalisation_is_inside_the_model():
    m = build_encoder(small_cfg()).eval()
    x = torch.rand(2, 3, 16, 16)
    mean = torch.tensor(m.cfg.preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(m.cfg.preprocess.std).view(1, 3, 1, 1)
    with torch.no_grad():
        manual = torch.nn.functional.normalize(m.head(m.backbone((x - mean) / std)), dim=1)
        torch.testing.assert_close(m(x), manual)


def test_bf16_autocast_output_is_fp32_unit():
    m = build_encoder(small_cfg())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = m(torch.rand(2, 3, 16, 16))
    assert z.dtype == torch.float32
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2), atol=1e-5, rtol=0)


def test_checkpoint_round_trip_weights_only(tmp_path):
    cfg = small_cfg()
    m = build_encoder(cfg).eval()
    path = save_checkpoint(tmp_path / "run" / "checkpoint.pt", m, cfg, {"lr": 0.03})
    raw = torch.load(path, weights_only=True)
    assert raw["model_config"]["preprocess"]["input_size"] == 16
    loaded = load_encoder(tmp_path / "run")  # a run folder works too
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m(x))
    assert len(loaded.checkpoint_sha256) == 64 and not loaded.training
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["checkpoint.pt"]  # no temp files left


class _Opaque:
    """Any class: a checkpoint that pickles one cannot be read with weights_only=True."""


def test_bad_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(tmp_path / "empty.pt")
    cfg = small_cfg()
    good = save_checkpoint(tmp_path / "good.pt", build_encoder(cfg), cfg, {})
    data = good.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "cut.pt")
    (tmp_path / "image.pt").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)  # e.g. a mixed-up file name
    with pytest.raises(CheckpointError, match=r"image\.pt is a PNG image; pass a checkpoint\.pt written by"):
        load_checkpoint(tmp_path / "image.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint\n" * 10)
    with pytest.raises(CheckpointError, match=r"not a PyTorch file \(neither the zip nor the pickle format"):
        load_checkpoint(tmp_path / "text.pt")
    # a pickled object: torch's weights-only load refuses it and suggests weights_only=False
    torch.save({"model": _Opaque()}, tmp_path / "objects.pt")
    with pytest.raises(CheckpointError, match="holds Python objects that a weights-only load refuses") as ei:
        load_checkpoint(tmp_path / "objects.pt")
    assert "weights_only" not in str(ei.value) and "\x1b" not in str(ei.value)  # never torch's unsafe advice
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an ISFE checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    raw = torch.load(good, weights_only=True)
    raw["model_config"]["embedding_dim"] = 64  # weights no longer fit the declared architecture
    torch.save(raw, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="do not fit"):
        load_encoder(tmp_path / "mismatch.pt")


# --------------------------------------------------------------------------- initialisation (ModelConfig.init)


def cifar_cfg(init: str, arch: str = "resnet18") -> ModelConfig:
    return ModelConfig(arch=arch, embedding_dim=16, preprocess=PreprocessSpec(input_size=32, resize_size=32), init=init)


def _fan(w: torch.Tensor) -> tuple[int, int]:
    """(fan_in, fan_out) of a conv [C_out, C_in, kh, kw] or linear [C_out, C_in] weight."""
    receptive = int(w[0, 0].numel())
    return w.shape[1] * receptive, w.shape[0] * receptive


def _kurtosis(w: torch.Tensor) -> float:
    x = w.double().flatten()
    x = x - x.mean()
    return float((x ** 4).mean() / (x ** 2).mean() ** 2)


def _check_uniform(name: str, w: torch.Tensor, bound: float) -> None:
    """w ~ U(-bound, bound): max|w| within and close to the bound, std bound/sqrt(3) within sampling error."""
    n = w.numel()
    top = float(w.abs().max())
    assert top <= bound * (1 + 1e-6), (name, top, bound)
    assert top >= bound * (1 - 20.0 / n), (name, top, bound)  # P(max|w| < b(1 - 20/n)) ~ exp(-20)
    rel = 6 * (0.2 / n) ** 0.5  # 6 standard errors of the sample std of a uniform (kurtosis 1.8)
    assert abs(float(w.double().std()) / (bound / 3 ** 0.5) - 1) < rel, (name, float(w.std()), bound)
    assert abs(float(w.double().mean())) < 6 * bound / (3 * n) ** 0.5, name


def _check_normal(name: str, w: torch.Tensor, std: float) -> None:
    n = w.numel()
    rel = 6 * (1 / (2 * n)) ** 0.5  # 6 standard errors of the sample std of a normal
    assert abs(float(w.double().std()) / std - 1) < rel, (name, float(w.std()), std)
    assert abs(float(w.double().mean())) < 6 * std / n ** 0.5, name
    if n >= 8192:  # normal (kurtosis 3), not uniform (1.8)
        assert abs(_kurtosis(w) - 3) < 0.5, (name, _kurtosis(w))


def _layers(net: torch.nn.Module, kind):
    return [(n, m) for n, m in net.backbone.named_modules() if isinstance(m, kind)]


def test_init_field_default_and_validation():
    assert ModelConfig().init == "torchvision" and ModelConfig().to_dict()["init"] == "torchvision"
    assert INITS == ("torchvision", "authors")
    with pytest.raises(ValueError, match="unknown --init 'kaiming'; choose one of torchvision, authors"):
        ModelConfig(init="kaiming")
    legacy = ModelConfig().to_dict()
    del legacy["init"]  # a checkpoint from before the field
    assert ModelConfig.from_dict(legacy).init == "torchvision"


def test_torchvision_init_is_the_plain_torchvision_construction():
    """init="torchvision" builds exactly today's encoder: same seed -> bit-identical weights to a hand-made twin."""
    torch.manual_seed(3)
    ours = build_encoder(cifar_cfg("torchvision"))
    torch.manual_seed(3)
    ref = torchvision.models.resnet18(weights=None)
    ref.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    ref.maxpool, ref.fc = torch.nn.Identity(), torch.nn.Identity()
    head = torch.nn.Linear(512, 16)
    expected = {**{f"backbone.{k}": v for k, v in ref.state_dict().items()},
                **{f"head.{k}": v for k, v in head.state_dict().items()}}
    got = ours.state_dict()
    assert list(got) == list(expected)
    for k in got:
        assert torch.equal(got[k], expected[k]), k


def test_authors_init_matches_pytorch_defaults():
    """Every conv/linear weight U(-b, b), b = 1/sqrt(fan_in) (kaiming_uniform_(a=sqrt(5))), as a fresh nn.Conv2d."""
    torch.manual_seed(0)
    net = build_encoder(cifar_cfg("authors"))
    convs = _layers(net, torch.nn.Conv2d)
    assert len(convs) == 20  # stem + 16 block convs + 3 shortcut convs
    for name, m in convs:
        fan_in, _ = _fan(m.weight)
        _check_uniform(name, m.weight.detach(), 1 / fan_in ** 0.5)
        fresh = torch.nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, bias=False)
        # the same distribution as PyTorch's own default: same bound, same std within sampling error
        assert float(fresh.weight.detach().abs().max()) <= 1 / fan_in ** 0.5 * (1 + 1e-6)
        _check_uniform(f"fresh {name}", fresh.weight.detach(), 1 / fan_in ** 0.5)
        assert (abs(float(fresh.weight.detach().std()) / float(m.weight.detach().std()) - 1)
                < 12 * (0.2 / m.weight.numel()) ** 0.5)
    for name, m in _layers(net, torch.nn.BatchNorm2d):
        assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias)), name
    fan_in, _ = _fan(net.head.weight)  # the head: PyTorch's nn.Linear default under both options
    _check_uniform("head", net.head.weight.detach(), 1 / fan_in ** 0.5)
    _check_uniform("head.bias", net.head.bias.detach(), 1 / fan_in ** 0.5)


def test_torchvision_init_is_kaiming_normal_fan_out():
    torch.manual_seed(0)
    net = build_encoder(cifar_cfg("torchvision"))
    for name, m in _layers(net, torch.nn.Conv2d):
        fan_in, fan_out = _fan(m.weight)
        if name == "conv1":  # the CIFAR stem replaces torchvision's 7x7 conv after construction: PyTorch's default
            _check_uniform(name, m.weight.detach(), 1 / fan_in ** 0.5)
        else:
            _check_normal(name, m.weight.detach(), (2 / fan_out) ** 0.5)
    for name, m in _layers(net, torch.nn.BatchNorm2d):
        assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias)), name
    big = build_encoder(ModelConfig(embedding_dim=16, preprocess=PreprocessSpec(64, 64), cifar_stem=False))
    fan_in, fan_out = _fan(big.backbone.conv1.weight)  # the ImageNet stem is torchvision's own: kaiming normal too
    _check_normal("imagenet conv1", big.backbone.conv1.weight.detach(), (2 / fan_out) ** 0.5)


def test_conv_std_ratio_is_about_sqrt6():
    """A 3x3 conv with 64 -> 64 channels: sqrt(2/fan_out) / (1/sqrt(3 fan_in)) = sqrt(6) ~ 2.45."""
    torch.manual_seed(1)
    tv = build_encoder(cifar_cfg("torchvision")).backbone.layer1[0].conv1.weight
    au = build_encoder(cifar_cfg("authors")).backbone.layer1[0].conv1.weight
    assert tv.shape == au.shape == (64, 64, 3, 3)
    ratio = float(tv.detach().std() / au.detach().std())
    assert abs(ratio - 6 ** 0.5) < 0.05, ratio


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "googlenet"])
@pytest.mark.parametrize("init", INITS)
def test_builds_and_runs_with_each_init(arch, init):
    size = 32 if arch != "googlenet" else 64
    cfg = ModelConfig(arch=arch, embedding_dim=16, preprocess=PreprocessSpec(size, size), init=init)
    m = build_encoder(cfg).eval()
    with torch.no_grad():
        z = m(torch.rand(2, 3, size, size))
    assert z.shape == (2, 16) and torch.isfinite(z).all()
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2))
    if init == "authors":  # PyTorch defaults in every conv of the backbone, for any architecture
        for name, layer in _layers(m, torch.nn.Conv2d)[:6]:
            _check_uniform(name, layer.weight.detach(), 1 / _fan(layer.weight)[0] ** 0.5)


def test_checkpoint_keeps_init_and_loading_does_not_depend_on_it(tmp_path):
    cfg = small_cfg(init="authors")
    m = build_encoder(cfg).eval()
    path = save_checkpoint(tmp_path / "a.pt", m, cfg, {})
    raw = torch.load(path, weights_only=True)
    assert raw["model_config"]["init"] == "authors"
    loaded = load_encoder(path)
    assert loaded.cfg.init == "authors"
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m(x), rtol=0, atol=0)
    for value in (None, "torchvision"):  # without the field (older checkpoints) or another value: the same weights
        other = dict(raw, model_config={k: v for k, v in raw["model_config"].items() if k != "init"})
        if value:
            other["model_config"]["init"] = value
        torch.save(other, tmp_path / "b.pt")
        again = load_encoder(tmp_path / "b.pt")
        assert again.cfg.init == "torchvision"
        with torch.no_grad():
            torch.testing.assert_close(again(x), m(x), rtol=0, atol=0)


def test_pretrained_backbone_is_not_reinitialised(tmp_path):
    """--pretrained overwrites the whole backbone under either init; only the new head keeps its (default) init."""
    src = build_encoder(small_cfg()).eval()
    torch.save(src.backbone.state_dict(), tmp_path / "weights.pth")
    net = build_encoder(small_cfg(init="authors"))
    load_pretrained(net, tmp_path / "weights.pth")
    for k, v in src.backbone.state_dict().items():
        assert torch.equal(net.backbone.state_dict()[k], v), k
    fan_in, _ = _fan(net.head.weight)
    _check_uniform("head", net.head.weight.detach(), 1 / fan_in ** 0.5)
