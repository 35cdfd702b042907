"""Evaluation: weighted kNN accuracy, Recall@K and NMI.

``python -m training.evaluate --checkpoint runs/X/checkpoint.pt [--data ...]``

* Weighted kNN (the paper's protocol, from Wu et al. 2018): embed the training
  split with the evaluation transform; for each test image take the k = 200
  most cosine-similar training images, weight each by exp(sim / sigma)
  (sigma = 0.1), sum the weights per class; report top-1 and top-5 accuracy.
* Recall@K: fraction of queries whose K nearest neighbours (the query itself
  excluded) contain at least one image of the query's class.
* NMI: k-means with as many clusters as classes on the embeddings, then the
  normalised mutual information (arithmetic mean normalisation) with labels.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from isfe_model.preprocess import PreprocessSpec, center_crop_array

__all__ = ["embed_images", "eval_tensors", "knn_scores", "knn_accuracy", "recall_at_k", "nmi", "main"]


def eval_tensors(images: np.ndarray, spec: PreprocessSpec) -> Tensor:
    """uint8 [N, R, R, 3] cache images -> float32 [N, 3, S, S] in [0, 1] (the evaluation transform)."""
    x = torch.from_numpy(np.ascontiguousarray(center_crop_array(np.asarray(images), spec.input_size)))
    return x.permute(0, 3, 1, 2).float().div_(255.0)


@torch.no_grad()
def embed_images(
    model: nn.Module,
    images: np.ndarray | Tensor,
    spec: PreprocessSpec,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
) -> Tensor:
    """Embed uint8 [N, R, R, 3] images (numpy, or a tensor on any device) -> float32 [N, D] on ``device``."""
    was_training = model.training
    model.eval()
    out = []
    s = spec.input_size
    n = images.shape[0]
    for i in range(0, n, batch_size):
        chunk = images[i : i + batch_size]
        if isinstance(chunk, Tensor):
            r = chunk.shape[1]
            top, left = int(round((r - s) / 2.0)), int(round((chunk.shape[2] - s) / 2.0))
            x = chunk[:, top : top + s, left : left + s].to(device).permute(0, 3, 1, 2).float().div_(255.0)
        else:
            x = eval_tensors(chunk, spec).to(device)
        out.append(model(x).float())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, 0, device=device)


@torch.no_grad()
def knn_scores(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    num_classes: int,
    k: int = 200,
    sigma: float = 0.1,
    chunk_size: int = 1024,
) -> Tensor:
    """Weighted kNN class scores.

    Args:
        train_feats: [N, D] unit rows (the memory bank).
        train_labels: [N] int64.
        test_feats: [M, D] unit rows.
        num_classes: C.
        k: neighbours (clipped to N).
        sigma: temperature of the weights exp(sim / sigma).

    Returns:
        [M, C] float32 scores: sum over the top-k neighbours of exp(sim/sigma) per class.
    """
    k = min(k, train_feats.shape[0])
    labels = train_labels.to(train_feats.device)
    out = []
    for i in range(0, test_feats.shape[0], chunk_size):
        sims = test_feats[i : i + chunk_size].float() @ train_feats.float().t()  # [m, N]
        top_sim, top_idx = sims.topk(k, dim=1)
        w = (top_sim / sigma).exp()
        scores = torch.zeros(sims.shape[0], num_classes, device=sims.device)
        scores.scatter_add_(1, labels[top_idx], w)
        out.append(scores)
    return torch.cat(out) if out else torch.zeros(0, num_classes)


def knn_accuracy(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    num_classes: int,
    k: int = 200,
    sigma: float = 0.1,
) -> tuple[float, float]:
    """(top-1, top-5) weighted-kNN accuracy in percent."""
    scores = knn_scores(train_feats, train_labels, test_feats, num_classes, k, sigma)
    labels = test_labels.to(scores.device)
    ranked = scores.argsort(dim=1, descending=True)
    top1 = (ranked[:, 0] == labels).float().mean().item() * 100
    top5 = (ranked[:, : min(5, num_classes)] == labels[:, None]).any(dim=1).float().mean().item() * 100
    return top1, top5


@torch.no_grad()
def recall_at_k(feats: Tensor, labels: Tensor, ks: Sequence[int] = (1, 2, 4, 8), chunk_size: int = 1024) -> dict[int, float]:
    """Recall@K in percent; each query is excluded from its own ranking.

    Args:
        feats: [N, D] unit rows; labels: [N].
    """
    n = feats.shape[0]
    kmax = min(max(ks), n - 1)
    labels = labels.to(feats.device)
    hits = {k: 0 for k in ks}
    for i in range(0, n, chunk_size):
        sims = feats[i : i + chunk_size].float() @ feats.float().t()
        rows = torch.arange(sims.shape[0], device=sims.device)
        sims[rows, rows + i] = float("-inf")  # exclude the query itself
        idx = sims.topk(kmax, dim=1).indices
        same = labels[idx] == labels[i : i + chunk_size, None]
        first = torch.where(same.any(1), same.float().argmax(1), torch.full_like(rows, kmax + 1))
        for k in ks:
            hits[k] += int((first < k).sum())
    return {k: 100.0 * hits[k] / n for k in ks}


def nmi(feats: Tensor | np.ndarray, labels: Tensor | np.ndarray, n_clusters: int | None = None, seed: int = 0) -> float:
    """NMI (in [0, 1]) between k-means clusters of the embeddings and the labels."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score

    x = feats.detach().cpu().numpy() if isinstance(feats, Tensor) else np.asarray(feats)
    y = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    c = n_clusters or len(np.unique(y))
    pred = KMeans(n_clusters=c, n_init=10, random_state=seed).fit_predict(x.astype(np.float64))
    return float(normalized_mutual_info_score(y, pred, average_method="arithmetic"))


def evaluate_model(model: nn.Module, train, test, device: str | torch.device = "cpu", k: int = 200, sigma: float = 0.1,
                   recall_ks: Sequence[int] = (1, 2, 4, 8), with_nmi: bool = True, batch_size: int = 512) -> dict:
    """All metrics for a model on an (ImageDataset train, ImageDataset test) pair."""
    spec = model.cfg.preprocess
    ftr = embed_images(model, train.images, spec, batch_size, device)
    fte = embed_images(model, test.images, spec, batch_size, device)
    ytr = torch.from_numpy(np.asarray(train.labels)).to(device)
    yte = torch.from_numpy(np.asarray(test.labels)).to(device)
    top1, top5 = knn_accuracy(ftr, ytr, fte, yte, len(train.classes), k, sigma)
    out = {"knn_top1": top1, "knn_top5": top5, "k": k, "sigma": sigma}
    out.update({f"recall@{kk}": v for kk, v in recall_at_k(fte, yte, recall_ks).items()})
    if with_nmi:
        out["nmi"] = nmi(fte, yte)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from training.data import DataError, load_split
    from training.model import CheckpointError, load_encoder

    ap = argparse.ArgumentParser(prog="python -m training.evaluate", description="kNN accuracy, Recall@K and NMI of a trained encoder.")
    ap.add_argument("--checkpoint", required=True, help="checkpoint.pt (or its run folder)")
    ap.add_argument("--data", default=None, help="dataset the kNN memory bank and queries come from (default: the checkpoint's training data)")
    ap.add_argument("--k", type=int, default=200)
    ap.add_argument("--sigma", type=float, default=0.1)
    ap.add_argument("--recall-ks", default="1,2,4,8", help="comma-separated K values for Recall@K")
    ap.add_argument("--no-nmi", action="store_true", help="skip the k-means NMI")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    try:
        ks = tuple(int(v) for v in args.recall_ks.split(","))
        if args.k < 1 or args.sigma <= 0 or min(ks) < 1:
            raise ValueError
    except ValueError:
        print(f"error: --k and --recall-ks need positive integers and --sigma > 0 (got --k {args.k} --sigma {args.sigma} --recall-ks {args.recall_ks})", file=sys.stderr)
        return 2
    try:
        model = load_encoder(args.checkpoint, map_location=args.device)
        data = args.data or model.checkpoint.get("config", {}).get("data")
        spec = model.cfg.preprocess
        train = load_split(data, "train", resize_size=spec.resize_size)
        test = load_split(data, "test", resize_size=spec.resize_size)
    except (CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res = evaluate_model(model, train, test, args.device, args.k, args.sigma, ks, not args.no_nmi, args.batch_size)
    res["data"] = data or "digits"
    if args.json:
        print(json.dumps(res))
    else:
        print(f"data: {res['data']}  train {len(train)} / test {len(test)} images, {len(train.classes)} classes")
        print(f"weighted kNN (k={args.k}, sigma={args.sigma}): top-1 {res['knn_top1']:.2f}%  top-5 {res['knn_top5']:.2f}%")
        print("Recall@K (test): " + "  ".join(f"R@{kk} {res[f'recall@{kk}']:.2f}%" for kk in ks))
        if "nmi" in res:
            print(f"NMI (test, k-means with {len(test.classes)} clusters): {res['nmi']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
