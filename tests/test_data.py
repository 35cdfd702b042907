"""Data loaders: embedded default, image folders, archives, the cache and bad input."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from isfe_model.preprocess import load_image, to_uint8_square
from training.data import DataError, default_spec, load_split


def make_folder(root: Path, classes=("a", "b"), per_class=3, size=(40, 30)) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i}.png")
    return root


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ISFE_CACHE", str(tmp_path / "cache"))


def test_embedded_default_is_real_digits():
    tr, te = load_split(None, "train"), load_split("digits", "test")
    assert tr.images.dtype == np.uint8 and tr.images.shape[1:] == (16, 16, 3)
    assert len(tr) + len(te) == 1797 and len(te) == 359
    assert sorted(set(tr.labels.tolist())) == list(range(10))
    assert tr.spec.input_size == 16
    # not noise: the mean image has structure (digits are centred strokes on black)
    assert tr.images.mean() < 80 and tr.images.std() > 40


def test_image_folder_decodes_with_shared_preprocessing(tmp_path):
    root = make_folder(tmp_path / "data")
    ds = load_split(str(root), "train")
    assert ds.classes == ["a", "b"] and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.images.shape == (6, 32, 32, 3)
    expected = to_uint8_square(load_image(root / "train" / "b" / "1.png"), 32)
    np.testing.assert_array_equal(ds.images[4], expected)


def test_cache_is_reused_and_invalidated(tmp_path):
    root = make_folder(tmp_path / "data")
    first = load_split(str(root), "test")
    cached = load_split(str(root), "test")
    assert isinstance(cached.images, np.memmap)
    np.testing.assert_array_equal(np.asarray(cached.images), first.images)
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(root / "test" / "a" / "0.png")  # content changes
    fresh = load_split(str(root), "test")
    assert not np.array_equal(np.asarray(fresh.images[0]), first.images[0])


def test_archive_is_read_without_extracting(tmp_path):
    root = make_folder(tmp_path / "data" / "set")
    arc = tmp_path / "set.tar.gz"
    with tarfile.open(arc, "w:gz") as tf:
        tf.add(root, arcname="set")
    from_arc = load_split(str(arc), "train")
    from_dir = load_split(str(root), "train")
    np.testing.assert_array_equal(from_arc.images, from_dir.images)
    assert from_arc.classes == from_dir.classes


@pytest.mark.parametrize("fmt", ["zip", "tar.xz", "tar.bz2"])
def test_zip_and_other_tar_compressions_read_like_the_folder(tmp_path, fmt):
    import zipfile

    root = make_folder(tmp_path / "data" / "set")
    arc = tmp_path / f"set.{fmt}"
    if fmt == "zip":  # as a desktop zips a folder: folder entries, a macOS resource fork, a stray file
        with zipfile.ZipFile(arc, "w", zipfile.ZIP_DEFLATED) as zf:
            for p in sorted(root.rglob("*")):
                zf.write(p, "set/" + p.relative_to(root).as_posix() + ("/" if p.is_dir() else ""))
            zf.writestr("__MACOSX/set/train/a/._0.png", b"\x00\x05\x16\x07 apple double")
            zf.writestr("set/train/a/notes.txt", "not an image")
    else:
        with tarfile.open(arc, "w:" + fmt.split(".")[1]) as tf:
            tf.add(root, arcname="set")
    for split in ("train", "test"):
        from_arc, from_dir = load_split(str(arc), split), load_split(str(root), split)
        np.testing.assert_array_equal(from_arc.images, from_dir.images)
        assert from_arc.classes == from_dir.classes and from_arc.labels.tolist() == from_dir.labels.tolist()


def test_hostile_archives_are_refused_by_name(tmp_path, monkeypatch):
    import zipfile

    import training.data as data

    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(good)
    bomb = tmp_path / "bomb.zip"  # a member that inflates far beyond any image
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(good, "train/a/ok.png")
        zf.writestr("train/a/huge.png", b"\0" * (2 << 20))
    monkeypatch.setattr(data, "MAX_MEMBER_BYTES", 1 << 20)
    with pytest.raises(DataError, match=r"huge\.png is 2 MiB.*remove it"):
        load_split(str(bomb), "train")
    truncated = tmp_path / "trunc.zip"
    truncated.write_bytes(bomb.read_bytes()[:200])
    with pytest.raises(DataError, match="not a readable zip archive"):
        load_split(str(truncated), "train")
    fake = tmp_path / "photos.tar.gz"  # tarfile's own error lists every compression it tried, a line each
    fake.write_bytes(b"not an archive at all")
    with pytest.raises(DataError, match=r"not a readable tar archive \(neither a tar file nor a gzip, bzip2 or xz "
                                        r"compressed one\); pass an intact archive") as ei:
        load_split(str(fake), "train")
    assert "\n" not in str(ei.value)
    other = tmp_path / "photos.rar"
    other.write_bytes(b"Rar!\x1a\x07\x00")
    with pytest.raises(DataError, match=r"not a folder or a supported archive.*extract it"):
        load_split(str(other), "train")


def test_large_images_get_imagenet_style_spec(tmp_path):
    root = make_folder(tmp_path / "big", per_class=1, size=(300, 200))
    spec = default_spec(str(root))
    assert (spec.input_size, spec.resize_size) == (224, 256)
    assert default_spec(str(root), input_size=64).resize_size == 256


def test_bad_sources_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_split(str(tmp_path / "missing"), "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        load_split(str(tmp_path / "empty"), "train")
    (tmp_path / "noimg" / "train" / "a").mkdir(parents=True)
    (tmp_path / "noimg" / "train" / "a" / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match="no images"):
        load_split(str(tmp_path / "noimg"), "train")
    (tmp_path / "flat" / "x").mkdir(parents=True)  # neither train/ nor test/: an (empty) unlabelled folder
    with pytest.raises(DataError, match=r"no images found under .*flat \(at any depth\)"):
        load_split(str(tmp_path / "flat"), "train")
    (tmp_path / "testonly" / "test" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no 'train/' folder"):
        load_split(str(tmp_path / "testonly"), "train")
    root = make_folder(tmp_path / "corrupt")
    (root / "train" / "a" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(DataError, match=r"1\.png.*Remove or replace"):
        load_split(str(root), "train")
    bad_arc = tmp_path / "bad.tar.gz"
    bad_arc.write_bytes(b"not a tar")
    with pytest.raises(DataError, match="tar archive"):
        load_split(str(bad_arc), "train")


def _varied_folder(root: Path, n_per_class: int = 7) -> Path:
    """Images of different sizes and modes (so each decodes differently)."""
    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for c in ("x", "y", "z"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n_per_class):
                w, h = int(rng.integers(20, 90)), int(rng.integers(20, 90))
                im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
                (im.convert("L") if i % 3 == 0 else im).save(d / f"{i:02d}.{'png' if i % 2 else 'jpg'}")
    return root


def test_parallel_decode_equals_one_image_at_a_time(tmp_path, monkeypatch):
    """The chunked thread-pool decoder writes exactly what decoding each file in order gives."""
    import training.data as data

    root = _varied_folder(tmp_path / "data")
    monkeypatch.setattr(data, "DECODE_CHUNK", 4)  # 21 images -> 6 chunks over 3 threads
    ds = load_split(str(root), "train", resize_size=24)
    files = sorted((root / "train").rglob("*.*"))
    expected = np.stack([to_uint8_square(load_image(f), 24) for f in files])
    np.testing.assert_array_equal(np.asarray(ds.images), expected)
    assert ds.labels.tolist() == [0] * 7 + [1] * 7 + [2] * 7
    assert isinstance(ds.images, np.memmap) and not ds.images.flags.writeable  # decoded straight into the cache
    seq, _, _ = data._decode_folder(str(root), "train", 24, workers=1)
    np.testing.assert_array_equal(seq, expected)
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_bad_file_in_a_parallel_decode_leaves_no_cache(tmp_path, monkeypatch):
    import training.data as data

    root = _varied_folder(tmp_path / "data")
    (root / "train" / "y" / "03.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # truncated, mid-split
    monkeypatch.setattr(data, "DECODE_CHUNK", 4)
    with pytest.raises(DataError, match=r"y/03\.png.*Remove or replace"):
        load_split(str(root), "train", resize_size=24)
    cache = tmp_path / "cache"
    assert not list(cache.rglob("*.tmp")) and not list(cache.rglob("images.npy")) and not list(cache.rglob("meta.json"))
    Image.new("RGB", (30, 30), "red").save(root / "train" / "y" / "03.png")  # fixed: the next run works
    assert len(load_split(str(root), "train", resize_size=24)) == 21


def test_cache_without_room_decodes_in_memory(tmp_path, monkeypatch, capsys):
    """A cache folder that cannot take the file (full disk, read-only) warns and decodes into memory."""
    import errno
    import os

    root = _varied_folder(tmp_path / "data", n_per_class=2)

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space, raising=False)
    ds = load_split(str(root), "test", resize_size=16)
    err = capsys.readouterr().err
    assert "No space left on device" in err and "ISFE_CACHE" in err
    assert not isinstance(ds.images, np.memmap) and ds.images.shape == (6, 16, 16, 3)
    assert not list((tmp_path / "cache").rglob("*.npy*"))
    monkeypatch.undo()
    monkeypatch.setenv("ISFE_CACHE", str(tmp_path / "cache"))
    np.testing.assert_array_equal(np.asarray(load_split(str(root), "test", resize_size=16).images), ds.images)


def _unlabeled_folder(root: Path, n: int = 9) -> Path:
    """Images directly in the folder and in nested folders, plus things that are not training images."""
    rng = np.random.default_rng(2)
    for i in range(n):
        d = root if i % 3 == 0 else root / "trip" / ("day1" if i % 3 == 1 else "day2")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)).save(d / f"img{i}.jpg")
    (root / "notes.txt").write_text("not an image")
    (root / ".thumbs").mkdir()
    Image.new("RGB", (8, 8)).save(root / ".thumbs" / "t.png")  # hidden: skipped
    return root


def test_folder_without_splits_is_unlabeled_training_data(tmp_path):
    from training.data import UNLABELED_CLASS, has_split, is_unlabeled_folder

    root = _unlabeled_folder(tmp_path / "photos")
    assert is_unlabeled_folder(root) and has_split(str(root), "train") and not has_split(str(root), "test")
    ds = load_split(str(root), "train", resize_size=16)
    files = sorted(p for p in root.rglob("*.jpg"))
    assert len(ds) == 9 and ds.classes == [UNLABELED_CLASS] and set(ds.labels.tolist()) == {0}
    expected = np.stack([to_uint8_square(load_image(f), 16) for f in files])
    np.testing.assert_array_equal(np.asarray(ds.images), expected)
    with pytest.raises(DataError, match="no 'test/' folder.*unlabelled"):
        load_split(str(root), "test", resize_size=16)
    # the cache follows the folder's content
    Image.new("RGB", (20, 20), "blue").save(root / "trip" / "day1" / "new.jpg")
    assert len(load_split(str(root), "train", resize_size=16)) == 10
    # the same as an archive
    arc = tmp_path / "photos.tar.gz"
    with tarfile.open(arc, "w:gz") as tf:
        tf.add(root, arcname="photos")
    assert is_unlabeled_folder(arc) and not has_split(str(arc), "test")
    np.testing.assert_array_equal(np.asarray(load_split(str(arc), "train", resize_size=16).images),
                                  np.asarray(load_split(str(root), "train", resize_size=16).images))
    # a labelled folder keeps its meaning; one with train/ only has no test split
    labelled = make_folder(tmp_path / "labelled")
    assert not is_unlabeled_folder(labelled) and has_split(str(labelled), "test")
    import shutil

    shutil.rmtree(labelled / "test")
    assert not is_unlabeled_folder(labelled) and not has_split(str(labelled), "test")
    assert load_split(str(labelled), "train").classes == ["a", "b"]


def test_unlabeled_archive_of_large_images_gets_the_large_image_spec(tmp_path):
    root = tmp_path / "shots"
    root.mkdir()
    for i in range(2):
        Image.new("RGB", (320, 240), (i * 90, 20, 20)).save(root / f"{i}.jpg")
    arc = tmp_path / "shots.tar.gz"
    with tarfile.open(arc, "w:gz") as tf:
        tf.add(root, arcname="shots")
    assert (default_spec(str(arc)).input_size, default_spec(str(root)).input_size) == (224, 224)
    (tmp_path / "nothing" / "deep").mkdir(parents=True)
    (tmp_path / "nothing" / "deep" / "a.txt").write_text("x")
    with pytest.raises(DataError, match=r"no images found under .*nothing \(at any depth\)"):
        load_split(str(tmp_path / "nothing"), "train")
