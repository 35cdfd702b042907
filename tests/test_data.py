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
    (tmp_path / "flat" / "x").mkdir(parents=True)
    with pytest.raises(DataError, match="train/"):
        load_split(str(tmp_path / "flat"), "train")
    root = make_folder(tmp_path / "corrupt")
    (root / "train" / "a" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(DataError, match=r"1\.png.*Remove or replace"):
        load_split(str(root), "train")
    bad_arc = tmp_path / "bad.tar.gz"
    bad_arc.write_bytes(b"not a tar")
    with pytest.raises(DataError, match="tar archive"):
        load_split(str(bad_arc), "train")
