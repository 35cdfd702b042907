"""The unseen-category protocol: backbones by name, pretrained weights, per-dataset Recall@K, presets, a short run."""

from __future__ import annotations

import json
import urllib.error

import numpy as np
import pytest
import torch
import torchvision

from isfe_model.preprocess import PreprocessSpec
from training.model import (
    ModelConfig,
    PretrainedError,
    build_encoder,
    load_encoder,
    load_pretrained,
    pretrained_preprocess,
    save_checkpoint,
)


def gcfg(size: int = 32, dim: int = 16) -> ModelConfig:
    return ModelConfig(arch="googlenet", embedding_dim=dim, preprocess=PreprocessSpec(size, size))


# --------------------------------------------------------------------------- backbones


def test_googlenet_embedding_on_pool5_at_227():
    m = build_encoder(ModelConfig(arch="googlenet", embedding_dim=128, preprocess=PreprocessSpec(227, 256))).eval()
    assert m.backbone.aux1 is None and m.backbone.aux2 is None and not m.backbone.transform_input
    assert isinstance(m.backbone.dropout, torch.nn.Identity) and m.head.in_features == 1024
    x = torch.rand(1, 3, 227, 227)
    with torch.no_grad():
        z, f = m(x), m.features(x)
    assert z.shape == (1, 128) and f.shape == (1, 1024)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(1))
    assert not m.cfg.cifar_stem


def test_googlenet_small_input_train_mode_and_checkpoint(tmp_path):
    cfg = gcfg()
    m = build_encoder(cfg).train()
    z = m(torch.rand(2, 3, 32, 32))  # train mode: a plain tensor, not GoogLeNetOutputs
    assert isinstance(z, torch.Tensor) and z.shape == (2, 16)
    z.sum().backward()
    path = save_checkpoint(tmp_path / "g.pt", m, cfg, {"data": None})
    loaded = load_encoder(path)
    assert loaded.cfg.arch == "googlenet"
    m.eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m(x))
    with pytest.raises(ValueError, match="googlenet has no CIFAR stem"):
        ModelConfig(arch="googlenet", cifar_stem=True)


def test_stem_threshold_covers_stl10():
    # STL-10, as the authors' ResNet
    assert build_encoder(ModelConfig(preprocess=PreprocessSpec(96, 96))).cfg.cifar_stem
    assert not build_encoder(ModelConfig(preprocess=PreprocessSpec(112, 128))).cfg.cifar_stem


# --------------------------------------------------------------------------- pretrained weights


@pytest.fixture(scope="module")
def tv_state() -> dict:
    """A state_dict in the layout of torchvision's ImageNet file (aux heads and fc included)."""
    torch.manual_seed(0)
    return torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True).state_dict()


def test_load_pretrained_googlenet_from_local_file(tmp_path, tv_state):
    state = tv_state
    path = tmp_path / "googlenet-1378be20.pth"
    torch.save(state, path)
    torch.manual_seed(1)
    m = build_encoder(gcfg())
    head = m.head.weight.detach().clone()
    msg = load_pretrained(m, str(path))
    assert "googlenet" in msg and str(path) in msg
    own = m.backbone.state_dict()
    for k, v in own.items():
        torch.testing.assert_close(v, state[k], msg=k)
    torch.testing.assert_close(m.head.weight, head)  # the embedding head keeps its initialisation
    # wrapped in {"state_dict": ...} with DDP prefixes: same result
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "wrapped.pth")
    m2 = build_encoder(gcfg())
    load_pretrained(m2, str(tmp_path / "wrapped.pth"))
    torch.testing.assert_close(m2.backbone.conv1.conv.weight, state["conv1.conv.weight"])


def test_load_pretrained_from_isfe_checkpoint(tmp_path):
    cfg = ModelConfig(arch="resnet18", embedding_dim=8, preprocess=PreprocessSpec(16, 16))
    torch.manual_seed(0)
    src = build_encoder(cfg)
    path = save_checkpoint(tmp_path / "c.pt", src, cfg, {})
    torch.manual_seed(1)
    dst = build_encoder(cfg)
    load_pretrained(dst, str(path))
    torch.testing.assert_close(dst.backbone.layer4[1].conv2.weight, src.backbone.layer4[1].conv2.weight)
    assert not torch.equal(dst.head.weight, src.head.weight)


def test_wrong_weight_files_give_clear_errors(tmp_path):
    m = build_encoder(gcfg())
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(PretrainedError, match=r"do not fit a googlenet backbone: \d+ missing .* unexpected"):
        load_pretrained(m, str(tmp_path / "resnet18.pth"))
    (tmp_path / "junk.pth").write_bytes(b"\x00not a torch file")
    with pytest.raises(PretrainedError, match="not a readable PyTorch weights file"):
        load_pretrained(m, str(tmp_path / "junk.pth"))
    torch.save({"a": 1, "b": "text"}, tmp_path / "notweights.pth")
    with pytest.raises(PretrainedError, match="does not hold a state_dict"):
        load_pretrained(m, str(tmp_path / "notweights.pth"))
    with pytest.raises(PretrainedError, match="no such file"):
        load_pretrained(m, str(tmp_path / "missing.pth"))
    # ImageNet ResNet weights into a CIFAR-stem ResNet: the conv1 shape, and the fix
    small = build_encoder(ModelConfig(arch="resnet18", embedding_dim=8, preprocess=PreprocessSpec(32, 32)))
    with pytest.raises(PretrainedError, match="conv1.weight has shape .*standard stem: use an input size above 96"):
        load_pretrained(small, str(tmp_path / "resnet18.pth"))


def test_imagenet_weights_through_torchvision_api(monkeypatch, tv_state):
    import torchvision.models._api as api

    state = tv_state
    seen = {}

    def fake_download(url, *a, **k):  # the hub cache / download step, without a network
        seen["url"] = url
        return state

    monkeypatch.setattr(api, "load_state_dict_from_url", fake_download)
    m = build_encoder(gcfg())
    assert "GoogLeNet_Weights.IMAGENET1K_V1" in load_pretrained(m, "imagenet")
    assert seen["url"] == torchvision.models.GoogLeNet_Weights.IMAGENET1K_V1.url
    torch.testing.assert_close(m.backbone.inception5b.branch1.conv.weight, state["inception5b.branch1.conv.weight"])

    def offline(url, *a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    with pytest.raises(PretrainedError) as e:
        load_pretrained(m, "imagenet")
    msg = str(e.value)
    assert "googlenet-1378be20.pth" in msg and "--pretrained PATH" in msg and "URLError" in msg


def test_pretrained_normalisation():
    spec = PreprocessSpec(227, 256)
    g = pretrained_preprocess("googlenet", spec)
    assert g.mean == (0.5, 0.5, 0.5) and g.std == (0.5, 0.5, 0.5) and g.input_size == 227
    # with transform_input off, (x - 0.5) / 0.5 is exactly what torchvision's transform_input feeds the weights
    tv = torchvision.models.googlenet(weights=None, aux_logits=False, transform_input=True, init_weights=False).eval()
    m = build_encoder(ModelConfig(arch="googlenet", embedding_dim=4, preprocess=g)).eval()
    m.backbone.load_state_dict({k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")})
    x = torch.rand(1, 3, 64, 64)
    mean, std = (torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1),
                 torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
    tv.fc = torch.nn.Identity()
    with torch.no_grad():
        torch.testing.assert_close(m.features(x), tv((x - mean) / std), rtol=1e-4, atol=1e-4)
    r = pretrained_preprocess("resnet50", PreprocessSpec(224, 256))
    assert r.mean == (0.485, 0.456, 0.406)


# --------------------------------------------------------------------------- Recall@K per dataset, unseen evaluation


def test_recall_ks_per_dataset(tmp_path):
    from training.evaluate import default_recall_ks

    for name, ks in {"cub200": (1, 2, 4, 8), "cars196": (1, 2, 4, 8), "sop": (1, 10, 100),
                     "stl10": (1, 2, 4, 8)}.items():
        d = tmp_path / name
        d.mkdir()
        (d / "dataset.json").write_text(json.dumps({"name": name}))
        assert default_recall_ks(str(d)) == ks
    (tmp_path / "custom").mkdir()
    (tmp_path / "custom" / "dataset.json").write_text(json.dumps({"name": "x", "recall_ks": [1, 5]}))
    assert default_recall_ks(str(tmp_path / "custom")) == (1, 5)
    assert default_recall_ks(None) == (1, 2, 4, 8) and default_recall_ks(str(tmp_path / "none")) == (1, 2, 4, 8)


def test_torch_kmeans_nmi_matches_sklearn_on_blobs():
    from training.evaluate import kmeans, nmi

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(12, 8)) * 10
    y = np.repeat(np.arange(12), 15)
    x = centres[y] + rng.normal(size=(len(y), 8))
    assert nmi(x, y, method="torch") == pytest.approx(1.0) == nmi(x, y, method="sklearn")
    noisy = centres[y] + 6 * rng.normal(size=(len(y), 8))
    assert nmi(noisy, y, method="torch") == pytest.approx(nmi(noisy, y, method="sklearn"), abs=0.08)
    labels = kmeans(torch.from_numpy(x), 12)
    assert labels.shape == (180,) and len(labels.unique()) == 12
    with pytest.raises(ValueError, match="1 <= k <= N"):
        kmeans(torch.from_numpy(x[:3]), 5)


# --------------------------------------------------------------------------- presets and short runs


def test_paper_presets():
    from training.config import _merge
    from training.presets import PRESETS

    cub = _merge(PRESETS["cub200-paper"], {})
    assert (cub.arch, cub.pretrained, cub.input_size, cub.resize_size) == ("googlenet", "imagenet", 227, 256)
    assert (cub.lr, cub.schedule, cub.batch_size, cub.temperature, cub.momentum) == (0.001, "step", 64, 0.1, 0.9)
    assert cub.positive == "nn-or-aug" and cub.embedding_dim == 128
    assert not cub.augment["color_jitter"] and not cub.augment["grayscale"] and cub.augment["flip"]
    # the crop is exactly 227 x 227 of the 256 x 256 image (then no resampling)
    from training.augment import AugmentConfig, sample_params

    p = sample_params(50, 256, 256, AugmentConfig.from_dict(cub.augment), torch.Generator().manual_seed(0))
    assert (p.crop_box[:, 2:] == 227).all() and p.crop_box[:, :2].max() <= 29 and p.crop_box[:, :2].min() >= 0
    for name in ("cars196-paper", "sop-paper"):
        c = _merge(PRESETS[name], {})
        assert c.arch == "googlenet" and c.pretrained == "imagenet" and c.lr == 0.001
    stl = _merge(PRESETS["stl10-paper"], {})
    assert (stl.arch, stl.pretrained, stl.input_size, stl.train_split) == ("resnet18", None, 96, "train+unlabeled")
    scratch = _merge(PRESETS["sop-scratch-paper"], {})
    assert scratch.arch == "resnet18" and scratch.pretrained is None


def make_images(root, classes: int, per_class: int, side: int = 12, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"class{c:02d}"
        d.mkdir(parents=True)
        colour = rng.integers(0, 256, 3)
        for k in range(per_class):
            img = np.clip(colour + rng.integers(-40, 40, (side, side, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(d / f"{k}.png")


TINY = ["--input-size", "8", "--resize-size", "12", "--embedding-dim", "8", "--batch-size", "8", "--device", "cpu",
        "--no-compile", "--no-amp"]


def test_unseen_run_with_nearest_neighbour_positives(tmp_path, monkeypatch, capsys):
    from training import train as T
    from training.data import load_split
    from training.evaluate import main as evaluate_main
    from training.positives import PositiveSampler
    from training.prepare import main as prepare_main

    monkeypatch.setenv("ISFE_CACHE", str(tmp_path / "cache"))
    make_images(tmp_path / "photos", 6, 8)
    data = tmp_path / "data"
    assert prepare_main(["split-classes", str(tmp_path / "photos"), "--out", str(data)]) == 0

    calls = []
    orig_call, orig_pos = T.TrainStep.__call__, PositiveSampler.positives

    def spy_positives(self, anchors, gen=None):
        out = orig_pos(self, anchors, gen)
        calls.append({"anchors": anchors.clone(), "pos": out.clone(), "nn": self.nn_index.clone()})
        return out

    def spy_call(self, batch, lr, second=None):
        calls[-1].update(batch=batch.clone(), second=second.clone())
        return orig_call(self, batch, lr, second)

    monkeypatch.setattr(PositiveSampler, "positives", spy_positives)
    monkeypatch.setattr(T.TrainStep, "__call__", spy_call)
    out = tmp_path / "run"
    assert T.main(TINY + ["--data", str(data), "--epochs", "2", "--eval-every", "1", "--positive", "nn-or-aug",
                          "--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert "neighbour bank: 24 images, 8-d embedding features" in log and "R@1" in log
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2] and all("recall@1" in r and "knn_top1" not in r for r in rows)

    images = torch.from_numpy(np.array(load_split(str(data), "train", 12).images))
    assert len(calls) == 2 * (24 // 8)
    took_nn = took_self = 0
    for c in calls:
        torch.testing.assert_close(c["batch"], images[c["anchors"]])  # view 1: the anchors
        torch.testing.assert_close(c["second"], images[c["pos"]])  # view 2: the chosen positives' images
        is_nn = c["pos"] == c["nn"][c["anchors"]]
        assert (is_nn | (c["pos"] == c["anchors"])).all() and (c["nn"] != torch.arange(24)).all()
        took_nn += int(is_nn.sum())
        took_self += int((c["pos"] == c["anchors"]).sum())
    assert took_nn > 0 and took_self > 0  # both branches were taken

    assert evaluate_main(["--checkpoint", str(out), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert ("kNN: skipped (train and test classes are disjoint)" in text and "R@8" in text
            and "unseen categories" in text)


def test_pretrained_option_in_training(tmp_path, monkeypatch, capsys):
    from training.train import main

    monkeypatch.setenv("ISFE_CACHE", str(tmp_path / "cache"))
    make_images(tmp_path / "photos", 4, 6)
    from training.prepare import main as prepare_main

    assert prepare_main(["split-classes", str(tmp_path / "photos"), "--out", str(tmp_path / "data")]) == 0
    common = TINY + ["--data", str(tmp_path / "data"), "--epochs", "1", "--eval-every", "0"]
    assert main(common + ["--out", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    assert main(common + ["--pretrained", str(tmp_path / "a" / "checkpoint.pt"), "--out", str(tmp_path / "b")]) == 0
    assert (f"loaded pretrained resnet18 backbone weights from {tmp_path / 'a' / 'checkpoint.pt'}"
            in capsys.readouterr().out)
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert cfg["pretrained"] == str(tmp_path / "a" / "checkpoint.pt")
    assert cfg["model"]["preprocess"]["mean"] == [0.485, 0.456, 0.406]  # the ImageNet weights' normalisation
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "r34.pth")
    for bad, msg in [(str(tmp_path / "missing.pth"), "no such file"),
                     (str(tmp_path / "r34.pth"), "do not fit a resnet18")]:
        assert main(common + ["--pretrained", bad, "--out", str(tmp_path / "c")]) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(common + ["--positive", "neighbours", "--out", str(tmp_path / "d")]) == 2
    assert "--positive must be one of aug, nn-or-aug" in capsys.readouterr().err


def test_stl10_train_plus_unlabeled(tmp_path, monkeypatch, capsys):
    from tests.test_prepare import fake_stl10
    from training.prepare import main as prepare_main
    from training.train import main

    monkeypatch.setenv("ISFE_CACHE", str(tmp_path / "cache"))
    fake_stl10(tmp_path / "root", n_train=10, n_test=10, n_unlabeled=6)
    assert prepare_main(["stl10", str(tmp_path / "root"), "--out", str(tmp_path / "stl")]) == 0
    args = ["--data", str(tmp_path / "stl"), "--input-size", "8", "--resize-size", "8", "--embedding-dim", "8",
            "--batch-size", "8", "--epochs", "1", "--device", "cpu", "--no-compile", "--no-amp"]
    assert main(args + ["--train-split", "train+unlabeled", "--out", str(tmp_path / "r")]) == 0
    log = capsys.readouterr().out
    assert "16 train / 10 test images" in log and "kNN top-1" in log  # 10 labelled + 6 unlabeled; kNN on the labelled
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["train_split"] == "train+unlabeled" and cfg["steps_per_epoch"] == 2
    assert main(
        args + ["--train-split", "train+unlabeled", "--data", str(tmp_path / "root"), "--out", str(tmp_path / "x")]
    ) == 2
