"""Nearest-neighbour positives: the bank, the neighbour search and the choice, against slow loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from isfe_model.preprocess import PreprocessSpec
from training.evaluate import embed_images
from training.model import ModelConfig, build_encoder
from training.positives import PositiveSampler, bank_features, choose_positives, neighbour_index


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def loop_nearest(feats: torch.Tensor) -> list[int]:
    out = []
    for i in range(feats.shape[0]):
        best, arg = -float("inf"), -1
        for j in range(feats.shape[0]):
            s = float(torch.dot(feats[i], feats[j]))
            if j != i and s > best:  # strict: the first (lowest) index wins ties
                best, arg = s, j
        out.append(arg)
    return out


def test_neighbour_index_match_loop_and_exclude_self():
    f = unit(50, 6, 0)
    fast = neighbour_index(f, chunk_size=7)
    assert fast.tolist() == loop_nearest(f)
    assert (fast != torch.arange(50)).all()


def test_neighbour_index_ties_and_duplicates():
    base = unit(5, 4, 1)
    f = torch.cat([base, base[:2]])  # rows 5, 6 duplicate rows 0, 1: each other's nearest neighbours
    nn = neighbour_index(f, chunk_size=3)
    assert nn[0] == 5 and nn[5] == 0 and nn[1] == 6 and nn[6] == 1
    same = F.normalize(torch.ones(4, 3), dim=1)  # all tied: the lowest other index
    assert neighbour_index(same).tolist() == [1, 0, 0, 0] == loop_nearest(same)
    with pytest.raises(ValueError, match="at least 2"):
        neighbour_index(base[:1])


def test_choose_positives_probability_0_and_1():
    nn_index = torch.tensor([3, 2, 1, 0, 5, 4])
    anchors = torch.tensor([0, 4, 2, 5])
    g = torch.Generator().manual_seed(0)
    assert choose_positives(anchors, nn_index, 0.0, g).tolist() == [0, 4, 2, 5]
    assert choose_positives(anchors, nn_index, 1.0, g).tolist() == [3, 5, 1, 4]


def test_choose_positives_half_and_half_matches_loop():
    n = 4000
    nn_index = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    anchors = torch.arange(n)
    out = choose_positives(anchors, nn_index, 0.5, torch.Generator().manual_seed(2))
    u = torch.rand(n, generator=torch.Generator().manual_seed(2))  # the same draws, one anchor at a time
    expected = [int(nn_index[a]) if float(u[i]) < 0.5 else int(a) for i, a in enumerate(anchors)]
    assert out.tolist() == expected
    took_nn = (out == nn_index[anchors]) & (out != anchors)
    assert 0.45 < took_nn.float().mean() < 0.55
    with pytest.raises(ValueError):
        choose_positives(anchors, nn_index, 1.5)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return build_encoder(ModelConfig(embedding_dim=16, preprocess=PreprocessSpec(input_size=8, resize_size=12))).eval()


def test_bank_features_use_the_evaluation_transform():
    model = tiny_model()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 12, 12, 3), dtype=np.uint8)
    spec = model.cfg.preprocess
    emb = bank_features(model, images, spec, "embedding", batch_size=3)
    torch.testing.assert_close(emb, embed_images(model, images, spec, 4, "cpu"))
    back = bank_features(model, torch.from_numpy(images), spec, "backbone", batch_size=4)
    x = torch.from_numpy(images[:, 2:10, 2:10]).permute(0, 3, 1, 2).float() / 255  # central 8x8 of 12x12
    with torch.no_grad():
        ref = F.normalize(model.features(x), dim=1)
    assert back.shape == (10, 512)
    torch.testing.assert_close(back, ref, rtol=1e-4, atol=1e-5)
    model.train()
    bank_features(model, images, spec)
    assert model.training  # mode restored


def test_sampler_aug_mode_is_a_no_op():
    s = PositiveSampler("aug")
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    idx = torch.tensor([4, 1, 7])
    s.refresh(tiny_model(), torch.zeros(3, 12, 12, 3, dtype=torch.uint8), tiny_model().cfg.preprocess)
    assert s.positives(idx, g) is idx and torch.equal(g.get_state(), state)  # no random numbers drawn


def test_sampler_nn_mode_against_loop():
    model = tiny_model(1)
    rng = np.random.default_rng(1)
    images = torch.from_numpy(rng.integers(0, 256, (20, 12, 12, 3), dtype=np.uint8))
    spec = model.cfg.preprocess
    s = PositiveSampler("nn-or-aug", "embedding", p_nn=1.0, batch_size=6)
    with pytest.raises(RuntimeError, match="refresh"):
        s.positives(torch.tensor([0]))
    s.refresh(model, images, spec)
    anchors = torch.tensor([3, 0, 19, 7])
    ref = loop_nearest(embed_images(model, images.numpy(), spec, 20, "cpu"))
    assert s.positives(anchors, torch.Generator().manual_seed(0)).tolist() == [ref[a] for a in anchors.tolist()]
    s.p_nn = 0.0
    assert s.positives(anchors, torch.Generator().manual_seed(0)).tolist() == anchors.tolist()
    with pytest.raises(ValueError, match="--positive"):
        PositiveSampler("neighbour")
    with pytest.raises(ValueError, match="--nn-features"):
        PositiveSampler("nn-or-aug", "pixels")
