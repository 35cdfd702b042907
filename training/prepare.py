"""Dataset preparation: ``python -m training.prepare DATASET SOURCE... --out DIR``.

Turns the official downloads into the image-folder layout the rest of the
project reads (``DIR/train/<class>/*``, ``DIR/test/<class>/*``) plus
``DIR/dataset.json`` (name, protocol, the paper's Recall@K values, counts):

* ``cub200 CUB_200_2011.tgz`` (or its extracted folder): ``images.txt``,
  ``image_class_labels.txt``, ``classes.txt``, ``images/<class>/*.jpg``.
  Classes 1-100 train (5,864 images), 101-200 test (5,924), as in the paper.
* ``cars196 car_ims.tgz cars_annos.mat`` (or a folder holding ``car_ims/``
  and ``cars_annos.mat``): classes 1-98 train (8,054), 99-196 test (8,131).
* ``sop Stanford_Online_Products.zip`` (or its folder): ``Ebay_train.txt``
  (11,318 classes, 59,551 images) train, ``Ebay_test.txt`` (11,316 classes,
  60,502 images) test — the official split the paper uses.
* ``stl10 ROOT``: STL-10's binary release (``ROOT/stl10_binary/*.bin``, as
  torchvision's ``STL10(ROOT, download=True)`` leaves it; ``--download``
  fetches it that way where a network exists) -> PNGs: train (5,000
  labelled), test (8,000) and ``unlabeled/`` (100,000, no class; training
  on ``train+unlabeled`` is the paper's 105K setting, ``--train-split``).
* ``split-classes FOLDER``: any folder of class subfolders (or one with
  train/ and test/ class subfolders, pooled per class): the first half of the
  classes, sorted by name, for training, the rest for testing
  (``--train-classes N`` to choose another boundary).

The paper resizes CUB/Cars/Products images to 256 x 256 (aspect ratio not
kept) before its 227 crops; ``--resize 256`` (the default for those three)
writes such squashed JPEGs (quality 95) so the project's pipeline
(shorter side -> 256, center square, center/random 227 crop) sees exactly
the paper's images.  ``--resize 0`` keeps the original files instead (hard
links where the source is an extracted folder on the same file system,
copies otherwise).

Output is written into a temporary sibling folder and renamed into place at
the end, so an interrupted run leaves nothing half-written at ``--out``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import sys
import tarfile
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from isfe_model.jsonsafe import write_json
from isfe_model.preprocess import IMAGE_EXTENSIONS, ImageError, load_image
from isfe_model.walk import printable, walk
from training.data import MAX_MEMBER_BYTES, Skipped, read_capped, walk_images

__all__ = [
    "DATASET_INFO",
    "PAPER_COUNTS",
    "PrepareError",
    "load_unlabeled",
    "main",
    "prepare_cars196",
    "prepare_cub200",
    "prepare_sop",
    "prepare_split_classes",
    "prepare_stl10",
    "read_dataset_info",
    "read_stl10_binary",
]

DATASET_INFO = "dataset.json"
#: (train images, test images) of the complete datasets with the paper's class split.
PAPER_COUNTS = {"cub200": (5864, 5924), "cars196": (8054, 8131), "sop": (59551, 60502), "stl10": (5000, 8000)}
RECALL_KS = {"cub200": [1, 2, 4, 8], "cars196": [1, 2, 4, 8], "sop": [1, 10, 100], "stl10": [1, 2, 4, 8]}
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
STL10_SIDE = 96
_SHARD = 1000  # unlabeled images per subfolder


class PrepareError(ValueError):
    """A source that cannot be prepared; the message names the problem and the fix."""


# --------------------------------------------------------------------------- sources


class Source:
    """Files of a folder, a tar(.gz) or a zip archive, by '/'-separated relative name."""

    def __init__(self, path: Path):
        self.path = path

    @staticmethod
    def open(path: str | os.PathLike) -> "Source":
        p = Path(path)
        if not p.exists():
            raise PrepareError(f"{p}: no such file or folder")
        if p.is_dir():
            return FolderSource(p)
        name = p.name.lower()
        if name.endswith(".zip"):
            return ZipSource(p)
        if name.endswith((".tar", ".tgz", ".tar.gz")):
            return TarSource(p)
        raise PrepareError(f"{p} is neither a folder nor a .tar/.tgz/.tar.gz/.zip archive")

    def names(self) -> list[str]:
        raise NotImplementedError

    def read(self, name: str) -> bytes:
        raise NotImplementedError

    def file_path(self, name: str) -> Path | None:
        """The file on disk (folders only; archives return None)."""
        return None

    def iter_read(self, names: Iterable[str]) -> Iterator[tuple[str, bytes]]:
        """(name, bytes) for the given names, in the order cheapest for the source."""
        for n in names:
            yield n, self.read(n)

    def find(self, filename: str) -> str | None:
        """The shortest name equal to ``filename`` or ending with ``/filename``."""
        hits = [n for n in self.names() if n == filename or n.endswith("/" + filename)]
        return min(hits, key=len) if hits else None

    def require(self, filename: str, what: str) -> str:
        hit = self.find(filename)
        if hit is None:
            raise PrepareError(f"{self.path} has no {filename}; {what}")
        return hit

    def require_together(self, filenames: Sequence[str], what: str) -> tuple[str, list[str]]:
        """The first file found as :meth:`require` does, the others in its folder: (folder prefix, names)."""
        first = self.require(filenames[0], what)
        root = first[: -len(filenames[0])]
        return root, [first] + [self.require(root + name, what) for name in filenames[1:]]


class FolderSource(Source):
    """An extracted folder, walked iteratively (:func:`isfe_model.walk.walk`: any depth, symlinked
    folders not followed, names sorted by relative path); the paths left out are summed up on stderr."""

    def __init__(self, path: Path):
        super().__init__(path)
        skipped = Skipped()
        walked = walk(path)
        skipped.take(walked)
        self._names = walked.names
        skipped.log(str(path))

    def names(self) -> list[str]:
        return self._names

    def read(self, name: str) -> bytes:
        return _read_file(self.path / name)

    def file_path(self, name: str) -> Path | None:
        return self.path / name


class ZipSource(Source):
    def __init__(self, path: Path):
        super().__init__(path)
        try:
            self._zip = zipfile.ZipFile(path)
            self._names = sorted(i.filename for i in self._zip.infolist() if not i.is_dir())
        except (zipfile.BadZipFile, OSError) as e:
            raise PrepareError(f"{path} is not a readable zip archive ({e}); download it again") from None

    def names(self) -> list[str]:
        return self._names

    def read(self, name: str) -> bytes:
        try:
            info = self._zip.getinfo(name)
            if info.file_size > MAX_MEMBER_BYTES:
                raise _oversized(self.path, name)
            with self._zip.open(info) as f:
                data = read_capped(f, MAX_MEMBER_BYTES)  # inflates at most the cap + 1 bytes
        except (zipfile.BadZipFile, OSError, EOFError, KeyError, RuntimeError, NotImplementedError) as e:
            raise PrepareError(f"{printable(self.path)}: cannot read {printable(name)} ({e}); the archive is damaged "
                               f"or encrypted — download it again") from None
        if data is None:
            raise _oversized(self.path, name)
        return data


class TarSource(Source):
    """A tar archive read in streaming passes (a .tgz has no cheap random access).

    The constructor's pass lists the files and keeps small metadata files
    (.txt/.mat/.csv under 64 MiB) in memory; ``iter_read`` makes one more pass.
    """

    _META = (".txt", ".mat", ".csv", ".json")

    def __init__(self, path: Path):
        super().__init__(path)
        self._names: list[str] = []
        self._small: dict[str, bytes] = {}
        try:
            with tarfile.open(path, "r|*") as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    name = _clean(m.name)
                    if m.size > MAX_MEMBER_BYTES and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                        raise _oversized(path, name)  # refused at its header: the stream is not inflated past it
                    self._names.append(name)
                    if name.lower().endswith(self._META) and m.size < (64 << 20):
                        self._small[name] = tf.extractfile(m).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise PrepareError(f"{path} is not a readable tar archive ({e}); download it again") from None
        self._names.sort()

    def names(self) -> list[str]:
        return self._names

    def read(self, name: str) -> bytes:
        if name in self._small:
            return self._small[name]
        for _, data in self.iter_read([name]):
            return data
        raise PrepareError(f"{self.path} has no member {name}")

    def iter_read(self, names: Iterable[str]) -> Iterator[tuple[str, bytes]]:
        wanted = set(names)
        try:
            with tarfile.open(self.path, "r|*") as tf:
                for m in tf:
                    if not wanted:
                        return
                    name = _clean(m.name)
                    if m.isfile() and name in wanted:
                        wanted.discard(name)
                        data = read_capped(tf.extractfile(m), MAX_MEMBER_BYTES) if m.size <= MAX_MEMBER_BYTES else None
                        if data is None:
                            raise _oversized(self.path, name)
                        yield name, data
        except (tarfile.TarError, OSError, EOFError) as e:
            raise PrepareError(f"{self.path}: the archive is truncated or damaged ({e}); download it again") from None
        if wanted:
            raise PrepareError(f"{self.path}: {len(wanted)} listed files are missing from the archive (e.g. "
                               f"{sorted(wanted)[0]})")


def _read_file(path: Path) -> bytes:
    """A source file's bytes, at most MAX_MEMBER_BYTES (like an archive member)."""
    try:
        with open(path, "rb") as f:
            data = read_capped(f, MAX_MEMBER_BYTES)
    except OSError as e:
        raise PrepareError(f"{printable(path)}: cannot read it ({e.strerror or e})") from None
    if data is None:
        raise PrepareError(f"{printable(path)} is larger than any file this reads ({MAX_MEMBER_BYTES >> 20} MiB); "
                           f"remove it from the source")
    return data


def _oversized(archive: Path, name: str) -> PrepareError:
    return PrepareError(f"{printable(archive)}: member {printable(name)} is larger than any file this reads "
                        f"({MAX_MEMBER_BYTES >> 20} MiB); the archive is not the official download — download it again")


def _makedirs(path: Path) -> None:
    """``mkdir -p`` without recursion (pathlib and os.makedirs recurse once per missing level: 1,100 nested
    folders of a source would be a RecursionError)."""
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            pass  # another writer thread made it


def remove_tree(top: Path) -> None:
    """Delete a folder tree of any depth without recursion (shutil.rmtree recurses once per level:
    1,100 nested folders are a RecursionError): a stack of open folder descriptors, each step relative."""
    stack = [(os.open(top, os.O_RDONLY | os.O_DIRECTORY), -1, "")]
    try:
        while stack:
            fd, parent, name = stack[-1]
            sub = None
            for entry in os.scandir(fd):
                if entry.is_dir(follow_symlinks=False):
                    sub = entry.name
                    break
                os.unlink(entry.name, dir_fd=fd)
            if sub is not None:
                stack.append((os.open(sub, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd), fd, sub))
                continue
            os.close(fd)
            stack.pop()
            if parent >= 0:
                os.rmdir(name, dir_fd=parent)
    finally:
        for fd, _, _ in stack:
            os.close(fd)
    os.rmdir(top)


def _clean(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


def _text_lines(source: Source, name: str) -> list[list[str]]:
    text = source.read(name).decode("utf-8", errors="replace")
    return [line.split() for line in text.splitlines() if line.strip()]


_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def safe_name(name: str) -> str:
    """A file-system-safe folder/file name (no separators, no leading dot)."""
    out = _UNSAFE.sub("_", name).strip("_") or "x"
    return out.lstrip(".") or "x"


# --------------------------------------------------------------------------- the writer


@dataclass
class Item:
    """One output image: ``<split>/<cls>/<name>`` from ``source_name`` of the source."""

    split: str
    cls: str
    name: str
    source_name: str


class Writer:
    """Builds the output in a temporary sibling folder and renames it into place at the end."""

    def __init__(self, out: str | os.PathLike, resize: int = 0, link: bool = True, workers: int | None = None,
                 skip_bad: bool = False, log: Callable[[str], None] = print):
        self.out = Path(out)
        if self.out.exists() and (not self.out.is_dir() or any(self.out.iterdir())):
            raise PrepareError(f"--out {self.out} already exists and is not an empty folder; choose another --out "
                               "or delete it")
        if resize < 0:
            raise PrepareError(f"--resize must be >= 0 (0 keeps the original files), got {resize}")
        self.resize, self.link, self.skip_bad, self.log = int(resize), link, skip_bad, log
        self.workers = max(1, workers or min(8, os.cpu_count() or 1))
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.out.parent / f".{self.out.name}.partial-{os.getpid()}"
        if self.tmp.exists():
            remove_tree(self.tmp)
        self.tmp.mkdir()
        self.counts: dict[str, dict[str, int]] = {}
        self.skipped: list[dict[str, str]] = []
        self.linked = 0
        self._lock = threading.Lock()

    # -- files
    def _dest(self, item: Item) -> Path:
        name = item.name
        if self.resize:
            name = str(Path(name).with_suffix(".jpg"))
        d = self.tmp / item.split / item.cls
        return d / name

    def _count(self, item: Item, linked: bool = False) -> None:
        with self._lock:
            c = self.counts.setdefault(item.split, {})
            c[item.cls] = c.get(item.cls, 0) + 1
            self.linked += linked

    def _write_bytes(self, item: Item, data: bytes, display: str) -> None:
        dest = self._dest(item)
        _makedirs(dest.parent)
        if self.resize:
            from PIL import Image

            try:
                im = load_image(data, name=display)
            except ImageError as e:
                if self.skip_bad:
                    with self._lock:
                        self.skipped.append({"path": display, "reason": e.reason})
                    return
                raise PrepareError(f"{e}. Replace the file or pass --skip-bad to leave it out.") from None
            im.resize((self.resize, self.resize), Image.BILINEAR).save(dest, format="JPEG", quality=95)
        else:
            dest.write_bytes(data)
        self._count(item)

    def _place_file(self, item: Item, path: Path) -> None:
        dest = self._dest(item)
        _makedirs(dest.parent)
        if self.link:
            try:
                os.link(path, dest)
                self._count(item, linked=True)
                return
            except OSError:
                pass  # another file system, or links not allowed: copy
        shutil.copyfile(path, dest)
        self._count(item)

    def write_items(self, source: Source, items: Sequence[Item]) -> None:
        """Write every item (decoding/resizing in ``workers`` threads, at most 4 per thread in flight)."""
        from tqdm import tqdm

        seen: set[Path] = set()
        for it in items:  # two source files may share a basename inside one class: keep both
            if self._dest(it) in seen:
                it.name = safe_name(it.source_name.replace("/", "__"))
            seen.add(self._dest(it))
        by_name: dict[str, list[Item]] = {}
        for it in items:
            by_name.setdefault(it.source_name, []).append(it)
        direct = bool(items) and not self.resize and source.file_path(items[0].source_name) is not None
        bar = tqdm(total=len(items), desc=f"writing {self.out.name}", unit="img", disable=None, file=sys.stderr)
        pending: list = []

        def drain(limit: int) -> None:
            while len(pending) > limit:
                pending.pop(0).result()
                bar.update(1)

        with ThreadPoolExecutor(self.workers) as pool:
            try:
                if direct:  # files on disk: hard links (or copies), no decoding
                    for it in items:
                        pending.append(pool.submit(self._place_file, it, source.file_path(it.source_name)))
                        drain(4 * self.workers)
                else:
                    for name, data in source.iter_read(list(by_name)):
                        for it in by_name[name]:
                            shown = f"{printable(source.path)}:{printable(name)}"
                            pending.append(pool.submit(self._write_bytes, it, data, shown))
                        drain(4 * self.workers)
                drain(0)
            finally:
                for f in pending:
                    f.cancel()
                bar.close()

    def write_array(self, item: Item, image: np.ndarray) -> None:
        """Write an RGB uint8 [H, W, 3] image as PNG."""
        from PIL import Image

        dest = self._dest(item).with_suffix(".png")
        _makedirs(dest.parent)
        Image.fromarray(np.ascontiguousarray(image)).save(dest, format="PNG")
        self._count(item)

    # -- finishing
    def finish(self, info: dict) -> dict:
        splits = {s: {"images": sum(c.values())} | ({"classes": len(c)} if s != "unlabeled" else {})
                  for s, c in sorted(self.counts.items())}
        if "train" not in splits or "test" not in splits:
            raise PrepareError(f"nothing to write for {'train' if 'train' not in splits else 'test'}/ — "
                               f"the source holds no images of that split")
        info = {"format": "isfe-dataset", "version": 1, **info, "splits": splits, "resize": self.resize or None,
                "skipped": self.skipped, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_json(self.tmp / DATASET_INFO, info)
        if self.out.exists():
            self.out.rmdir()  # empty (checked in __init__)
        os.replace(self.tmp, self.out)
        return info

    def abort(self) -> None:
        try:
            remove_tree(self.tmp)
        except OSError:
            pass  # already gone, or not ours to remove: the next run with this --out replaces it


def _run(writer: Writer, body: Callable[[Writer], dict]) -> dict:
    try:
        info = body(writer)
        return writer.finish(info)
    except BaseException:
        writer.abort()
        raise


def _by_class_rule(n_classes: int) -> int:
    """Number of training classes: the first half (CUB 100 of 200, Cars 98 of 196)."""
    return n_classes // 2


# --------------------------------------------------------------------------- datasets


def prepare_cub200(src: str | os.PathLike, writer: Writer) -> dict:
    """CUB-200-2011: classes 1..100 -> train, 101..200 -> test (ids from classes.txt)."""
    source = Source.open(src)
    how = "pass CUB_200_2011.tgz from the dataset's page or the folder it extracts to"
    root, (images_txt, labels_txt, classes_txt) = source.require_together(
        ("images.txt", "image_class_labels.txt", "classes.txt"), how)
    try:
        paths = {int(r[0]): r[1] for r in _text_lines(source, images_txt)}
        labels = {int(r[0]): int(r[1]) for r in _text_lines(source, labels_txt)}
        classes = {int(r[0]): r[1] for r in _text_lines(source, classes_txt)}
    except (ValueError, IndexError):
        raise PrepareError(f"{src}: images.txt / image_class_labels.txt / classes.txt are not in the CUB format "
                           "('<id> <value>' lines)") from None
    if set(paths) != set(labels):
        raise PrepareError(f"{src}: images.txt and image_class_labels.txt list different image ids")
    n_train = _by_class_rule(len(classes))
    names = set(source.names())
    items = []
    for i in sorted(paths):
        cid = labels[i]
        if cid not in classes:
            raise PrepareError(f"{src}: image {i} has class {cid}, which classes.txt does not list")
        member = f"{root}images/{paths[i]}"
        if member not in names:
            raise PrepareError(f"{src}: {member} (listed in images.txt) is missing; the download is incomplete")
        split = "train" if cid <= n_train else "test"
        items.append(Item(split, safe_name(classes[cid]), safe_name(Path(paths[i]).name), member))
    writer.write_items(source, items)
    return {"name": "cub200", "protocol": "unseen", "recall_ks": RECALL_KS["cub200"], "source": str(src),
            "class_rule": f"classes 1-{n_train} train, {n_train + 1}-{len(classes)} test (by class id)"}


def _mat_str(v) -> str:
    return str(np.ravel(v)[0])


def prepare_cars196(srcs: Sequence[str | os.PathLike], writer: Writer) -> dict:
    """Cars196: cars_annos.mat classes 1..98 -> train, 99..196 -> test; images from car_ims(.tgz)."""
    import scipy.io

    how = "pass car_ims.tgz and cars_annos.mat (or a folder holding car_ims/ and cars_annos.mat)"
    mat_bytes, image_source = None, None
    for s in srcs:
        p = Path(s)
        if p.is_file() and p.suffix.lower() == ".mat":
            mat_bytes = p.read_bytes()
            continue
        source = Source.open(p)
        hit = source.find("cars_annos.mat")
        if hit is not None and mat_bytes is None:
            mat_bytes = source.read(hit)
        if any("car_ims/" in n or n.startswith("car_ims/") for n in source.names()):
            image_source = source
    if mat_bytes is None:
        raise PrepareError(f"no cars_annos.mat among {', '.join(map(str, srcs))}; {how}")
    if image_source is None:
        raise PrepareError(f"no car_ims/ images among {', '.join(map(str, srcs))}; {how}")
    try:
        mat = scipy.io.loadmat(io.BytesIO(mat_bytes))
        ann = mat["annotations"].ravel()
        class_names = [_mat_str(c) for c in mat["class_names"].ravel()]
        records = [(_mat_str(a["relative_im_path"]), int(np.ravel(a["class"])[0])) for a in ann]
    except Exception as e:  # scipy raises many types for a wrong file
        raise PrepareError(f"cars_annos.mat is not the Cars196 annotation file ({type(e).__name__}: {e}); "
                           f"{how}") from None
    n_train = _by_class_rule(len(class_names))
    names = image_source.names()
    prefix = ""
    car_dir = next((n for n in names if "/car_ims/" in "/" + n), None)
    if car_dir is not None:
        prefix = car_dir[: ("/" + car_dir).index("/car_ims/")]
    name_set = set(names)
    items = []
    for rel, cid in records:
        if not 1 <= cid <= len(class_names):
            raise PrepareError(f"cars_annos.mat: image {rel} has class {cid} outside 1..{len(class_names)}")
        member = prefix + _clean(rel)
        if member not in name_set:
            raise PrepareError(f"{image_source.path}: {rel} (listed in cars_annos.mat) is missing; the download is "
                               "incomplete")
        cls = f"{cid:03d}.{safe_name(class_names[cid - 1])}"
        items.append(Item("train" if cid <= n_train else "test", cls, safe_name(Path(rel).name), member))
    writer.write_items(image_source, items)
    return {"name": "cars196", "protocol": "unseen", "recall_ks": RECALL_KS["cars196"],
            "source": ", ".join(map(str, srcs)),
            "class_rule": f"classes 1-{n_train} train, {n_train + 1}-{len(class_names)} test (by class id)"}


def prepare_sop(src: str | os.PathLike, writer: Writer) -> dict:
    """Stanford Online Products: Ebay_train.txt -> train, Ebay_test.txt -> test (the official class split)."""
    source = Source.open(src)
    how = "pass Stanford_Online_Products.zip or the folder it extracts to"
    root, (train_txt, test_txt) = source.require_together(("Ebay_train.txt", "Ebay_test.txt"), how)
    name_set = set(source.names())
    items = []
    class_sets: dict[str, set[int]] = {}
    for split, txt in (("train", train_txt), ("test", test_txt)):
        rows = _text_lines(source, txt)
        if not rows or rows[0][:2] != ["image_id", "class_id"]:
            raise PrepareError(f"{src}: {txt} does not start with the header 'image_id class_id super_class_id path'")
        ids = class_sets.setdefault(split, set())
        for r in rows[1:]:
            try:
                cid, rel = int(r[1]), r[3]
            except (ValueError, IndexError):
                raise PrepareError(f"{src}: {txt}: malformed line {' '.join(r)!r}") from None
            member = root + rel
            if member not in name_set:
                raise PrepareError(f"{src}: {member} (listed in {Path(txt).name}) is missing; the download is "
                                   "incomplete")
            ids.add(cid)
            items.append(Item(split, f"{cid:05d}", safe_name(Path(rel).name), member))
    if not class_sets["train"].isdisjoint(class_sets["test"]):
        raise PrepareError(f"{src}: Ebay_train.txt and Ebay_test.txt share classes; these are not the official "
                           "split files")
    writer.write_items(source, items)
    return {"name": "sop", "protocol": "unseen", "recall_ks": RECALL_KS["sop"], "source": str(src),
            "class_rule": "Ebay_train.txt classes train, Ebay_test.txt classes test (official split)"}


def _stl10_dir(root: Path) -> Path:
    for cand in (root / "stl10_binary", root):
        if (cand / "train_X.bin").exists():
            return cand
    raise PrepareError(
        f"{root} holds no STL-10 binaries (stl10_binary/train_X.bin); pass the folder torchvision's STL10 downloads "
        "into, "
        f"add --download (needs a network), or extract stl10_binary.tar.gz there first"
    )


def read_stl10_binary(folder: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray | None]:
    """One split of STL-10's binary release -> (uint8 [N, 96, 96, 3] RGB, int64 [N] labels 0..9 or None).

    The files store each image as 3 planes of 96 x 96 bytes in column-major
    order (as torchvision's STL10 reads them); labels are 1..10 on disk.
    The unlabeled split is memory-mapped.
    """
    folder = Path(folder)
    x_path = folder / f"{split}_X.bin"
    if not x_path.exists():
        raise PrepareError(f"{x_path} is missing; the STL-10 download is incomplete")
    plane = 3 * STL10_SIDE * STL10_SIDE
    size = x_path.stat().st_size
    if size == 0 or size % plane:
        raise PrepareError(f"{x_path}: {size} bytes is not a whole number of 3x96x96 images; the file is damaged")
    raw = np.memmap(x_path, dtype=np.uint8, mode="r").reshape(-1, 3, STL10_SIDE, STL10_SIDE)
    images = raw.transpose(0, 3, 2, 1)  # [N, c, col, row] on disk -> [N, row, col, c]
    y_path = folder / f"{split}_y.bin"
    if not y_path.exists():
        return images, None
    y = np.fromfile(y_path, dtype=np.uint8).astype(np.int64) - 1
    if y.shape[0] != images.shape[0] or y.min(initial=0) < 0 or y.max(initial=0) > 9:
        raise PrepareError(f"{y_path} does not match {x_path.name} ({y.shape[0]} labels for {images.shape[0]} "
                           "images, or labels outside 1..10)")
    return images, y


def prepare_stl10(src: str | os.PathLike, writer: Writer, unlabeled: bool = True, download: bool = False) -> dict:
    """STL-10 -> PNGs: train/<class>/ (5,000), test/<class>/ (8,000), unlabeled/<shard>/ (100,000)."""
    root = Path(src)
    splits = ["train", "test"] + (["unlabeled"] if unlabeled else [])
    if download:
        import torchvision

        root.mkdir(parents=True, exist_ok=True)
        try:
            for s in splits:
                torchvision.datasets.STL10(str(root), split=s, download=True)
        except Exception as e:  # no network, broken download
            raise PrepareError(f"could not download STL-10 through torchvision ({e}); download stl10_binary.tar.gz "
                               f"elsewhere, extract it into {root} and run again without --download") from None
    folder = _stl10_dir(root)
    names_file = folder / "class_names.txt"
    classes = STL10_CLASSES
    if names_file.exists():
        classes = [c.strip() for c in names_file.read_text().splitlines() if c.strip()]
    if len(classes) != 10:
        raise PrepareError(f"{names_file} lists {len(classes)} classes; STL-10 has 10")
    classes = [safe_name(c) for c in classes]
    from tqdm import tqdm

    for s in splits:
        images, labels = read_stl10_binary(folder, s)
        if s != "unlabeled" and labels is None:
            raise PrepareError(f"{folder / (s + '_y.bin')} is missing; the STL-10 download is incomplete")
        with ThreadPoolExecutor(writer.workers) as pool:
            jobs = []
            for i in range(images.shape[0]):
                if s == "unlabeled":
                    item = Item("unlabeled", f"{i // _SHARD:03d}", f"{i:06d}.png", "")
                else:
                    item = Item(s, classes[int(labels[i])], f"{i:05d}.png", "")
                jobs.append(pool.submit(writer.write_array, item, images[i]))
            for j in tqdm(jobs, desc=f"stl10 {s}", unit="img", disable=None, file=sys.stderr):
                j.result()
    return {"name": "stl10", "protocol": "seen", "recall_ks": RECALL_KS["stl10"], "source": str(folder),
            "class_rule": "official train/test split; unlabeled/ has no classes (train on it with --train-split "
                          "train+unlabeled)"}


def prepare_split_classes(src: str | os.PathLike, writer: Writer, train_classes: int | None = None) -> dict:
    """Any folder of class subfolders: the first half of the classes (sorted by name) train, the rest test.

    A folder with ``train/`` and ``test/`` class subfolders is pooled per
    class first (its images keep a ``train/`` or ``test/`` subfolder).
    """
    root = Path(src)
    if not root.is_dir():
        raise PrepareError(f"split-classes needs a folder of class subfolders, got {root}")
    bases = [root]
    if (root / "train").is_dir() and any(p.is_dir() for p in (root / "train").iterdir()):
        bases = [b for b in (root / "train", root / "test") if b.is_dir()]
    per_class: dict[str, list[tuple[Path, str]]] = {}
    skipped = Skipped()
    for base in bases:
        tag = base.name + "/" if base is not root else ""
        for cdir in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
            files = walk_images(cdir, skipped, rel_to=root)
            if files:
                per_class.setdefault(cdir.name, []).extend((f, tag + f.relative_to(cdir).as_posix()) for f in files)
    skipped.log(str(root))
    classes = sorted(per_class)
    if len(classes) < 2:
        raise PrepareError(f"{root} has {len(classes)} class folder(s) with images; splitting by class needs at "
                           f"least 2")
    n_train = _by_class_rule(len(classes)) if train_classes is None else int(train_classes)
    if not 1 <= n_train < len(classes):
        raise PrepareError(f"--train-classes must be between 1 and {len(classes) - 1} ({len(classes)} classes), got "
                           f"{n_train}")
    items, files = [], {}
    for i, c in enumerate(classes):
        for f, rel in per_class[c]:
            key = f"{c}/{rel}"
            files[key] = f
            items.append(Item("train" if i < n_train else "test", c, rel, key))

    class _Files(Source):
        def names(self) -> list[str]:
            return list(files)

        def read(self, name: str) -> bytes:
            return _read_file(files[name])

        def file_path(self, name: str) -> Path | None:
            return files[name]

    writer.write_items(_Files(root), items)
    return {"name": "split-classes", "protocol": "unseen", "recall_ks": [1, 2, 4, 8], "source": str(root),
            "class_rule": f"first {n_train} of {len(classes)} classes (sorted by name) train, the other "
                          f"{len(classes) - n_train} test",
            "train_classes": classes[:n_train], "test_classes": classes[n_train:]}


# --------------------------------------------------------------------------- reading back


def read_dataset_info(data: str | os.PathLike | None) -> dict | None:
    """The dataset.json of a prepared folder, or None (not a folder, no file, unreadable)."""
    if data is None:
        return None
    p = Path(str(data))
    try:
        if p.is_dir() and (p / DATASET_INFO).is_file():
            info = json.loads((p / DATASET_INFO).read_text())
            return info if isinstance(info, dict) else None
    except (OSError, ValueError):
        return None
    return None


def load_unlabeled(data: str | os.PathLike, resize_size: int, decode: str = "full") -> np.ndarray:
    """The ``unlabeled/`` images of a prepared folder -> uint8 [M, R, R, 3] (cached like load_split, with the same
    JPEG ``decode`` policy).

    Raises:
        DataError: no ``unlabeled/`` folder, or an unreadable image (named).
    """
    from training import data as d

    root = Path(str(data))
    if not (root / "unlabeled").is_dir():
        raise d.DataError(
            f"{root} has no unlabeled/ folder; --train-split train+unlabeled needs one (STL-10: "
            f"`python -m training.prepare stl10 ROOT --out {root}` writes it), or use --train-split train"
        )
    r = int(resize_size)
    cdir = d.cache_dir() / "datasets" / d._source_key(str(root), "unlabeled", r, decode)
    if (cdir / "meta.json").exists():
        try:
            meta = json.loads((cdir / "meta.json").read_text())
            x = np.load(cdir / "images.npy", mmap_mode="r", allow_pickle=False)
            if x.shape[0] == meta["count"]:
                return x
        except (OSError, ValueError, KeyError):
            pass  # damaged cache entry: rebuild
    x, _, _ = d._decode_folder(str(root), "unlabeled", r, cdir, decode=decode)  # shard folders play the classes
    return x


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m training.prepare",
                                 description="Turn a dataset download into train/<class>/ and test/<class>/ image "
                                             "folders.")
    sub = ap.add_subparsers(dest="dataset", required=True, metavar="DATASET")

    def common(p: argparse.ArgumentParser, resize_default: int) -> None:
        p.add_argument("--out", required=True, help="output folder (must not exist, or be empty)")
        p.add_argument("--resize", type=int, default=resize_default,
                       help="squash every image to NxN JPEG (the paper: 256); 0 keeps the original files (default "
                            f"{resize_default})")
        p.add_argument("--copy", action="store_true", help="copy original files instead of hard-linking them (with "
                                                           "--resize 0)")
        p.add_argument("--workers", type=int, default=None, help="threads for decoding/resizing (default: CPU "
                                                                 "count, at most 8)")
        p.add_argument("--skip-bad", action="store_true", help="leave out unreadable images (listed in "
                                                               "dataset.json) instead of stopping")

    p = sub.add_parser("cub200", help="CUB-200-2011 (CUB_200_2011.tgz or its folder)")
    p.add_argument("source")
    common(p, 256)
    p = sub.add_parser("cars196", help="Cars196 (car_ims.tgz and cars_annos.mat, or a folder with both)")
    p.add_argument("source", nargs="+")
    common(p, 256)
    p = sub.add_parser("sop", help="Stanford Online Products (Stanford_Online_Products.zip or its folder)")
    p.add_argument("source")
    common(p, 256)
    p = sub.add_parser("stl10", help="STL-10 binary release (a folder with stl10_binary/)")
    p.add_argument("source", help="folder holding stl10_binary/ (torchvision's STL10 root)")
    p.add_argument("--out", required=True)
    p.add_argument("--download", action="store_true", help="download through torchvision first (needs a network)")
    p.add_argument("--no-unlabeled", action="store_true", help="skip the 100,000 unlabeled images")
    p.add_argument("--workers", type=int, default=None)
    p = sub.add_parser("split-classes", help="any folder of class subfolders: first half of the classes train, rest "
                                             "test")
    p.add_argument("source")
    p.add_argument("--train-classes", type=int, default=None, help="number of (sorted) classes for training "
                                                                   "(default: half)")
    common(p, 0)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.time()
    try:
        if args.dataset == "stl10":
            writer = Writer(args.out, 0, True, args.workers)
            info = _run(writer, lambda w: prepare_stl10(args.source, w, not args.no_unlabeled, args.download))
        else:
            writer = Writer(args.out, args.resize, not args.copy, args.workers, args.skip_bad)
            body = {
                "cub200": lambda w: prepare_cub200(args.source, w),
                "cars196": lambda w: prepare_cars196(args.source, w),
                "sop": lambda w: prepare_sop(args.source, w),
                "split-classes": lambda w: prepare_split_classes(args.source, w, args.train_classes),
            }[args.dataset]
            info = _run(writer, body)
    except PrepareError as e:
        print(f"error: {printable(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: nothing was written at {args.out}", file=sys.stderr)
        return 130
    sp = info["splits"]
    line = "  ".join(f"{s} {v['images']} images" + (f" / {v['classes']} classes" if "classes" in v else "")
                     for s, v in sp.items())
    print(f"{info['name']} -> {args.out}: {line}  ({time.time() - t0:.0f} s)")
    print(f"split: {info['class_rule']}")
    expected = PAPER_COUNTS.get(info["name"])
    if expected is not None:
        got = (sp["train"]["images"], sp["test"]["images"])
        note = "matches the paper" if got == expected else "differs from the complete dataset's"
        print(f"train/test images {got[0]}/{got[1]}: {note} ({expected[0]}/{expected[1]})")
    if info["skipped"]:
        print(f"skipped {len(info['skipped'])} unreadable images (listed in {Path(args.out) / DATASET_INFO})")
    print(f"train with: python -m training --data {args.out} ...; Recall@K: {','.join(map(str, info['recall_ks']))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
