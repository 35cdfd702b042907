"""The encoder: shapes, unit norm, stems, the input contract and checkpoints."""

from __future__ import annotations

import pytest
import torch

from isfe_model.preprocess import PreprocessSpec
from training.model import CheckpointError, ModelConfig, build_encoder, load_checkpoint, load_encoder, save_checkpoint


def small_cfg(**kw) -> ModelConfig:
    return ModelConfig(embedding_dim=kw.pop("embedding_dim", 32), preprocess=PreprocessSpec(input_size=16, resize_size=16), **kw)


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
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an ISFE checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    raw = torch.load(good, weights_only=True)
    raw["model_config"]["embedding_dim"] = 64  # weights no longer fit the declared architecture
    torch.save(raw, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="do not fit"):
        load_encoder(tmp_path / "mismatch.pt")
