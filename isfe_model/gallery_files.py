"""The gallery folder on disk: reading, checking and checksumming its three files (never pickle).

::

    embeddings.npy   float32 or float16 [N, D], unit rows (np.load(allow_pickle=False))
    items.jsonl      one JSON object per row: {"id": ..., "label": ..., "metadata": {...}}
    manifest.json    format, model_sha256, fingerprint, dim, dtype, count, created, skipped, ...,
                     files: {name: {"bytes", "sha256"}} of the other two (checked by load)

Here: the checks every row and item passes (:func:`_check_embeddings`: finite unit rows;
:func:`_validate_items`: strict JSON), the readers :meth:`isfe_model.Gallery.load` runs on
files opened together (the .npy header is checked against the file size before any data is
read; each file's sha256 is compared with the manifest's), the model check
(:func:`check_compatible`) and which folders a save may replace (:func:`_check_replaceable`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any, BinaryIO, Mapping, Protocol, Sequence

import numpy as np

from .gallery_errors import GalleryError
from .metadata import short_repr
from .walk import _bad_text, _utf8_ok

__all__ = ["CHECKED_FILES", "DTYPES", "EMBEDDINGS_FILE", "FORMAT", "FORMAT_VERSION", "ITEMS_FILE", "MANIFEST_FILE",
           "MAX_JSON_DEPTH", "UNIT_NORM_TOL", "check_compatible"]

FORMAT = "isfe-gallery"
FORMAT_VERSION = 1
EMBEDDINGS_FILE = "embeddings.npy"
ITEMS_FILE = "items.jsonl"
MANIFEST_FILE = "manifest.json"
#: Files whose size and sha256 the manifest records ("files") and Gallery.load checks.
CHECKED_FILES = (EMBEDDINGS_FILE, ITEMS_FILE)
_SHA256_HEX = re.compile("[0-9a-f]{64}")
DTYPES = ("float32", "float16")
#: Deepest nesting of lists/objects accepted in item metadata and manifests.  JSON parsers and
#: writers recurse, so thousands of levels would overflow the stack (RecursionError) later.
MAX_JSON_DEPTH = 100
#: Gallery rows must be unit vectors: |L2 norm - 1| <= UNIT_NORM_TOL.  float16 storage rounds each
#: component by at most 2**-11 (relative), which moves a unit row's norm by at most ~4.9e-4.
UNIT_NORM_TOL = 1e-3
#: Rows per step when scanning embeddings (finite values, norms) aim at this many bytes.
_SCAN_BYTES = 8 << 20


class _EncoderLike(Protocol):
    dim: int
    fingerprint: str


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
                    return (f"{_json_path(path, keys)} has the key {short_repr(k)} ({type(k).__name__}); "
                            f"JSON object keys are strings")
                if not _utf8_ok(k):
                    return _bad_text(f"a key of {_json_path(path, keys)}", k)
                tx = type(x)
                if ((tx is str and x.isascii()) or tx is int or tx is bool or x is None
                        or (tx is float and math.isfinite(x))):
                    continue  # the common leaves, checked without a trip through the stack
                stack.append((x, keys + (k,)))
        elif isinstance(v, (list, tuple)):
            if len(keys) >= MAX_JSON_DEPTH:
                return f"{_json_path(path, keys)} is nested more than {MAX_JSON_DEPTH} levels deep"
            for i, x in enumerate(v):
                tx = type(x)
                if ((tx is str and x.isascii()) or tx is int or tx is bool or x is None
                        or (tx is float and math.isfinite(x))):
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
            raise GalleryError(f"{where}: item {short_repr(item_id)} has label {short_repr(label)}; "
                               f"labels are strings or null")
        meta = it.get("metadata") or {}
        if type(meta) is not dict:
            if not isinstance(meta, Mapping):
                raise GalleryError(f"{where}: item {short_repr(item_id)} has metadata {short_repr(meta)}; "
                                   f"metadata is a JSON object")
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
    names = (MANIFEST_FILE, EMBEDDINGS_FILE, ITEMS_FILE)
    missing = [f for f in names if not (d / f).exists()]  # a link to a device "exists" but is no file
    if missing:
        return f"gallery {d} lacks {', '.join(missing)}; it is not a gallery or is damaged — rebuild it with isfe-index"
    odd = [f for f in names if not (d / f).is_file()]
    if odd:
        return (f"gallery {d}: {', '.join(odd)} {'is' if len(odd) == 1 else 'are'} not a regular file (a folder, "
                f"device or pipe); the gallery is damaged — rebuild it with isfe-index")
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
            raise GalleryError(f"gallery {d}: {MANIFEST_FILE} has {key} {short_repr(v)} ({type(v).__name__}); "
                               f"it must be an integer >= {low} — the file was edited or damaged; {rebuild}")
    if not isinstance(manifest["fingerprint"], str):
        raise GalleryError(f"gallery {d}: {MANIFEST_FILE} has fingerprint {short_repr(manifest['fingerprint'])}; "
                           f"it must be a string (the model's checkpoint sha256); {rebuild}")
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
        raise GalleryError(f"{where} is damaged or not a plain .npy array ({str(e)[:300]}); "
                           f"rebuild the gallery") from None
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise GalleryError(f"{where} is damaged or not a plain .npy array (it holds Python objects); "
                           f"rebuild the gallery")
    expected = math.prod(int(n) for n in shape) * dtype.itemsize
    if data_bytes != expected:
        raise GalleryError(f"{where} is damaged: its header says "
                           f"{' x '.join(str(int(n)) for n in shape) or 'a scalar'} {dtype} "
                           f"({expected:,} bytes of data) but the file holds {data_bytes:,} bytes; rebuild the gallery")
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
        raise GalleryError(f"gallery {d}: {EMBEDDINGS_FILE} holds {dtype} {list(shape)}, "
                           f"expected float32/float16 [N, D]")
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
        raise GalleryError(f"gallery {d}: not enough memory to read {EMBEDDINGS_FILE} ({shape[0]} x {shape[1]} "
                           f"{dtype}); load it memory-mapped (mmap=True) or free memory") from None
    except (OSError, ValueError, EOFError) as e:
        raise GalleryError(f"gallery {d}: {EMBEDDINGS_FILE} is damaged or not a plain .npy array ({e}); "
                           f"{rebuild}") from None
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
        raise GalleryError(f"{where} was built with another model: "
                           f"gallery fingerprint {str(manifest['fingerprint'])[:16]}…{name}, "
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
    # the types come from the listing itself (d_type): a folder swapped away meanwhile
    # cannot make its files look foreign
    with os.scandir(p) as listing:
        return sorted(e.name for e in listing
                      if e.name not in own or e.is_symlink() or not e.is_file(follow_symlinks=False))


def _is_replaceable(p: Path) -> bool:
    try:
        return p.is_dir() and not p.is_symlink() and (not any(p.iterdir())
                                                      or (_is_gallery_dir(p) and not _foreign_entries(p)))
    except FileNotFoundError:  # moved aside by another writer meanwhile: nothing left to replace
        return True


def _check_replaceable(target: Path, overwrite: bool) -> None:
    """Refuse replacing ``target`` unless it is empty or a gallery (and ``overwrite``).

    A folder that another writer moved aside meanwhile is fine: there is nothing left to protect.
    """
    try:
        _check_replaceable_now(target, overwrite)
    except FileNotFoundError:  # another writer moved it aside between our checks: there is nothing to protect
        pass


def _check_replaceable_now(target: Path, overwrite: bool) -> None:
    if not (target.exists() or target.is_symlink()):
        raise FileNotFoundError(str(target))
    if not target.is_dir() or target.is_symlink():
        raise GalleryError(f"{target} exists and is not a folder; choose another output path")
    if not any(target.iterdir()):
        return  # an empty folder is fine to fill
    if not _is_gallery_dir(target):
        if not target.exists():  # moved aside while its manifest was read
            raise FileNotFoundError(str(target))
        raise GalleryError(f"{target} exists and is not an ISFE gallery; refusing to replace it "
                           f"— choose another output folder")
    foreign = _foreign_entries(target)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise GalleryError(f"{target} holds files that are not part of the gallery ({shown}); "
                           f"replacing it would delete them — move them out or choose another output folder")
    if not overwrite:
        raise GalleryError(f"{target} already holds a gallery; pass --overwrite (overwrite=True) to replace it")

