"""Gallery: embedded images with ids, labels and metadata; exact cosine search; a plain folder on disk.

On disk a gallery is a folder of three files (never pickle)::

    embeddings.npy   float32 or float16 [N, D], unit rows (np.load(allow_pickle=False))
    items.jsonl      one JSON object per row: {"id": ..., "label": ..., "metadata": {...}}
    manifest.json    format, model_sha256, fingerprint, dim, dtype, count, created, skipped, ...,
                     files: {name: {"bytes", "sha256"}} of the other two (checked by load)

A folder is replaced whole (isfe_model.atomic.replace_directory) and read whole (atomic.open_together):
a load that overlaps a save(overwrite=True) returns the old or the new gallery, never a mix.

The fingerprint is the training checkpoint's sha256 that the model carries:
queries are only compared with embeddings of the same weights.

This module holds :class:`Gallery` (build, search, add/remove, save/load) and :class:`SearchResult`;
reading and checking the three files is :mod:`isfe_model.gallery_files`, the folder walk and
printable names :mod:`isfe_model.walk`, and :class:`GalleryError` :mod:`isfe_model.gallery_errors`.
Their public names, and the private ones that cli.py and the tests use, are importable from here as before.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ._version import __version__
from .atomic import atomic_save_npy, open_together, replace_directory
from .gallery_errors import GalleryError
from .gallery_files import (  # noqa: F401  (MAX_JSON_DEPTH, UNIT_NORM_TOL: re-exported, once defined here)
    CHECKED_FILES,
    DTYPES,
    EMBEDDINGS_FILE,
    FORMAT,
    FORMAT_VERSION,
    ITEMS_FILE,
    MANIFEST_FILE,
    MAX_JSON_DEPTH,
    UNIT_NORM_TOL,
    _Changed,
    _check_embeddings,
    _check_replaceable,
    _EncoderLike,
    _file_digest,
    _is_replaceable,
    _json_problem,
    _read_embeddings,
    _read_items,
    _read_manifest,
    _recorded_files,
    _validate_items,
    _verify_files,
    _why_unopenable,
    check_compatible,
)
from .jsonsafe import dumps
from .metadata import short_repr
from .search import FaissIndex, topk_inner_product
from .walk import _bad_text, _printable, _utf8_ok, ids_and_labels, list_files, printable, walk_files

__all__ = ["FORMAT", "Gallery", "GalleryError", "SearchResult", "ids_and_labels", "list_files", "printable",
           "walk_files"]

#: Tries of Gallery.load when the files change while they are read (a concurrent replacement).
LOAD_ATTEMPTS = 3
BACKENDS = ("numpy", "faiss")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass
class SearchResult:
    """Top-k neighbours of Q queries.

    Attributes:
        scores: float32 [Q, k] cosine similarities, descending per row.
        indices: int64 [Q, k] gallery rows.
        items: the gallery's items at search time (for :meth:`hits`).
    """

    scores: np.ndarray
    indices: np.ndarray
    items: list[dict[str, Any]] = field(repr=False)

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def hits(self, q: int = 0) -> list[dict[str, Any]]:
        """Neighbours of query ``q``: [{"rank": 1.., "id", "score", "label", "metadata"}, ...]."""
        out = []
        for r, (s, i) in enumerate(zip(self.scores[q].tolist(), self.indices[q].tolist(), strict=True)):
            it = self.items[i]
            # scores are rounded to 6 decimals here (float32 noise such as 1.0000001 is not information)
            out.append({"rank": r + 1, "id": it["id"], "score": round(float(s), 6), "label": it["label"],
                        "metadata": it["metadata"]})
        return out


def _embed_paths(encoder: Any, paths: Sequence[Path], dtype: str, batch_size: int, progress: bool, skip_bad: bool,
                 decode_threads: int | None) -> tuple[np.ndarray, list[int], list[Any]]:
    """``paths`` -> (``dtype`` [M, D] rows of the usable images in order, their indices, the ImageErrors skipped).

    The rows are written into one [N, D] array as the batches of ``encoder.embed_iter`` arrive
    (skipped images leave no row: the result is its first M rows).
    """
    names = [str(p) for p in paths]
    out = np.empty((len(names), int(encoder.dim)), dtype=dtype)
    kept: list[int] = []
    errors: list[Any] = []
    for idx, vecs in encoder.embed_iter(names, batch_size=batch_size, decode_threads=decode_threads,
                                        progress=progress, names=names, label="indexing",
                                        on_error=(lambda i, e: errors.append(e)) if skip_bad else None):
        out[len(kept) : len(kept) + len(idx)] = vecs
        kept.extend(idx.tolist())
    return (out if len(kept) == len(out) else out[: len(kept)].copy()), kept, errors


class Gallery:
    """Embeddings [N, D] with one item per row, searchable by cosine similarity.

    Args:
        embeddings: float32 or float16 [N, D] unit rows.
        items: N dicts {"id": str (unique), "label": str | None, "metadata": dict}.
        manifest: at least {"dim", "fingerprint"}; missing bookkeeping keys are filled in.
        backend: "numpy" (exact, chunked) or "faiss" (exact IndexFlatIP).

    Thread safety: searches may run concurrently with each other and with
    add/remove (which swap in new arrays; a search sees the state at its start).
    """

    def __init__(self, embeddings: np.ndarray, items: Sequence[Mapping[str, Any]], manifest: Mapping[str, Any],
                 backend: str = "numpy"):
        if backend not in BACKENDS:
            raise GalleryError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        manifest = dict(manifest)
        dim = manifest.get("dim")
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1):
            raise GalleryError(f"gallery: manifest dim is {short_repr(dim)} ({type(dim).__name__}); "
                               f"it must be an integer >= 1")
        problem = _json_problem(manifest, "manifest", strict=False)
        if problem:
            raise GalleryError(f"gallery: {problem}")
        emb = _check_embeddings(embeddings, "gallery", int(dim) if dim is not None else None)
        items = _validate_items(items, "gallery")
        self._setup(emb, items, manifest, backend)

    def _setup(self, emb: np.ndarray, items: list[dict[str, Any]], manifest: dict[str, Any], backend: str) -> None:
        """The constructor after validation (:meth:`load` validates with messages naming the files)."""
        if len(items) != emb.shape[0]:
            raise GalleryError(f"gallery: {emb.shape[0]} embeddings but {len(items)} items")
        manifest.setdefault("format", FORMAT)
        manifest.setdefault("format_version", FORMAT_VERSION)
        manifest.setdefault("fingerprint", "")
        manifest.setdefault("model_sha256", "")
        manifest.setdefault("created", _now())
        manifest.setdefault("skipped", [])
        manifest["dim"] = int(emb.shape[1])
        manifest["dtype"] = str(emb.dtype)
        manifest["count"] = int(emb.shape[0])
        self._lock = threading.Lock()
        self._emb = emb
        self._items = items
        self._index_of = {it["id"]: n for n, it in enumerate(items)}
        self.manifest: dict[str, Any] = manifest
        self.backend = backend
        self._faiss = FaissIndex(emb) if backend == "faiss" else None

    # ------------------------------------------------------------------ building

    @staticmethod
    def new_manifest(encoder: Any, dtype: str = "float32", **extra: Any) -> dict[str, Any]:
        """The manifest of a gallery made with ``encoder`` (an :class:`isfe_model.Encoder`)."""
        md = getattr(encoder, "metadata", None)
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "isfe_model_version": __version__,
            "model_sha256": getattr(encoder, "model_sha256", ""),
            "fingerprint": encoder.fingerprint,
            "model_name": getattr(md, "model_name", ""),
            "model_version": getattr(md, "model_version", ""),
            "preprocess": encoder.spec.to_dict() if hasattr(encoder, "spec") else None,
            "dim": int(encoder.dim),
            "dtype": dtype,
            "count": 0,
            "created": _now(),
            "skipped": [],
            **extra,
        }

    @classmethod
    def empty(cls, encoder: Any, dtype: str = "float32", backend: str = "numpy") -> "Gallery":
        """A gallery with no items yet (fill it with :meth:`add`)."""
        if dtype not in DTYPES:
            raise GalleryError(f"dtype must be float32 or float16, got {dtype!r}")
        return cls(np.zeros((0, int(encoder.dim)), dtype=dtype), [], cls.new_manifest(encoder, dtype), backend=backend)

    @classmethod
    def build(cls, encoder: Any, source: str | os.PathLike | Sequence[str | os.PathLike], skip_bad: bool = False,
              progress: bool = False, dtype: str = "float32", batch_size: int = 64,
              metadata: Mapping[str, Mapping[str, Any]] | None = None, exclude: Sequence[str | os.PathLike] = (),
              backend: str = "numpy", decode_threads: int | None = None) -> "Gallery":
        """Embed a folder (recursively) or a list of image files.

        ids are paths relative to the folder (for a list: to the folders'
        common parent), with "/"; label = the first folder below that root
        (class folders), None for files directly in it.

        Args:
            encoder: an :class:`isfe_model.Encoder`.
            source: a folder, or a list of image paths.
            skip_bad: skip files that are not usable images and list them in
                ``manifest["skipped"]`` ([{"path", "reason"}]); otherwise the
                first one raises :class:`isfe_model.ImageError`.  What the folder
                walk leaves out (links to folders, unreadable folders, paths over
                the system limit; see :func:`walk_files`) is listed there always.
            dtype: "float32", or "float16" to halve the file and memory size
                (cosines change by ~1e-3; search converts rows on the fly, so
                it is several times slower per query than float32).
            metadata: optional {id: {free metadata}} stored with the items.
            exclude: paths under the folder to leave out.
            decode_threads: image decoding threads (None: the encoder's).

        The images are streamed through ``encoder.embed_iter`` into one preallocated
        [N, D] array: memory holds a bounded number of decoded images besides it.

        Raises:
            GalleryError: no such folder, no files, nothing embeddable.
            ImageError: a bad file (without ``skip_bad``).
        """
        if dtype not in DTYPES:
            raise GalleryError(f"dtype must be float32 or float16, got {dtype!r}")
        left_out: list[dict[str, str]] = []
        if isinstance(source, (str, os.PathLike)):
            root = Path(source)
            paths, left_out = walk_files(root, exclude=exclude)
            if not paths:
                why = (f"; {len(left_out)} path(s) left out, e.g. {left_out[0]['path']}: {left_out[0]['reason']}"
                       if left_out else "")
                raise GalleryError(f"{root} holds no files (hidden files are ignored{why}); put images in it, "
                                   f"in class subfolders if you have labels")
            src_desc = str(root)
        else:
            paths = [Path(p) for p in source]
            if not paths:
                raise GalleryError("no images given")
            parents = [os.path.abspath(p.parent) for p in paths]
            root = Path(os.path.commonpath(parents))
            src_desc = f"{len(paths)} files under {root}"
        ids, labels = ids_and_labels(paths, root)
        if len(set(ids)) != len(ids):
            raise GalleryError("the same image path is given twice; ids (relative paths) must be unique")
        # an id must be writable to items.jsonl: file names that are not UTF-8 are found before embedding anything
        unnamed = [n for n, i in enumerate(ids) if not _utf8_ok(i)]
        name_skips = []
        if unnamed and not skip_bad:
            bad_id = ids[unnamed[0]]
            raise GalleryError(f"item {short_repr(bad_id)}: {_bad_text('its id', bad_id)}; "
                               f"ids are the paths relative to {root}")
        if unnamed:
            name_skips = [{"path": _printable(str(paths[n])),
                           "reason": "the file name is not valid UTF-8, so it cannot be stored as an id; "
                                     "rename the file"}
                          for n in unnamed]
            keep = sorted(set(range(len(paths))) - set(unnamed))
            paths, ids, labels = [paths[n] for n in keep], [ids[n] for n in keep], [labels[n] for n in keep]
        emb, kept, errors = _embed_paths(encoder, paths, dtype, batch_size, progress, skip_bad, decode_threads)
        bad = name_skips + [{"path": _printable(e.source), "reason": _printable(e.reason)} for e in errors]
        skipped = left_out + bad
        if not kept:
            raise GalleryError(f"none of the {len(paths) + len(name_skips)} files in {src_desc} is a usable image"
                               + (f" (first: {bad[0]['path']}: {bad[0]['reason']})" if bad else ""))
        metadata = metadata or {}
        items = [{"id": ids[i], "label": labels[i], "metadata": metadata.get(ids[i]) or {}} for i in kept]
        manifest = cls.new_manifest(encoder, dtype, source=src_desc, skipped=skipped)
        return cls(emb, items, manifest, backend=backend)

    # ------------------------------------------------------------------ accessors

    def __len__(self) -> int:
        return int(self._emb.shape[0])

    def __repr__(self) -> str:
        return (f"Gallery({len(self)} x {self.dim} {self.dtype}, backend={self.backend}, "
                f"fingerprint={self.fingerprint[:12]})")

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def dtype(self) -> str:
        return str(self._emb.dtype)

    @property
    def fingerprint(self) -> str:
        return str(self.manifest.get("fingerprint", ""))

    @property
    def embeddings(self) -> np.ndarray:
        """float32/float16 [N, D] (read-only view)."""
        v = self._emb.view()
        v.flags.writeable = False
        return v

    @property
    def items(self) -> list[dict[str, Any]]:
        return list(self._items)

    @property
    def ids(self) -> list[str]:
        return [it["id"] for it in self._items]

    @property
    def labels(self) -> list[str | None]:
        return [it["label"] for it in self._items]

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._index_of

    def index_of(self, item_id: str) -> int:
        """Row of ``item_id`` (KeyError if absent)."""
        return self._index_of[item_id]

    # ------------------------------------------------------------------ search

    def search(self, queries: np.ndarray, k: int = 10, chunk_rows: int | None = None) -> SearchResult:
        """Exact top-k by cosine similarity (inner product of unit rows).

        Args:
            queries: float [Q, D] or [D] (e.g. ``encoder.embed(images)``).
            k: neighbours per query, clipped to len(gallery).

        Returns:
            :class:`SearchResult` with scores [Q, k] (descending; ties by
            lower row) and indices [Q, k].

        Raises:
            GalleryError: wrong dimension, non-finite values, k < 1.
        """
        q = np.asarray(queries)
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or not np.issubdtype(q.dtype, np.number):
            raise GalleryError(f"queries must be a float array [Q, {self.dim}] or [{self.dim}], "
                               f"got shape {list(q.shape)} {q.dtype}")
        if q.shape[1] != self.dim:
            raise GalleryError(f"queries have dimension {q.shape[1]} but the gallery has {self.dim}; "
                               f"embed them with the model the gallery was built with")
        q = q.astype(np.float32, copy=False)
        if not np.isfinite(q).all():
            raise GalleryError("queries contain NaN or infinite values")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise GalleryError(f"k must be an integer >= 1, got {k!r}")
        with self._lock:
            emb, items, index = self._emb, self._items, self._faiss
        if index is not None:
            scores, idx = index.search(q, int(k))
        else:
            scores, idx = topk_inner_product(emb, q, int(k), chunk_rows=chunk_rows)
        return SearchResult(scores, idx, items)

    # ------------------------------------------------------------------ editing

    def add(self, embeddings: np.ndarray, items: Sequence[Mapping[str, Any]]) -> None:
        """Append rows.  embeddings [M, D] (or [D] for one item); items: M dicts with new unique ids.

        Rows must be L2-normalised (``Encoder.embed`` output; |norm - 1| <= UNIT_NORM_TOL) and
        items plain JSON (no NaN/infinity, sets, bytes, ...); otherwise GalleryError.
        """
        emb = np.asarray(embeddings)
        if emb.ndim == 1:
            emb = emb[None]
        emb = _check_embeddings(emb, "add", self.dim)
        new_items = _validate_items(items, "add")
        if len(new_items) != emb.shape[0]:
            raise GalleryError(f"add: {emb.shape[0]} embeddings but {len(new_items)} items")
        with self._lock:
            clash = [it["id"] for it in new_items if it["id"] in self._index_of]
            if clash:
                raise GalleryError(f"add: ids already in the gallery: {', '.join(map(repr, clash[:5]))}; "
                                   f"remove them first")
            all_emb = np.concatenate([np.asarray(self._emb), emb.astype(self._emb.dtype)])
            self._set(all_emb, self._items + new_items)

    def remove(self, ids: Iterable[str] | str) -> int:
        """Remove items by id; returns how many were removed (unknown ids are ignored)."""
        if isinstance(ids, str):
            ids = [ids]
        with self._lock:
            rows = sorted({self._index_of[i] for i in ids if i in self._index_of})
            if not rows:
                return 0
            keep = np.ones(len(self._items), dtype=bool)
            keep[rows] = False
            self._set(np.asarray(self._emb)[keep], [it for it, kp in zip(self._items, keep, strict=True) if kp])
            return len(rows)

    def _set(self, emb: np.ndarray, items: list[dict[str, Any]]) -> None:
        faiss_index = FaissIndex(emb) if self.backend == "faiss" else None
        self._emb, self._items, self._faiss = emb, items, faiss_index
        self._index_of = {it["id"]: n for n, it in enumerate(items)}
        self.manifest["count"] = int(emb.shape[0])
        self.manifest["updated"] = _now()

    # ------------------------------------------------------------------ files

    def save(self, directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the gallery folder atomically (temporary folder, then swapped in whole).

        The manifest records each file's size and sha256 (``files``), which :meth:`load`
        checks.  An existing ``directory`` is replaced only with ``overwrite=True`` and
        only if it is empty or an ISFE gallery (never any other folder); a reader
        loading it meanwhile gets the whole old or the whole new gallery.

        Raises:
            GalleryError: the folder exists (without overwrite) or is not a gallery.
        """
        target = Path(directory)
        with self._lock:
            emb, items, manifest = self._emb, list(self._items), dict(self.manifest)
        manifest.update(count=int(emb.shape[0]), dim=int(emb.shape[1]), dtype=str(emb.dtype),
                        isfe_model_version=__version__)
        manifest.pop("files", None)
        if target.exists() or target.is_symlink():
            _check_replaceable(target, overwrite)

        def fill(tmp: Path) -> None:
            atomic_save_npy(tmp / EMBEDDINGS_FILE, np.asarray(emb))
            with open(tmp / ITEMS_FILE, "w", encoding="utf-8") as f:
                for it in items:
                    f.write(json.dumps(it, ensure_ascii=False, sort_keys=True) + "\n")
            manifest["files"] = {name: _file_digest(tmp / name) for name in CHECKED_FILES}
            (tmp / MANIFEST_FILE).write_text(dumps(manifest, indent=2) + "\n", encoding="utf-8")

        try:
            return replace_directory(target, fill, lambda t: _is_replaceable(t))
        except FileExistsError:
            raise GalleryError(f"{target} appeared while writing; run again with overwrite") from None

    @classmethod
    def load(cls, directory: str | os.PathLike, encoder: _EncoderLike | None = None, backend: str = "numpy",
             mmap: bool = False) -> "Gallery":
        """Read a gallery folder written by :meth:`save`.

        The three files are opened together from one folder (a folder swapped in by a
        concurrent ``save(overwrite=True)`` cannot mix in) and checked against the sizes
        and sha256 the manifest records; if they changed while being read, the load is
        tried again (LOAD_ATTEMPTS in all).  Galleries saved before checksums were
        recorded (no ``files`` in the manifest) load without that check.

        Args:
            encoder: if given, its ``dim`` and ``fingerprint`` must match the
                gallery's (else GalleryError saying how to fix it).
            backend: "numpy" or "faiss" (needs ``pip install "isfe-model[faiss]"``).
            mmap: memory-map embeddings.npy instead of reading it (large galleries).

        Raises:
            GalleryError: missing/damaged files, inconsistent counts or dims, files
                that do not match their checksums, or a model mismatch.
        """
        d = Path(directory)
        if backend not in BACKENDS:
            raise GalleryError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        for attempt in range(LOAD_ATTEMPTS):
            try:
                return cls._load_once(d, encoder, backend, mmap)
            except _Changed as e:
                if attempt == LOAD_ATTEMPTS - 1:
                    raise GalleryError(str(e)) from None
                time.sleep(0.01 * (attempt + 1))
        raise AssertionError("unreachable")

    @classmethod
    def _load_once(cls, d: Path, encoder: _EncoderLike | None, backend: str, mmap: bool) -> "Gallery":
        """One attempt of :meth:`load`; ``_Changed`` when the files could not be opened or changed while read."""
        try:
            fm, fe, fi = open_together(d, (MANIFEST_FILE, EMBEDDINGS_FILE, ITEMS_FILE))
        except OSError as e:  # missing now, or only for a moment (a replacement without an atomic exchange)
            raise _Changed(_why_unopenable(d, e)) from None
        with fm, fe, fi:
            manifest = _read_manifest(fm, d)
            recorded = _recorded_files(manifest, d)
            emb, emb_digest = _read_embeddings(fe, d, manifest, mmap)
            items, items_digest = _read_items(fi, d, emb.shape[0])
        if encoder is not None:
            check_compatible(manifest, encoder, str(d))
        rebuild = "rebuild the gallery with isfe-index"
        emb = _check_embeddings(emb, f"gallery {d}: {EMBEDDINGS_FILE}", manifest["dim"],
                                fix=f"the file is damaged or was not written by isfe_model — {rebuild}")
        items = _validate_items(items, f"gallery {d}: {ITEMS_FILE}", copy=False)
        if recorded is not None:
            _verify_files(d, recorded, {EMBEDDINGS_FILE: emb_digest, ITEMS_FILE: items_digest})
        gallery = cls.__new__(cls)
        try:
            gallery._setup(emb, items, manifest, backend)
        except GalleryError as e:
            raise GalleryError(f"gallery {d}: {e}") from None
        return gallery

    def check(self, encoder: _EncoderLike) -> None:
        """Raise GalleryError unless ``encoder`` produced (or could have produced) this gallery."""
        check_compatible(self.manifest, encoder, "gallery")
