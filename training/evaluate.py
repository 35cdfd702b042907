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
  Up to 512 clusters scikit-learn's KMeans (10 restarts); beyond (Stanford
  Online Products: 11,316 test classes) a batched k-means++ / Lloyd k-means
  in torch on the evaluation device (``kmeans``), which scikit-learn would
  need hours for.
* Linear probe (``--linear-probe``, the paper's Table 2 linear classifier):
  multinomial logistic regression (L2, scikit-learn's ``C``) on frozen,
  standardised features of the labelled training split, accuracy on the
  test split; solved full-batch with L-BFGS in torch (``fit_logistic``).

The kNN bank search and the Recall@K rankings are :func:`training.retrieval.topk_similar`
(exact, chunked, ties to the lower index); the embeddings :func:`training.retrieval.embed_images`.

Seen vs unseen categories: when the training and test splits share no class
(CUB-200 / Cars196 / Products protocol) kNN classification is meaningless and
is skipped; Recall@K and NMI are computed on the test split.  The default
Recall@K values come from the dataset (``dataset.json`` written by
``python -m training.prepare``): 1, 2, 4, 8, and 1, 10, 100 for Products.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from isfe_model.jsonsafe import dumps
from training.data import DataError, load_split
from training.model import CheckpointError, load_encoder
from training.prepare import read_dataset_info
from training.retrieval import embed_images, eval_tensors, topk_similar

__all__ = [
    "RECALL_KS",
    "classes_disjoint",
    "default_recall_ks",
    "embed_images",
    "eval_tensors",
    "fit_logistic",
    "kmeans",
    "knn_accuracy",
    "knn_scores",
    "linear_probe",
    "main",
    "monitor_metrics",
    "nmi",
    "recall_at_k",
]

#: The paper's Recall@K values per dataset (Tables 3-6); anything else gets (1, 2, 4, 8).
RECALL_KS: dict[str, tuple[int, ...]] = {
    "cub200": (1, 2, 4, 8),
    "cars196": (1, 2, 4, 8),
    "sop": (1, 10, 100),
    "stl10": (1, 2, 4, 8),
}
DEFAULT_RECALL_KS = (1, 2, 4, 8)
#: Above this many clusters NMI uses the torch k-means instead of scikit-learn's.
SKLEARN_KMEANS_MAX_CLUSTERS = 512


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
    """Weighted kNN class scores (Wu et al. 2018): score[q, c] = sum over the k most similar bank rows j
    of class c of exp(sim(q, j) / sigma).

    Args:
        train_feats: [N, D] unit rows (the memory bank).
        train_labels: [N] int64.
        test_feats: [M, D] unit rows.
        num_classes: C.
        k: neighbours (clipped to N).
        sigma: temperature of the weights exp(sim / sigma).

    Returns:
        [M, C] float32 scores on the bank's device.
    """
    sims, idx = topk_similar(test_feats, train_feats, k, chunk_size=chunk_size)  # [M, k] each
    labels = train_labels.to(idx.device)
    scores = torch.zeros(sims.shape[0], num_classes, device=sims.device)
    return scores.scatter_add_(1, labels[idx], (sims / sigma).exp())


def knn_accuracy(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    num_classes: int,
    k: int = 200,
    sigma: float = 0.1,
) -> tuple[float, float]:
    """(top-1, top-5) weighted-kNN accuracy in percent: the true class among the 1 / 5 highest :func:`knn_scores`."""
    scores = knn_scores(train_feats, train_labels, test_feats, num_classes, k, sigma)
    labels = test_labels.to(scores.device)
    ranked = scores.argsort(dim=1, descending=True)
    top1 = (ranked[:, 0] == labels).float().mean().item() * 100
    top5 = (ranked[:, : min(5, num_classes)] == labels[:, None]).any(dim=1).float().mean().item() * 100
    return top1, top5


@torch.no_grad()
def recall_at_k(feats: Tensor, labels: Tensor, ks: Sequence[int] = (1, 2, 4, 8),
                chunk_size: int = 1024) -> dict[int, float]:
    """Recall@K in percent: the share of queries with a same-class image among their K nearest others.

    Args:
        feats: [N, D] unit rows, each both a query and a bank row (excluded from its own ranking); labels: [N].
    """
    n = feats.shape[0]
    _, idx = topk_similar(feats, feats, max(ks), exclude_self=True, chunk_size=chunk_size)  # [N, min(K, N-1)]
    labels = labels.to(idx.device)
    same = labels[idx] == labels[:, None]
    # rank of the first same-class neighbour; max(ks) (never a hit) when there is none
    first = torch.where(same.any(1), same.float().argmax(1), torch.full((n,), max(ks), device=idx.device))
    return {k: 100.0 * int((first < k).sum()) / n for k in ks}


@torch.no_grad()
def kmeans(x: Tensor, k: int, iters: int = 100, seed: int = 0, chunk_size: int = 4096, n_init: int = 1) -> Tensor:
    """k-means (k-means++ seeding, then Lloyd iterations until no point moves) in torch.

    Args:
        x: [N, D] float points (on any device; work happens there).
        k: clusters, 1 <= k <= N.
        iters: at most this many Lloyd iterations.
        n_init: runs with different seedings; the one with the lowest inertia wins.

    Returns:
        int64 [N] cluster index per point.  An emptied cluster keeps its centre.
    """
    x = x.float()
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= N, got k={k}, N={n}")
    best, best_inertia = None, float("inf")
    for r in range(max(1, int(n_init))):
        assign, inertia = _kmeans_once(x, k, iters, seed + r, chunk_size)
        if inertia < best_inertia:
            best, best_inertia = assign, inertia
    return best


def _kmeans_once(x: Tensor, k: int, iters: int, seed: int, chunk_size: int) -> tuple[Tensor, float]:
    n = x.shape[0]
    g = torch.Generator(device="cpu").manual_seed(seed)
    sq = (x * x).sum(1)

    def dist_to(c: Tensor) -> Tensor:  # squared distances of all points to centres c [m, D] -> [N, m]
        return (sq[:, None] - 2 * x @ c.t() + (c * c).sum(1)[None, :]).clamp_(min=0)

    # k-means++: each next centre drawn with probability proportional to the squared distance
    # to the nearest centre chosen so far
    idx = [int(torch.randint(n, (1,), generator=g))]
    d2 = dist_to(x[idx[0] : idx[0] + 1])[:, 0]
    u = torch.rand(k, generator=g, dtype=torch.float64)
    for j in range(1, k):
        cum = torch.cumsum(d2.double(), 0)
        if float(cum[-1]) <= 0:  # every point coincides with a centre: any point will do
            nxt = int(torch.randint(n, (1,), generator=g))
        else:
            nxt = int(torch.searchsorted(cum, (u[j] * cum[-1]).reshape(1), right=True).clamp_(max=n - 1))
        idx.append(nxt)
        d2 = torch.minimum(d2, dist_to(x[nxt : nxt + 1])[:, 0])
    centres = x[torch.tensor(idx, device=x.device)].clone()

    assign = torch.full((n,), -1, dtype=torch.int64, device=x.device)
    for _ in range(iters):
        csq = (centres * centres).sum(1)[None, :]
        new = torch.cat([(csq - 2 * x[i : i + chunk_size] @ centres.t()).argmin(1) for i in range(0, n, chunk_size)])
        if torch.equal(new, assign):
            break
        assign = new
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        nonempty = counts > 0
        centres[nonempty] = sums[nonempty] / counts[nonempty, None]
    inertia = float(((x - centres[assign]) ** 2).sum())
    return assign, inertia


def nmi(feats: Tensor | np.ndarray, labels: Tensor | np.ndarray, n_clusters: int | None = None, seed: int = 0,
        method: str = "auto") -> float:
    """NMI (in [0, 1]) between k-means clusters of the embeddings and the labels.

    ``method``: "sklearn" (KMeans, 10 restarts), "torch" (:func:`kmeans` on the
    features' device: 10 restarts up to ``SKLEARN_KMEANS_MAX_CLUSTERS``
    clusters, one k-means++ run beyond) or "auto" (sklearn up to
    ``SKLEARN_KMEANS_MAX_CLUSTERS`` clusters, torch beyond).
    """
    from sklearn.metrics import normalized_mutual_info_score

    y = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    c = n_clusters or len(np.unique(y))
    if method == "auto":
        method = "sklearn" if c <= SKLEARN_KMEANS_MAX_CLUSTERS else "torch"
    if method == "torch":
        t = feats.detach() if isinstance(feats, Tensor) else torch.from_numpy(np.asarray(feats))
        pred = kmeans(t, c, seed=seed, n_init=10 if c <= SKLEARN_KMEANS_MAX_CLUSTERS else 1).cpu().numpy()
    elif method == "sklearn":
        from sklearn.cluster import KMeans

        x = feats.detach().cpu().numpy() if isinstance(feats, Tensor) else np.asarray(feats)
        pred = KMeans(n_clusters=c, n_init=10, random_state=seed).fit_predict(x.astype(np.float64))
    else:
        raise ValueError(f"method must be auto, sklearn or torch, got {method!r}")
    return float(normalized_mutual_info_score(y, pred, average_method="arithmetic"))


def classes_disjoint(train, test) -> bool:
    """True when the two splits share no class name (the unseen-category protocol)."""
    return set(train.classes).isdisjoint(test.classes)


def default_recall_ks(data: str | None) -> tuple[int, ...]:
    """The paper's K values for a dataset: its dataset.json (written by training.prepare), or its name."""
    info = read_dataset_info(data)
    if info is not None:
        if info.get("recall_ks"):
            return tuple(int(k) for k in info["recall_ks"])
        if info.get("name") in RECALL_KS:
            return RECALL_KS[info["name"]]
    return RECALL_KS.get(str(data), DEFAULT_RECALL_KS)


# --------------------------------------------------------------------------- linear probe


def _standardise(train_x: Tensor, test_x: Tensor) -> tuple[Tensor, Tensor]:
    mean = train_x.mean(0, keepdim=True)
    std = train_x.std(0, keepdim=True).clamp_(min=1e-6)
    return (train_x - mean) / std, (test_x - mean) / std


def fit_logistic(x: Tensor, y: Tensor, num_classes: int, c: float = 1.0, max_iter: int = 500,
                 tol: float = 1e-7) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression, the objective of scikit-learn's ``LogisticRegression(C=c)``.

    Minimises ``sum_i CE(W x_i + b, y_i) + ||W||^2 / (2 c)`` (bias not
    penalised) full-batch with L-BFGS (strong Wolfe line search); the
    objective is strictly convex in W, so any solver reaches the same W.

    Args:
        x: [N, D] float features; y: [N] int64 labels in [0, num_classes).

    Returns:
        (W [C, D], b [C]) in x's dtype (float32 is promoted to float64 on the CPU).
    """
    if c <= 0:
        raise ValueError(f"C must be > 0, got {c}")
    dtype = torch.float64 if x.device.type == "cpu" else torch.float32
    x = x.to(dtype)
    y = y.to(x.device)
    n, d = x.shape
    w = torch.zeros(num_classes, d, dtype=dtype, device=x.device, requires_grad=True)
    b = torch.zeros(num_classes, dtype=dtype, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        # scaled by 1/N (same minimiser) so the gradient tolerance means the same for any N
        loss = torch.nn.functional.cross_entropy(x @ w.t() + b, y, reduction="mean") + (w * w).sum() / (2 * c * n)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def linear_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, num_classes: int, c: float = 1.0,
                 max_iter: int = 500) -> dict:
    """Linear classifier on frozen features: standardise (train statistics), fit, score.

    Returns:
        {"probe_top1": test accuracy %, "probe_train_top1": training accuracy %, "probe_c": c}
    """
    if train_x.shape[0] == 0 or test_x.shape[0] == 0:
        raise ValueError("the linear probe needs labelled training and test images")
    xtr, xte = _standardise(train_x.float(), test_x.float().to(train_x.device))
    w, b = fit_logistic(xtr, train_y, num_classes, c, max_iter)
    pred_tr = (xtr.to(w.dtype) @ w.t() + b).argmax(1).cpu()
    pred_te = (xte.to(w.dtype) @ w.t() + b).argmax(1).cpu()
    return {
        "probe_top1": 100.0 * float((pred_te == test_y.cpu()).double().mean()),
        "probe_train_top1": 100.0 * float((pred_tr == train_y.cpu()).double().mean()),
        "probe_c": c,
    }


def evaluate_model(model: nn.Module, train, test, device: str | torch.device = "cpu", k: int = 200, sigma: float = 0.1,
                   recall_ks: Sequence[int] = (1, 2, 4, 8), with_nmi: bool = True, batch_size: int = 512,
                   knn: bool | None = None, probe: str | None = None, probe_c: float = 1.0) -> dict:
    """All metrics for a model on an (ImageDataset train, ImageDataset test) pair.

    ``knn=None`` runs the kNN classifier only when the splits share classes.
    ``probe`` ("embedding" or "backbone") adds the linear probe on those features.
    """
    spec = model.cfg.preprocess
    disjoint = classes_disjoint(train, test)
    knn = not disjoint if knn is None else knn
    out: dict = {"protocol": "unseen" if disjoint else "seen"}
    fte = embed_images(model, test.images, spec, batch_size, device)
    yte = torch.from_numpy(np.asarray(test.labels)).to(device)
    ytr = torch.from_numpy(np.asarray(train.labels)).to(device)
    if knn:
        ftr = embed_images(model, train.images, spec, batch_size, device)
        top1, top5 = knn_accuracy(ftr, ytr, fte, yte, len(train.classes), k, sigma)
        out.update({"knn_top1": top1, "knn_top5": top5, "k": k, "sigma": sigma})
    out.update({f"recall@{kk}": v for kk, v in recall_at_k(fte, yte, recall_ks).items()})
    if with_nmi:
        out["nmi"] = nmi(fte, yte)
    if probe is not None:
        if disjoint:
            raise ValueError("the linear probe needs the same classes in the training and test splits; "
                             "this dataset's are disjoint")
        xtr = embed_images(model, train.images, spec, batch_size, device, features=probe)
        xte = embed_images(model, test.images, spec, batch_size, device, features=probe)
        out.update(linear_probe(xtr, ytr, xte, yte, len(train.classes), probe_c))
        out["probe_features"] = f"{xtr.shape[1]}-d {probe}"
    return out


def monitor_metrics(model: nn.Module, train, test, device: str | torch.device, k: int = 200, sigma: float = 0.1,
                    train_images: Tensor | None = None, batch_size: int = 1024, amp: bool = False) -> dict:
    """The training loop's quick metric: kNN top-1/top-5 (shared classes) or Recall@1 on the test split (disjoint).

    ``train_images`` (uint8 [N, R, R, 3], e.g. already on the device) replaces
    ``train.images`` as the kNN memory bank; ``amp``: bf16 autocast (the
    training loop passes its own ``--amp``, also where a CPU's timed trial chose
    bf16: measured on the 2-epoch digits models on an AMX-BF16 Xeon, bf16
    embeddings changed kNN top-1 by 1 of 359 test images (91.92% -> 91.64%) on
    the bf16-trained model and not at all on the fp32 one, top-5 not at all,
    at half the time; ``tests/test_cpu_speed.py`` holds it within 1 point).
    :func:`evaluate_model` (``python -m training.evaluate``, the reported
    numbers) always embeds in float32.
    """
    spec = model.cfg.preprocess
    device = torch.device(device)
    fte = embed_images(model, test.images, spec, batch_size, device, amp=amp)
    disjoint = classes_disjoint(train, test)
    if not disjoint:
        bank = train_images if train_images is not None else train.images
        ftr = embed_images(model, bank, spec, batch_size, device, amp=amp)
    yte = torch.from_numpy(np.asarray(test.labels)).to(device)
    if disjoint:
        return {"recall@1": round(recall_at_k(fte, yte, (1,))[1], 3)}
    ytr = torch.from_numpy(np.asarray(train.labels)).to(device)
    top1, top5 = knn_accuracy(ftr, ytr, fte, yte, len(train.classes), k, sigma)
    return {"knn_top1": round(top1, 3), "knn_top5": round(top5, 3)}


def format_metrics(row: dict) -> str:
    """'kNN top-1 x%  top-5 y%' or 'R@1 x%' for a monitor_metrics row, then its 'loss z' if it has one."""
    if "knn_top1" in row:
        parts = [f"kNN top-1 {row['knn_top1']:6.2f}%  top-5 {row['knn_top5']:6.2f}%"]
    else:
        parts = [f"R@{k.split('@')[1]} {v:6.2f}%" for k, v in row.items() if k.startswith("recall@")]
    if "loss" in row:
        parts.append(f"loss {row['loss']:.4f}")
    return "  ".join(parts) or "no metrics (no test split)"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.evaluate",
                                 description="kNN accuracy, Recall@K, NMI and a linear probe of a trained encoder.")
    ap.add_argument("--checkpoint", required=True, help="checkpoint.pt (or its run folder)")
    ap.add_argument("--data", default=None,
                    help="dataset the kNN memory bank and queries come from (default: the checkpoint's training data)")
    ap.add_argument("--k", type=int, default=200)
    ap.add_argument("--sigma", type=float, default=0.1)
    ap.add_argument("--recall-ks", default=None,
                    help="comma-separated K values for Recall@K (default: the dataset's, from its dataset.json: "
                         "1,2,4,8; Stanford Online Products 1,10,100)")
    ap.add_argument("--no-nmi", action="store_true", help="skip the k-means NMI")
    ap.add_argument("--linear-probe", action="store_true",
                    help="also fit a linear classifier (logistic regression) on frozen features of the labelled "
                         "training split "
                         "and report its test accuracy (the paper's Table 2)")
    ap.add_argument("--probe-features", default="embedding", choices=["embedding", "backbone"],
                    help="features for the linear probe: the embedding (default) or the pooled backbone features")
    ap.add_argument("--probe-c", type=float, default=1.0, help="inverse L2 strength of the probe (scikit-learn's C)")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    try:
        ks = tuple(int(v) for v in args.recall_ks.split(",")) if args.recall_ks else None
        if args.k < 1 or args.sigma <= 0 or (ks is not None and (not ks or min(ks) < 1)) or args.probe_c <= 0:
            raise ValueError
    except ValueError:
        print(f"error: --k and --recall-ks need positive integers, --sigma and --probe-c must be > 0 "
              f"(got --k {args.k} --sigma {args.sigma} --recall-ks {args.recall_ks} --probe-c {args.probe_c})",
              file=sys.stderr)
        return 2
    try:
        model = load_encoder(args.checkpoint, map_location=args.device)
        data = args.data or model.checkpoint.get("config", {}).get("data")
        spec = model.cfg.preprocess
        # decoded as the model's inputs are (its spec's decode policy: the arrays isfe_model makes)
        train = load_split(data, "train", resize_size=spec.resize_size, decode=spec.decode)
        test = load_split(data, "test", resize_size=spec.resize_size, decode=spec.decode)
    except (CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ks = ks or default_recall_ks(data)
    probe = args.probe_features if args.linear_probe else None
    if probe is not None and classes_disjoint(train, test):
        print(f"error: --linear-probe needs the same classes in train/ and test/; {data} has disjoint classes "
              f"(unseen-category protocol: use Recall@K and NMI)", file=sys.stderr)
        return 2
    tf32_was = torch.backends.cudnn.allow_tf32  # a *-paper run (config tf32 false) is evaluated in full float32
    torch.backends.cudnn.allow_tf32 = tf32_was and model.checkpoint.get("config", {}).get("tf32") is not False
    try:
        res = evaluate_model(model, train, test, args.device, args.k, args.sigma, ks, not args.no_nmi,
                             args.batch_size, probe=probe, probe_c=args.probe_c)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32_was
    res["data"] = data or "digits"
    if args.json:
        print(dumps(res))  # strict JSON: a NaN metric prints as null
    else:
        print(f"data: {res['data']}  train {len(train)} / test {len(test)} images, "
              f"{len(train.classes)} / {len(test.classes)} classes ({res['protocol']} categories)")
        if "knn_top1" in res:
            print(f"weighted kNN (k={args.k}, sigma={args.sigma}): "
                  f"top-1 {res['knn_top1']:.2f}%  top-5 {res['knn_top5']:.2f}%")
        else:
            print("weighted kNN: skipped (train and test classes are disjoint)")
        print("Recall@K (test): " + "  ".join(f"R@{kk} {res[f'recall@{kk}']:.2f}%" for kk in ks))
        if "nmi" in res:
            print(f"NMI (test, k-means with {len(test.classes)} clusters): {res['nmi']:.4f}")
        if "probe_top1" in res:
            print(f"linear probe (logistic regression, C={args.probe_c}, on {res['probe_features']} features): "
                  f"test top-1 {res['probe_top1']:.2f}%  (train {res['probe_train_top1']:.2f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
