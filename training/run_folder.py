"""The run folder (``--out``): what a training run writes, and when.

==================  =========================================================================
``config.json``     the resolved settings, at the start (:meth:`RunFolder.start`)
``metrics.jsonl``   one JSON row per evaluation (epoch 0 = the random encoder), rewritten
                    atomically from the history at every evaluation
``last.pt``         the full training state (weights, optimizer, step counters, RNG states,
                    history) at every evaluation, every ``--save-every`` epochs and at the end:
                    what ``--resume`` continues from (:mod:`training.run_state`)
``checkpoint.pt``   the trained encoder, when training finishes or stops at ``--time-limit``
``curves.png``      loss and kNN curves (:func:`training.report.write_curves`), at the end
==================  =========================================================================

Only rank 0 writes; every process keeps the history.  Every file is written
atomically (:mod:`isfe_model.atomic`, :mod:`isfe_model.jsonsafe`): a crash
leaves the old file or the new one, never half of one, but a ``kill -9``
during a write leaves its temporary file (``.<name>.<random>.tmp``) behind;
:meth:`RunFolder.start` removes those of the files above and says so.

The history row is committed before its metrics line: last.pt first (a crash
in between re-creates the line from the history on resume), then metrics.jsonl.

Epoch index (:data:`EPOCH_INDEX`): row ``epoch 0`` is the random encoder, row
``epoch N`` the encoder after N training epochs.  The authors' loop trains first
and logs its first evaluation as "epoch 0", so their epoch ``e`` is our ``e + 1``.

Best epoch: like the authors (who evaluate every epoch and keep the best), every
evaluation row of a trained epoch also carries the best value so far of its
monitor metric and that epoch (:data:`BEST_METRICS`: ``best_knn_top1`` and
``best_knn_top1_epoch``, or ``best_recall@1`` and ``best_recall@1_epoch`` for
unseen test classes; the earliest epoch on a tie; epoch 0 is not a candidate),
so the last row, ``checkpoint.pt``'s ``metrics`` and the closing log line hold
both the final and the best number.  It is the best of the *evaluated* epochs:
``--eval-every 1`` evaluates every epoch (the paper's Fig. 3 curve).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

from torch import nn

import training.distributed as dist_utils
from isfe_model.atomic import atomic_write_bytes
from isfe_model.jsonsafe import dumps, write_json
from training.config import UsageError
from training.evaluate import format_metrics
from training.model import ModelConfig, save_checkpoint

__all__ = ["RunFolder", "prepare_out", "stale_temporaries", "RUN_FILES", "EPOCH_INDEX", "BEST_METRICS", "best_of",
           "best_fields"]

RUN_FILES = ("config.json", "metrics.jsonl", "last.pt", "checkpoint.pt", "curves.png")

#: What "epoch" means in metrics.jsonl, checkpoint.pt and benchmarks/run_result.py's JSON.
EPOCH_INDEX = "0 = random encoder; N = after N training epochs (the authors' logs call it epoch N-1)"

#: Monitor metrics whose best value (and its epoch) is recorded: kNN top-1 (shared classes), Recall@1 (unseen).
BEST_METRICS = ("knn_top1", "recall@1")


def best_of(rows: list[dict[str, Any]], metric: str) -> tuple[float, int] | None:
    """(best value, its epoch) of ``metric`` over the rows of trained epochs (epoch >= 1), earliest on ties."""
    best = None
    for r in rows:
        v = r.get(metric)
        number = isinstance(v, (int, float)) and math.isfinite(v)
        if r.get("epoch", 0) >= 1 and number and (best is None or v > best[0]):
            best = (v, int(r["epoch"]))
    return best


def best_fields(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``best_<metric>`` and ``best_<metric>_epoch`` over ``rows`` for each metric the last row has (epoch >= 1)."""
    out: dict[str, Any] = {}
    last = rows[-1] if rows else {}
    for metric in BEST_METRICS:
        found = best_of(rows, metric) if metric in last else None
        if found is not None:
            out[f"best_{metric}"], out[f"best_{metric}_epoch"] = found
    return out


def _best_text(row: dict[str, Any]) -> str:
    """'; best kNN top-1 x% at epoch N' for a row with best fields, else ''."""
    names = {"knn_top1": "kNN top-1", "recall@1": "R@1"}
    return "".join(f"; best {names[m]} {row[f'best_{m}']:.2f}% at epoch {row[f'best_{m}_epoch']}"
                   for m in BEST_METRICS if f"best_{m}" in row)


# what last.pt holds besides the history (a zero-argument function, called on rank 0 only)
StateFn = Callable[[], dict[str, Any]]


def prepare_out(out: str | None, resuming: bool = False) -> Path:
    """The folder of ``--out`` (default ``runs/<timestamp>``); refuses to start over a finished or unfinished run."""
    path = Path(out) if out else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {path} exists and is not a folder; choose another --out")
    if not resuming and (path / "checkpoint.pt").exists():
        raise UsageError(f"--out {path} already holds a finished run (checkpoint.pt); choose another --out, delete it, "
                         f"or continue it with --resume {path} --epochs N")
    if not resuming and (path / "last.pt").exists():
        raise UsageError(f"--out {path} holds an unfinished run (last.pt); continue it with --resume {path}, "
                         f"or choose another --out")
    return path


def stale_temporaries(folder: Path) -> list[Path]:
    """What interrupted atomic writes of the run files left: ``.<name>.<random>.tmp`` (and ``.<name>.tmp``)."""
    found: set[Path] = set()
    for name in RUN_FILES:
        for pattern in (f".{name}.*.tmp", f".{name}.tmp"):
            found.update(p for p in folder.glob(pattern) if p.is_file() and not p.is_symlink())
    return sorted(found)


class RunFolder:
    """One run's folder and history (see the module docstring for the files).

    Args:
        path: the folder (:func:`prepare_out`).
        ctx: the process group (rank 0 writes).
        log: progress output.
        t_begin: ``time.time()`` when this process started the run.
        history: the metrics rows so far (a resumed run's); ``time_before``: its seconds so far.
        saved_epoch: the epoch ``last.pt`` holds (a resumed run's).
    """

    def __init__(self, path: Path, ctx: dist_utils.DistContext, log: Callable[..., None], t_begin: float,
                 history: list[dict[str, Any]] | None = None, time_before: float = 0.0, saved_epoch: int = 0):
        self.path, self.ctx, self.log, self.t_begin = path, ctx, log, t_begin
        self.history = [dict(r) for r in history or []]
        self.time_before, self.saved_epoch = time_before, saved_epoch

    def elapsed(self) -> float:
        """Training seconds of the whole run (a resumed run's earlier time included)."""
        return round(self.time_before + time.time() - self.t_begin, 2)

    def start(self, resolved: dict[str, Any]) -> None:
        """Create the folder, remove stale temporary files, write config.json and the history's metrics.jsonl."""
        if not self.ctx.is_main:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        stale = stale_temporaries(self.path)
        for p in stale:
            p.unlink(missing_ok=True)
        if stale:
            self.log(f"removed {len(stale)} temporary file(s) left in {self.path} by an interrupted write: "
                     f"{', '.join(p.name for p in stale)}")
        write_json(self.path / "config.json", resolved)
        self._write_metrics()

    def _write_metrics(self) -> None:
        text = "".join(dumps(r) + "\n" for r in self.history)
        atomic_write_bytes(self.path / "metrics.jsonl", text.encode("utf-8"))

    def save_state(self, epoch: int, state: StateFn) -> None:
        """last.pt: everything needed to continue exactly after ``epoch`` (``state()``: model, optimizer, RNG ...)."""
        self.saved_epoch = epoch
        if self.ctx.is_main:
            s = state()
            save_checkpoint(self.path / "last.pt", s.pop("model"), s.pop("model_cfg"), s.pop("config"), epoch=epoch,
                            history=self.history, time_seconds=self.elapsed(),
                            metrics=self.history[-1] if self.history else {}, **s)

    def commit(self, row: dict[str, Any], epoch: int, state: StateFn) -> None:
        """Add an evaluation row (+ the best so far, :func:`best_fields`): the history, last.pt, metrics.jsonl."""
        self.history.append(row)
        row.update(best_fields(self.history))
        self.save_state(epoch, state)
        if self.ctx.is_main:
            self._write_metrics()

    def finish(self, model: nn.Module, model_cfg: ModelConfig, resolved: dict[str, Any], epoch: int,
               **extra: Any) -> dict[str, Any]:
        """checkpoint.pt with the last row's metrics, the closing log line and curves.png; returns the last row."""
        last = self.history[-1]
        if not self.ctx.is_main:
            return last
        path = self.path / "checkpoint.pt"
        save_checkpoint(path, model, model_cfg, resolved, epoch=epoch, metrics=last, train_seconds=self.elapsed(),
                        epoch_index=EPOCH_INDEX, **extra)
        self.log(f"done in {self.elapsed():.0f} s: epoch {epoch} {format_metrics(last)}{_best_text(last)} -> {path}")
        try:  # learning curves next to the checkpoint; a plotting problem never fails a finished run
            from training.report import write_curves  # matplotlib: only when a run ends

            write_curves([self.path], self.path / "curves.png")
        except Exception as e:  # noqa: BLE001
            print(f"warning: could not write {self.path / 'curves.png'} ({type(e).__name__}: {e})", file=sys.stderr)
        return last
