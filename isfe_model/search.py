"""Exact top-k inner-product search: chunked NumPy (default) and FAISS flat (optional).

For unit-length rows the inner product is the cosine similarity.  The NumPy
path walks the gallery in chunks, so memory stays at O(Q x chunk) however
large the gallery is, and breaks ties by the lower gallery index.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["FaissIndex", "default_chunk_rows", "faiss_available", "topk_inner_product"]

#: Bytes of the [Q, chunk] score block the NumPy search aims for (under glibc's
#: 32 MiB mmap threshold, so the block's memory is reused instead of page-faulted in anew).
SCORE_BLOCK_BYTES = 16 << 20
#: Bytes of the float32 buffer float16 galleries are converted through.
CONVERT_BYTES = 4 << 20


def default_chunk_rows(n_queries: int, dim: int) -> int:
    """Gallery rows per chunk: a [Q, chunk] float32 score block of about 16 MiB (1,024 .. 262,144 rows)."""
    rows = SCORE_BLOCK_BYTES // (4 * max(1, n_queries))
    return int(min(262_144, max(1_024, rows)))


def _empty(q: int, k: int = 0) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((q, k), dtype=np.float32), np.zeros((q, k), dtype=np.int64)


def _merge(s_a: np.ndarray, i_a: np.ndarray, s_b: np.ndarray, i_b: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of two candidate lists per row: descending score, then ascending index."""
    s = np.concatenate([s_a, s_b], axis=1)
    i = np.concatenate([i_a, i_b], axis=1)
    order = np.lexsort((i, -s), axis=-1)[:, :k]
    return np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)


def _block_topk_partition(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of each row of ``scores`` [Q, C] (C > k) by argpartition: (values [Q, k], columns [Q, k]), unordered.

    Ties at the k-th value are resolved by the lower column, like a stable sort.
    """
    c = scores.shape[1]
    idx = np.argpartition(scores, c - k, axis=1)[:, c - k :]
    vals = np.take_along_axis(scores, idx, 1)
    kth = vals.min(axis=1, keepdims=True)
    # argpartition picks arbitrary members of a tie at the k-th value; find the
    # rows where that choice matters and redo them with a stable sort.
    n_eq_all = np.count_nonzero(scores == kth, axis=1)
    n_eq_sel = np.count_nonzero(vals == kth, axis=1)
    for r in np.flatnonzero(n_eq_all != n_eq_sel):
        best = np.argsort(-scores[r], kind="stable")[:k]
        idx[r] = best
        vals[r] = scores[r, best]
    return vals, idx


def _block_topk(scores: np.ndarray, k: int, floor: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of each row of ``scores`` [Q, C] (C > k): (values [Q, k], columns [Q, k]), sorted, ties -> lower column.

    Threshold filter instead of a full selection: split each row into blocks;
    the k-th largest block maximum is a lower bound of the row's k-th largest
    value (k distinct elements reach it), so only elements >= that bound can
    be in the top-k.  On real data a few dozen per row pass, and selecting
    among them is cheap.  ``floor`` [Q] (the k-th best score found in earlier
    chunks) raises the bound further.  Falls back to argpartition when too
    many elements pass (e.g. massive ties).
    """
    q, c = scores.shape
    nblocks = max(k, min(1024, c // 64))
    b = c // nblocks
    if b < 2:
        return _block_topk_partition(scores, k)
    body = nblocks * b
    # "blocks" are the strided groups {j, j + nblocks, j + 2 nblocks, ...}: any split into
    # disjoint groups gives a valid bound, and this one reduces with fast element-wise maxima
    maxima = scores[:, :body].reshape(q, b, nblocks).max(axis=1)
    if body < c:
        maxima = np.concatenate([maxima, scores[:, body:].max(axis=1, keepdims=True)], axis=1)
    m = maxima.shape[1]
    thr = np.partition(maxima, m - k, axis=1)[:, m - k]
    if floor is not None:
        thr = np.maximum(thr, floor)
    flat = np.flatnonzero(scores >= thr[:, None])  # row-major: sorted by row, then column
    if flat.size > 16 * q * k + 4096:
        return _block_topk_partition(scores, k)
    rows, cols = np.divmod(flat, c)
    vals = scores[rows, cols]
    order = np.lexsort((cols, -vals, rows))
    counts = np.bincount(rows, minlength=q)  # >= k per row, unless the floor (earlier chunks) cut it
    starts = np.cumsum(counts) - counts
    slot = np.arange(k)
    if order.size == 0:
        return np.full((q, k), -np.inf, np.float32), np.zeros((q, k), np.intp)
    take = order[np.minimum(starts[:, None] + slot, order.size - 1)]
    out_v, out_c = vals[take], cols[take]
    valid = slot[None, :] < counts[:, None]
    if not valid.all():  # rows with fewer than k candidates above the floor: pad with -inf (they lose every merge)
        out_v = np.where(valid, out_v, np.float32(-np.inf))
        out_c = np.where(valid, out_c, 0)
    return out_v, out_c


def topk_inner_product(gallery: np.ndarray, queries: np.ndarray, k: int,
                       chunk_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product.

    Args:
        gallery: float32/float16 [N, D] (a memmap is fine: read chunk by chunk).
        queries: float32 [Q, D].
        k: neighbours per query; clipped to N.
        chunk_rows: gallery rows per step (default :func:`default_chunk_rows`).

    Returns:
        (scores float32 [Q, k] descending, indices int64 [Q, k]); equal scores
        are ordered by ascending gallery index.
    """
    n, d = gallery.shape
    q = queries.shape[0]
    k = max(0, min(int(k), n))
    if k == 0 or q == 0:
        return _empty(q, k)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    chunk = int(chunk_rows) if chunk_rows else default_chunk_rows(q, d)
    chunk = max(chunk, k)
    if n <= chunk:  # one block: no merging
        vals, cols = _select(_scores(queries, gallery), k)
        if q == 1:
            order = np.lexsort((cols[0], -vals[0]))
            return vals[:, order], cols[:, order].astype(np.int64)
        order = np.lexsort((cols, -vals), axis=-1)
        return np.take_along_axis(vals, order, 1), np.take_along_axis(cols, order, 1).astype(np.int64)
    best_s = np.zeros((q, 0), dtype=np.float32)
    best_i = np.zeros((q, 0), dtype=np.int64)
    for start in range(0, n, chunk):
        scores = _scores(queries, gallery[start : start + chunk])
        # rows already holding k results only need scores >= their current k-th best
        floor = best_s[:, k - 1] if best_s.shape[1] == k else None
        vals, cols = _select(scores, k, floor)
        best_s, best_i = _merge(best_s, best_i, vals, cols.astype(np.int64) + start, k)
    return np.ascontiguousarray(best_s, dtype=np.float32), np.ascontiguousarray(best_i)


def _rowdot(block: np.ndarray, vec: np.ndarray) -> np.ndarray:
    """float32 [c, D] . [D] -> [c], single-threaded (np.vecdot on NumPy 2, einsum before)."""
    vecdot = getattr(np, "vecdot", None)
    if vecdot is not None:
        return vecdot(block, vec)
    return np.einsum("ij,j->i", block, vec)


def _scores(queries: np.ndarray, block: np.ndarray) -> np.ndarray:
    """float32 [Q, D] x [c, D] -> [Q, c] inner products.

    A float16 block is converted in cache-sized pieces into one reused buffer
    (converting a whole chunk would allocate and stream a large temporary).
    """
    block = np.asarray(block)
    q = queries.shape[0]
    if block.dtype == np.float32:
        if q == 1:
            # One query: a single-threaded row-by-row dot product.  BLAS would split this
            # small, memory-bound product over threads, which stalls for milliseconds
            # whenever the cores are busy (e.g. a server answering several requests at once).
            return _rowdot(block, queries[0])[None]
        return queries @ block.T
    c, d = block.shape
    out = np.empty((q, c), dtype=np.float32)
    piece = max(1, min(c, CONVERT_BYTES // (4 * d)))
    buf = np.empty((piece, d), dtype=np.float32)
    for s0 in range(0, c, piece):
        m = min(piece, c - s0)
        np.copyto(buf[:m], block[s0 : s0 + m])
        if q == 1:
            out[0, s0 : s0 + m] = _rowdot(buf[:m], queries[0])
        else:
            out[:, s0 : s0 + m] = queries @ buf[:m].T
    return out


def _select(scores: np.ndarray, k: int, floor: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k candidates of each row of ``scores`` [Q, C] (unordered), exact with ties -> lower column."""
    q, c = scores.shape
    if c <= k:
        return scores, np.broadcast_to(np.arange(c), (q, c))
    if q == 1 and c <= 2_048:  # one short row: fewer NumPy calls than the block filter
        row = scores[0]
        idx = np.argpartition(row, c - k)[c - k :]
        vals = row[idx]
        if np.count_nonzero(row >= vals.min()) != k:  # a tie at the k-th value straddles the cut
            idx = np.argsort(-row, kind="stable")[:k]
            vals = row[idx]
        return vals[None], idx[None]
    return _block_topk(scores, k, floor)


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


class FaissIndex:
    """FAISS exact inner-product index (``IndexFlatIP``) over float32 rows.

    Install with ``pip install "isfe-model[faiss]"`` (faiss-cpu).  Results are
    re-ordered by (descending score, ascending index) inside the returned k,
    but which of several equal-scored rows FAISS returns at the k-th place is
    up to FAISS.
    """

    def __init__(self, embeddings: np.ndarray):
        try:
            import faiss
        except ImportError:
            raise ImportError(
                'the FAISS backend needs faiss: pip install "isfe-model[faiss]" (or pip install faiss-cpu)'
            ) from None
        self._faiss: Any = faiss
        self.dim = int(embeddings.shape[1])
        self.index = faiss.IndexFlatIP(self.dim)
        for start in range(0, embeddings.shape[0], 262_144):  # bounded temporary float32 copies
            self.index.add(np.ascontiguousarray(embeddings[start : start + 262_144], dtype=np.float32))

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """float32 [Q, D] -> (scores float32 [Q, k], indices int64 [Q, k])."""
        q = queries.shape[0]
        k = max(0, min(int(k), len(self)))
        if k == 0 or q == 0:
            return _empty(q, k)
        scores, idx = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        idx = idx.astype(np.int64)
        order = np.lexsort((idx, -scores), axis=-1)
        return np.take_along_axis(scores, order, 1).astype(np.float32), np.take_along_axis(idx, order, 1)
