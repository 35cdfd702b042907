"""Training inputs that are hostile or careless (issue 15 classes 5 and 6): deep folders, links,
control characters in names, archive bombs, oversized and single-image datasets."""

from __future__ import annotations

import gzip
import importlib
import io
import os
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import training.data as data
from isfe_model.walk import walk
from tests.helpers_models import make_tgz
from training.data import DataError, Skipped, default_spec, load_split, read_capped
from training.prepare import (
    FolderSource,
    PrepareError,
    TarSource,
    Writer,
    ZipSource,
    prepare_split_classes,
    remove_tree,
)

pp = importlib.import_module("isfe_model.preprocess")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ISFE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def deep_root(tmp_path_factory):
    """``train/a/`` with one image on top and one 1,100 folders down, ``train/b/``, ``test/a/`` (made once)."""
    root = tmp_path_factory.mktemp("deep")
    _png(root / "data" / "train" / "a" / "top.png")
    _png(root / "data" / "train" / "b" / "b.png")
    _deep(root / "data" / "train" / "a", 1100)
    _png(root / "data" / "test" / "a" / "t.png")
    yield root / "data"
    # shutil.rmtree (pytest's clean-up of old temporary folders) recurses once per level: a tree of
    # 1,100 nested folders would be a RecursionError at the end of some later session
    remove_tree(root)


def _png(path: Path, value: int = 0, size: tuple[int, int] = (12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, 40, 90)).save(path)
    return path


def _deep(base: Path, depth: int) -> Path:
    """``base/d/d/.../d`` (``depth`` folders), made one level at a time (no path given to the OS is long)."""
    os.makedirs(base, exist_ok=True)
    cwd = os.getcwd()
    try:
        os.chdir(base)
        for _ in range(depth):
            os.mkdir("d")
            os.chdir("d")
        Image.new("RGB", (9, 9), (7, 7, 7)).save("deep.png")
    finally:
        os.chdir(cwd)
    return base.joinpath(*["d"] * depth)


# --------------------------------------------------------------------------- class 5: folders and names


def test_1100_nested_folders_load_without_recursion_error(deep_root, tmp_path, monkeypatch):
    monkeypatch.setenv("ISFE_CACHE", str(deep_root.parent / "cache"))
    ds = load_split(str(deep_root), "train")
    assert len(ds) == 3 and ds.labels.tolist() == [0, 0, 1]  # the image 1,100 folders down is found
    assert default_spec(str(deep_root)).input_size == 32
    flat = deep_root / "train" / "a"  # neither train/ nor test/: unlabelled, every image at any depth
    assert len(load_split(str(flat), "train")) == 2
    names = FolderSource(flat).names()  # dataset preparation walks the same way
    assert len(names) == 2 and names[0].endswith("deep.png") and names[0].count("/") == 1100


def test_deep_split_classes_folder_prepares(deep_root):
    out = deep_root.parent / "prepared"  # inside the module's folder: removed with it
    info = prepare_split_classes(deep_root / "train", w := Writer(out, log=lambda s: None), None)
    assert info["train_classes"] == ["a"] and w.counts["train"]["a"] == 2 and w.counts["test"]["b"] == 1


def test_walk_equals_os_walk_on_an_ordinary_tree(tmp_path):
    """The slow twin: os.walk (no links followed, hidden names dropped) lists the same files in the same order."""
    rng = np.random.default_rng(0)
    for i in range(40):
        parts = [f"f{int(v)}" for v in rng.integers(0, 3, int(rng.integers(0, 4)))]
        p = tmp_path.joinpath("t", *parts, f"{i}.png" if i % 5 else f".{i}.png")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    root = tmp_path / "t"
    expected = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        expected += [Path(dirpath) / f for f in filenames if not f.startswith(".")]
    skipped = Skipped()
    assert skipped.take(walk(root)) == sorted(expected)
    assert len(skipped.by_reason["hidden (name starts with '.')"]) == 8


def test_links_and_special_files_are_left_out_and_reported(tmp_path, capsys):
    root = tmp_path / "data"
    for i in range(3):
        _png(root / "train" / "a" / f"{i}.png", i * 50)
    _png(root / "test" / "a" / "t.png")
    outside = _png(tmp_path / "elsewhere" / "pics" / "o.png")
    (root / "train" / "a" / "linked_folder").symlink_to(outside.parent, target_is_directory=True)
    (root / "train" / "a" / "loop").symlink_to(root / "train", target_is_directory=True)  # a cycle
    (root / "train" / "a" / "linked_file.png").symlink_to(outside)  # a link to a file is the file
    (root / "train" / "a" / "broken.png").symlink_to(tmp_path / "gone.png")
    os.mkfifo(root / "train" / "a" / "pipe.png")  # would block a reader forever
    (root / "train" / "a" / "notes.txt").write_text("not an image")
    ds = load_split(str(root), "train")
    assert len(ds) == 4  # 3 images + the linked file
    err = capsys.readouterr().err
    assert "left out 5 path(s) under" in err
    for reason, name in (("symlinked folder(s) (not followed)", "'a/linked_folder'"),
                         ("broken symlink(s)", "'a/broken.png'"),
                         ("special file(s) (FIFO, device or socket)", "'a/pipe.png'"),
                         ("file(s) without an image extension", "'a/notes.txt'")):
        assert f"{reason}: " in err and name in err, (reason, err)
    assert "'a/loop'" in err


def test_control_characters_in_names_are_escaped_when_printed(tmp_path, capsys):
    root = tmp_path / "data"
    _png(root / "train" / "a" / "0.png")
    _png(root / "test" / "a" / "t.png")
    (root / "train" / "a" / "ev\x1b[2Jil\r.txt").write_text("x")  # clears a terminal if printed raw
    bad = root / "train" / "a" / "bro\x1b]0;title\x07ken\r.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(DataError) as ei:
        load_split(str(root), "train")
    msg = str(ei.value)
    assert "bro\\x1b]0;title\\x07ken\\x0d.png" in msg and "Remove or replace" in msg
    assert not any(c in msg for c in "\x1b\x07\r")
    err = capsys.readouterr().err
    assert "ev\\x1b[2Jil\\x0d.txt" in err and "\x1b" not in err and "\r" not in err


def test_undecodable_file_names_are_escaped(tmp_path, capsys):
    root = tmp_path / "data"
    _png(root / "train" / "a" / "0.png")
    _png(root / "train" / "a" / "1.png")
    raw = os.fsencode(root / "train" / "a") + b"/caf\xe9.txt"  # Latin-1 name: not UTF-8
    with open(raw, "wb") as f:
        f.write(b"x")
    assert len(load_split(str(root), "train")) == 2
    err = capsys.readouterr().err
    assert "caf\\xe9.txt" in err
    err.encode("utf-8")  # printable on a UTF-8 terminal (no lone surrogates)


# --------------------------------------------------------------------------- class 6: archives, limits, counts


def test_read_capped_stops_inflating_at_the_cap():
    """The bounded reader against a gzip stream of zeros: it inflates cap + 1 bytes, not the member."""
    blob = gzip.compress(b"\0" * (8 << 20))
    with gzip.GzipFile(fileobj=io.BytesIO(blob)) as f:
        assert read_capped(f, 1 << 20) is None
        assert f.tell() == (1 << 20) + 1
    with gzip.GzipFile(fileobj=io.BytesIO(blob)) as f:
        got = read_capped(f, 8 << 20)
    assert got is not None and len(got) == 8 << 20  # the slow twin: f.read()
    assert read_capped(io.BytesIO(b"abc"), 3) == b"abc" and read_capped(io.BytesIO(b""), 0) == b""


def test_archive_bomb_member_is_refused_by_name_before_it_is_inflated(tmp_path, monkeypatch):
    ok = io.BytesIO()
    Image.new("RGB", (8, 8)).save(ok, "PNG")
    members = {"set/train/a/ok.png": ok.getvalue(), "set/train/a/zeros.png": b"\0" * (4 << 20),
               "set/test/a/ok.png": ok.getvalue()}
    arc = make_tgz(tmp_path / "bomb.tar.gz", members)
    monkeypatch.setattr(data, "MAX_MEMBER_BYTES", 1 << 20)
    assert default_spec(str(arc)).input_size == 32  # the first-image probe does not inflate it either
    with pytest.raises(DataError, match=r"bomb\.tar\.gz:set/train/a/zeros\.png is 4 MiB.*remove it from the archive"):
        load_split(str(arc), "train")
    with pytest.raises(DataError, match=r"zeros\.png is 4 MiB"):
        load_split(str(arc), "test")  # the listing refuses it whichever split is loaded
    z = tmp_path / "bomb.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, blob in members.items():
            zf.writestr(name, blob)
    with pytest.raises(DataError, match=r"zeros\.png is 4 MiB"):
        load_split(str(z), "train")


def test_prepare_sources_cap_members(tmp_path, monkeypatch):
    import training.prepare as prepare

    monkeypatch.setattr(prepare, "MAX_MEMBER_BYTES", 1 << 20)
    arc = make_tgz(tmp_path / "src.tgz", {"images/a/x.jpg": b"\0" * (3 << 20), "images.txt": b"1 a/x.jpg\n"})
    with pytest.raises(PrepareError, match=r"member images/a/x\.jpg is larger than any file this reads \(1 MiB\)"):
        TarSource(arc)  # refused at its header, while the archive is listed
    src = TarSource(make_tgz(tmp_path / "ok.tgz", {"images/a/x.jpg": b"\xff" * 100, "images.txt": b"1 a/x.jpg\n"}))
    monkeypatch.setattr(prepare, "MAX_MEMBER_BYTES", 50)  # and capped while it is read
    with pytest.raises(PrepareError, match=r"member images/a/x\.jpg is larger than any file this reads"):
        list(src.iter_read(["images/a/x.jpg"]))
    z = tmp_path / "src.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("images/a/x.jpg", b"\0" * (3 << 20))
    with pytest.raises(PrepareError, match=r"larger than any file this reads"):
        ZipSource(z).read("images/a/x.jpg")


def test_training_images_get_isfe_model_limits(tmp_path, monkeypatch):
    root = tmp_path / "data"
    _png(root / "train" / "a" / "0.png")
    _png(root / "test" / "a" / "0.png")
    bomb = root / "train" / "a" / "1.png"  # the first image of a class: a 60-megapixel header
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 10_000, 6_000, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    (root / "train" / "a" / "0.png").unlink()  # so the bomb is the first training image
    _png(root / "train" / "b" / "2.png")
    assert default_spec(str(root)).input_size == 32  # probed with the pixel limit: refused, not decoded
    with pytest.raises(DataError, match=r"1\.png: image is 10000x6000 = 60,000,000 pixels, over the limit"):
        load_split(str(root), "train")
    bomb.unlink()
    big = root / "train" / "a" / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(big)
    monkeypatch.setattr(pp, "MAX_FILE_BYTES", 200)  # the same file-size cap as isfe_model
    with pytest.raises(DataError, match=r"big\.png: file of 0 MiB is larger than any image this reads.*Remove"):
        load_split(str(root), "train")


@pytest.mark.parametrize("layout", ["labelled", "unlabelled", "archive"])
def test_one_image_dataset_says_two_are_needed(tmp_path, layout):
    root = tmp_path / "one"
    if layout == "unlabelled":
        _png(root / "only.png")
    else:
        _png(root / "train" / "a" / "only.png")
        _png(root / "test" / "a" / "t.png")
    src = root
    if layout == "archive":
        src = tmp_path / "one.tar.gz"
        with tarfile.open(src, "w:gz") as tf:
            tf.add(root, arcname="one")
    with pytest.raises(DataError) as ei:
        load_split(str(src), "train")
    assert str(ei.value).endswith("has 1 image; training needs at least 2 (each image needs another as its negative)")
    assert "batch" not in str(ei.value)
    if layout != "unlabelled":
        assert len(load_split(str(src), "test")) == 1  # one test image is fine: the kNN monitor queries the train bank
