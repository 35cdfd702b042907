"""Datasets, decoded once into a memory-mappable uint8 cache.

``--data`` accepts:

* nothing / ``digits`` — the embedded default: scikit-learn's handwritten
  digits (1,797 real 8x8 scans shipped inside scikit-learn, no network),
  shown to the model as 16x16 RGB images; a fixed stratified split of
  1,438 train / 359 test images (20% of each class).
* ``cifar10`` — torchvision's CIFAR-10 (downloads where a network exists).
* a folder with ``train/`` and ``test/`` subfolders of class folders
  (labels are used only for evaluation), or a ``.tar``/``.tar.gz`` archive
  holding such a folder (e.g. ``../shared/data/cifar10-jpeg.tar.gz``).

Every split is decoded with :mod:`isfe_model.preprocess` (the same code the
inference package uses) into ``uint8 [N, R, R, 3]`` (shorter side resized to
R, center square crop) and cached as ``.npy`` under ``$ISFE_CACHE`` (default
``~/.cache/isfe``), keyed by the source's content, so later runs start in
seconds.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from isfe_model.atomic import atomic_save_npy, atomic_write_bytes
from isfe_model.preprocess import ImageError, PreprocessSpec, load_image, to_uint8_square

__all__ = ["DataError", "ImageDataset", "IMAGE_EXTENSIONS", "default_spec", "load_split", "cache_dir"]

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
CACHE_VERSION = "2"
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
DIGITS_MEAN = (0.19, 0.19, 0.19)
DIGITS_STD = (0.31, 0.31, 0.31)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


def _is_archive(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and (name.endswith(".tar") or name.endswith(".tar.gz") or name.endswith(".tgz"))


def default_spec(data: str | None, input_size: int | None = None, resize_size: int | None = None) -> PreprocessSpec:
    """Default preprocessing for a data source (overridable sizes).

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
    return PreprocessSpec(input_size=s, resize_size=r, mean=mean, std=std)


def _first_image_side(path: Path) -> int:
    """Shorter side of the first training image (streams archives: reads only what it needs)."""
    try:
        if _is_archive(path):
            with tarfile.open(path, "r|*") as tf:
                for m in tf:
                    if m.isfile() and "train" in Path(m.name).parts and Path(m.name).suffix.lower() in IMAGE_EXTENSIONS:
                        return min(load_image(tf.extractfile(m).read(), max_pixels=None).size)
            return 32
        for _, _, _, read in _iter_folder_split(path, "train"):
            im = load_image(read(), max_pixels=None)
            return min(im.size)
    except (DataError, ImageError, OSError, tarfile.TarError, EOFError):
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


def _iter_folder_split(root: Path, split: str) -> Iterator[tuple[str, str, str, "callable"]]:
    """Yield (class, relative path, display name, read-bytes) for image files of a split."""
    if _is_archive(root):
        yield from _iter_archive_split(root, split)
        return
    base = root / split
    if not base.is_dir():
        raise DataError(f"{root} has no '{split}/' folder; an image folder needs {root}/train/<class>/*.jpg and {root}/test/<class>/*.jpg")
    classes = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{base} has no class folders; put images in {base}/<class>/ (any class name)")
    for c in classes:
        for p in sorted((base / c).rglob("*")):
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."):
                yield c, str(p.relative_to(base)), str(p), p.read_bytes


def _iter_archive_split(archive: Path, split: str) -> Iterator[tuple[str, str, str, "callable"]]:
    try:
        tf = tarfile.open(archive, "r:*")
        members = [m for m in tf.getmembers() if m.isfile()]
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{archive} is not a readable tar archive ({e}); pass an intact .tar.gz or an extracted folder") from None
    entries = []
    for m in members:
        parts = Path(m.name).parts
        if split in parts:
            i = len(parts) - 1 - parts[::-1].index(split)
            rest = parts[i + 1 :]
            if len(rest) >= 2 and Path(m.name).suffix.lower() in IMAGE_EXTENSIONS and not rest[-1].startswith("."):
                entries.append((rest[0], "/".join(rest), m))
    if not entries:
        tf.close()
        raise DataError(f"{archive} holds no images under a '{split}/<class>/' folder; the archive needs <root>/{split}/<class>/*.jpg")
    entries.sort(key=lambda e: (e[0], e[1]))
    try:
        for c, rel, m in entries:
            yield c, rel, f"{archive}:{m.name}", (lambda m=m: tf.extractfile(m).read())
    finally:
        tf.close()


def _source_key(data: str, split: str, resize_size: int) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}|{split}|{resize_size}|".encode())
    p = Path(data)
    if data in ("digits", "cifar10"):
        h.update(data.encode())
    elif _is_archive(p):
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    else:
        base = p / split
        h.update(str(p.resolve()).encode())
        if base.is_dir():
            for f in sorted(base.rglob("*")):
                if f.is_file():
                    st = f.stat()
                    h.update(f"{f.relative_to(base)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def _decode_folder(data: str, split: str, resize_size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    root = Path(data)
    images: list[np.ndarray] = []
    labels: list[int] = []
    classes: list[str] = []
    for c, _rel, display, read in _iter_folder_split(root, split):
        if not classes or classes[-1] != c:
            classes.append(c)
        try:
            im = load_image(read(), name=display)
        except ImageError as e:
            raise DataError(f"{e}. Remove or replace this file, then run again.") from None
        images.append(to_uint8_square(im, resize_size))
        labels.append(len(classes) - 1)
    if not images:
        raise DataError(
            f"no images found under {root}/{split}/<class>/ (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    return np.stack(images), np.asarray(labels, dtype=np.int64), classes


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
) -> ImageDataset:
    """Load a split ("train" or "test") as decoded uint8 images.

    Args:
        data: None/"digits", "cifar10", an image folder, or a tar archive of one.
        split: "train" or "test".
        resize_size: side R of the cached square images (default: the
            source's default spec).

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
            raise DataError(f"--data {key_name}: no such file or folder; give an image folder with train/ and test/ class subfolders, a .tar.gz of one, 'cifar10' or 'digits'")
        if p.is_dir() and not any(p.iterdir()):
            raise DataError(f"--data {key_name}: the folder is empty; it needs train/<class>/ and test/<class>/ image folders")
    spec = default_spec(key_name, None, resize_size)
    r = spec.resize_size
    if key_name == "digits":
        from PIL import Image

        x8, y, classes = _digits_split(split)
        x = np.stack([to_uint8_square(Image.fromarray(a, "L").convert("RGB"), r) for a in x8])
        return ImageDataset(x, y, classes, "digits", spec)

    cdir = cache_dir() / "datasets" / _source_key(key_name, split, r)
    if use_cache and (cdir / "meta.json").exists():
        try:
            meta = json.loads((cdir / "meta.json").read_text())
            x = np.load(cdir / "images.npy", mmap_mode="r", allow_pickle=False)
            y = np.load(cdir / "labels.npy", allow_pickle=False)
            if x.shape[0] == y.shape[0] == meta["count"]:
                return ImageDataset(x, y, list(meta["classes"]), key_name, spec)
        except (OSError, ValueError, KeyError, json.JSONDecodeError):
            pass  # damaged cache entry: rebuild it below
    if key_name == "cifar10":
        x, y, classes = _decode_cifar10(split, r)
    else:
        x, y, classes = _decode_folder(key_name, split, r)
    if use_cache:
        try:
            cdir.mkdir(parents=True, exist_ok=True)
            atomic_save_npy(cdir / "images.npy", x)
            atomic_save_npy(cdir / "labels.npy", y)
            meta = {"source": key_name, "split": split, "resize_size": r, "count": int(len(y)), "classes": classes}
            atomic_write_bytes(cdir / "meta.json", json.dumps(meta).encode())  # written last: marks the entry complete
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

    ap = argparse.ArgumentParser(prog="python -m training.data", description="Decode (and cache) a dataset split; optionally write it as an image folder.")
    ap.add_argument("--data", default=None, help="digits (default), cifar10, an image folder or a .tar.gz of one")
    ap.add_argument("--split", default="test", choices=["train", "test"])
    ap.add_argument("--resize-size", type=int, default=None)
    ap.add_argument("--write-folder", default=None, help="write the split as PNGs into FOLDER/<class>/")
    args = ap.parse_args(argv)
    try:
        ds = load_split(args.data, args.split, args.resize_size)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{ds.name} {args.split}: {len(ds)} images {ds.images.shape[1]}x{ds.images.shape[2]}, {len(ds.classes)} classes")
    if args.write_folder:
        n = write_folder(ds, args.write_folder)
        print(f"wrote {n} PNG files under {args.write_folder}/<class>/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
