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
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Mapping, Protocol, Sequence

import numpy as np

from ._version import __version__
from .atomic import atomic_save_npy, open_together, replace_directory
from .jsonsafe import dumps
from .metadata import short_repr
from .search import FaissIndex, topk_inner_product

__all__ = ["FORMAT", "Gallery", "GalleryError", "SearchResult", "ids_and_labels", "list_files", "printable",
           "walk_files"]

FORMAT = "isfe-gallery"
FORMAT_VERSION = 1
EMBEDDINGS_FILE = "embeddings.npy"
ITEMS_FILE = "items.jsonl"
MANIFEST_FILE = "manifest.json"
#: Files whose size and sha256 the manifest records ("files") and Gallery.load checks.
CHECKED_FILES = (EMBEDDINGS_FILE, ITEMS_FILE)
#: Tries of Gallery.load when the files change while they are read (a concurrent replacement).
LOAD_ATTEMPTS = 3
_SHA256_HEX = re.compile("[0-9a-f]{64}")
DTYPES = ("float32", "float16")
BACKENDS = ("numpy", "faiss")
#: Deepest nesting of lists/objects accepted in item metadata and manifests.  JSON parsers and
#: writers recurse, so thousands of levels would overflow the stack (RecursionError) later.
MAX_JSON_DEPTH = 100
#: Gallery rows must be unit vectors: |L2 norm - 1| <= UNIT_NORM_TOL.  float16 storage rounds each
#: component by at most 2**-11 (relative), which moves a unit row's norm by at most ~4.9e-4.
UNIT_NORM_TOL = 1e-3
#: Rows per step when scanning embeddings (finite values, norms) aim at this many bytes.
_SCAN_BYTES = 8 << 20


class GalleryError(ValueError):
    """A gallery that is missing, damaged, or built with another model; the message says the fix."""


class _EncoderLike(Protocol):
    dim: int
    fingerprint: str


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _path_max(folder: Path) -> int:
    """Bytes a path may have, including the terminating NUL (PATH_MAX: 4096 on Linux)."""
    try:
        return int(os.pathconf(folder, "PC_PATH_MAX"))
    except (AttributeError, OSError, ValueError):  # Windows has no pathconf
        return 4096 if os.name == "posix" else 32767


def _inode(path: str | os.PathLike) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def walk_files(folder: str | os.PathLike,
               exclude: Sequence[str | os.PathLike] = ()) -> tuple[list[Path], list[dict[str, str]]]:
    """(files, left_out): every file under ``folder``, sorted by relative path, and what the walk could not take.

    An explicit stack of folders (no recursion, so any depth).  Hidden names (".") and the
    ``exclude`` folders (e.g. the gallery being written) are left out silently.  Left out and
    returned as ``{"path", "reason"}``: links to folders (never followed: loops, and files
    outside ``folder``), folders that cannot be read, and paths over the system's length limit
    (PATH_MAX; nothing could open them).  Links to files are followed like files (the id is
    the link's path).  Files are *not* filtered by extension: a non-image is reported as bad
    (or skipped and listed with ``skip_bad``) when it is embedded, never dropped silently.
    """
    root = Path(folder)
    if not root.is_dir():
        raise GalleryError(f"{root} is not a folder" if root.exists() else f"{root}: no such folder")
    limit = _path_max(root)
    excluded = {key for key in map(_inode, exclude) if key is not None}
    excluded_inodes = {ino for _dev, ino in excluded}
    files: list[str] = []
    left_out: list[dict[str, str]] = []

    def leave_out(path: str, reason: str) -> None:
        left_out.append({"path": _printable(path), "reason": reason})

    stack = [str(root)]
    while stack:
        here = stack.pop()
        try:
            with os.scandir(here) as it:
                entries = list(it)
        except OSError as e:
            leave_out(here, f"folder cannot be read ({e.strerror or e}); its files are not indexed "
                            f"— fix its permissions")
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = entry.path
            size = len(os.fsencode(path))
            if size >= limit:
                leave_out(path, f"path is {size:,} bytes long, over the system limit of {limit - 1:,}; "
                                f"nothing can open it — move it to a shallower folder or index a folder closer to it")
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    # entry.inode() costs no system call; stat (for st_dev) only on a match
                    if entry.inode() not in excluded_inodes or _inode(path) not in excluded:
                        stack.append(path)
                elif entry.is_symlink() and entry.is_dir():
                    leave_out(path, "link to a folder; links to folders are not followed (loops, files outside the "
                                    "folder) — index the folder it points to, or copy it in")
                else:
                    files.append(path)
            except OSError as e:
                leave_out(path, f"cannot be examined ({e.strerror or e})")
    left_out.sort(key=lambda s: s["path"])
    return sorted((Path(f) for f in files), key=lambda p: p.relative_to(root).as_posix()), left_out


def list_files(folder: str | os.PathLike, exclude: Sequence[str | os.PathLike] = ()) -> list[Path]:
    """The files of :func:`walk_files` (what it leaves out is not returned)."""
    return walk_files(folder, exclude)[0]


def ids_and_labels(paths: Sequence[Path], root: Path) -> tuple[list[str], list[str | None]]:
    """ids = paths relative to ``root`` with "/"; label = first folder below ``root`` (None for files directly in it)."""
    ids, labels = [], []
    for p in paths:
        rel = Path(os.path.relpath(p, root)).as_posix()
        ids.append(rel)
        parts = rel.split("/")
        labels.append(parts[0] if len(parts) > 1 else None)
    return ids, labels


def _utf8_ok(text: str) -> bool:
    """False for text that cannot be written as UTF-8 (lone surrogates, e.g. from a non-UTF-8 file name)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _bad_text(where: str, text: str) -> str:
    return f"{where} is text that is not valid Unicode ({short_repr(text)}; a file name that is not UTF-8? rename the file)"


def _printable(text: str) -> str:
    """``text`` made writable as UTF-8 (for the manifest): undecodable bytes of a file name become \\xNN escapes."""
    if _utf8_ok(text):
        return text
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


#: What a terminal must not be sent raw: C0 controls (ESC, CR, BEL, newline, ...), DEL and C1 controls
#: (0x9b is a one-byte CSI), bidirectional overrides and marks that reorder what is shown, line and
#: paragraph separators, and lone surrogates (undecodable bytes of a file name; unprintable as UTF-8).
_TERMINAL_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")


def _escape_char(m: re.Match[str]) -> str:
    c = ord(m.group())
    if 0xDC80 <= c <= 0xDCFF:  # surrogateescape: the byte c - 0xDC00 of a file name that is not UTF-8
        return f"\\x{c - 0xDC00:02x}"
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def printable(text: object) -> str:
    """``str(text)`` safe to print on a terminal as one line: each control character becomes an escape.

    C0/C1 control characters and DEL become ``\\xNN`` (ESC -> ``\\x1b``, CR -> ``\\x0d``), bidi overrides and
    line separators ``\\uNNNN``, undecodable bytes of a file name (surrogateescape) ``\\xNN`` of the byte.
    Text without such characters is returned unchanged (a backslash is left as it is).
    """
    text = str(text)
    if _TERMINAL_UNSAFE.search(text) is None:
        return text
    return _TERMINAL_UNSAFE.sub(_escape_char, text)


def _json_path(root: str, keys: tuple[Any, ...]) -> str:
    return root + "".join(f"[{short_repr(k)}]" for k in keys)


def _json_problem(value: Any, path: str, strict: bool = True) -> str | None:
    """Why ``value`` cannot be stored as strict JSON and read back equal; None when it can.

    Strict JSON: None, bool, int, finite float, valid Unicode str, lists/tuples and dicts with
    str keys, at most MAX_JSON_DEPTH levels deep.  ``strict=False`` lets other leaf types
    through (the manifest is written with ``default=str``) but still refuses NaN/infinity,
    non-str keys and excessive nesting.  Iterative (no recursion), and the path of the
    offending value is only formatted for the message.
    """
    stack: list[tuple[Any, tuple[Any, ...]]] = [(value, ())]
    while stack:
        v, keys = stack.pop()
        if isinstance(v, dict):
            if len(keys) >= MAX_JSON_DEPTH:
                return f"{_json_path(path, keys)} is nested more than {MAX_JSON_DEPTH} levels deep"
            for k, x in v.items():
                if not isinstance(k, str):
                    return f"{_json_path(path, keys)} has the key {short_repr(k)} ({type(k).__name__}); JSON object keys are strings"
                if not _utf8_ok(k):
                    return _bad_text(f"a key of {_json_path(path, keys)}", k)
                tx = type(x)
                if (tx is str and x.isascii()) or tx is int or tx is bool or x is None or (tx is float and math.isfinite(x)):
                    continue  # the common leaves, checked without a trip through the stack
                stack.append((x, keys + (k,)))
        elif isinstance(v, (list, tuple)):
            if len(keys) >= MAX_JSON_DEPTH:
                return f"{_json_path(path, keys)} is nested more than {MAX_JSON_DEPTH} levels deep"
            for i, x in enumerate(v):
                tx = type(x)
                if (tx is str and x.isascii()) or tx is int or tx is bool or x is None or (tx is float and math.isfinite(x)):
                    continue
                stack.append((x, keys + (i,)))
        elif v is None or isinstance(v, int):  # bool is an int
            continue
        elif isinstance(v, str):
            if not _utf8_ok(v):
                return _bad_text(_json_path(path, keys), v)
        elif isinstance(v, float):
            if not math.isfinite(v):
                return f"{_json_path(path, keys)} is {float(v)!r}, which JSON cannot store (no NaN or infinity)"
        elif strict:
            return (f"{_json_path(path, keys)} is {short_repr(v)} (type {type(v).__name__}), which JSON cannot store; "
                    f"use str, int, float, bool, None, lists and dicts")
    return None


def _validate_items(items: Sequence[Mapping[str, Any]], where: str, copy: bool = True) -> list[dict[str, Any]]:
    """Items as stored: {"id": non-empty str (unique), "label": str | None, "metadata": dict}, all strict JSON.

    ``copy``: deep-copy the metadata (through JSON, so tuples become lists exactly as after a
    save/load round trip, and later changes to the caller's dicts do not reach the gallery).
    """
    out = []
    seen: set[str] = set()
    for n, it in enumerate(items):
        if type(it) is not dict and not isinstance(it, Mapping):
            raise GalleryError(f"{where}: item {n} needs a non-empty string 'id', got {short_repr(it)}")
        item_id = it.get("id")
        if not isinstance(item_id, str) or not item_id:
            raise GalleryError(f"{where}: item {n} needs a non-empty string 'id', got {short_repr(it)}")
        label = it.get("label")
        if label is not None and not isinstance(label, str):
            raise GalleryError(f"{where}: item {short_repr(item_id)} has label {short_repr(label)}; labels are strings or null")
        meta = it.get("metadata") or {}
        if type(meta) is not dict:
            if not isinstance(meta, Mapping):
                raise GalleryError(f"{where}: item {short_repr(item_id)} has metadata {short_repr(meta)}; metadata is a JSON object")
            meta = dict(meta)
        if item_id in seen:
            raise GalleryError(f"{where}: id {short_repr(item_id)} occurs twice; ids must be unique")
        seen.add(item_id)
        if not _utf8_ok(item_id):
            problem: str | None = _bad_text("its id", item_id)
        elif label is not None and not _utf8_ok(label):
            problem = _bad_text("its label", label)
        else:
            problem = _json_problem(meta, "metadata") if meta else None
        if problem:
            raise GalleryError(f"{where}: item {short_repr(item_id)}: {problem}; items must be plain JSON "
                               f"(no NaN or infinity, sets, bytes or other objects)")
        if copy:
            try:
                meta = json.loads(json.dumps(meta, ensure_ascii=False, allow_nan=False)) if meta else {}
            except (ValueError, TypeError, RecursionError) as e:  # e.g. an int too long to write
                raise GalleryError(f"{where}: item {short_repr(item_id)}: metadata cannot be written as JSON "
                                   f"({str(e)[:200]}); items must be plain JSON") from None
        out.append({"id": item_id, "label": label, "metadata": meta})
    return out


def _check_embeddings(emb: Any, where: str, dim: int | None = None,
                      fix: str = "pass L2-normalised rows, e.g. Encoder.embed output "
                                 "(or x / np.linalg.norm(x, axis=1, keepdims=True))") -> np.ndarray:
    """A float32/float16 [N, D] array of finite unit rows (|norm - 1| <= UNIT_NORM_TOL), else GalleryError.

    ``fix`` ends the message about non-unit rows.  Scans in steps of ~8 MiB (fine for a memmap).
    """
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
    step = max(1, _SCAN_BYTES // (4 * max(1, emb.shape[1])))
    for start in range(0, emb.shape[0], step):
        block = np.asarray(emb[start : start + step], dtype=np.float32)
        finite = np.isfinite(block).all(axis=1)
        if not finite.all():
            row = start + int(np.flatnonzero(~finite)[0])
            raise GalleryError(f"{where}: embeddings contain NaN or infinite values (row {row})")
        norms = np.sqrt(np.einsum("ij,ij->i", block, block, dtype=np.float64))
        off = np.abs(norms - 1.0) > UNIT_NORM_TOL
        if off.any():
            r = int(np.flatnonzero(off)[0])
            raise GalleryError(f"{where}: row {start + r} has L2 norm {norms[r]:.6g}, but gallery rows must be unit "
                               f"vectors (|norm - 1| <= {UNIT_NORM_TOL:g}; cosine scores are inner products); {fix}")
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
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1):
            raise GalleryError(f"gallery: manifest dim is {short_repr(dim)} ({type(dim).__name__}); it must be an integer >= 1")
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
                first one raises :class:`isfe_model.ImageError`.  What the folder
                walk leaves out (links to folders, unreadable folders, paths over
                the system limit; see :func:`walk_files`) is listed there always.
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
            raise GalleryError(f"item {short_repr(bad_id)}: {_bad_text('its id', bad_id)}; ids are the paths relative to {root}")
        if unnamed:
            name_skips = [{"path": _printable(str(paths[n])), "reason": "the file name is not valid UTF-8, so it cannot be "
                           "stored as an id; rename the file"} for n in unnamed]
            keep = sorted(set(range(len(paths))) - set(unnamed))
            paths, ids, labels = [paths[n] for n in keep], [ids[n] for n in keep], [labels[n] for n in keep]
        emb, kept, errors = encoder.embed_partial([str(p) for p in paths], batch_size=batch_size, progress=progress,
                                                  skip_bad=skip_bad, names=[str(p) for p in paths], label="indexing")
        bad = name_skips + [{"path": _printable(e.source), "reason": _printable(e.reason)} for e in errors]
        skipped = left_out + bad
        if not kept:
            raise GalleryError(f"none of the {len(paths) + len(name_skips)} files in {src_desc} is a usable image"
                               + (f" (first: {bad[0]['path']}: {bad[0]['reason']})" if bad else ""))
        metadata = metadata or {}
        items = [{"id": ids[i], "label": labels[i], "metadata": metadata.get(ids[i]) or {}} for i in kept]
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
        manifest.update(count=int(emb.shape[0]), dim=int(emb.shape[1]), dtype=str(emb.dtype), isfe_model_version=__version__)
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


def _no_constant(name: str) -> Any:
    """json.loads' parse_constant: gallery files are strict JSON (NaN and Infinity are not JSON)."""
    raise ValueError(f"{name} is not valid JSON (gallery files hold no NaN or infinity)")


#: Parses gallery files: strict JSON (made once: json.loads with arguments builds a decoder per call).
_STRICT_JSON = json.JSONDecoder(parse_constant=_no_constant)


class _Changed(Exception):
    """A gallery's files changed while they were read (:meth:`Gallery.load` tries again); the message is final."""


def _why_unopenable(d: Path, e: OSError) -> str:
    """The message for a gallery folder whose files :func:`open_together` could not open."""
    if not d.exists():
        return f"gallery {d}: no such folder; build one with `isfe-index MODEL IMAGE_FOLDER -o {d}`"
    if not d.is_dir():
        return f"gallery {d} is a file; a gallery is the folder written by isfe-index"
    missing = [f for f in (MANIFEST_FILE, EMBEDDINGS_FILE, ITEMS_FILE) if not (d / f).is_file()]
    if missing:
        return f"gallery {d} lacks {', '.join(missing)}; it is not a gallery or is damaged — rebuild it with isfe-index"
    return (f"gallery {d}: cannot open {e.filename or d} ({e.strerror or e}); fix its permissions, or try again "
            f"if it was being replaced")


def _file_digest(path: Path) -> dict[str, Any]:
    """{"bytes": size, "sha256": hex} of a file, as the manifest records it."""
    with open(path, "rb") as f:
        return {"bytes": os.fstat(f.fileno()).st_size, "sha256": hashlib.file_digest(f, "sha256").hexdigest()}


def _read_manifest(f: BinaryIO, d: Path) -> dict[str, Any]:
    """manifest.json from the open file ``f``, checked: format, version, dim, count, fingerprint; strict JSON."""
    rebuild = "rebuild the gallery with isfe-index"
    try:
        manifest = _STRICT_JSON.decode(f.read().decode("utf-8"))
    except RecursionError:
        raise GalleryError(f"gallery {d}: {MANIFEST_FILE} is nested too deeply to be read; {rebuild}") from None
    except (OSError, ValueError) as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise GalleryError(f"gallery {d}: {MANIFEST_FILE} is unreadable ({str(e)[:300]}); {rebuild}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise GalleryError(f"gallery {d}: {MANIFEST_FILE} is not an ISFE gallery manifest (format != {FORMAT!r})")
    version = manifest.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise GalleryError(f"gallery {d}: {MANIFEST_FILE} has format_version {short_repr(version)} "
                           f"({type(version).__name__}); it must be an integer (this isfe_model reads "
                           f"{FORMAT_VERSION}) — the file was edited or damaged; {rebuild}")
    if version != FORMAT_VERSION:
        raise GalleryError(f"gallery {d}: format version {version!r} is not supported "
                           f"(this isfe_model reads {FORMAT_VERSION}); rebuild it or upgrade isfe-model")
    for key in ("dim", "count", "fingerprint"):
        if key not in manifest:
            raise GalleryError(f"gallery {d}: {MANIFEST_FILE} lacks {key!r}; {rebuild}")
    for key, low in (("dim", 1), ("count", 0)):
        v = manifest[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise GalleryError(f"gallery {d}: {MANIFEST_FILE} has {key} {short_repr(v)} ({type(v).__name__}); it must be "
                               f"an integer >= {low} — the file was edited or damaged; {rebuild}")
    if not isinstance(manifest["fingerprint"], str):
        raise GalleryError(f"gallery {d}: {MANIFEST_FILE} has fingerprint {short_repr(manifest['fingerprint'])}; it must be "
                           f"a string (the model's checkpoint sha256); {rebuild}")
    problem = _json_problem(manifest, MANIFEST_FILE, strict=False)
    if problem:
        raise GalleryError(f"gallery {d}: {problem}; {rebuild}")
    return manifest


def _recorded_files(manifest: Mapping[str, Any], d: Path) -> dict[str, dict[str, Any]] | None:
    """The manifest's ``files`` {name: {"bytes", "sha256"}} for CHECKED_FILES; None for galleries saved without it."""
    files = manifest.get("files")
    if files is None:
        return None

    def ok(entry: Any) -> bool:
        return (isinstance(entry, dict) and type(entry.get("bytes")) is int and entry["bytes"] >= 0
                and isinstance(entry.get("sha256"), str) and _SHA256_HEX.fullmatch(entry["sha256"]) is not None)

    if not isinstance(files, dict) or not all(ok(files.get(name)) for name in CHECKED_FILES):
        raise GalleryError(f"gallery {d}: {MANIFEST_FILE} has files {short_repr(files)}; it must give "
                           f"{{\"bytes\": size, \"sha256\": hex digest}} for {' and '.join(CHECKED_FILES)} "
                           f"— the file was edited or damaged; rebuild the gallery with isfe-index")
    return {name: {"bytes": files[name]["bytes"], "sha256": files[name]["sha256"]} for name in CHECKED_FILES}


def _verify_files(d: Path, recorded: Mapping[str, Mapping[str, Any]], read: Mapping[str, Mapping[str, Any]]) -> None:
    """``_Changed`` unless every file read has the size and sha256 the manifest recorded."""
    for name in CHECKED_FILES:
        want, got = recorded[name], read[name]
        if want != got:
            what = (f"{got['bytes']:,} bytes, the manifest says {want['bytes']:,}" if want["bytes"] != got["bytes"]
                    else f"sha256 {got['sha256'][:12]}…, the manifest says {want['sha256'][:12]}…")
            raise _Changed(f"gallery {d}: {name} does not match the checksum in {MANIFEST_FILE} ({what}): it changed "
                           f"while it was read, or was edited or damaged after the gallery was written; try again, "
                           f"or rebuild the gallery with isfe-index")


def _npy_header(f: BinaryIO, where: str) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """(shape, dtype, fortran_order, data offset) from the .npy header of open file ``f``, checked against its size."""
    fmt = np.lib.format
    try:
        f.seek(0)
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(f)
        else:
            raise ValueError(f".npy format version {version[0]}.{version[1]} is not supported here")
        offset = f.tell()
        data_bytes = os.fstat(f.fileno()).st_size - offset
    except (OSError, ValueError, EOFError, SyntaxError, TypeError, RecursionError, MemoryError) as e:
        raise GalleryError(f"{where} is damaged or not a plain .npy array ({str(e)[:300]}); rebuild the gallery") from None
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise GalleryError(f"{where} is damaged or not a plain .npy array (it holds Python objects); rebuild the gallery")
    expected = math.prod(int(n) for n in shape) * dtype.itemsize
    if data_bytes != expected:
        raise GalleryError(f"{where} is damaged: its header says {' x '.join(str(int(n)) for n in shape) or 'a scalar'} "
                           f"{dtype} ({expected:,} bytes of data) but the file holds {data_bytes:,} bytes; rebuild the gallery")
    return tuple(int(n) for n in shape), dtype, bool(fortran), offset


def _read_embeddings(f: BinaryIO, d: Path, manifest: Mapping[str, Any],
                     mmap: bool) -> tuple[np.ndarray, dict[str, Any]]:
    """embeddings.npy [count, dim] from open file ``f`` (memory-mapped with ``mmap``) and the digest of the bytes used.

    The header is checked against the file size and the manifest before any data is read: a
    damaged header can claim any shape (np.load would try to allocate it: MemoryError).
    """
    rebuild = "rebuild the gallery with isfe-index"
    shape, dtype, fortran, offset = _npy_header(f, f"gallery {d}: {EMBEDDINGS_FILE}")
    if len(shape) != 2 or dtype not in (np.dtype(np.float32), np.dtype(np.float16)):
        raise GalleryError(f"gallery {d}: {EMBEDDINGS_FILE} holds {dtype} {list(shape)}, expected float32/float16 [N, D]")
    if shape[1] != manifest["dim"] or shape[0] != manifest["count"]:
        raise GalleryError(f"gallery {d}: {EMBEDDINGS_FILE} is {shape[0]} x {shape[1]} but the manifest says "
                           f"{manifest['count']} x {manifest['dim']}; the folder is damaged — rebuild it")
    try:
        if mmap:
            emb = np.memmap(f, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")
        else:
            f.seek(0)
            emb = np.load(f, allow_pickle=False)
    except MemoryError:
        raise GalleryError(f"gallery {d}: not enough memory to read {EMBEDDINGS_FILE} ({shape[0]} x {shape[1]} {dtype}); "
                           f"load it memory-mapped (mmap=True) or free memory") from None
    except (OSError, ValueError, EOFError) as e:
        raise GalleryError(f"gallery {d}: {EMBEDDINGS_FILE} is damaged or not a plain .npy array ({e}); {rebuild}") from None
    if tuple(emb.shape) != tuple(shape) or emb.dtype != dtype:  # the file changed while it was read
        raise _Changed(f"gallery {d}: {EMBEDDINGS_FILE} changed while it was read; try again")
    f.seek(0)
    h = hashlib.sha256(f.read(offset))  # the header as stored, then the data in file order
    raw = emb.T if fortran else emb
    step = max(1, _SCAN_BYTES // max(1, raw.itemsize * int(np.prod(raw.shape[1:]))))
    for start in range(0, raw.shape[0], step):
        h.update(np.ascontiguousarray(raw[start : start + step]).data)
    return emb, {"bytes": offset + int(emb.nbytes), "sha256": h.hexdigest()}


def _read_items(f: BinaryIO, d: Path, n: int) -> tuple[list[Any], dict[str, Any]]:
    """items.jsonl from open file ``f`` (strict JSON, one object a line; blank lines ignored) and the file's digest.

    Stops after ``n + 1`` items (one too many is enough to refuse the file).
    """
    rebuild = "rebuild the gallery with isfe-index"
    h, size, items, ln = hashlib.sha256(), 0, [], 0
    try:
        for ln, line in enumerate(f, 1):
            h.update(line)
            size += len(line)
            if line.strip():
                items.append(_STRICT_JSON.decode(line.decode("utf-8")))
                if len(items) > n:
                    break
    except RecursionError:
        raise GalleryError(f"gallery {d}: {ITEMS_FILE} line {ln} is nested too deeply to be read; {rebuild}") from None
    except (OSError, ValueError) as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise GalleryError(f"gallery {d}: {ITEMS_FILE} line {ln} is unreadable ({str(e)[:300]}); {rebuild}") from None
    if len(items) != n:
        has = f"more than {n}" if len(items) > n else str(len(items))
        raise GalleryError(f"gallery {d}: {ITEMS_FILE} has {has} items for {n} embeddings; {rebuild}")
    return items, {"bytes": size, "sha256": h.hexdigest()}


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
    except (OSError, ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return False


def _foreign_entries(p: Path) -> list[str]:
    """Names in gallery folder ``p`` that a gallery does not consist of (replacing ``p`` would delete them)."""
    own = {MANIFEST_FILE, EMBEDDINGS_FILE, ITEMS_FILE}
    return sorted(e.name for e in p.iterdir() if e.name not in own or e.is_symlink() or not e.is_file())


def _is_replaceable(p: Path) -> bool:
    return p.is_dir() and not p.is_symlink() and (not any(p.iterdir()) or (_is_gallery_dir(p) and not _foreign_entries(p)))


def _check_replaceable(target: Path, overwrite: bool) -> None:
    if not target.is_dir() or target.is_symlink():
        raise GalleryError(f"{target} exists and is not a folder; choose another output path")
    if not any(target.iterdir()):
        return  # an empty folder is fine to fill
    if not _is_gallery_dir(target):
        raise GalleryError(f"{target} exists and is not an ISFE gallery; refusing to replace it — choose another output folder")
    foreign = _foreign_entries(target)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise GalleryError(f"{target} holds files that are not part of the gallery ({shown}); replacing it would delete "
                           f"them — move them out or choose another output folder")
    if not overwrite:
        raise GalleryError(f"{target} already holds a gallery; pass --overwrite (overwrite=True) to replace it")

