"""Parity harness shared by every export backend.

Reference: the PyTorch encoder in fp32 on CPU.  Inputs: real images (an image
folder, or a split of a ``training.data`` source), never only random noise.
For a candidate backend's embeddings of the same images it reports

* ``max_abs``: max |candidate - reference| over all elements;
* ``min_cosine`` / ``mean_cosine``: per-row cosine similarity;
* ``max_norm_dev``: worst | ||row|| - 1 | of the candidate (rows must be unit);
* ``nonfinite``: count of NaN/Inf values;
* retrieval agreement on a gallery built from the same images (each image
  queries all the others): ``top1_agreement`` and ``topk_identical`` (fraction
  of queries whose top-k neighbour *set* equals the reference's; neighbours
  tied with the k-th reference score within 1e-5 are interchangeable: fp32
  rounding alone moves similarities by ~1e-6);
* with labels: leave-one-out weighted kNN top-1 accuracy (k = 10, sigma = 0.1)
  of reference and candidate, and the drop in points.

Gates (:data:`GATES`) are per backend.  :func:`run_parity` prints a table and
writes ``<artifact>.parity.json``.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from isfe_model.jsonsafe import json_safe, write_json
from isfe_model.preprocess import (
    IMAGE_EXTENSIONS,
    ImageError,
    PreprocessSpec,
    center_crop_array,
    preprocess,
    to_chw_float,
)
from isfe_model.search import topk_inner_product
from isfe_model.walk import EXTENSION, walk
from training.data import DataError, has_split, load_split

from .common import ExportError

__all__ = [
    "GATES",
    "Gate",
    "ParityImages",
    "ParityReport",
    "batched",
    "check_gate",
    "compare",
    "list_images",
    "load_folder_images",
    "load_parity_images",
    "neighbours_excluding_self",
    "ort_embedder",
    "reference_embeddings",
    "report_path",
    "run_parity",
]

TIE_TOL = 1e-5  # reference-similarity gap below which two neighbours count as tied (fp32 noise is ~1e-6)
KNN_K = 10
KNN_SIGMA = 0.1


@dataclass(frozen=True)
class Gate:
    """Thresholds a backend must meet; ``None`` = not checked."""

    max_abs: float | None = None
    min_cosine: float | None = None
    mean_cosine: float | None = None
    max_norm_dev: float | None = None
    topk_identical: float | None = None  # required fraction of queries with identical top-k sets
    top1_agreement: float | None = None
    knn_top1_drop: float | None = None  # max drop in points; needs labels
    k: int = 10


#: Gates per backend (issue 5).
GATES: dict[str, Gate] = {
    "onnxruntime-fp32": Gate(max_abs=1e-4, min_cosine=0.99999, max_norm_dev=1e-4, topk_identical=1.0, k=10),
    "onnxruntime-fp32-simplified": Gate(max_abs=1e-4, min_cosine=0.99999, max_norm_dev=1e-4, topk_identical=1.0, k=10),
    "tensorrt-fp32": Gate(max_abs=1e-4, min_cosine=0.99999, max_norm_dev=1e-4),
    "tensorrt-fp16": Gate(min_cosine=0.999, max_norm_dev=1e-3, top1_agreement=0.99),
    "onnxruntime-int8": Gate(mean_cosine=0.99, max_norm_dev=1e-3, knn_top1_drop=1.0),
}


@dataclass
class ParityImages:
    """Preprocessed parity inputs: x float32 [N, 3, S, S] in [0, 1], labels int64 [N] or None."""

    x: np.ndarray
    labels: np.ndarray | None
    source: str
    classes: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.x.shape[0])


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder``: :func:`isfe_model.walk.walk` with the image extensions (any depth, sorted by
    relative path, hidden names skipped, links to files followed, links to folders not)."""
    return walk(folder, extensions=IMAGE_EXTENSIONS).files


def _walk_images(root: Path) -> tuple[list[Path], list[dict[str, str]]]:
    """(image files, what else the walk left out as ``{"path", "reason"}``; files that are not images not listed)."""
    walked = walk(root, extensions=IMAGE_EXTENSIONS)
    return walked.files, [{"path": str(lo.path), "reason": lo.message} for lo in walked.left_out
                          if lo.reason != EXTENSION]


def load_folder_images(folder: str | os.PathLike, spec: PreprocessSpec, max_images: int | None, flag: str = "--images",
                       seed: int = 0) -> ParityImages:
    """Preprocess up to ``max_images`` images of a folder (a fixed random sample when there are more).

    Images in class subfolders (``folder/<class>/x.jpg``) get labels; when any
    image sits directly in ``folder`` there are no labels.  Unreadable images
    are skipped and listed, after them what the folder walk left out (links to
    folders, broken links, FIFOs, unreadable folders, paths over PATH_MAX).

    Raises:
        ExportError: missing folder, or no readable image in it.
    """
    root = Path(folder)
    if not root.exists():
        raise ExportError(f"{flag} {root}: no such folder; give a folder of images (optionally in class subfolders)")
    if not root.is_dir():
        raise ExportError(f"{flag} {root} is not a folder; give a folder of images (optionally in class subfolders)")
    files, left_out = _walk_images(root)
    if not files:
        first = left_out[0] if left_out else None
        why = f"; {len(left_out)} path(s) left out, e.g. {first['path']}: {first['reason']}" if first else ""
        raise ExportError(f"{flag} {root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found in it{why}")
    if max_images is not None and len(files) > max_images:
        pick = np.sort(np.random.default_rng(seed).choice(len(files), size=max_images, replace=False))
        files = [files[i] for i in pick]
    xs, names, skipped = [], [], []
    for f in files:
        try:
            xs.append(preprocess(f, spec))
            names.append(f.relative_to(root).parts)
        except ImageError as e:
            skipped.append({"path": str(f), "reason": e.reason})
    if not xs:
        raise ExportError(f"{flag} {root}: none of the {len(files)} image files could be read "
                          f"(first: {skipped[0]['path']}: {skipped[0]['reason']})")
    labels = None
    classes: list[str] = []
    if all(len(parts) > 1 for parts in names):
        classes = sorted({parts[0] for parts in names})
        index = {c: i for i, c in enumerate(classes)}
        labels = np.array([index[parts[0]] for parts in names], dtype=np.int64)
    return ParityImages(np.stack(xs).astype(np.float32), labels, str(root), classes, skipped + left_out)


def load_parity_images(
    spec: PreprocessSpec,
    images_dir: str | os.PathLike | None = None,
    data: str | None = None,
    split: str = "test",
    max_images: int | None = 512,
    flag: str = "--images",
    seed: int = 0,
) -> ParityImages:
    """Real images for a parity check, preprocessed with the model's ``spec``.

    ``images_dir`` (an image folder) wins; otherwise ``split`` of the
    ``training.data`` source ``data`` (None = the embedded default dataset).
    """
    if images_dir is not None:
        return load_folder_images(images_dir, spec, max_images, flag=flag, seed=seed)
    try:
        if split == "test" and not has_split(data, "test"):
            split = "train"  # a folder of unlabelled images has no test split: check on its (training) images
        ds = load_split(data, split, resize_size=spec.resize_size, decode=spec.decode)
    except DataError as e:
        raise ExportError(str(e)) from None
    idx = np.arange(len(ds))
    if max_images is not None and len(idx) > max_images:
        idx = np.sort(np.random.default_rng(seed).choice(len(idx), size=max_images, replace=False))
    imgs = np.asarray(ds.images[idx])
    x = to_chw_float(center_crop_array(imgs, spec.input_size)).astype(np.float32)
    return ParityImages(x, np.asarray(ds.labels[idx], dtype=np.int64), f"{ds.name}:{split}", list(ds.classes))


def batched(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch_size: int) -> np.ndarray:
    """Apply ``fn`` ([b,3,S,S] -> [b,D]) over ``x`` in batches; float32 [N, D]."""
    outs = [np.asarray(fn(np.ascontiguousarray(x[i : i + batch_size])), dtype=np.float32)
            for i in range(0, len(x), batch_size)]
    return np.concatenate(outs)


def reference_embeddings(model: Any, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """PyTorch fp32 CPU embeddings (the reference): float32 [N, D]."""
    import torch

    model = model.to("cpu", torch.float32).eval()

    def run(b: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(b)).float().numpy()

    return batched(run, x, batch_size)


def ort_embedder(onnx_path: str | os.PathLike, threads: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """ONNX Runtime CPU session as a function float32 [b,3,S,S] -> [b,D]."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    if threads:
        so.intra_op_num_threads = int(threads)
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda b: sess.run(None, {name: b})[0]


def neighbours_excluding_self(e: np.ndarray, k: int, chunk_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k nearest *other* rows by inner product, with ``isfe_model.search.topk_inner_product``.

    The top k+1 of the full ranking (descending score, ties by lower index)
    minus the row itself is the top k of the other rows, whether or not the
    row ranks itself first (rounding can put a near-duplicate above it).

    Args:
        e: float [N, D], finite (scored in float32).
        chunk_rows: gallery rows per step of the search (default: its own).

    Returns:
        (scores float32 [N, k'], indices int64 [N, k']) with k' = min(k, N-1),
        sorted by descending score, ties by lower index.
    """
    n = e.shape[0]
    k = max(0, min(int(k), n - 1))
    e32 = np.ascontiguousarray(e, dtype=np.float32)
    sc, idx = topk_inner_product(e32, e32, k + 1, chunk_rows=chunk_rows)  # [N, k+1]
    keep = idx != np.arange(n)[:, None]
    keep[keep.all(axis=1), -1] = False  # the row itself is not among the k+1: drop the last instead
    return sc[keep].reshape(n, k), idx[keep].reshape(n, k)


def _knn_top1(nbr: np.ndarray, nbr_scores: np.ndarray, labels: np.ndarray, k: int = KNN_K,
              sigma: float = KNN_SIGMA) -> float:
    """Leave-one-out weighted kNN top-1 accuracy in percent (votes exp(sim / sigma))."""
    k = min(k, nbr.shape[1])
    n_cls = int(labels.max()) + 1
    votes = np.zeros((nbr.shape[0], n_cls))
    w = np.exp((nbr_scores[:, :k].astype(np.float64) - 1.0) / sigma)  # shifted: same argmax, no overflow
    np.add.at(votes, (np.arange(nbr.shape[0])[:, None], labels[nbr[:, :k]]), w)
    return float((votes.argmax(axis=1) == labels).mean() * 100.0)


def compare(ref: np.ndarray, cand: np.ndarray, labels: np.ndarray | None = None, k: int = 10) -> dict[str, Any]:
    """Parity metrics of candidate vs reference embeddings (both float [N, D], N >= 2)."""
    if ref.shape != cand.shape:
        raise ExportError(f"candidate embeddings have shape {tuple(cand.shape)}, reference {tuple(ref.shape)}")
    ref = ref.astype(np.float64)
    cand = cand.astype(np.float64)
    finite = np.isfinite(cand)
    nonfinite = int((~finite).sum())
    cand_safe = np.where(finite, cand, 0.0)
    nr, nc = np.linalg.norm(ref, axis=1), np.linalg.norm(cand, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = (ref * cand).sum(axis=1) / (nr * nc)
    cos = np.where(np.isfinite(cos), cos, -1.0)  # a NaN/Inf/zero row counts as the worst cosine
    kmax = max(k, KNN_K)
    r_sc, r_idx = neighbours_excluding_self(ref, kmax)
    c_sc, c_idx = neighbours_excluding_self(cand_safe, kmax)
    kk = min(k, r_idx.shape[1])
    identical = np.zeros(len(ref), dtype=bool)
    top1 = np.zeros(len(ref), dtype=bool)
    overlap = np.zeros(len(ref))
    for i in range(len(ref)):
        rs, cs = set(r_idx[i, :kk].tolist()), set(c_idx[i, :kk].tolist())
        overlap[i] = len(rs & cs) / max(kk, 1)
        identical[i] = rs == cs
        top1[i] = r_idx[i, 0] == c_idx[i, 0]
        if not (identical[i] and top1[i]):  # differences only among neighbours tied in the reference
            sims = ref @ ref[i]
            if not identical[i]:
                identical[i] = all(abs(sims[j] - r_sc[i, kk - 1]) <= TIE_TOL for j in rs ^ cs)
            if not top1[i]:
                top1[i] = abs(sims[c_idx[i, 0]] - r_sc[i, 0]) <= TIE_TOL
    out: dict[str, Any] = {
        "n": int(len(ref)),
        "dim": int(ref.shape[1]),
        "max_abs": float(np.abs(cand - ref).max()) if nonfinite == 0 else math.inf,
        "mean_abs": float(np.abs(cand - ref).mean()) if nonfinite == 0 else math.inf,
        "min_cosine": float(cos.min()),
        "mean_cosine": float(cos.mean()),
        "max_norm_dev": float(np.abs(nc - 1.0).max()) if nonfinite == 0 else math.inf,
        "nonfinite": nonfinite,
        "k": int(kk),
        "top1_agreement": float(top1.mean()),
        "topk_identical": float(identical.mean()),
        "topk_overlap": float(overlap.mean()),
    }
    if labels is not None and len(np.unique(labels)) > 1:
        rk = _knn_top1(r_idx, r_sc, labels)
        ck = _knn_top1(c_idx, c_sc, labels)
        out.update({"knn_top1_reference": rk, "knn_top1_candidate": ck, "knn_top1_drop": rk - ck})
    return out


def check_gate(metrics: dict[str, Any], gate: Gate) -> list[dict[str, Any]]:
    """One row per checked metric: {"metric", "value", "limit", "passed"}."""
    rows: list[dict[str, Any]] = [
        {"metric": "nonfinite", "value": metrics["nonfinite"], "limit": "== 0", "passed": metrics["nonfinite"] == 0}]

    def add(metric: str, limit: float | None, op: str) -> None:
        if limit is None:
            return
        value = metrics.get(metric)
        if value is None:
            rows.append({"metric": metric, "value": None, "limit": f"{op} {limit:g}", "passed": False,
                         "note": "not measurable: give labelled images (class subfolders) or a labelled --data source"})
            return
        ok = value <= limit if op == "<=" else value >= limit
        rows.append({"metric": metric, "value": value, "limit": f"{op} {limit:g}",
                     "passed": bool(ok and math.isfinite(value))})

    add("max_abs", gate.max_abs, "<=")
    add("min_cosine", gate.min_cosine, ">=")
    add("mean_cosine", gate.mean_cosine, ">=")
    add("max_norm_dev", gate.max_norm_dev, "<=")
    add("topk_identical", gate.topk_identical, ">=")
    add("top1_agreement", gate.top1_agreement, ">=")
    add("knn_top1_drop", gate.knn_top1_drop, "<=")
    return rows


@dataclass
class ParityReport:
    """Result of one backend's parity check (saved as ``<artifact>.parity.json``)."""

    backend: str
    artifact: str
    images: str
    n_images: int
    metrics: dict[str, Any]
    checks: list[dict[str, Any]]
    passed: bool
    skipped_images: list[dict[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The report as plain JSON values (:func:`isfe_model.jsonsafe.json_safe`: non-finite metrics -> null)."""
        return json_safe(asdict(self))

    def table(self) -> str:
        """A fixed-width text table of the checks."""
        lines = [f"parity {self.backend}  ({self.n_images} images from {self.images}; reference: PyTorch fp32 CPU)"]
        lines.append(f"  {'metric':<18} {'value':>14}  {'gate':<12} result")
        shown = set()
        for c in self.checks:
            shown.add(c["metric"])
            lines.append(f"  {c['metric']:<18} {_fmt(c['value'], c['metric']):>14}  {c['limit']:<12} "
                         f"{'ok' if c['passed'] else 'FAIL'}" + (f"  ({c['note']})" if c.get("note") else ""))
        for key in ("max_abs", "min_cosine", "mean_cosine", "max_norm_dev", "top1_agreement", "topk_identical",
                    "knn_top1_reference", "knn_top1_candidate"):
            if key not in shown and key in self.metrics:
                lines.append(f"  {key:<18} {_fmt(self.metrics[key], key):>14}  {'-':<12} info")
        lines.append(f"  => {'PASSED' if self.passed else 'FAILED'}")
        return "\n".join(lines)


def _fmt(v: Any, metric: str = "") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if "cosine" in metric:
            return f"{v:.8f}"
        if metric.startswith("knn"):
            return f"{v:.2f}"
        return f"{v:.3e}" if (v != 0 and abs(v) < 1e-3) else f"{v:.6f}"
    return str(v)


def report_path(artifact: str | os.PathLike) -> Path:
    """Where the report of an artifact goes: ``<artifact>.parity.json``."""
    return Path(f"{artifact}.parity.json")


def run_parity(
    backend: str,
    embed: Callable[[np.ndarray], np.ndarray],
    images: ParityImages,
    reference: np.ndarray,
    artifact: str | os.PathLike,
    batch_size: int = 64,
    gate: Gate | None = None,
    save: bool = True,
    log: Callable[[str], None] | None = print,
) -> ParityReport:
    """Embed ``images`` with a backend, compare with ``reference``, gate, print and save.

    Args:
        backend: a key of :data:`GATES` (or any name with an explicit ``gate``).
        embed: float32 [b,3,S,S] -> [b,D].
        reference: PyTorch fp32 CPU embeddings of ``images.x``, [N, D].
        artifact: the artifact's final path; the report goes to
            ``<artifact>.parity.json`` when ``save``.
    """
    if len(images) < 2:
        raise ExportError("parity needs at least 2 images")
    gate = gate or GATES[backend]
    try:
        cand = batched(embed, images.x, batch_size)
    except ExportError:
        raise
    except Exception as e:  # backend runtime errors (onnxruntime, TensorRT) come in many types
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise ExportError(f"{backend}: running {artifact} failed ({type(e).__name__}: {first_line})") from None
    metrics = compare(reference, cand, images.labels, k=gate.k)
    checks = check_gate(metrics, gate)
    report = ParityReport(
        backend=backend,
        artifact=str(artifact),
        images=images.source,
        n_images=len(images),
        metrics=metrics,
        checks=checks,
        passed=all(c["passed"] for c in checks),
        skipped_images=images.skipped,
    )
    if log is not None:
        log(report.table())
    if save:
        write_json(report_path(artifact), report.to_json())
    return report

