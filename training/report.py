"""Visual reports of training runs (the paper's Fig. 3-6 for your own runs).

``python -m training.report --run runs/<name> [--run runs/<other> ...] [--data ...] [--out DIR]``

Writes into ``--out`` (default ``<first run>/report``):

* ``curves.png`` -- training loss and weighted-kNN top-1 per epoch, read from
  each run's ``metrics.jsonl``; several ``--run`` are overlaid (legend = run
  folder name) to compare presets or ablations (paper Fig. 3).
* ``similarity.png`` -- the paper's Fig. 5 for the first run: histograms of
  the cosine similarity of each query to its 5 nearest neighbours within its
  own class and to its 5 nearest within the other classes, for the randomly
  initialised encoder (left) and the trained one (right).
* ``retrieval.png`` -- example queries with their top-k neighbours, each
  neighbour framed green (same class) or red (other class) (paper Fig. 4).
* ``report.json`` -- the separation numbers, the run's configuration and
  final metrics, and everything needed to recompute the numbers.
* ``report.html`` -- one self-contained page (figures embedded as base64
  ``data:`` URIs) with the figures, configuration and metrics, to share a run
  as a single file.

Definitions (pinned down here; the tests recompute them independently):

* Embeddings: the evaluation transform (center crop of the cached
  ``resize_size`` images to ``input_size``), unit rows, so cosine similarity
  is a dot product. Similarities are computed in float64.
* Queries: the test split, or -- when it has more than ``--max-queries``
  (default 2000) images -- the subset ``sorted(numpy.random.default_rng(seed)
  .choice(n_test, max_queries, replace=False))`` (``--seed``, default 0).
  The bank (``--bank``): the whole train split (default; the kNN memory bank
  of the paper's protocol) or the test split itself, each query excluded
  from its own neighbours.
* Neighbours, the paper's Fig. 5 definition (k = 5 by default, ``--nn-k``):
  per query, its k most cosine-similar bank images *among those of its own
  class* (the "same" pairs) and its k most similar *among those of the other
  classes* (the "other" pairs) -- not the overall k nearest split by label.
  Ties go to the lower bank index; a query whose class (or its complement)
  has fewer than k bank images contributes what there is.  See
  :func:`class_neighbours`.
* Separation: ``mean_gap = mean(sim | same) - mean(sim | other)`` over all
  pairs, and ``auc`` = the area under the ROC curve of predicting "same
  class" from the similarity (rank statistic, ties count 1/2); ``null`` when
  one of the two groups is empty.  (``same_fraction`` = n_same / n_pairs is
  about 1/2 by construction.)
* Random encoder: ``build_encoder(model.cfg)`` right after
  ``torch.manual_seed(seed)`` (the global RNG state is restored afterwards),
  same preprocessing, eval mode.
* Retrieval grid: ``--queries`` (default 8) test images picked with
  ``numpy.random.default_rng(seed)`` (different classes first), each with its
  ``--top-k`` (default 8) most similar images of the test split (the
  evaluation set), the query itself excluded, as in Recall@K.

Bad input (a missing run folder, one without ``metrics.jsonl`` or -- for the
first run -- without ``checkpoint.pt``, an unreadable ``metrics.jsonl``, bad
data) prints one line and exits 2. With ``--curves-only`` only ``curves.png``
is drawn and no checkpoint is needed (useful while runs are still training).
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import html
import io
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from isfe_model.atomic import atomic_write_bytes
from isfe_model.jsonsafe import dumps
from training.config import UsageError
from training.data import DataError, load_split
from training.model import CheckpointError, build_encoder, load_encoder
from training.retrieval import embed_images, topk_similar
from training.runtime import resolve_device

__all__ = [
    "ReportError",
    "RunRecord",
    "load_run",
    "read_metrics",
    "curves_figure",
    "write_curves",
    "select_queries",
    "class_neighbours",
    "fig5_pairs",
    "roc_auc",
    "separation",
    "similarity_figure",
    "retrieval_queries",
    "retrieval_figure",
    "figure_png",
    "render_html",
    "build_report",
    "main",
]

SAME_COLOR = "#2ca02c"  # green: neighbour of the query's class
OTHER_COLOR = "#d62728"  # red: neighbour of another class
QUERY_COLOR = "#1f4e9c"
#: Where Fig. 5's neighbours come from (``--bank``): the train split (the kNN memory bank) or the test split itself.
BANKS = ("train", "test")


class ReportError(ValueError):
    """Bad input for a report; the message names the problem and the fix."""


# --------------------------------------------------------------------------- runs


@dataclass
class RunRecord:
    """One run folder: its metrics rows and configuration."""

    path: Path
    name: str
    rows: list[dict[str, Any]]
    config: dict[str, Any]

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint.pt"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``metrics.jsonl`` (one JSON object per line, each with an integer ``epoch``).

    A partial last line (a run being written right now) is skipped; any other
    unreadable line raises :class:`ReportError`.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ReportError(f"cannot read {path} ({e}); pass a run folder written by `python -m training`") from None
    rows: list[dict[str, Any]] = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or isinstance(row.get("epoch"), bool) or not isinstance(row.get("epoch"), int):
                raise ValueError("no integer 'epoch'")
        except ValueError as e:
            if i == len(lines) and not path.read_bytes().endswith(b"\n"):
                continue  # the training run is writing this line right now
            raise ReportError(f"{path} line {i} is not a metrics row ({e}); it is damaged — rerun the training "
                              "or delete the line") from None
        rows.append(row)
    if not rows:
        raise ReportError(f"{path} has no metrics rows yet; wait for the run's first evaluation (epoch 0) or rerun it")
    return rows


def load_run(path: str | Path, need_checkpoint: bool = True) -> RunRecord:
    """Check a run folder and read its metrics and configuration."""
    p = Path(path)
    if not p.exists():
        raise ReportError(f"--run {p}: no such folder; pass a run folder written by `python -m training --out DIR`")
    if not p.is_dir():
        if p.name in ("checkpoint.pt", "metrics.jsonl", "config.json") and p.parent.is_dir():
            p = p.parent
        else:
            raise ReportError(f"--run {p} is a file, not a run folder; pass the folder that holds metrics.jsonl "
                              "and checkpoint.pt")
    if not (p / "metrics.jsonl").is_file():
        raise ReportError(f"--run {p} has no metrics.jsonl; it is not a training run folder "
                          "(or the run has not started)")
    if need_checkpoint and not (p / "checkpoint.pt").is_file():
        raise ReportError(f"--run {p} has no checkpoint.pt (the run has not finished); "
                          "wait for it, or use --curves-only")
    rows = read_metrics(p / "metrics.jsonl")
    config: dict[str, Any] = {}
    if (p / "config.json").is_file():
        try:
            loaded = json.loads((p / "config.json").read_text(encoding="utf-8"))
            config = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            config = {}
    name = p.resolve().name or str(p)
    return RunRecord(path=p, name=name, rows=rows, config=config)


# --------------------------------------------------------------------------- figures (Agg, no pyplot)


def _write(path: Path, data: bytes) -> Path:
    """Atomic write with the usual permissions (0666 minus the umask; temp files start as 0600)."""
    atomic_write_bytes(path, data)
    mask = os.umask(0)
    os.umask(mask)
    try:
        os.chmod(path, 0o666 & ~mask)
    except OSError:
        pass
    return path


def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def figure_png(fig) -> bytes:
    """Render a matplotlib Figure with the Agg backend -> PNG bytes (no global pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", facecolor="white")
    return buf.getvalue()


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = sorted((int(r["epoch"]), float(r[key])) for r in rows
                 if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool))
    return [e for e, _ in pts], [v for _, v in pts]


def curves_figure(runs: Sequence[RunRecord]):
    """Loss (left) and kNN top-1 (right; Recall@1 for runs with unseen test classes) per epoch; one line per run."""
    fig = _new_figure(11, 4.2)
    ax_loss, ax_knn = fig.subplots(1, 2)
    names = [_plain(n) for n in _unique_names([r.name for r in runs])]
    any_loss = False
    shown: set[str] = set()
    for run, label in zip(runs, names):
        e, v = _series(run.rows, "loss")
        if e:
            any_loss = True
            ax_loss.plot(e, v, marker="o", markersize=3.5, linewidth=1.6, label=label)
        key = "knn_top1" if _series(run.rows, "knn_top1")[0] else "recall@1"  # unseen test classes: Recall@1
        e, v = _series(run.rows, key)
        if e:
            shown.add(key)
            ax_knn.plot(e, v, marker="o", markersize=3.5, linewidth=1.6,
                        label=label if key == "knn_top1" else f"{label} (R@1)")
    ax_loss.set_title("InvaSpread training loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("mean loss per step")
    if not any_loss:
        ax_loss.text(0.5, 0.5, "no training epoch recorded yet", ha="center", va="center", transform=ax_loss.transAxes,
                     color="0.4")
    if shown == {"recall@1"}:
        ax_knn.set_title("Recall@1 (unseen test classes)")
        ax_knn.set_ylabel("Recall@1 (%)")
    else:
        ax_knn.set_title("weighted kNN top-1 accuracy (test split)" + (" / Recall@1" if len(shown) > 1 else ""))
        ax_knn.set_ylabel("top-1 accuracy (%)")
    if not shown:
        ax_knn.text(0.5, 0.5, "no accuracy recorded\n(the data has no labelled test split)", ha="center", va="center",
                    transform=ax_knn.transAxes, color="0.4")
    ax_knn.set_xlabel("epoch")
    epochs = [int(r["epoch"]) for run in runs for r in run.rows]
    lo, hi = min(epochs), max(epochs)
    pad = max(0.5, 0.03 * (hi - lo))
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_loss, ax_knn):
        ax.grid(True, alpha=0.3)
        ax.set_xlim(lo - pad, hi + pad)  # both panels share the epoch axis, also with a single loss point
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    title = _plain(runs[0].name) if len(runs) == 1 else f"{len(runs)} runs"
    fig.suptitle(f"Learning curves: {title}", fontsize=12)
    return fig


def _plain(text: object) -> str:
    """Text shown literally by matplotlib (a '$' in a folder or class name would start mathtext)."""
    return str(text).replace("$", r"\$")


def _unique_names(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n} ({seen[n]})")
    return out


def write_curves(run_dirs: Sequence[str | Path], out_png: str | Path) -> Path:
    """Draw curves.png for run folders (only metrics.jsonl is needed); atomic write. Raises ReportError."""
    runs = [load_run(d, need_checkpoint=False) for d in run_dirs]
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    return _write(out_png, figure_png(curves_figure(runs)))


# --------------------------------------------------------------------------- similarity statistics


def select_queries(n: int, max_queries: int, seed: int) -> np.ndarray:
    """Indices of the query subset: all of ``range(n)``, or a seeded sorted random subset of ``max_queries``."""
    if n <= max_queries:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_queries, replace=False)).astype(np.int64)


def _float64_topk(queries: torch.Tensor, bank: torch.Tensor, k: int,
                  exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The report's neighbours: :func:`training.retrieval.topk_similar` on the CPU in float64 -> numpy.

    queries [M, D], bank [N, D] -> (sims float64 [M, k], idx int64 [M, k]), most similar first, ties -> lower index.
    """
    sims, idx = topk_similar(queries.cpu(), bank.cpu(), k, exclude=exclude, chunk_size=256, dtype=torch.float64)
    return sims.numpy(), idx.numpy()


#: Most score entries (query rows x candidates) one other-class top-k call may return (float64 + int64: 16 B each).
_CANDIDATE_BUDGET = 1 << 22


def class_neighbours(queries: torch.Tensor, bank: torch.Tensor, query_labels: np.ndarray, bank_labels: np.ndarray,
                     k: int, exclude: np.ndarray | None = None,
                     chunk_size: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fig. 5's neighbours: per query, its k nearest bank rows within its class and its k nearest outside it.

    queries [M, D], bank [N, D] (unit rows: the inner product is the cosine), labels [M] and [N];
    ``exclude`` int [M] (optional): the bank row of query i itself (same label), never its neighbour.

    same(i) = top-k of <q_i, b_j> over {j : y_j = y_i, j != exclude_i};
    other(i) = top-k of <q_i, b_j> over {j : y_j != y_i}; both descending, ties -> lower j, in float64.

    Exact and chunked, through :func:`training.retrieval.topk_similar`: per query class c, the same-class
    search runs on the bank rows of class c (n_c of them); the other-class top-k is the first k other-class
    entries of the overall top-(k + n_c), which must contain them (at most n_c entries are of class c).

    Returns (same_sims [M, k] float64, same_idx [M, k] int64, other_sims, other_idx): indices into the bank,
    most similar first; where a class (or its complement) has fewer than k candidates the row is padded with
    NaN / -1.
    """
    q = torch.as_tensor(queries).detach().cpu()
    b = torch.as_tensor(bank).detach().cpu()
    yq, yb = np.asarray(query_labels, dtype=np.int64), np.asarray(bank_labels, dtype=np.int64)
    m, n = len(yq), len(yb)
    if q.shape[0] != m or b.shape[0] != n:
        raise ValueError(f"labels do not fit: queries {tuple(q.shape)} with {m} labels, bank {tuple(b.shape)} "
                         f"with {n} labels")
    ex = None if exclude is None else np.asarray(exclude, dtype=np.int64)
    if ex is not None and (ex.shape != (m,) or (m and (ex.min() < 0 or ex.max() >= n or (yb[ex] != yq).any()))):
        raise ValueError("exclude must give, per query, its own bank row (an index in [0, N) with the query's label)")
    k = max(0, int(k))
    out = [np.full((m, k), np.nan), np.full((m, k), -1, dtype=np.int64),
           np.full((m, k), np.nan), np.full((m, k), -1, dtype=np.int64)]
    for c in np.unique(yq):
        rows = np.flatnonzero(yq == c)
        members = np.flatnonzero(yb == c)  # ascending, so local ties -> lower bank index too
        if members.size:
            local_ex = None if ex is None else np.searchsorted(members, ex[rows])
            sims, idx = topk_similar(q[rows], b[members], k, exclude=local_ex, chunk_size=chunk_size,
                                     dtype=torch.float64)
            w = idx.shape[1]
            out[0][rows, :w], out[1][rows, :w] = sims.numpy(), members[idx.numpy()]
        want = min(k, n - members.size)  # other-class candidates there are
        if want == 0:
            continue
        step = max(1, _CANDIDATE_BUDGET // (k + members.size))
        for lo in range(0, rows.size, step):
            part = rows[lo : lo + step]
            sims, idx = (t.numpy() for t in topk_similar(q[part], b, k + members.size, chunk_size=chunk_size,
                                                        dtype=torch.float64))
            first = np.argsort(yb[idx] == c, axis=1, kind="stable")[:, :want]  # other-class entries, in rank order
            out[2][part, :want] = np.take_along_axis(sims, first, 1)
            out[3][part, :want] = np.take_along_axis(idx, first, 1)
    return out[0], out[1], out[2], out[3]


def fig5_pairs(queries: torch.Tensor, bank: torch.Tensor, query_labels: np.ndarray, bank_labels: np.ndarray,
               k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The (query, neighbour) pairs of Fig. 5 -> (sims float64 [P], same bool [P]).

    Each query's same-class k nearest (same = True) then its other-class k nearest (same = False), from
    :func:`class_neighbours`, queries in order; missing neighbours (a class with fewer than k) are left out.
    """
    ss, si, os_, oi = class_neighbours(queries, bank, query_labels, bank_labels, k, exclude)
    sims = np.concatenate([ss, os_], axis=1)
    same = np.concatenate([np.ones_like(si, dtype=bool), np.zeros_like(oi, dtype=bool)], axis=1)
    keep = np.concatenate([si, oi], axis=1) >= 0
    return sims[keep], same[keep]


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve of ``scores`` for the binary ``positive`` labels.

    Mann-Whitney form: P(score of a positive > score of a negative) + 1/2 P(tie),
    with average ranks for ties. None when either class is empty.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(positive, dtype=bool).ravel()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(s, kind="stable")
    sorted_s = s[order]
    ranks = np.empty(len(s), dtype=np.float64)
    # average rank (1-based) of each run of equal scores
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], len(s)]
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def separation(sims: np.ndarray, same: np.ndarray) -> dict[str, Any]:
    """Statistics of the (query, neighbour) similarities split by same/other class."""
    s = np.asarray(sims, dtype=np.float64).ravel()
    m = np.asarray(same, dtype=bool).ravel()
    a, b = s[m], s[~m]

    def stat(x: np.ndarray, f) -> float | None:
        return float(f(x)) if x.size else None

    mean_same, mean_other = stat(a, np.mean), stat(b, np.mean)
    return {
        "n_pairs": int(s.size),
        "n_same": int(a.size),
        "n_other": int(b.size),
        "same_fraction": float(m.mean()) if s.size else None,
        "mean_same": mean_same,
        "mean_other": mean_other,
        "std_same": stat(a, np.std),
        "std_other": stat(b, np.std),
        "mean_gap": None if mean_same is None or mean_other is None else mean_same - mean_other,
        "auc": roc_auc(s, m),
    }


def _fmt(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def similarity_figure(panels: Sequence[tuple[str, np.ndarray, np.ndarray, dict[str, Any]]], k: int):
    """Histograms per panel: (title, sims [P], same [P] bool, separation stats) for P (query, neighbour) pairs."""
    fig = _new_figure(5.2 * len(panels), 4.4)
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (title, sims, same, st) in zip(axes, panels):
        s = np.asarray(sims, dtype=np.float64).ravel()
        m = np.asarray(same, dtype=bool).ravel()
        lo, hi = (float(s.min()), float(s.max())) if s.size else (0.0, 1.0)
        if hi - lo < 1e-6:
            lo, hi = lo - 0.01, hi + 0.01
        bins = np.linspace(lo, hi, 41)
        groups = ((m, SAME_COLOR, f"{k}NN within the query's class"), (~m, OTHER_COLOR, f"{k}NN in the other classes"))
        for sel, color, label in groups:
            if sel.any():
                ax.hist(s[sel], bins=bins, density=True, alpha=0.55, color=color, label=f"{label} (n={int(sel.sum())})")
                ax.axvline(float(s[sel].mean()), color=color, linestyle="--", linewidth=1.4)
        ax.set_title(f"{title}\nmean gap {_fmt(st['mean_gap'])}   AUC {_fmt(st['auc'])}", fontsize=10)
        ax.set_xlabel("cosine similarity of query and neighbour")
        ax.set_ylabel("density")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"Query to its {k} nearest neighbours within its class vs within the other classes "
                 "(paper Fig. 5; dashed: means)", fontsize=11)
    return fig


# --------------------------------------------------------------------------- retrieval grid


def retrieval_queries(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` query indices in seeded random order, covering different classes first."""
    labels = np.asarray(labels)
    order = np.random.default_rng(seed).permutation(len(labels))
    picked: list[int] = []
    seen: set[int] = set()
    for i in order:
        if int(labels[i]) not in seen:
            picked.append(int(i))
            seen.add(int(labels[i]))
            if len(picked) == n:
                break
    for i in order:
        if len(picked) >= n:
            break
        if int(i) not in picked:
            picked.append(int(i))
    return np.asarray(picked[:n], dtype=np.int64)


def _show(ax, img: np.ndarray, color: str, width: float) -> None:
    ax.imshow(np.asarray(img), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for sp in ax.spines.values():
        sp.set_edgecolor(color)
        sp.set_linewidth(width)


def retrieval_figure(images: np.ndarray, labels: np.ndarray, classes: Sequence[str], query_idx: np.ndarray,
                     nn_idx: np.ndarray, nn_sims: np.ndarray, title: str):
    """Grid: one row per query (first column), then its neighbours framed green/red.

    Args:
        images: uint8 [N, R, R, 3] of the evaluation set; labels: [N].
        query_idx: [Q]; nn_idx, nn_sims: [Q, K] neighbours (indices into images).
    """
    q, k = nn_idx.shape
    fig = _new_figure(max(6.0, 1.15 * (k + 1) + 0.4), 1.35 * q + 0.9)
    grid = fig.subplots(q, k + 1, squeeze=False)

    def name(i: int) -> str:
        c = str(classes[int(labels[i])])
        return _plain(c if len(c) <= 12 else c[:11] + "…")

    for r in range(q):
        qi = int(query_idx[r])
        _show(grid[r, 0], images[qi], QUERY_COLOR, 3.0)
        grid[r, 0].set_title(f"query: {name(qi)}", fontsize=8, color=QUERY_COLOR)
        for c in range(k):
            ni = int(nn_idx[r, c])
            same = int(labels[ni]) == int(labels[qi])
            color = SAME_COLOR if same else OTHER_COLOR
            _show(grid[r, c + 1], images[ni], color, 3.0)
            grid[r, c + 1].set_title(f"{name(ni)}  {nn_sims[r, c]:.3f}", fontsize=7, color=color)
    for c in range(k):
        grid[q - 1, c + 1].set_xlabel(f"#{c + 1}", fontsize=8)
    fig.suptitle(_plain(title), fontsize=10)
    return fig


# --------------------------------------------------------------------------- HTML


def _table(rows: list[tuple[str, Any]]) -> str:
    cells = []
    for k, v in rows:
        if isinstance(v, float):
            text = f"{v:.4g}"
        elif isinstance(v, (dict, list, tuple)):
            text = dumps(v)
        else:
            text = "" if v is None else str(v)
        cells.append(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(text)}</td></tr>")
    return "<table>" + "".join(cells) + "</table>"


def render_html(report: dict[str, Any], pngs: dict[str, bytes]) -> str:
    """A static, self-contained page: figures as base64 data URIs, config and metrics as tables."""
    def img(name: str, alt: str) -> str:
        if name not in pngs:
            return ""
        data = base64.b64encode(pngs[name]).decode("ascii")
        return (f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(alt)}</figcaption></figure>")

    sim = report.get("similarity", {})
    sep_rows = []
    for which in ("random", "trained"):
        st = sim.get(which)
        if st:
            sep_rows += [(f"{which}: mean same-class", st["mean_same"]),
                         (f"{which}: mean other-class", st["mean_other"]),
                         (f"{which}: mean gap", st["mean_gap"]), (f"{which}: AUC", st["auc"])]
    final = report.get("final_metrics", {})
    cfg = report.get("config", {})
    runs = ", ".join(report.get("runs", []))
    title = f"ISFE run report: {report.get('run_name', '')}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
        "img{max-width:100%;border:1px solid #ddd}figure{margin:1.5em 0}figcaption{color:#555;font-size:.9em}"
        "table{border-collapse:collapse;margin:.5em 0 1.5em}"
        "th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;"
        "font-size:.9em;vertical-align:top}th{background:#f4f4f4;font-weight:600}td{font-family:ui-monospace,monospace;"
        "word-break:break-all}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>Run folder: <code>{html.escape(str(report.get('run', '')))}</code>; "
        f"data: <code>{html.escape(str(report.get('data', '')))}</code>;"
        f" curves compare: {html.escape(runs)}.</p>",
        "<h2>Final metrics</h2>",
        _table(list(final.items())),
    ]
    summaries = report.get("run_summaries", [])
    if len(summaries) > 1:
        head = "".join(f"<th>{h}</th>" for h in ("run", "last epoch", "kNN top-1 (%)", "kNN top-5 (%)", "last loss"))
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape('' if v is None else str(v))}</td>"
                             for v in (r["name"], r["epoch"], r["knn_top1"], r["knn_top5"], r["loss"])) + "</tr>"
            for r in summaries)
        parts += ["<h2>Runs compared</h2>", f"<table><tr>{head}</tr>{body}</table>"]
    if sep_rows:
        parts += [
            "<h2>Similarity separation</h2>",
            f"<p>Each of {sim.get('num_queries', '?')} test queries with its {sim.get('nn_k', '?')} most "
            f"cosine-similar {html.escape(str(sim.get('bank_split', 'train')))} images of its own class and its "
            f"{sim.get('nn_k', '?')} most similar of the other classes (paper Fig. 5). "
            "AUC: area under the ROC curve of &ldquo;same class&rdquo; vs similarity.</p>",
            _table(sep_rows),
        ]
    parts += [
        "<h2>Figures</h2>",
        img("curves.png", "Learning curves: loss and kNN top-1 per epoch"),
        img("similarity.png", "Cosine similarity of each query to its nearest neighbours within its class and "
                              "within the other classes, random vs trained encoder"),
        img("retrieval.png", "Example retrievals from the test split (green: same class, red: other class)"),
        "<h2>Configuration</h2>",
        _table(list(cfg.items())),
        "</body></html>",
    ]
    return "\n".join(parts)


# --------------------------------------------------------------------------- the report


@dataclass
class ReportOptions:
    data: str | None = None
    out: str | None = None
    nn_k: int = 5
    bank: str = "train"
    max_queries: int = 2000
    queries: int = 8
    top_k: int = 8
    seed: int = 0
    batch_size: int = 512
    device: str = "auto"
    curves_only: bool = False


def _random_encoder(cfg, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_encoder(cfg)
    return model.eval()


def _summary(run: RunRecord) -> dict[str, Any]:
    last = run.rows[-1]
    losses = [r["loss"] for r in run.rows if "loss" in r]
    return {"name": run.name, "path": str(run.path), "epoch": last.get("epoch"), "knn_top1": last.get("knn_top1"),
            "knn_top5": last.get("knn_top5"), "loss": losses[-1] if losses else None}


def _check_options(run_dirs: Sequence[str | Path], opts: ReportOptions) -> None:
    if not run_dirs:
        raise ReportError("give at least one --run FOLDER")
    checks = (("--nn-k", opts.nn_k), ("--max-queries", opts.max_queries), ("--queries", opts.queries),
              ("--top-k", opts.top_k), ("--batch-size", opts.batch_size))
    for name, v in checks:
        if v < 1:
            raise ReportError(f"{name} must be >= 1, got {v}")
    if opts.bank not in BANKS:
        raise ReportError(f"--bank must be one of {', '.join(BANKS)}, got {opts.bank!r}")


def _load_inputs(first: RunRecord, opts: ReportOptions, log) -> tuple[torch.device, Any, str | None, Any, Any]:
    """(device, trained model, data source, train split, test split).

    Raises ReportError, DataError or CheckpointError.
    """
    try:
        device = resolve_device(opts.device)
    except UsageError as e:
        raise ReportError(str(e)) from None
    model = load_encoder(first.checkpoint, map_location=device)
    config = first.config or dict(model.checkpoint.get("config") or {})
    data = opts.data if opts.data is not None else config.get("data")
    spec = model.cfg.preprocess
    train = load_split(data, "train", resize_size=spec.resize_size, decode=spec.decode)
    test = load_split(data, "test", resize_size=spec.resize_size, decode=spec.decode)
    log(f"data {train.name}: {len(train)} train / {len(test)} test images (Fig. 5 bank: {opts.bank} split); "
        f"embedding with {model.cfg.arch} on {device}")
    return device, model, data, train, test


def _similarity(model, train, test, qidx: np.ndarray, opts: ReportOptions, device, run_name: str, log):
    """Fig. 5 separation (same-class kNN vs other-class kNN) for the random and the trained encoder.

    Returns (similarity.png bytes, {"random": stats, "trained": stats}, trained test embeddings [N_test, D]).
    """
    spec = model.cfg.preprocess
    yte = np.asarray(test.labels, dtype=np.int64)
    ybank = yte if opts.bank == "test" else np.asarray(train.labels, dtype=np.int64)
    exclude = qidx if opts.bank == "test" else None  # a query is never its own neighbour
    nets = {"random": _random_encoder(model.cfg, opts.seed).to(device), "trained": model}
    panels, stats, fte = [], {}, None
    for which, net in nets.items():
        fte = embed_images(net, test.images, spec, opts.batch_size, device)
        fbank = fte if opts.bank == "test" else embed_images(net, train.images, spec, opts.batch_size, device)
        sims, same = fig5_pairs(fte.cpu()[qidx], fbank, yte[qidx], ybank, opts.nn_k, exclude)
        st = stats[which] = separation(sims, same)
        label = "random initialisation" if which == "random" else f"trained ({_plain(run_name)})"
        panels.append((label, sims, same, st))
        log(f"{which:>7}: same-class mean {_fmt(st['mean_same'])}  other-class mean {_fmt(st['mean_other'])}  "
            f"gap {_fmt(st['mean_gap'])}  AUC {_fmt(st['auc'])}  ({st['n_same']} same / {st['n_other']} other pairs)")
    return figure_png(similarity_figure(panels, opts.nn_k)), stats, fte


def _retrieval(fte, test, opts: ReportOptions, run_name: str) -> tuple[bytes, dict[str, Any]]:
    """The retrieval grid from the test split (query excluded): (retrieval.png bytes, its report section)."""
    yte = np.asarray(test.labels, dtype=np.int64)
    rq = retrieval_queries(yte, min(opts.queries, len(test)), opts.seed)
    rsims, ridx = _float64_topk(fte.cpu()[rq], fte, opts.top_k, exclude=rq)
    hits = float((yte[ridx] == yte[rq][:, None]).mean()) if ridx.size else 0.0
    png = figure_png(retrieval_figure(
        np.asarray(test.images), yte, test.classes, rq, ridx, rsims,
        f"Top-{ridx.shape[1]} retrievals from the test split, {run_name} "
        f"(green: same class, red: other class; {100 * hits:.0f}% same class)"))
    section = {"gallery_split": "test (query excluded)", "query_indices": rq.tolist(),
               "neighbour_indices": ridx.tolist(), "same_class_fraction": hits}
    return png, section


def build_report(run_dirs: Sequence[str | Path], opts: ReportOptions, log=print) -> dict[str, Any]:
    """Draw all figures and write report.json / report.html; returns the report dict.

    Raises ReportError, DataError or CheckpointError for bad input.
    """
    _check_options(run_dirs, opts)
    runs = [load_run(d, need_checkpoint=(i == 0 and not opts.curves_only)) for i, d in enumerate(run_dirs)]
    first = runs[0]
    out = Path(opts.out) if opts.out else first.path / "report"
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out} exists and is not a folder; choose another --out")
    report: dict[str, Any] = {
        "run": str(first.path),
        "run_name": first.name,
        "runs": [str(r.path) for r in runs],
        "config": first.config,
        "final_metrics": first.rows[-1],
        "run_summaries": [_summary(r) for r in runs],
        "files": ["curves.png"],
    }
    pngs: dict[str, bytes] = {"curves.png": figure_png(curves_figure(runs))}
    if opts.curves_only:
        out.mkdir(parents=True, exist_ok=True)
        _write(out / "curves.png", pngs["curves.png"])
        log(f"wrote {out / 'curves.png'} ({len(runs)} run{'s' if len(runs) > 1 else ''})")
        return report

    # everything that can be wrong with the input is found before anything is written
    device, model, data, train, test = _load_inputs(first, opts, log)
    qidx = select_queries(len(test), opts.max_queries, opts.seed)
    pngs["similarity.png"], sim_stats, fte = _similarity(model, train, test, qidx, opts, device, first.name, log)
    pngs["retrieval.png"], retrieval = _retrieval(fte, test, opts, first.name)
    report.update({
        "data": data or "digits",
        "checkpoint": str(first.checkpoint),
        "checkpoint_sha256": getattr(model, "checkpoint_sha256", None),
        "model": model.cfg.to_dict(),
        "similarity": {
            "definition": "the paper's Fig. 5: queries: test split (seeded subset if larger than max_queries); "
                          "bank: bank_split (the query itself excluded when it is in the bank); per query its "
                          "nn_k most cosine-similar bank images WITHIN ITS OWN CLASS (same pairs) and its nn_k "
                          "most similar WITHIN THE OTHER CLASSES (other pairs) -- not the overall nn_k nearest "
                          "split by label; float64, ties -> lower bank index; fewer when a class has fewer; "
                          "mean_gap = mean_same - mean_other; auc = ROC AUC of same-class vs similarity "
                          "over all pairs",
            "bank_split": opts.bank,
            "query_split": "test",
            "nn_k": opts.nn_k,
            "max_queries": opts.max_queries,
            "seed": opts.seed,
            "random_encoder": f"build_encoder(model.cfg) after torch.manual_seed({opts.seed}) "
                              f"(init {model.cfg.init!r}, as the run)",
            "num_queries": int(len(qidx)),
            "query_indices": qidx.tolist(),
            "random": sim_stats["random"],
            "trained": sim_stats["trained"],
        },
        "retrieval": retrieval,
        "files": ["curves.png", "similarity.png", "retrieval.png", "report.json", "report.html"],
    })
    page = render_html(report, pngs).encode("utf-8")
    text = (dumps(report, indent=2) + "\n").encode("utf-8")  # strict JSON (NaN/Inf -> null), built before any write
    out.mkdir(parents=True, exist_ok=True)
    for name, data_bytes in pngs.items():
        _write(out / name, data_bytes)
    _write(out / "report.json", text)
    _write(out / "report.html", page)
    log(f"wrote {', '.join(report['files'])} to {out}/")
    return report


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m training.report",
        description="Learning curves, similarity histograms and retrieval grids for training runs.")
    ap.add_argument("--run", action="append", required=True, metavar="FOLDER",
                    help="run folder (metrics.jsonl, checkpoint.pt); repeat to overlay several runs' curves")
    ap.add_argument("--data", default=None, help="dataset for similarity/retrieval (default: the run's config 'data')")
    ap.add_argument("--out", default=None, help="output folder (default: <first run>/report)")
    ap.add_argument("--nn-k", type=int, default=5,
                    help="Fig. 5: neighbours per query within its class and within the other classes (paper: 5)")
    ap.add_argument("--bank", default="train", metavar="|".join(BANKS),
                    help="Fig. 5: search the train split (default, the kNN memory bank) or the test split itself "
                         "(query excluded)")
    ap.add_argument("--max-queries", type=int, default=2000, help="at most this many test queries (seeded subset)")
    ap.add_argument("--queries", type=int, default=8, help="rows of the retrieval grid")
    ap.add_argument("--top-k", type=int, default=8, help="neighbours per row of the retrieval grid")
    ap.add_argument("--seed", type=int, default=0, help="seed of the query subsets and of the random encoder")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    ap.add_argument("--curves-only", action="store_true", help="only curves.png (no checkpoint needed)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    opts = ReportOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ReportOptions)})
    try:
        build_report(args.run, opts)
    except (ReportError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
