"""Vectorised metrics against slow loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.evaluate import knn_accuracy, knn_scores, nmi, recall_at_k


def feats(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=1)


def loop_knn_scores(train, train_labels, test, num_classes, k, sigma):
    out = torch.zeros(test.shape[0], num_classes)
    for q in range(test.shape[0]):
        sims = [(float(torch.dot(test[q], train[j])), j) for j in range(train.shape[0])]
        sims.sort(key=lambda t: -t[0])
        for s, j in sims[:k]:
            out[q, int(train_labels[j])] += math.exp(s / sigma)
    return out


@pytest.mark.parametrize("k", [1, 5, 200])
def test_knn_scores_match_loop(k):
    tr, te = feats(150, 8, 0), feats(40, 8, 1)
    ytr = torch.randint(0, 4, (150,), generator=torch.Generator().manual_seed(2))
    fast = knn_scores(tr, ytr, te, 4, k=k, sigma=0.1, chunk_size=7)
    slow = loop_knn_scores(tr, ytr, te, 4, min(k, 150), 0.1)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)


def test_knn_accuracy_top1_top5_by_hand():
    tr, te = feats(120, 6, 3), feats(30, 6, 4)
    ytr = torch.randint(0, 7, (120,), generator=torch.Generator().manual_seed(5))
    yte = torch.randint(0, 7, (30,), generator=torch.Generator().manual_seed(6))
    top1, top5 = knn_accuracy(tr, ytr, te, yte, 7, k=20, sigma=0.1)
    slow = loop_knn_scores(tr, ytr, te, 7, 20, 0.1)
    ranked = [sorted(range(7), key=lambda c: -float(slow[q, c])) for q in range(30)]
    assert top1 == pytest.approx(100 * np.mean([ranked[q][0] == int(yte[q]) for q in range(30)]))
    assert top5 == pytest.approx(100 * np.mean([int(yte[q]) in ranked[q][:5] for q in range(30)]))


def test_knn_perfect_on_separated_clusters():
    centers = feats(3, 16, 7)
    y = torch.arange(3).repeat_interleave(20)
    x = F.normalize(centers[y] + 0.01 * torch.randn(60, 16), dim=1)
    assert knn_accuracy(x, y, x, y, 3, k=10)[0] == 100.0


def loop_recall(x, y, ks):
    n = x.shape[0]
    res = {}
    for k in ks:
        hits = 0
        for q in range(n):
            order = sorted((j for j in range(n) if j != q), key=lambda j: -float(torch.dot(x[q], x[j])))
            hits += any(int(y[j]) == int(y[q]) for j in order[:k])
        res[k] = 100.0 * hits / n
    return res


def test_recall_at_k_matches_loop_and_excludes_query():
    x = feats(60, 5, 8)
    y = torch.randint(0, 6, (60,), generator=torch.Generator().manual_seed(9))
    ks = (1, 2, 4, 8)
    fast = recall_at_k(x, y, ks, chunk_size=13)
    slow = loop_recall(x, y, ks)
    for k in ks:
        assert fast[k] == pytest.approx(slow[k])
    # every image alone in its class: recall must be 0 (the query itself never counts)
    assert recall_at_k(x[:10], torch.arange(10), (1, 4))[1] == 0.0


def test_nmi_perfect_and_against_sklearn():
    from sklearn.metrics import normalized_mutual_info_score

    centers = feats(4, 8, 10) * 10
    y = torch.arange(4).repeat_interleave(25)
    x = centers[y] + 0.01 * torch.randn(100, 8)
    assert nmi(x, y) == pytest.approx(1.0)
    rnd = feats(100, 8, 11)
    from sklearn.cluster import KMeans

    pred = KMeans(n_clusters=4, n_init=10, random_state=0).fit_predict(rnd.numpy().astype(np.float64))
    assert nmi(rnd, y) == pytest.approx(normalized_mutual_info_score(y.numpy(), pred))


def test_recall_at_k_with_k_beyond_the_other_images():
    # K >= N: every other image is a neighbour; a query whose class has no other image is never a hit
    x = feats(4, 5, 12)
    y = torch.tensor([0, 1, 2, 2])
    ks = (1, 2, 4, 8)
    fast = recall_at_k(x, y, ks)
    slow = loop_recall(x, y, ks)
    for k in ks:
        assert fast[k] == pytest.approx(slow[k])
    assert fast[4] == fast[8] == 50.0
