"""Linear probe (torch L-BFGS logistic regression) against scikit-learn, and its command-line plumbing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from training.evaluate import fit_logistic, linear_probe, main


def blobs(n_per: int, d: int, classes: int, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, d)) * 2
    y = np.repeat(np.arange(classes), n_per)
    x = centres[y] + spread * rng.normal(size=(len(y), d))
    return x, y


@pytest.mark.parametrize("c", [0.05, 1.0])
def test_fit_logistic_matches_sklearn(c):
    from sklearn.linear_model import LogisticRegression

    x, y = blobs(40, 6, 4, 2.0, 0)  # overlapping classes: a proper optimisation problem
    ref = LogisticRegression(C=c, tol=1e-10, max_iter=10_000).fit(x, y)
    w, b = fit_logistic(torch.from_numpy(x), torch.from_numpy(y), 4, c=c, max_iter=2000, tol=1e-10)
    np.testing.assert_allclose(w.numpy(), ref.coef_, rtol=2e-3, atol=2e-4)
    # the bias is not penalised: softmax is invariant to a common shift, compare centred biases
    np.testing.assert_allclose(
        b.numpy() - b.numpy().mean(), ref.intercept_ - ref.intercept_.mean(), rtol=2e-3, atol=2e-4
    )
    xt, _ = blobs(30, 6, 4, 2.0, 1)
    ours = (torch.from_numpy(xt) @ w.t() + b).argmax(1).numpy()
    assert (ours == ref.predict(xt)).mean() >= 0.99


def test_linear_probe_accuracy_equals_sklearn_on_standardised_features():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    xtr, ytr = blobs(50, 8, 5, 1.5, 2)
    xte, yte = blobs(40, 8, 5, 1.5, 2)  # same centres (same seed), new noise below
    xte = xte + np.random.default_rng(3).normal(scale=1.5, size=xte.shape)
    res = linear_probe(
        torch.from_numpy(xtr).float(), torch.from_numpy(ytr), torch.from_numpy(xte).float(), torch.from_numpy(yte), 5
    )
    scaler = StandardScaler().fit(xtr.astype(np.float32))
    ref = LogisticRegression(C=1.0, tol=1e-10, max_iter=10_000).fit(scaler.transform(xtr.astype(np.float32)), ytr)
    assert res["probe_top1"] == pytest.approx(
        100 * ref.score(scaler.transform(xte.astype(np.float32)), yte), abs=100 / len(yte) + 1e-9
    )
    sep_tr, sep_ytr = blobs(20, 4, 3, 0.01, 4)
    perfect = linear_probe(
        torch.from_numpy(sep_tr), torch.from_numpy(sep_ytr), torch.from_numpy(sep_tr), torch.from_numpy(sep_ytr), 3
    )
    assert perfect["probe_top1"] == 100.0 and perfect["probe_train_top1"] == 100.0


def make_folder(root, classes_train, classes_test, n=6, side=12, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, classes in (("train", classes_train), ("test", classes_test)):
        for ci, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True)
            for k in range(n):
                base = np.full((side, side, 3), 40 * (ci + 1), dtype=np.uint8)
                Image.fromarray((base + rng.integers(0, 30, base.shape)).astype(np.uint8)).save(d / f"{k}.png")


def tiny_checkpoint(tmp_path, data: str) -> str:
    from isfe_model.preprocess import PreprocessSpec
    from training.model import ModelConfig, build_encoder, save_checkpoint

    torch.manual_seed(0)
    cfg = ModelConfig(embedding_dim=16, preprocess=PreprocessSpec(input_size=8, resize_size=12))
    return str(save_checkpoint(tmp_path / "ck.pt", build_encoder(cfg), cfg, {"data": data}))


def test_evaluate_linear_probe_plumbing(tmp_path, capsys, monkeypatch):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from training.data import load_split
    from training.model import load_encoder
    from training.positives import bank_features

    monkeypatch.setenv("ISFE_CACHE", str(tmp_path / "cache"))
    make_folder(tmp_path / "data", ["a", "b", "c"], ["a", "b", "c"])
    ck = tiny_checkpoint(tmp_path, str(tmp_path / "data"))
    assert main(
        ["--checkpoint", ck, "--linear-probe", "--probe-features", "backbone", "--no-nmi", "--json", "--device", "cpu"]
    ) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["protocol"] == "seen" and res["probe_features"] == "512-d backbone" and "knn_top1" in res
    # the same number straight from scikit-learn on the same frozen features
    model = load_encoder(ck)
    tr, te = load_split(str(tmp_path / "data"), "train", 12), load_split(str(tmp_path / "data"), "test", 12)
    xtr = bank_features(model, tr.images, model.cfg.preprocess, "backbone").numpy()
    xte = bank_features(model, te.images, model.cfg.preprocess, "backbone").numpy()
    sc = StandardScaler().fit(xtr)
    ref = LogisticRegression(C=1.0, tol=1e-10, max_iter=10_000).fit(sc.transform(xtr), tr.labels)
    assert res["probe_top1"] == pytest.approx(100 * ref.score(sc.transform(xte), te.labels), abs=100 / len(te) + 1e-9)
    assert main(["--checkpoint", ck, "--linear-probe", "--no-nmi", "--device", "cpu"]) == 0
    assert ("linear probe (logistic regression, C=1.0, on 16-d embedding features): test top-1"
            in capsys.readouterr().out)


def test_linear_probe_refuses_disjoint_classes(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ISFE_CACHE", str(tmp_path / "cache"))
    make_folder(tmp_path / "data", ["a", "b"], ["c", "d"])
    ck = tiny_checkpoint(tmp_path, str(tmp_path / "data"))
    assert main(["--checkpoint", ck, "--linear-probe", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "disjoint classes" in err and "Traceback" not in err
    assert main(["--checkpoint", ck, "--probe-c", "0", "--device", "cpu"]) == 2
    assert "--probe-c must be > 0" in capsys.readouterr().err
