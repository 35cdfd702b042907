"""Datasets, decoded once into a memory-mappable uint8 cache.

``--data`` accepts:

* nothing / ``digits`` — the embedded default: scikit-learn's handwritten
  digits (1,797 real 8x8 scans shipped inside scikit-learn, no network),
  shown to the model as 16x16 RGB images; a fixed stratified split of
  1,438 train / 359 test images (20% of each class).
* ``cifar10`` — torchvision's CIFAR-10 (downloads where a network exists).
* a folder with ``train/`` and ``test/`` subfolders of class folders
  (labels are used only for evaluation), or an archive holding such a folder
  (``.tar`` with any compression, or ``.zip``; e.g.
  ``../shared/data/cifar10-jpeg.tar.gz``), read without extracting.
* a folder (or archive) of images with neither ``train/`` nor ``test/``:
  unlabelled data; every image below it (any depth) is a training image and
  there is no test split (training runs without the kNN monitor).

Every split is decoded with :mod:`isfe_model.preprocess` (the same code the
inference package uses) into ``uint8 [N, R, R, 3]`` (shorter side resized to
R, center square crop) and cached as ``.npy`` under ``$ISFE_CACHE`` (default
``~/.cache/isfe``), keyed by the source's content, so later runs start in
seconds.  Decoding runs on a thread pool straight into the memory-mapped
cache file, so a split larger than the RAM (e.g. Stanford Online Products at
256 px, 24 GB) decodes in bounded memory; training then reads batches from
the memory map (:class:`training.batches.HostBatches`) and augments them on
the device.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import json
import os
import sys
import tarfile
import tempfile
import time
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from isfe_model.atomic import atomic_save_npy
from isfe_model.jsonsafe import write_json
from isfe_model.preprocess import (
    IMAGE_EXTENSIONS,
    ImageError,
    PreprocessSpec,
    decode_square,
    load_image,
    read_image_file,
    to_uint8_square,
)
from isfe_model.walk import (
    BROKEN_LINK,
    EXTENSION,
    FOLDER_LINK,
    HIDDEN,
    SPECIAL,
    TOO_LONG,
    UNEXAMINABLE,
    UNREADABLE_FOLDER,
    Walk,
    printable,
    walk,
)

__all__ = ["DataError", "ImageDataset", "IMAGE_EXTENSIONS", "MIN_TRAIN_IMAGES", "Skipped", "UNLABELED_CLASS",
           "default_spec", "has_split", "is_unlabeled_folder", "load_split", "cache_dir", "read_capped", "walk_images"]

CACHE_VERSION = "2"
DECODE_CHUNK = 256  # images per decoding task
DECODE_WORKERS = 8  # decoding threads at most (and at most the CPU count)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
DIGITS_MEAN = (0.19, 0.19, 0.19)
DIGITS_STD = (0.31, 0.31, 0.31)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: The instance loss contrasts each image with the others of its batch: one image has no negative.
MIN_TRAIN_IMAGES = 2


class DataError(ValueError):
    """A data source that cannot be used; the message says why and what to do."""


@dataclass
class ImageDataset:
    """A decoded split.

    Attributes:
        images: uint8 [N, R, R, 3] (possibly a read-only memmap).
        labels: int64 [N] class indices (evaluation only).
        classes: class names, index = label.
        name: human-readable source name.
        spec: the default preprocessing for this data (R = spec.resize_size).
    """

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    name: str
    spec: PreprocessSpec

    def __len__(self) -> int:
        return int(self.images.shape[0])


def cache_dir() -> Path:
    return Path(os.environ.get("ISFE_CACHE", Path.home() / ".cache" / "isfe"))


# --------------------------------------------------------------------------- walking folders, reading files


class Skipped:
    """Paths a folder walk or an archive listing left out, by reason (for one line of the log)."""

    SHOWN = 3  # names shown per reason

    def __init__(self) -> None:
        self.by_reason: dict[str, list[str]] = {}

    def add(self, reason: str, path: str) -> None:
        self.by_reason.setdefault(reason, []).append(path)

    def __len__(self) -> int:
        return sum(len(v) for v in self.by_reason.values())

    def summary(self, where: str) -> str | None:
        """``left out N paths under WHERE: 2 symlinked folders (not followed): 'a', 'b'; ...`` (names escaped)."""
        if not self.by_reason:
            return None
        parts = []
        for reason, paths in sorted(self.by_reason.items()):
            shown = ", ".join(f"'{printable(p)}'" for p in paths[: self.SHOWN])
            parts.append(f"{len(paths):,} {reason}: {shown}" + (", ..." if len(paths) > self.SHOWN else ""))
        return f"note: left out {len(self):,} path(s) under {printable(where)}: " + "; ".join(parts)

    def log(self, where: str) -> None:
        line = self.summary(where)
        if line:
            print(line, file=sys.stderr, flush=True)

    def take(self, walked: Walk, rel_to: Path | None = None) -> list[Path]:
        """``walked.files``; each path the walk left out (and each hidden name) added under training's words for
        its reason, relative to ``rel_to`` (default: the walked folder)."""
        prefix = "" if rel_to is None else _rel(walked.root, rel_to)
        for lo in (*walked.left_out, *walked.hidden):
            rel = lo.rel if prefix in ("", ".") else prefix if lo.rel == "." else f"{prefix}/{lo.rel}"
            self.add(_SKIP_WORDS[lo.reason].format(detail=lo.detail), rel)
        return walked.files


#: How the training log words each reason of :func:`isfe_model.walk.walk` (one group per wording).
_SKIP_WORDS = {
    HIDDEN: "hidden (name starts with '.')",
    FOLDER_LINK: "symlinked folder(s) (not followed)",
    BROKEN_LINK: "broken symlink(s)",
    SPECIAL: "special file(s) (FIFO, device or socket)",
    UNREADABLE_FOLDER: "unreadable folder(s) ({detail})",
    UNEXAMINABLE: "unreadable path(s) ({detail})",
    TOO_LONG: "path(s) over the system length limit (PATH_MAX; nothing can open them)",
    EXTENSION: "file(s) without an image extension",
}


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path != root else "."


def walk_images(root: Path, skipped: Skipped, rel_to: Path | None = None) -> list[Path]:
    """The image files below ``root`` (any depth), in :func:`isfe_model.walk.walk`'s order and policy.

    Hidden names, links to folders (not followed), broken links, FIFOs/devices/sockets, folders
    that cannot be listed, paths over PATH_MAX and files without an image extension are added to
    ``skipped`` (relative to ``rel_to``, default ``root``); links to files are followed.
    """
    return skipped.take(walk(root, extensions=IMAGE_EXTENSIONS), rel_to)


def read_capped(f, cap: int) -> bytes | None:
    """The rest of file object ``f`` if it is at most ``cap`` bytes, else None.

    Reads (inflates) at most cap + 1 bytes, in steps of 1 MiB.
    """
    parts, total = [], 0
    while total <= cap:
        block = f.read(min(1 << 20, cap + 1 - total))
        if not block:
            return b"".join(parts)
        parts.append(block)
        total += len(block)
    return None


def _read_file(path: Path, display: str) -> bytes:
    """A training image's bytes with isfe_model's checks (a regular file of at most MAX_FILE_BYTES)."""
    try:
        return read_image_file(path, display)
    except ImageError as e:
        raise DataError(f"{e}. Remove or replace this file, then run again.") from None


#: File name endings read as archives (tar with any of Python's compressions, and zip).
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".zip")
#: An archive member larger than this is refused before it is read (a compressed "image" that
#: inflates to gigabytes); the largest real photos are a few tens of MB.
MAX_MEMBER_BYTES = 256 << 20


def _is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _is_zip(path: Path) -> bool:
    return path.name.lower().endswith(".zip")


def _wanted(name: str) -> bool:
    """An archive member that is read as an image: an image extension and no hidden folder or name."""
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS and not _hidden(Path(name))


def _oversized(archive: Path, name: str, size: int) -> DataError:
    return DataError(f"{printable(archive)}:{printable(name)} is {size / 2**20:.0f} MiB, larger than any image this "
                     f"reads ({MAX_MEMBER_BYTES >> 20} MiB); remove it from the archive")


def _list_members(archive: Path, kind: str) -> tuple[zipfile.ZipFile | tarfile.TarFile, list[tuple[str, int, object]]]:
    """(open handle, [(name, size, member)]) of an archive's regular files.

    An image member over MAX_MEMBER_BYTES is refused as its header is read: a tar stream
    (``getmembers()`` would inflate the whole archive first) is never inflated past it.
    """
    handle = zipfile.ZipFile(archive) if kind == "zip" else tarfile.open(archive, "r:*")
    try:
        if kind == "zip":
            items = ((i.filename, i.file_size, i) for i in handle.infolist() if not i.is_dir())
        else:
            items = ((m.name, m.size, m) for m in handle if m.isfile())
        members = []
        for name, size, m in items:
            if size > MAX_MEMBER_BYTES and _wanted(name):
                raise _oversized(archive, name, size)
            members.append((name, size, m))
    except BaseException:
        handle.close()
        raise
    return handle, members


def _archive_reason(e: BaseException) -> str:
    """One line for why an archive could not be opened (tarfile lists every compression it tried, a line each)."""
    text = str(e).strip()
    if isinstance(e, tarfile.ReadError) and "\n" in text:  # "file could not be opened successfully:\n- method gz: ..."
        return "neither a tar file nor a gzip, bzip2 or xz compressed one"
    return " ".join(text.split()) or type(e).__name__


@contextlib.contextmanager
def _archive_members(archive: Path) -> Iterator[list[tuple[str, int, Callable[[], bytes]]]]:
    """The regular files of a tar or zip archive as (name, size, read); the archive stays open inside the ``with``.

    Links, devices and folders are skipped; names are only used to pick files
    and labels, nothing is written to the disk.  ``read()`` inflates at most
    MAX_MEMBER_BYTES + 1 bytes and refuses the member by name beyond that.
    """
    kind = "zip" if _is_zip(archive) else "tar"
    try:
        handle, members = _list_members(archive, kind)
    except DataError:
        raise
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError) as e:
        raise DataError(f"{printable(archive)} is not a readable {kind} archive ({_archive_reason(e)}); pass an "
                        f"intact archive ({', '.join(ARCHIVE_SUFFIXES)}) or an extracted folder") from None

    def reader(name: str, size: int, m) -> Callable[[], bytes]:
        def read() -> bytes:
            if size > MAX_MEMBER_BYTES:
                raise _oversized(archive, name, size)
            try:
                if kind == "zip":
                    with handle.open(m) as f:
                        data = read_capped(f, MAX_MEMBER_BYTES)
                else:
                    data = read_capped(handle.extractfile(m), MAX_MEMBER_BYTES)
            except (tarfile.TarError, zipfile.BadZipFile, zlib.error, OSError, EOFError, RuntimeError,
                    NotImplementedError) as e:  # RuntimeError: encrypted zip member
                raise DataError(f"{printable(archive)}:{printable(name)} cannot be read ({e}); the archive is damaged "
                                f"or encrypted, copy it again or extract it") from None
            if data is None:
                raise DataError(f"{printable(archive)}:{printable(name)} inflates to more than "
                                f"{MAX_MEMBER_BYTES >> 20} MiB, larger than any image this reads; remove it from "
                                f"the archive")
            return data
        return read

    try:
        yield [(name, size, reader(name, size, m)) for name, size, m in members]
    finally:
        handle.close()


def default_spec(data: str | None, input_size: int | None = None, resize_size: int | None = None,
                 decode: str = "full") -> PreprocessSpec:
    """Default preprocessing for a data source (overridable sizes; ``decode``: the JPEG decode policy).

    digits: 16/16; cifar10 and folders of small images: 32/32; folders whose
    first image is larger than 64 px: 224 input from 256 (ImageNet style).
    """
    if data in (None, "digits"):
        s, r, mean, std = 16, 16, DIGITS_MEAN, DIGITS_STD
    elif data == "cifar10":
        s, r, mean, std = 32, 32, CIFAR_MEAN, CIFAR_STD
    else:
        big = _first_image_side(Path(str(data))) > 64
        s, r = (224, 256) if big else (32, 32)
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if big else (CIFAR_MEAN, CIFAR_STD)
    if input_size is not None:
        s = int(input_size)
        r = max(int(resize_size) if resize_size is not None else (r if r >= s else s), s)
    elif resize_size is not None:
        r = int(resize_size)
        s = min(s, r)
    return PreprocessSpec(input_size=s, resize_size=r, mean=mean, std=std, decode=decode)


def _first_image_side(path: Path) -> int:
    """Shorter side of the first training image (streams archives: reads only what it needs).

    The image gets every limit of isfe_model (pixels, decode memory and work, file or member size).
    """
    try:
        if _is_archive(path) and _is_zip(path):
            unlabeled = not _layout_splits(path)
            with _archive_members(path) as members:
                for name, _, read in members:
                    if (unlabeled or "train" in Path(name).parts[:-1]) and _wanted(name):
                        return min(load_image(read(), name=name).size)
            return 32
        if _is_archive(path):
            unlabeled = not _layout_splits(path)  # then any image is a training image
            with tarfile.open(path, "r|*") as tf:
                for m in tf:
                    if m.isfile() and (unlabeled or "train" in Path(m.name).parts[:-1]) and _wanted(m.name):
                        data = read_capped(tf.extractfile(m), MAX_MEMBER_BYTES) if m.size <= MAX_MEMBER_BYTES else None
                        if data is None:
                            raise _oversized(path, m.name, m.size)
                        return min(load_image(data, name=m.name).size)
            return 32
        for _, _, display, read in _iter_folder_split(path, "train"):
            return min(load_image(read(), name=display).size)
    except (DataError, ImageError, OSError, tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error):
        pass  # load_split reports the real problem
    return 32


# --------------------------------------------------------------------------- sources


def _digits_split(split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # [1797, 8, 8]
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(0)
    test_idx = []
    for c in range(10):  # fixed stratified split: 20% of each class for test
        idx = np.flatnonzero(y == c)
        test_idx.extend(rng.permutation(idx)[: round(0.2 * len(idx))])
    test_mask = np.zeros(len(y), dtype=bool)
    test_mask[np.array(test_idx)] = True
    mask = test_mask if split == "test" else ~test_mask
    return x[mask], y[mask], [str(c) for c in range(10)]


Entry = tuple[str, str, str, Callable[[], bytes]]  # (class, relative path, display name, read bytes)


#: The one "class" of a folder without train/ and test/ (unlabelled images: nothing to evaluate against).
UNLABELED_CLASS = "unlabeled"


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


@functools.lru_cache(maxsize=16)
def _archive_splits(path: str, size: int, mtime_ns: int) -> frozenset[str]:
    """Which of train/test appear as folders in an archive (read once per archive version)."""
    found: set[str] = set()
    try:
        if _is_zip(Path(path)):
            with zipfile.ZipFile(path) as zf:
                for name in zf.namelist():
                    found.update(s for s in ("train", "test") if s in Path(name).parts[:-1])
            return frozenset(found)
        with tarfile.open(path, "r:*") as tf:
            for m in tf:
                if m.isfile() and m.size > MAX_MEMBER_BYTES and _wanted(m.name):
                    break  # refused by name when the split is opened; never inflated to be skipped
                if m.isfile():
                    found.update(s for s in ("train", "test") if s in Path(m.name).parts[:-1])
                    if len(found) == 2:
                        break
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError, zlib.error, ValueError):
        pass  # _open_archive_split reports the real problem
    return frozenset(found)


def _layout_splits(root: Path) -> frozenset[str]:
    """The train/test split folders an image folder or archive has."""
    if _is_archive(root):
        st = root.stat()
        return _archive_splits(str(root.resolve()), st.st_size, st.st_mtime_ns)
    return frozenset(s for s in ("train", "test") if (root / s).is_dir())


def is_unlabeled_folder(data: str | os.PathLike | None) -> bool:
    """True for a folder (or archive) of images without train/ and test/: all of it is training data, unlabelled."""
    if data is None or str(data) in ("digits", "cifar10"):
        return False
    p = Path(str(data))
    return (p.is_dir() or _is_archive(p)) and not _layout_splits(p)


def has_split(data: str | os.PathLike | None, split: str) -> bool:
    """Whether ``load_split(data, split)`` has a split to load (an unlabelled folder has no test split).

    Missing paths answer True so that :func:`load_split` reports them.
    """
    if data is None or str(data) in ("digits", "cifar10") or not Path(str(data)).exists():
        return True
    if is_unlabeled_folder(data):
        return split == "train"
    return split in _layout_splits(Path(str(data))) or split not in ("train", "test")


@contextlib.contextmanager
def _open_split(root: Path, split: str, log: bool = True) -> Iterator[list[Entry]]:
    """The image files of a split, sorted by (class, path); archives stay open inside the ``with``.

    A folder without ``train/`` and ``test/`` is an unlabelled set: its
    ``train`` split is every image below it (one class, ``UNLABELED_CLASS``).
    Folders are walked by :func:`walk_images` (its symlink policy; a class
    folder that is itself a symlink is followed); with ``log`` the paths left
    out are summed up on stderr (count, reason, first names, escaped).
    """
    if _is_archive(root):
        with _open_archive_split(root, split, log) as entries:
            yield entries
        return
    base = root / split
    skipped = Skipped()
    if not base.is_dir():
        if split == "train" and is_unlabeled_folder(root):
            entries = [_folder_entry(UNLABELED_CLASS, p, root) for p in walk_images(root, skipped)]
            if log:
                skipped.log(str(root))
            yield entries
            return
        raise DataError(f"{printable(root)} has no '{split}/' folder; give a folder with train/<class>/ and "
                        f"test/<class>/ image folders (the test split is only for evaluation), or a folder of images "
                        f"with neither for unlabelled training")
    classes = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{printable(base)} has no class folders; put images in {printable(base)}/<class>/ "
                        f"(any class name)")
    entries: list[Entry] = []
    for c in classes:
        entries.extend(_folder_entry(c, p, base) for p in walk_images(base / c, skipped, rel_to=base))
    if log:
        skipped.log(str(base))
    yield entries


def _folder_entry(cls: str, path: Path, base: Path) -> Entry:
    display = printable(path)
    return (cls, str(path.relative_to(base)), display, functools.partial(_read_file, path, display))


def _iter_folder_split(root: Path, split: str) -> Iterator[Entry]:
    """Yield the entries of :func:`_open_split` one by one (nothing logged)."""
    with _open_split(root, split, log=False) as entries:
        yield from entries


@contextlib.contextmanager
def _open_archive_split(archive: Path, split: str, log: bool = True) -> Iterator[list[Entry]]:
    with _archive_members(archive) as members:
        entries = []
        skipped = Skipped()
        unlabeled = split == "train" and not _layout_splits(archive)
        for name, _, read in members:
            parts = Path(name).parts
            if not _wanted(name):
                skipped.add("hidden member(s)" if _hidden(Path(name)) else "member(s) without an image extension", name)
                continue
            if unlabeled:
                entries.append((UNLABELED_CLASS, name, f"{printable(archive)}:{printable(name)}", read))
            elif split in parts[:-1]:
                i = len(parts) - 1 - parts[::-1].index(split)
                rest = parts[i + 1 :]
                if len(rest) >= 2:
                    entries.append((rest[0], "/".join(rest), f"{printable(archive)}:{printable(name)}", read))
        if not entries:
            raise DataError(f"{printable(archive)} holds no images under a '{split}/<class>/' folder; the archive "
                            f"needs <root>/{split}/<class>/*.jpg (or images without train/ and test/ folders for "
                            f"unlabelled training)")
        if log and split == "train":  # once per archive (the listing is the same for both splits)
            skipped.log(str(archive))
        entries.sort(key=lambda e: (e[0], e[1]))
        yield entries


def _source_key(data: str, split: str, resize_size: int, decode: str = "full") -> str:
    # the decode policy is part of the key; "full" adds nothing, so caches from before the policy stay valid
    h = hashlib.sha256(f"v{CACHE_VERSION}|{split}|{resize_size}|{'' if decode == 'full' else decode + '|'}".encode())
    p = Path(data)
    if data in ("digits", "cifar10"):
        h.update(data.encode())
    elif _is_archive(p):
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    else:
        base = p / split
        if split == "train" and is_unlabeled_folder(p):
            base = p
        h.update(str(p.resolve()).encode())
        if base.is_dir():
            for f in walk(base).files:
                try:
                    st = f.stat()
                except OSError:
                    continue  # vanished: the decode reports it
                h.update(f"{f.relative_to(base)}|{st.st_size}|{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:24]


def _decode_chunk(out: np.ndarray, start: int, blobs: list[bytes], names: list[str], resize_size: int,
                  decode: str = "full") -> None:
    """Decode ``blobs`` into ``out[start : start + len(blobs)]`` (runs in a worker thread).

    Each image goes through isfe_model.preprocess.decode_square with the spec's resize size and
    decode policy: the arrays the inference package makes from the same files.
    """
    for i, (b, name) in enumerate(zip(blobs, names)):
        try:
            out[start + i] = decode_square(b, resize_size, decode, name=name)
        except ImageError as e:
            raise DataError(f"{e}. Remove or replace this file, then run again.") from None


def _decode_entries(entries: list[Entry], out: np.ndarray, resize_size: int, workers: int | None = None,
                    decode: str = "full") -> None:
    """Decode every entry into ``out`` [N, R, R, 3]: files are read in order, decoded by a thread pool.

    Pillow releases the GIL while it decodes and resizes, so large images
    decode in parallel; work goes out in chunks with a bounded number in
    flight, so memory stays at a few chunks of encoded bytes however large
    the split (``out`` may be a memory map).  The first bad file stops
    everything with its :class:`DataError`.
    """
    workers = max(1, min(DECODE_WORKERS, os.cpu_count() or 1) if workers is None else workers)
    if workers == 1 or len(entries) <= DECODE_CHUNK:
        for start in range(0, len(entries), DECODE_CHUNK):
            chunk = entries[start : start + DECODE_CHUNK]
            _decode_chunk(out, start, [read() for *_, read in chunk], [e[2] for e in chunk], resize_size, decode)
        return
    pending: collections.deque = collections.deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="isfe-decode") as pool:
        try:
            for start in range(0, len(entries), DECODE_CHUNK):
                chunk = entries[start : start + DECODE_CHUNK]
                blobs = [read() for *_, read in chunk]  # reading stays in this thread (tar members are sequential)
                names = [e[2] for e in chunk]
                pending.append(pool.submit(_decode_chunk, out, start, blobs, names, resize_size, decode))
                while len(pending) > 2 * workers:
                    pending.popleft().result()
            while pending:
                pending.popleft().result()
        except BaseException:
            for f in pending:
                f.cancel()
            raise


def _decode_folder(data: str, split: str, resize_size: int, cache_entry: Path | None = None,
                   workers: int | None = None, decode: str = "full") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode a split of an image folder or archive -> (images uint8 [N, R, R, 3], labels [N], classes).

    With ``cache_entry`` the images are decoded straight into
    ``cache_entry/images.npy`` (a memory map, written under a temporary name
    and renamed when complete; ``labels.npy`` and ``meta.json`` follow, the
    latter last) and returned memory-mapped read-only: a split larger than the
    RAM decodes in bounded memory.  Without it (or when the cache folder
    cannot be written) they are decoded into memory.
    """
    root = Path(data)
    with _open_split(root, split) as entries:
        if not entries:
            unlabeled = split == "train" and is_unlabeled_folder(root)
            where = f"{root} (at any depth)" if unlabeled else f"{root}/{split}/<class>/"
            raise DataError(f"no images found under {printable(where)} "
                            f"(extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
        _check_count(len(entries), str(root), split)
        classes = list(dict.fromkeys(e[0] for e in entries))
        index = {c: i for i, c in enumerate(classes)}
        labels = np.asarray([index[e[0]] for e in entries], dtype=np.int64)
        n, r = len(entries), int(resize_size)
        shape = (n, r, r, 3)
        big = n * r * r * 3 >= 64 << 20
        t0 = time.time()
        mapped = _create_cache_array(cache_entry, shape) if cache_entry is not None else None
        if big:
            print(f"decoding {n:,} images of {root} ({split}) at {r}x{r} px ({n * r * r * 3 / 2**30:.2f} GiB)"
                  + (", once: later runs read the cache" if mapped else ""), file=sys.stderr, flush=True)
        if mapped is None:
            images = np.empty(shape, dtype=np.uint8)
            _decode_entries(entries, images, r, workers, decode)
        else:
            images, tmp = mapped
            try:
                _decode_entries(entries, images, r, workers, decode)
                images.flush()
                del images
                os.replace(tmp, cache_entry / "images.npy")
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            try:
                atomic_save_npy(cache_entry / "labels.npy", labels)
                meta = {"source": str(root), "split": split, "resize_size": r, "decode": decode, "count": n,
                        "classes": classes}
                write_json(cache_entry / "meta.json", meta, indent=None)  # last: marks the entry complete
            except OSError:
                pass  # without meta.json the entry is not used; the next run decodes again
            images = np.load(cache_entry / "images.npy", mmap_mode="r", allow_pickle=False)
        if big:
            print(f"decoded {n:,} images in {time.time() - t0:.1f} s", file=sys.stderr, flush=True)
    return images, labels, classes


def _check_count(n: int, name: str, split: str) -> None:
    """A training split needs MIN_TRAIN_IMAGES images: the loss contrasts each image with the others."""
    if split == "train" and n < MIN_TRAIN_IMAGES:
        raise DataError(f"{printable(name)} (train) has {n} image{'s' if n != 1 else ''}; training needs at least "
                        f"{MIN_TRAIN_IMAGES} (each image needs another as its negative)")


def _create_cache_array(cache_entry: Path, shape: tuple[int, ...]) -> tuple[np.ndarray, Path] | None:
    """A writable ``.npy`` memory map of ``shape`` (uint8) under a temporary name in ``cache_entry``.

    The file's blocks are reserved first, so a full disk is an error here
    rather than a crash (SIGBUS) while writing through the map.  Returns
    None, after a warning, when the cache cannot hold it.
    """
    nbytes = int(np.prod(shape))
    tmp = None
    try:
        cache_entry.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".images.", suffix=".npy.tmp", dir=cache_entry)
        tmp = Path(name)
        os.close(fd)
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        if hasattr(os, "posix_fallocate") and nbytes:
            with open(tmp, "r+b") as f:
                os.posix_fallocate(f.fileno(), 0, os.path.getsize(tmp))
        return arr, tmp
    except OSError as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        print(f"warning: cannot write the dataset cache in {cache_entry} ({e.strerror or e}); decoding "
              f"{nbytes / 2**30:.2f} GiB into memory instead (set ISFE_CACHE to a folder with room)", file=sys.stderr)
        return None


def _decode_cifar10(split: str, resize_size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    import torchvision

    root = cache_dir() / "torchvision"
    try:
        ds = torchvision.datasets.CIFAR10(str(root), train=(split == "train"), download=True)
    except Exception as e:  # no network, broken download
        raise DataError(
            f"could not get CIFAR-10 through torchvision ({e}). Without a network, pass an image folder or "
            f"archive instead, e.g. --data ../shared/data/cifar10-jpeg.tar.gz"
        ) from None
    x = np.asarray(ds.data, dtype=np.uint8)
    if resize_size != 32:
        from PIL import Image

        x = np.stack([to_uint8_square(Image.fromarray(a), resize_size) for a in x])
    return x, np.asarray(ds.targets, dtype=np.int64), list(ds.classes)


def load_split(
    data: str | os.PathLike | None,
    split: str,
    resize_size: int | None = None,
    use_cache: bool = True,
    decode: str = "full",
) -> ImageDataset:
    """Load a split ("train" or "test") as decoded uint8 images.

    Args:
        data: None/"digits", "cifar10", an image folder, or a tar/zip archive of one.
        split: "train" or "test".
        resize_size: side R of the cached square images (default: the
            source's default spec).
        decode: the JPEG decode policy of the model's spec ("full" or "draft",
            see isfe_model.preprocess.PreprocessSpec); part of the cache key.

    Raises:
        DataError: missing or empty path, a folder without images, a
            corrupt image (named), an unreadable archive.
    """
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    key_name = "digits" if data in (None, "digits") else str(data)
    if key_name not in ("digits", "cifar10"):
        p = Path(key_name)
        if not p.exists():
            raise DataError(f"--data {printable(key_name)}: no such file or folder; give an image folder with train/ "
                            f"and test/ class subfolders, a .tar.gz or .zip of one, 'cifar10' or 'digits'")
        if not p.is_dir() and not _is_archive(p):
            raise DataError(f"--data {printable(key_name)}: not a folder or a supported archive (a file named "
                            f"{', '.join('*' + x for x in ARCHIVE_SUFFIXES)}); extract it and pass the folder, "
                            f"or give an image folder with train/ and test/ class subfolders")
        if p.is_dir() and not any(p.iterdir()):
            raise DataError(f"--data {printable(key_name)}: the folder is empty; it needs train/<class>/ and "
                            f"test/<class>/ image folders")
    spec = default_spec(key_name, None, resize_size, decode=decode)
    r = spec.resize_size
    if key_name == "digits":
        from PIL import Image

        x8, y, classes = _digits_split(split)
        x = np.stack([to_uint8_square(Image.fromarray(a, "L").convert("RGB"), r) for a in x8])
        return ImageDataset(x, y, classes, "digits", spec)

    cdir = cache_dir() / "datasets" / _source_key(key_name, split, r, spec.decode)
    if use_cache and (cdir / "meta.json").exists():
        cached = None
        try:
            meta = json.loads((cdir / "meta.json").read_text())
            x = np.load(cdir / "images.npy", mmap_mode="r", allow_pickle=False)
            y = np.load(cdir / "labels.npy", allow_pickle=False)
            if x.shape[0] == y.shape[0] == meta["count"]:
                cached = ImageDataset(x, y, list(meta["classes"]), key_name, spec)
        except (OSError, ValueError, KeyError, json.JSONDecodeError):
            pass  # damaged cache entry: rebuild it below
        if cached is not None:
            _check_count(len(cached), key_name, split)
            return cached
    if key_name != "cifar10":
        x, y, classes = _decode_folder(key_name, split, r, cdir if use_cache else None, decode=spec.decode)
        return ImageDataset(x, y, classes, key_name, spec)
    x, y, classes = _decode_cifar10(split, r)
    if use_cache:
        try:
            cdir.mkdir(parents=True, exist_ok=True)
            atomic_save_npy(cdir / "images.npy", x)
            atomic_save_npy(cdir / "labels.npy", y)
            meta = {"source": key_name, "split": split, "resize_size": r, "count": int(len(y)), "classes": classes}
            write_json(cdir / "meta.json", meta, indent=None)  # written last: marks the entry complete
        except OSError:
            pass  # a read-only cache is not fatal
    return ImageDataset(x, y, classes, key_name, spec)


def write_folder(ds: ImageDataset, out: str | os.PathLike) -> int:
    """Write a split as PNG files ``out/<class>/<index>.png`` (for galleries and demos)."""
    from PIL import Image

    out = Path(out)
    for i, (img, label) in enumerate(zip(ds.images, ds.labels)):
        d = out / ds.classes[int(label)]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(img)).save(d / f"{i:05d}.png")
    return len(ds)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m training.data", description="Decode (and cache) a dataset split; "
                                 "optionally write it as an image folder.")
    ap.add_argument("--data", default=None, help="digits (default), cifar10, an image folder or a .tar.gz of one")
    ap.add_argument("--split", default="test", choices=["train", "test"])
    ap.add_argument("--resize-size", type=int, default=None)
    ap.add_argument("--write-folder", default=None, help="write the split as PNGs into FOLDER/<class>/")
    args = ap.parse_args(argv)
    try:
        ds = load_split(args.data, args.split, args.resize_size)
    except DataError as e:
        print(f"error: {printable(e)}", file=sys.stderr)
        return 2
    print(f"{ds.name} {args.split}: {len(ds)} images {ds.images.shape[1]}x{ds.images.shape[2]}, "
          f"{len(ds.classes)} classes")
    if args.write_folder:
        n = write_folder(ds, args.write_folder)
        print(f"wrote {n} PNG files under {args.write_folder}/<class>/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
