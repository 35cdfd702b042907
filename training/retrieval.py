"""Retrieval primitives every metric of the training side is built on.

* :func:`topk_similar` -- exact top-k inner-product search of queries
  [Q, D] against a bank [N, D] -> (scores [Q, k], indices [Q, k]), chunked
  over the queries (one [chunk, N] score block in memory), with optional
  exclusion of one bank row per query (the query itself).  For unit rows the
  inner product is the cosine similarity.  Used by the weighted kNN and
  Recall@K (``training.evaluate``), the nearest-neighbour positives
  (``training.positives``) and the report's neighbours (``training.report``).
* :func:`embed_images` -- embed a bank of uint8 [N, R, R, 3] images with the
  evaluation transform (center crop to the model's input size, [0, 1]
  floats), batched, in eval mode, optionally under bf16 autocast; the
  embedding or the L2-normalised pooled backbone features.

The inference package has the NumPy twin of the search
(``isfe_model.search.topk_inner_product``, same ordering rule); this one
runs in torch on the features' device.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from isfe_model.preprocess import PreprocessSpec, center_crop_array
from training.model import unwrap

__all__ = ["BANK_FEATURES", "embed_images", "eval_tensors", "topk_similar"]

#: What a bank holds: the model output, or the L2-normalised pooled backbone features.
BANK_FEATURES = ("embedding", "backbone")


# --------------------------------------------------------------------------- top-k search


def _exclusion(exclude: Tensor | np.ndarray | Sequence[int] | None, exclude_self: bool, q: int, n: int,
               device: torch.device) -> Tensor | None:
    """int64 [Q] bank column each query must not match, or None; checks shapes and range."""
    if exclude_self and exclude is not None:
        raise ValueError("give exclude_self=True or an exclude index per query, not both")
    if exclude_self:
        if q != n:
            raise ValueError(f"exclude_self needs the queries to be the bank (Q == N), got Q={q}, N={n}")
        return torch.arange(q, device=device)
    if exclude is None:
        return None
    ex = torch.as_tensor(np.asarray(exclude) if not isinstance(exclude, Tensor) else exclude).to(device, torch.int64)
    if ex.shape != (q,):
        raise ValueError(f"exclude must hold one bank index per query, shape ({q},), got {tuple(ex.shape)}")
    if q and (int(ex.min()) < 0 or int(ex.max()) >= n):
        raise ValueError(f"exclude indices must lie in [0, {n}), got {int(ex.min())} .. {int(ex.max())}")
    return ex


def _block_topk(s: Tensor, k: int, excl: Tensor | None) -> tuple[Tensor, Tensor]:
    """Top-k of each row of a score block s [m, N] (modified in place): (scores [m, k], columns [m, k]).

    Order: descending score, then ascending column; NaN counts as -inf; the
    column ``excl[r]`` of row r (if given) is set to -inf and ranks after every
    other -inf, so with k <= N - 1 it is never returned.  ``torch.topk`` orders
    equal scores arbitrarily, so a row whose k+1 best hold a tie (inside the
    top k, or across the cut) is redone with a stable sort of the whole row;
    rows without one are already in the one correct order.
    """
    if excl is not None:
        s[torch.arange(s.shape[0], device=s.device), excl] = float("-inf")
    kk = min(k + 1, s.shape[1])
    vals, cols = s.topk(kk, dim=1)  # sorted, descending
    if vals[:, 0].isnan().any():  # topk ranks NaN first: make it -inf and select again (rare)
        s.nan_to_num_(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
        vals, cols = s.topk(kk, dim=1)
    redo = (vals[:, 1:] == vals[:, :-1]).any(1).nonzero().squeeze(1)
    vals, cols = vals[:, :k], cols[:, :k]
    if redo.numel():
        block = s[redo]
        full = block.sort(dim=1, descending=True, stable=True).indices
        if excl is not None:  # the excluded column goes last (stable: the others keep their order)
            last = (full == excl[redo, None]).to(torch.int32)
            full = full.gather(1, last.sort(dim=1, stable=True).indices)
        cols[redo] = full[:, :k]
        vals[redo] = block.gather(1, full[:, :k])
    return vals, cols


@torch.no_grad()
def topk_similar(
    queries: Tensor | np.ndarray,
    bank: Tensor | np.ndarray,
    k: int,
    *,
    exclude: Tensor | np.ndarray | Sequence[int] | None = None,
    exclude_self: bool = False,
    chunk_size: int = 1024,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """Exact top-k by inner product: score[q, j] = <queries[q], bank[j]>.

    Args:
        queries: [Q, D] (torch or numpy; moved to the bank's device).
        bank: [N, D]; the work happens on its device.
        k: neighbours per query, clipped to N (to N - 1 with an exclusion).
        exclude_self: the queries are the bank itself (Q == N): query i never matches bank row i.
        exclude: int [Q]: query i never matches bank row ``exclude[i]`` (e.g. a query subset of the bank).
        chunk_size: queries per [chunk, N] score block.
        dtype: the precision of the scores (float32; the report uses float64).

    Returns:
        (scores ``dtype`` [Q, k], indices int64 [Q, k]) on the bank's device,
        descending score; equal scores by ascending bank index (deterministic).
        NaN scores rank as -inf.  Autocast is off inside (the scores are in ``dtype``).
    """
    b = torch.as_tensor(bank).detach()
    b = b.to(dtype)
    q_all = torch.as_tensor(queries).detach()
    if q_all.ndim != 2 or b.ndim != 2 or (q_all.shape[0] and q_all.shape[1] != b.shape[1]):
        raise ValueError(f"queries [Q, D] and bank [N, D] need the same D, "
                         f"got {tuple(q_all.shape)} and {tuple(b.shape)}")
    nq, n = q_all.shape[0], b.shape[0]
    excl = _exclusion(exclude, exclude_self, nq, n, b.device)
    k = max(0, min(int(k), n - (1 if excl is not None else 0)))
    if k == 0 or nq == 0:
        return torch.zeros(nq, k, dtype=dtype, device=b.device), torch.zeros(nq, k, dtype=torch.int64, device=b.device)
    scores, indices = [], []
    with torch.autocast(b.device.type, enabled=False):
        for i in range(0, nq, chunk_size):
            s = q_all[i : i + chunk_size].to(b.device, dtype) @ b.t()  # [m, N]
            vals, cols = _block_topk(s, k, None if excl is None else excl[i : i + chunk_size])
            scores.append(vals)
            indices.append(cols)
    return torch.cat(scores), torch.cat(indices)


# --------------------------------------------------------------------------- embedding a bank


def _host_crop(images: np.ndarray, size: int) -> Tensor:
    """uint8 [N, R, R', 3] numpy -> the uint8 [N, S, S, 3] central window as a tensor (copied when not contiguous)."""
    x = center_crop_array(np.asarray(images), size)
    if not (x.flags.writeable and x.flags.c_contiguous):  # a read-only memmap of the cache: torch wants its own copy
        x = np.array(x, order="C")
    return torch.from_numpy(x)


def _to_float(x: Tensor) -> Tensor:
    """uint8 [N, S, S, 3] -> float32 [N, 3, S, S] in [0, 1]."""
    return x.permute(0, 3, 1, 2).float().div_(255.0)


def eval_tensors(images: np.ndarray, spec: PreprocessSpec) -> Tensor:
    """uint8 [N, R, R, 3] cache images -> float32 [N, 3, S, S] in [0, 1] (the evaluation transform)."""
    return _to_float(_host_crop(images, spec.input_size))


def _crop_to(chunk: Tensor | np.ndarray, size: int, device: torch.device) -> Tensor:
    """uint8 [B, R, R', 3] (numpy or any device) -> float32 [B, 3, S, S] in [0, 1] on ``device``: the central window."""
    if not isinstance(chunk, Tensor):
        return _to_float(_host_crop(chunk, size).to(device))
    top = int(round((chunk.shape[1] - size) / 2.0))  # torchvision's rounding, as center_crop_array
    left = int(round((chunk.shape[2] - size) / 2.0))
    return _to_float(chunk[:, top : top + size, left : left + size].to(device))


@torch.no_grad()
def embed_images(
    model: nn.Module,
    images: np.ndarray | Tensor,
    spec: PreprocessSpec,
    batch_size: int = 512,
    device: str | torch.device | None = None,
    *,
    features: str = "embedding",
    amp: bool = False,
) -> Tensor:
    """Embed a bank of images with the evaluation transform.

    Args:
        model: an EmbeddingNet, or a DDP / compiled wrapper of one (unwrapped:
            every rank embeds the whole bank with the same weights).
        images: uint8 [N, R, R, 3], numpy (a memmap is read one batch at a time)
            or a tensor on any device.
        spec: the model's preprocessing (center crop to ``spec.input_size``).
        device: where the model runs (default: the model's device).
        features: ``"embedding"`` (the model output, [N, D]) or ``"backbone"``
            (the pooled backbone features, L2-normalised, [N, F]).
        amp: bf16 autocast for the forward passes.

    Returns:
        float32 [N, D] on ``device``; the model's train/eval mode is restored.
    """
    if features not in BANK_FEATURES:
        raise ValueError(f"features must be one of {BANK_FEATURES}, got {features!r}")
    net = unwrap(model)
    if device is None:
        device = next((p.device for p in net.parameters()), torch.device("cpu"))
    device = torch.device(device)
    was_training = net.training
    net.eval()
    out = []
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            for i in range(0, images.shape[0], batch_size):
                x = _crop_to(images[i : i + batch_size], spec.input_size, device)
                f = net(x) if features == "embedding" else F.normalize(net.features(x).float(), dim=1)
                out.append(f.float())
    finally:
        net.train(was_training)
    return torch.cat(out) if out else torch.empty(0, 0, device=device)
