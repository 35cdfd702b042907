"""Gallery: embedded images with ids, labels and metadata; exact cosine search; a plain folder on disk.

On disk a gallery is a folder of three files (never pickle)::

    embeddings.npy   float32 or float16 [N, D], unit rows (np.load(allow_pickle=False))
    items.jsonl      one JSON object per row: {"id": ..., "label": ..., "metadata": {...}}
    manifest.json    format, model_sha256, fingerprint, dim, dtype, count, created, skipped, ...

The fingerprint is the training checkpoint's sha256 that the model carries:
queries are only compared with embeddings of the same weights.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol, Sequence

import numpy as np

from ._version import __version__
from .atomic import atomic_save_npy, replace_directory
from .search import FaissIndex, topk_inner_product

__all__ = ["FORMAT", "Gallery", "GalleryError", "SearchResult", "list_files", "ids_and_labels"]

FORMAT = "isfe-gallery"
FORMAT_VERSION = 1
EMBEDDINGS_FILE = "embeddings.npy"
ITEMS_FILE = "items.jsonl"
MANIFEST_FILE = "manifest.json"
DTYPES = ("float32", "float16")
BACKENDS = ("numpy", "faiss")


class GalleryError(ValueError):
    """A gallery that is missing, damaged, or built with another model; the message says the fix."""


class _EncoderLike(Protocol):
    dim: int
    fingerprint: str


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def list_files(folder: str | os.PathLike, exclude: Sequence[str | os.PathLike] = ()) -> list[Path]:
    """Every regular file under ``folder`` (recursively, sorted by relative path).

    Hidden files and folders (name starting with ".") are left out, and so is
    anything under an ``exclude`` path (e.g. the gallery being written).  Files
    are *not* filtered by extension: a non-image is reported as bad (or skipped
    and listed with ``skip_bad``), never dropped silently.
    """
    root = Path(folder)
    if not root.is_dir():
        raise GalleryError(f"{root} is not a folder" if root.exists() else f"{root}: no such folder")
    excluded = {Path(e).resolve() for e in exclude}
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and (here / d).resolve() not in excluded)
        for f in filenames:
            if not f.startswith("."):
                out.append(here / f)
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def ids_and_labels(paths: Sequence[Path], root: Path) -> tuple[list[str], list[str | None]]:
    """ids = paths relative to ``root`` with "/"; label = first folder below ``root`` (None for files directly in it)."""
    ids, labels = [], []
    for p in paths:
        rel = Path(os.path.relpath(p, root)).as_posix()
        ids.append(rel)
        parts = rel.split("/")
        labels.append(parts[0] if len(parts) > 1 else None)
    return ids, labels


def _validate_items(items: Sequence[Mapping[str, Any]], where: str) -> list[dict[str, Any]]:
    out = []
    seen: set[str] = set()
    for n, it in enumerate(items):
        if not isinstance(it, Mapping) or not isinstance(it.get("id"), str) or not it["id"]:
            raise GalleryError(f"{where}: item {n} needs a non-empty string 'id', got {it!r:.200}")
        label = it.get("label")
        if label is not None and not isinstance(label, str):
            raise GalleryError(f"{where}: item {it['id']!r} has label {label!r}; labels are strings or null")
        meta = it.get("metadata") or {}
        if not isinstance(meta, Mapping):
            raise GalleryError(f"{where}: item {it['id']!r} has metadata {meta!r:.200}; metadata is a JSON object")
        if it["id"] in seen:
            raise GalleryError(f"{where}: id {it['id']!r} occurs twice; ids must be unique")
        seen.add(it["id"])
        out.append({"id": it["id"], "label": label, "metadata": dict(meta)})
    return out


def _check_embeddings(emb: Any, where: str, dim: int | None = None) -> np.ndarray:
    if not isinstance(emb, np.ndarray):
        emb = np.asarray(emb)
    if emb.ndim != 2:
        raise GalleryError(f"{where}: embeddings must be a 2-D array [N, D], got shape {list(emb.shape)}")
    if emb.dtype not in (np.float32, np.float16):
        if np.issubdtype(emb.dtype, np.floating):
            emb = emb.astype(np.float32)
        else:
            raise GalleryError(f"{where}: embeddings must be float32 or float16, got {emb.dtype}")
    if dim is not None and emb.shape[1] != dim:
        raise GalleryError(f"{where}: embeddings have dimension {emb.shape[1]}, the gallery has {dim}")
    for start in range(0, emb.shape[0], 1 << 18):  # chunked: fine for a memmap of millions of rows
        if not np.isfinite(emb[start : start + (1 << 18)]).all():
            raise GalleryError(f"{where}: embeddings contain NaN or infinite values")
    return emb


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
            out.append({"rank": r + 1, "id": it["id"], "score": round(float(s), 6), "label": it["label"], "metadata": it["metadata"]})
        return out


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
        emb = _check_embeddings(embeddings, "gallery", int(dim) if dim is not None else None)
        items = _validate_items(items, "gallery")
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
              backend: str = "numpy") -> "Gallery":
        """Embed a folder (recursively) or a list of image files.

        ids are paths relative to the folder (for a list: to the folders'
        common parent), with "/"; label = the first folder below that root
        (class folders), None for files directly in it.

        Args:
            encoder: an :class:`isfe_model.Encoder`.
            source: a folder, or a list of image paths.
            skip_bad: skip files that are not usable images and list them in
                ``manifest["skipped"]`` ([{"path", "reason"}]); otherwise the
                first one raises :class:`isfe_model.ImageError`.
            dtype: "float32", or "float16" to halve the file and memory size
                (cosines change by ~1e-3; search converts rows on the fly, so
                it is several times slower per query than float32).
            metadata: optional {id: {free metadata}} stored with the items.
            exclude: paths under the folder to leave out.

        Raises:
            GalleryError: no such folder, no files, nothing embeddable.
            ImageError: a bad file (without ``skip_bad``).
        """
        if dtype not in DTYPES:
            raise GalleryError(f"dtype must be float32 or float16, got {dtype!r}")
        if isinstance(source, (str, os.PathLike)):
            root = Path(source)
            paths = list_files(root, exclude=exclude)
            if not paths:
                raise GalleryError(f"{root} holds no files (hidden files are ignored); put images in it, in class subfolders if you have labels")
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
        emb, kept, errors = encoder.embed_partial([str(p) for p in paths], batch_size=batch_size, progress=progress,
                                                  skip_bad=skip_bad, names=[str(p) for p in paths], label="indexing")
        skipped = [{"path": e.source, "reason": e.reason} for e in errors]
        if not kept:
            raise GalleryError(f"none of the {len(paths)} files in {src_desc} is a usable image"
                               + (f" (first: {skipped[0]['path']}: {skipped[0]['reason']})" if skipped else ""))
        metadata = metadata or {}
        items = [{"id": ids[i], "label": labels[i], "metadata": dict(metadata.get(ids[i], {}))} for i in kept]
        manifest = cls.new_manifest(encoder, dtype, source=src_desc, skipped=skipped)
        return cls(emb.astype(dtype), items, manifest, backend=backend)

    # ------------------------------------------------------------------ accessors

    def __len__(self) -> int:
        return int(self._emb.shape[0])

    def __repr__(self) -> str:
        return f"Gallery({len(self)} x {self.dim} {self.dtype}, backend={self.backend}, fingerprint={self.fingerprint[:12]})"

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
            raise GalleryError(f"queries must be a float array [Q, {self.dim}] or [{self.dim}], got shape {list(q.shape)} {q.dtype}")
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
        """Append rows.  embeddings [M, D] (or [D] for one item); items: M dicts with new unique ids."""
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
                raise GalleryError(f"add: ids already in the gallery: {', '.join(map(repr, clash[:5]))}; remove them first")
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
        """Write the gallery folder atomically (temporary folder + rename).

        An existing ``directory`` is replaced only with ``overwrite=True`` and
        only if it is empty or an ISFE gallery (never any other folder).

        Raises:
            GalleryError: the folder exists (without overwrite) or is not a gallery.
        """
        target = Path(directory)
        with self._lock:
            emb, items, manifest = self._emb, list(self._items), dict(self.manifest)
        manifest.update(count=int(emb.shape[0]), dim=int(emb.shape[1]), dtype=str(emb.dtype), isfe_model_version=__version__)
        if target.exists() or target.is_symlink():
            _check_replaceable(target, overwrite)

        def fill(tmp: Path) -> None:
            atomic_save_npy(tmp / EMBEDDINGS_FILE, np.asarray(emb))
            with open(tmp / ITEMS_FILE, "w", encoding="utf-8") as f:
                for it in items:
                    f.write(json.dumps(it, ensure_ascii=False, sort_keys=True) + "\n")
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")

        try:
            return replace_directory(target, fill, lambda t: _is_replaceable(t))
        except FileExistsError:
            raise GalleryError(f"{target} appeared while writing; run again with overwrite") from None

    @classmethod
    def load(cls, directory: str | os.PathLike, encoder: _EncoderLike | None = None, backend: str = "numpy",
             mmap: bool = False) -> "Gallery":
        """Read a gallery folder written by :meth:`save`.

        Args:
            encoder: if given, its ``dim`` and ``fingerprint`` must match the
                gallery's (else GalleryError saying how to fix it).
            backend: "numpy" or "faiss" (needs ``pip install "isfe-model[faiss]"``).
            mmap: memory-map embeddings.npy instead of reading it (large galleries).

        Raises:
            GalleryError: missing/damaged files, inconsistent counts or dims,
                or a model mismatch.
        """
        d = Path(directory)
        if not d.exists():
            raise GalleryError(f"gallery {d}: no such folder; build one with `isfe-index MODEL IMAGE_FOLDER -o {d}`")
        if not d.is_dir():
            raise GalleryError(f"gallery {d} is a file; a gallery is the folder written by isfe-index")
        missing = [f for f in (MANIFEST_FILE, EMBEDDINGS_FILE, ITEMS_FILE) if not (d / f).is_file()]
        if missing:
            raise GalleryError(f"gallery {d} lacks {', '.join(missing)}; it is not a gallery or is damaged — rebuild it with isfe-index")
        try:
            manifest = json.loads((d / MANIFEST_FILE).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise GalleryError(f"gallery {d}: {MANIFEST_FILE} is unreadable ({e}); rebuild the gallery") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise GalleryError(f"gallery {d}: {MANIFEST_FILE} is not an ISFE gallery manifest (format != {FORMAT!r})")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise GalleryError(f"gallery {d}: format version {manifest.get('format_version')!r} is not supported "
                               f"(this isfe_model reads {FORMAT_VERSION}); rebuild it or upgrade isfe-model")
        for key in ("dim", "count", "fingerprint"):
            if key not in manifest:
                raise GalleryError(f"gallery {d}: {MANIFEST_FILE} lacks {key!r}; rebuild the gallery")
        try:
            emb = np.load(d / EMBEDDINGS_FILE, allow_pickle=False, mmap_mode="r" if mmap else None)
        except (OSError, ValueError, EOFError) as e:
            raise GalleryError(f"gallery {d}: {EMBEDDINGS_FILE} is damaged or not a plain .npy array ({e}); rebuild the gallery") from None
        if emb.ndim != 2 or emb.dtype not in (np.float32, np.float16):
            raise GalleryError(f"gallery {d}: {EMBEDDINGS_FILE} holds {emb.dtype} {list(emb.shape)}, expected float32/float16 [N, D]")
        if emb.shape[1] != manifest["dim"] or emb.shape[0] != manifest["count"]:
            raise GalleryError(f"gallery {d}: {EMBEDDINGS_FILE} is {emb.shape[0]} x {emb.shape[1]} but the manifest says "
                               f"{manifest['count']} x {manifest['dim']}; the folder is damaged — rebuild it")
        items = []
        ln = 0
        try:
            with open(d / ITEMS_FILE, encoding="utf-8") as f:
                for ln, line in enumerate(f, 1):
                    if line.strip():
                        items.append(json.loads(line))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise GalleryError(f"gallery {d}: {ITEMS_FILE} line {ln} is unreadable ({e}); rebuild the gallery") from None
        if len(items) != emb.shape[0]:
            raise GalleryError(f"gallery {d}: {ITEMS_FILE} has {len(items)} items for {emb.shape[0]} embeddings; rebuild the gallery")
        if encoder is not None:
            check_compatible(manifest, encoder, str(d))
        try:
            return cls(emb, items, manifest, backend=backend)
        except GalleryError as e:
            raise GalleryError(f"gallery {d}: {e}") from None

    def check(self, encoder: _EncoderLike) -> None:
        """Raise GalleryError unless ``encoder`` produced (or could have produced) this gallery."""
        check_compatible(self.manifest, encoder, "gallery")


def check_compatible(manifest: Mapping[str, Any], encoder: _EncoderLike, where: str) -> None:
    """GalleryError if the encoder's dim or fingerprint differs from the gallery's."""
    if int(manifest["dim"]) != int(encoder.dim):
        raise GalleryError(f"{where} holds {manifest['dim']}-d embeddings but the model makes {encoder.dim}-d ones; "
                           f"use the model the gallery was built with, or rebuild the gallery with this model "
                           f"(isfe-index MODEL FOLDER -o GALLERY --overwrite)")
    if str(manifest["fingerprint"]) != str(encoder.fingerprint):
        name = f" ({manifest['model_name']})" if manifest.get("model_name") else ""
        raise GalleryError(f"{where} was built with another model: gallery fingerprint {str(manifest['fingerprint'])[:16]}…{name}, "
                           f"model fingerprint {str(encoder.fingerprint)[:16]}…; its embeddings are not comparable. "
                           f"Use the model the gallery was built with, or rebuild the gallery with this model "
                           f"(isfe-index MODEL FOLDER -o GALLERY --overwrite)")


def _is_gallery_dir(p: Path) -> bool:
    try:
        m = json.loads((p / MANIFEST_FILE).read_text(encoding="utf-8"))
        return isinstance(m, dict) and m.get("format") == FORMAT
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False


def _is_replaceable(p: Path) -> bool:
    return p.is_dir() and not p.is_symlink() and (not any(p.iterdir()) or _is_gallery_dir(p))


def _check_replaceable(target: Path, overwrite: bool) -> None:
    if not target.is_dir() or target.is_symlink():
        raise GalleryError(f"{target} exists and is not a folder; choose another output path")
    if not any(target.iterdir()):
        return  # an empty folder is fine to fill
    if not _is_gallery_dir(target):
        raise GalleryError(f"{target} exists and is not an ISFE gallery; refusing to replace it — choose another output folder")
    if not overwrite:
        raise GalleryError(f"{target} already holds a gallery; pass --overwrite (overwrite=True) to replace it")

