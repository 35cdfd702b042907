"""isfe_model.walk.walk, the one folder walk (gallery, training, dataset preparation, export parity, packages).

Everything is generated here and small (a few KB); deep chains are made and removed through
folder handles, so no path given to the OS is long and nothing recurses.
"""

from __future__ import annotations

import os
import socket
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import training.data as data
from export.common import ExportError
from export.package import _file_table
from export.parity import list_images, load_folder_images
from isfe_model.preprocess import IMAGE_EXTENSIONS, PreprocessSpec
from isfe_model.walk import (
    BROKEN_LINK,
    EXTENSION,
    FOLDER_LINK,
    SPECIAL,
    TOO_LONG,
    UNREADABLE_FOLDER,
    walk,
    walk_files,
)
from tests.helpers_models import refuse_listing
from training.data import Skipped, load_split
from training.prepare import FolderSource, remove_tree

posix_only = pytest.mark.skipif(os.name != "posix", reason="needs POSIX links, FIFOs and file names")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ISFE_CACHE", str(tmp_path / "cache"))


def _png(path: Path, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (9, 7), (value, 255 - value, 40)).save(path)
    return path


def _chain(root: Path, levels: int, name: str = "d", bottom: str = "deep.png") -> None:
    """``root/name/name/...`` (``levels`` folders) with ``bottom`` at the end, made through folder handles."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root, os.O_RDONLY)
    try:
        for _ in range(levels):
            os.mkdir(name, dir_fd=fd)
            nfd = os.open(name, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        wfd = os.open(bottom, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(wfd, b"x")
        os.close(wfd)
    finally:
        os.close(fd)


def _old_training_walk(root: Path, skipped: Skipped) -> list[Path]:
    """The training walk before it was merged (training.data.walk_files at e2c72ea), kept as the twin:
    same stack, same policy, ``sorted`` Paths (component-wise order)."""
    files, stack = [], [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as e:
            skipped.add(f"unreadable folder(s) ({e.strerror or e})", data._rel(folder, root))
            continue
        for entry in entries:
            path = Path(entry.path)
            if entry.name.startswith("."):
                skipped.add("hidden (name starts with '.')", data._rel(path, root))
            elif entry.is_dir(follow_symlinks=False):
                stack.append(path)
            elif entry.is_symlink() and os.path.isdir(path):
                skipped.add("symlinked folder(s) (not followed)", data._rel(path, root))
            elif entry.is_file():
                files.append(path)
            elif entry.is_symlink():
                skipped.add("broken symlink(s)", data._rel(path, root))
            else:
                skipped.add("special file(s) (FIFO, device or socket)", data._rel(path, root))
    return sorted(files)


def _ordinary_tree(root: Path, seed: int = 0, n: int = 60) -> None:
    """Class folders and subfolders of letters and digits (no name sorts differently by component and by string)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        parts = [f"c{int(v)}" for v in rng.integers(0, 4, int(rng.integers(0, 4)))]
        name = f"{i}.png" if i % 7 else f".{i}.png"
        p = root.joinpath(*parts, name)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")


# --------------------------------------------------------------------------- order


def test_order_equals_the_old_training_walk_on_an_ordinary_tree(tmp_path):
    """Same files, same order, same reasons as the walk it replaced: existing dataset caches keep their key."""
    root = tmp_path / "t"
    _ordinary_tree(root)
    if os.name == "posix":
        (root / "c1").mkdir(exist_ok=True)
        (root / "c1" / "loop").symlink_to(root, target_is_directory=True)
        (root / "c1" / "gone.png").symlink_to(tmp_path / "nothing.png")
        os.mkfifo(root / "pipe.png")
    old, new = Skipped(), Skipped()
    files = new.take(walk(root))
    assert files == _old_training_walk(root, old)
    assert {k: sorted(v) for k, v in new.by_reason.items()} == {k: sorted(v) for k, v in old.by_reason.items()}
    assert [f.relative_to(root).as_posix() for f in files] == walk(root).names
    # the gallery's walk (which hands FIFOs and broken links on to the embedder) has the same order
    assert [f for f in walk_files(root)[0] if f.is_file()] == files


def test_order_is_by_relative_path_string_as_in_an_archive(tmp_path):
    """Names with characters that sort before "/" (space, "-", "!", "."): a folder and its tar give one order."""
    root = tmp_path / "flat"
    names = ["a/x.png", "a-b/y.png", "a b/z.png", "a!/w.png", "a.png", "a/b/v.png", "ab.png", "a/b-c.png"]
    for i, n in enumerate(names):
        _png(root / n, value=20 * i)
    walked = walk(root)
    assert walked.names == sorted(names)  # the string order ...
    assert walked.names != [p.relative_to(root).as_posix() for p in sorted(walked.files)]  # ... not Path order
    tar = tmp_path / "flat.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(root, arcname="flat")
    from_folder = load_split(str(root), "train", use_cache=False)
    from_tar = load_split(str(tar), "train", use_cache=False)
    assert np.array_equal(np.asarray(from_folder.images), np.asarray(from_tar.images))
    expected = [np.asarray(Image.open(root / n).convert("RGB"))[0, 0] for n in sorted(names)]
    assert [tuple(img[0, 0]) for img in np.asarray(from_folder.images)] == [tuple(c) for c in expected]


def test_the_dataset_cache_key_follows_the_walk_order(tmp_path, monkeypatch):
    """The cache key hashes the files in walk order: were the order to change, an old entry is never read."""
    root = tmp_path / "data"
    for i in range(4):
        _png(root / "train" / "a" / f"{i}.png", i)
    key = data._source_key(str(root), "train", 16)
    assert data._source_key(str(root), "train", 16) == key
    real = data.walk

    def reversed_walk(*args, **kwargs):
        w = real(*args, **kwargs)
        w.files.reverse()
        return w

    monkeypatch.setattr(data, "walk", reversed_walk)
    assert data._source_key(str(root), "train", 16) != key


# --------------------------------------------------------------------------- depth, loops, links, special files


@posix_only
def test_1100_nested_folders_every_caller(tmp_path):
    root = tmp_path / "deep"
    _chain(root, 1100)
    _png(root / "top.png")
    try:
        walked = walk(root)
        assert walked.names == ["/".join(["d"] * 1100 + ["deep.png"]), "top.png"] and not walked.left_out
        assert list_images(root) == walked.files  # export parity (rglob was a RecursionError here)
        assert len(FolderSource(root).names()) == 2
        table = _file_table(root)
        assert sorted(table) == walked.names and table["top.png"]["bytes"] == (root / "top.png").stat().st_size
    finally:
        remove_tree(root)  # shutil.rmtree recurses once per level
    assert not root.exists()


@posix_only
def test_symlink_loops_are_never_followed(tmp_path):
    root = tmp_path / "r"
    _png(root / "a" / "1.png")
    (root / "a" / "up").symlink_to(root, target_is_directory=True)       # a loop through a folder link
    (root / "self").symlink_to(root / "self")                              # a link to itself (ELOOP)
    (root / "p").symlink_to(root / "q")                                    # two links to each other
    (root / "q").symlink_to(root / "p")
    (root / "a" / "file-link.png").symlink_to(root / "a" / "1.png")        # a link to a file: followed
    walked = walk(root)
    assert walked.names == ["a/1.png", "a/file-link.png"]
    assert walked.files[1] == root / "a" / "file-link.png"  # the link's path, not its target's
    assert [(lo.rel, lo.reason) for lo in walked.left_out] == [
        ("a/up", FOLDER_LINK), ("p", BROKEN_LINK), ("q", BROKEN_LINK), ("self", BROKEN_LINK)]
    assert all(lo.message for lo in walked.left_out)


@posix_only
def test_fifos_sockets_devices_and_broken_links_are_left_out(tmp_path, monkeypatch):
    root = tmp_path / "r"
    _png(root / "ok.png")
    os.mkfifo(root / "pipe.png")
    (root / "pipe-link.png").symlink_to(root / "pipe.png")
    (root / "null.png").symlink_to("/dev/null")  # a character device
    (root / "gone.png").symlink_to(tmp_path / "missing.png")
    monkeypatch.chdir(root)  # a socket's path is limited to ~100 bytes
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind("s.png")
        walked = walk(root)
    finally:
        sock.close()
    assert walked.names == ["ok.png"]
    assert {lo.rel: lo.reason for lo in walked.left_out} == {
        "pipe.png": SPECIAL, "pipe-link.png": SPECIAL, "null.png": SPECIAL, "s.png": SPECIAL, "gone.png": BROKEN_LINK}
    # the gallery hands these to the embedder (a bad file stops the index unless --skip-bad), in order
    files, left_out = walk_files(root)
    assert [f.name for f in files] == ["gone.png", "null.png", "ok.png", "pipe-link.png", "pipe.png", "s.png"]
    assert not left_out


def test_hidden_names_are_not_entered_but_counted(tmp_path):
    root = tmp_path / "r"
    _png(root / "a" / "1.png")
    _png(root / ".cache" / "x" / "2.png")  # a hidden folder: entered never, listed once
    _png(root / "a" / ".thumb.png")
    walked = walk(root)
    assert walked.names == ["a/1.png"] and not walked.left_out
    assert [lo.rel for lo in walked.hidden] == [".cache", "a/.thumb.png"]
    skipped = Skipped()
    skipped.take(walked)
    assert "left out 2 path(s)" in skipped.summary(str(root))


@posix_only
def test_unicode_and_control_character_names(tmp_path):
    root = tmp_path / "r"
    names = ["é/ü.png", "日本/写真.png", "esc\x1b[2J.png", "cr\rx.png", "nl\nx.png", "tab\t.png", "rtl\u202e.png"]
    for n in names:
        _png(root / n)
    raw = os.path.join(os.fsencode(root), b"caf\xe9.txt")  # not UTF-8
    with open(raw, "wb") as f:
        f.write(b"x")
    (root / "more").mkdir()
    (root / "more" / "a\x1b]0;x\x07.txt").write_text("x")
    walked = walk(root)
    assert walked.names == sorted([*names, os.fsdecode(b"caf\xe9.txt"), "more/a\x1b]0;x\x07.txt"])
    assert all(p.exists() for p in walked.files)
    skipped = Skipped()
    assert data.walk_images(root, skipped) == [root / n for n in sorted(names)]
    line = skipped.summary(str(root))
    assert "\x1b" not in line and "\\x1b]0;x\\x07.txt" in line and "caf\\xe9.txt" in line  # escaped when printed


# --------------------------------------------------------------------------- the other reasons


def test_extension_filter_checks_the_type_first(tmp_path):
    root = tmp_path / "r"
    _png(root / "UPPER.PNG")
    (root / "notes.txt").write_text("x")
    (root / "noext").write_text("x")
    if os.name == "posix":
        os.mkfifo(root / "pipe.txt")
    walked = walk(root, extensions=IMAGE_EXTENSIONS)
    assert walked.names == ["UPPER.PNG"]
    reasons = {lo.rel: lo.reason for lo in walked.left_out}
    assert reasons["notes.txt"] == EXTENSION and reasons["noext"] == EXTENSION
    assert os.name != "posix" or reasons["pipe.txt"] == SPECIAL
    assert walk(root).names == ["UPPER.PNG", "noext", "notes.txt"]  # no filter: every file


def test_unreadable_folders_and_the_root(tmp_path, monkeypatch):
    root = tmp_path / "r"
    _png(root / "open" / "1.png")
    _png(root / "locked" / "2.png")
    refuse_listing(monkeypatch, "locked")
    walked = walk(root)
    assert walked.names == ["open/1.png"]
    assert [(lo.rel, lo.reason, lo.detail) for lo in walked.left_out] == [("locked", UNREADABLE_FOLDER,
                                                                            "Permission denied")]
    whole = walk(root / "locked")
    assert not whole.files and [(lo.rel, lo.reason) for lo in whole.left_out] == [(".", UNREADABLE_FOLDER)]
    skipped = Skipped()  # training words it relative to the split folder
    data.walk_images(root / "locked", skipped, rel_to=root)
    assert skipped.by_reason == {"unreadable folder(s) (Permission denied)": ["locked"]}


@posix_only
def test_paths_over_path_max_are_left_out(tmp_path):
    root = tmp_path / "long"
    name = "n" * 200
    _chain(root, 24, name=name, bottom="far.png")
    _png(root / name / "near.png")
    try:
        walked = walk(root)
        assert walked.names == [f"{name}/near.png"]
        assert [lo.reason for lo in walked.left_out] == [TOO_LONG]
        assert "over the system limit" in walked.left_out[0].message
        skipped = Skipped()
        skipped.take(walked)
        assert list(skipped.by_reason) == ["path(s) over the system length limit (PATH_MAX; nothing can open them)"]
    finally:
        remove_tree(root)


def test_exclude_leaves_a_folder_out_silently(tmp_path):
    root = tmp_path / "r"
    _png(root / "a" / "1.png")
    _png(root / "out" / "2.png")
    assert walk(root, exclude=[root / "a" / ".." / "out"]).names == ["a/1.png"]
    assert walk(root, exclude=[tmp_path / "nothing"]).names == ["a/1.png", "out/2.png"]


# --------------------------------------------------------------------------- the callers' policies


@posix_only
def test_training_and_export_report_what_the_walk_left_out(tmp_path, capsys):
    root = tmp_path / "data"
    for i in range(3):
        _png(root / "train" / "a" / "sub" / f"{i}.png", 60 * i)
    _png(root / "test" / "a" / "t.png")
    (root / "train" / "a" / "sub" / "loop").symlink_to(root, target_is_directory=True)
    (root / "train" / "a" / "readme.txt").write_text("x")
    assert len(load_split(str(root), "train")) == 3
    err = capsys.readouterr().err
    assert "left out 2 path(s)" in err and "'a/sub/loop'" in err and "'a/readme.txt'" in err
    spec = PreprocessSpec(input_size=8, resize_size=8)
    im = load_folder_images(root / "train", spec, None)  # parity: the folder link is listed, the .txt is not
    assert len(im) == 3 and [Path(s["path"]).name for s in im.skipped] == ["loop"]
    assert "link to a folder" in im.skipped[0]["reason"]
    with pytest.raises(ExportError, match="link to a folder; .*a package holds plain files only"):
        _file_table(root / "train" / "a")  # a package is plain files only
