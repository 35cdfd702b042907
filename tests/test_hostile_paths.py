"""Hostile paths for the isfe_model CLI: outputs that are inputs, deep and long folders, links, terminal-hostile names.

Everything is generated here (a few KB of images; folder chains are made and removed through
folder handles, so no path in the test itself grows long and nothing recurses).
"""

from __future__ import annotations

import io
import json
import os
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from isfe_model import Gallery
from isfe_model.cli import embed_main, index_main, search_main
from isfe_model.gallery import printable, walk_files
from tests.helpers_models import EMBED_DIM, make_image_folder, photo, refuse_listing, write_image
from tests.helpers_models import clean_stderr as _err

posix_only = pytest.mark.skipif(os.name != "posix", reason="needs POSIX links and file names")


@pytest.fixture()
def photos(tmp_path):
    root = tmp_path / "photos"
    make_image_folder(root, {"cat": 2, "dog": 2})
    return root


# --------------------------------------------------------------------------- outputs that are inputs


@posix_only
def test_embed_refuses_an_output_that_is_an_input_or_the_model(model, photos, tmp_path, capsys):
    onnx = str(model.onnx_path)
    img = photos / "cat" / "000.png"
    other = photos / "dog" / "000.png"
    link_to_model = tmp_path / "model-link.npy"
    link_to_model.symlink_to(model.onnx_path)
    hard_to_image = tmp_path / "hard.npy"
    os.link(img, hard_to_image)
    dotted = photos / "dog" / ".." / "cat" / "000.png"
    before = {p: p.read_bytes() for p in (model.onnx_path, img, other)}
    cases = [
        (onnx, "model", onnx),                             # -o the model itself
        (str(img), "input image", str(img)),               # -o one of the images
        (str(dotted), "input image", str(img)),            # the same image by another spelling
        (str(link_to_model), "model", onnx),               # a symlink to the model
        (str(hard_to_image), "input image", str(img)),     # a hard link to an image
    ]
    for out, what, named in cases:
        rc = embed_main([onnx, str(other), str(img), "-o", out, "-q"])
        err = _err(capsys)
        assert rc == 2, (out, err)
        assert len(err.strip().splitlines()) == 1 and f"the output {out} is the {what} " in err, err
        assert named in err and "choose another -o" in err, err
    assert {p: p.read_bytes() for p in before} == before  # nothing was written over
    # an existing output that is not an input is still replaced
    old = tmp_path / "old.npy"
    old.write_bytes(b"previous run")
    assert embed_main([onnx, str(img), "-o", str(old), "-q"]) == 0
    assert np.load(old).shape == (1, EMBED_DIM)


@posix_only
def test_index_refuses_an_output_that_is_the_model_or_the_images(model, photos, tmp_path, capsys):
    onnx = str(model.onnx_path)
    models = tmp_path / "models"
    models.mkdir()
    kept = models / "m.onnx"
    kept.write_bytes(model.onnx_path.read_bytes())
    (tmp_path / "photos-link").symlink_to(photos)
    cases = [
        ([str(kept), str(photos), "-o", str(models), "--overwrite"],
         f"the output folder {models} holds the model {kept}"),
        ([onnx, str(photos), "-o", onnx], f"the output {onnx} is the model {onnx}"),
        ([onnx, str(photos), "-o", str(tmp_path / "photos-link")], "is the image folder"),
    ]
    for argv, msg in cases:
        assert index_main([*argv, "-q"]) == 2, argv
        err = _err(capsys)
        assert msg in err and len(err.strip().splitlines()) == 1, err
    assert kept.read_bytes() == model.onnx_path.read_bytes() and sorted(p.name for p in models.iterdir()) == ["m.onnx"]
    assert sorted(p.name for p in (photos / "cat").iterdir()) == ["000.png", "001.jpg"]


# --------------------------------------------------------------------------- deep and long folders


def make_chain(root: Path, levels: int, name: str = "d", files_at: dict[int, dict[str, bytes]] | None = None) -> None:
    """``root/name/...``, ``levels`` deep, ``files_at[level]`` written at each level; made through folder handles."""
    files_at = files_at or {}
    fd = os.open(root, os.O_RDONLY)
    try:
        for level in range(levels + 1):
            for fname, data in files_at.get(level, {}).items():
                wfd = os.open(fname, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=fd)
                os.write(wfd, data)
                os.close(wfd)
            if level < levels:
                os.mkdir(name, dir_fd=fd)
                nfd = os.open(name, os.O_RDONLY, dir_fd=fd)
                os.close(fd)
                fd = nfd
    finally:
        os.close(fd)


def remove_chain(root: Path, levels: int, name: str = "d") -> None:
    """Delete what :func:`make_chain` made, bottom up, two folder handles at a time (shutil.rmtree recurses)."""
    fd = os.open(root, os.O_RDONLY)
    for _ in range(levels):
        nfd = os.open(name, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    for _ in range(levels):
        for entry in os.listdir(fd):
            if entry != name:
                os.unlink(entry, dir_fd=fd)
        pfd = os.open("..", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        os.rmdir(name, dir_fd=pfd)
        fd = pfd
    os.close(fd)


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(photo(24, 20, seed)).save(buf, format="PNG")
    return buf.getvalue()


@posix_only
def test_index_walks_1100_nested_folders(model, enc, tmp_path, capsys):
    root = tmp_path / "deep"
    root.mkdir()
    levels = 1100
    make_chain(root, levels, files_at={0: {"top.png": _png(1)}, levels: {"bottom.png": _png(2)}})
    try:
        gal = tmp_path / "gal"
        assert index_main([str(model.onnx_path), str(root), "-o", str(gal), "-q"]) == 0, _err(capsys)
        g = Gallery.load(gal, encoder=enc)
        bottom = "/".join(["d"] * levels + ["bottom.png"])
        assert g.ids == [bottom, "top.png"] and g.labels == ["d", None]
        assert g.manifest["skipped"] == []
    finally:
        remove_chain(root, levels)


@posix_only
def test_paths_over_the_system_limit_are_reported_and_counted(model, tmp_path, capsys):
    root = tmp_path / "long"
    root.mkdir()
    name = "n" * 200  # 20 levels of 201 bytes pass the 4,096-byte PATH_MAX
    make_chain(root, 24, name=name, files_at={1: {"near.png": _png(3)}, 24: {"far.png": _png(4)}})
    try:
        files, left_out = walk_files(root)
        assert [f.name for f in files] == ["near.png"]
        assert len(left_out) == 1 and "over the system limit" in left_out[0]["reason"]
        assert len(os.fsencode(left_out[0]["path"])) >= os.pathconf(root, "PC_PATH_MAX")
        gal = tmp_path / "gal"
        assert index_main([str(model.onnx_path), str(root), "-o", str(gal), "--no-progress"]) == 0
        cap = capsys.readouterr()
        assert "skipped 1 file(s) or folder(s)" in cap.err and "over the system limit" in cap.err
        assert "(1 skipped)" in cap.out
        m = json.loads((gal / "manifest.json").read_text())
        assert m["count"] == 1 and [s["path"] for s in m["skipped"]] == [left_out[0]["path"]]
    finally:
        remove_chain(root, 24, name=name)


@posix_only
def test_symlinked_folders_are_reported_links_to_files_followed(model, enc, photos, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    make_image_folder(elsewhere, {"bird": 1}, seed=7)
    (photos / "birds").symlink_to(elsewhere / "bird")                   # a link to a folder: left out, reported
    (photos / "loop").symlink_to(photos)                                # a loop: left out, reported, not followed
    (photos / "cat" / "linked.png").symlink_to(elsewhere / "bird" / "000.png")  # a link to a file: indexed
    gal = tmp_path / "gal"
    assert index_main([str(model.onnx_path), str(photos), "-o", str(gal), "--no-progress"]) == 0
    cap = capsys.readouterr()
    assert "skipped 2 file(s) or folder(s)" in cap.err and cap.err.count("link to a folder") == 2
    g = Gallery.load(gal, encoder=enc)
    assert "cat/linked.png" in g and not any(i.startswith(("birds/", "loop/")) for i in g.ids)
    assert sorted(Path(s["path"]).name for s in g.manifest["skipped"]) == ["birds", "loop"]


def test_unreadable_folders_are_reported(tmp_path, monkeypatch):
    """A folder the walk cannot list (permissions; root ignores chmod, so the refusal is the OS's answer simulated)."""
    root = tmp_path / "r"
    make_image_folder(root, {"open": 1, "locked": 1})
    refuse_listing(monkeypatch, "locked")
    files, left_out = walk_files(root)
    assert [f.relative_to(root).as_posix() for f in files] == ["open/000.png"]
    assert left_out == [{"path": str(root / "locked"), "reason": left_out[0]["reason"]}]
    assert "cannot be read (Permission denied)" in left_out[0]["reason"]


def _reference_walk(root: Path) -> list[str]:
    """walk_files' slow, obvious twin for shallow trees: os.walk, hidden names dropped, folder links not followed."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and not os.path.islink(os.path.join(dirpath, d))]
        out += [os.path.relpath(os.path.join(dirpath, f), root) for f in filenames if not f.startswith(".")]
    return sorted(Path(p).as_posix() for p in out)


@posix_only
def test_walk_files_equals_os_walk_on_random_trees(tmp_path):
    rng = np.random.default_rng(5)
    for t in range(5):
        root = tmp_path / f"tree{t}"
        root.mkdir()
        folders = [root]
        for n in range(60):
            parent = folders[int(rng.integers(len(folders)))]
            kind = int(rng.integers(6))
            name = (".h" if kind == 0 else "") + f"e{n}"
            if kind <= 1:
                (parent / name).mkdir()
                folders.append(parent / name)
            elif kind == 2:
                (parent / name).symlink_to(folders[int(rng.integers(len(folders)))], target_is_directory=True)
            else:
                (parent / f"{name}.png").write_bytes(b"x")
        files, left_out = walk_files(root)
        assert [f.relative_to(root).as_posix() for f in files] == _reference_walk(root)
        assert all(s["reason"].startswith("link to a folder") for s in left_out)
        assert files == walk_files(root, exclude=[tmp_path / "nothing"])[0]
    # exclude leaves a folder (and what is under it) out
    sub = folders[1] if len(folders) > 1 else root
    kept = walk_files(root, exclude=[sub])[0]
    assert all(sub not in f.parents for f in kept)


# --------------------------------------------------------------------------- names that talk to the terminal


BIDI = {0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)}


def test_printable_escapes_exactly_the_characters_a_terminal_acts_on():
    """Every code point of the BMP against the Unicode database: controls, separators, bidi marks, surrogates."""
    for c in range(0x10000):
        ch = chr(c)
        unsafe = unicodedata.category(ch) in ("Cc", "Zl", "Zp", "Cs") or c in BIDI
        out = printable(f"a{ch}b")
        if unsafe:
            assert out != f"a{ch}b" and out.isascii() and out.isprintable(), hex(c)
        else:
            assert out == f"a{ch}b", hex(c)
    assert printable("x\x1b[2J\r\n.png") == "x\\x1b[2J\\x0d\\x0a.png"
    assert printable("caf\udce9.png") == "caf\\xe9.png"  # a Latin-1 byte of a non-UTF-8 name (surrogateescape)
    assert printable("\u202eevil") == "\\u202eevil" and printable("plain/ünï.png") == "plain/ünï.png"


HOSTILE_NAMES = ["\x1b[2J\x1b[31mred.png", "cr\rover.png", "bell\x07.png", "csi\x9b31m.png", "rtl\u202egnp.exe.png",
                 "nl\nline.png"]


@posix_only
def test_hostile_names_are_escaped_in_every_printed_line(model, enc, tmp_path, capsys):
    root = tmp_path / "names"
    for n, name in enumerate(HOSTILE_NAMES):
        write_image(root / "c" / name, photo(24, 20, n))
    (root / "c" / "bad\x1b]0;pwned\x07.png").write_bytes(b"not an image")
    gal = tmp_path / "gal"
    onnx = str(model.onnx_path)

    def clean(text: str) -> None:
        body = text.replace("\n", "")
        assert not any(unicodedata.category(ch) in ("Cc", "Zl", "Zp") or ord(ch) in BIDI for ch in body), repr(text)

    assert index_main([onnx, str(root), "-o", str(gal), "-q"]) == 1  # the bad file, named in the error
    err = _err(capsys)
    clean(err)
    assert "bad\\x1b]0;pwned\\x07.png" in err and len(err.strip().splitlines()) == 1
    assert index_main([onnx, str(root), "-o", str(gal), "--skip-bad", "--no-progress"]) == 0
    cap = capsys.readouterr()
    clean(cap.out + cap.err)
    assert "bad\\x1b]0;pwned\\x07.png" in cap.err
    g = Gallery.load(gal, encoder=enc)
    assert sorted(g.ids) == sorted(f"c/{n}" for n in HOSTILE_NAMES)  # the manifest and items keep the real names
    query = root / "c" / HOSTILE_NAMES[0]
    assert search_main([onnx, str(gal), str(query), "-k", str(len(HOSTILE_NAMES))]) == 0
    cap = capsys.readouterr()
    clean(cap.out + cap.err)
    assert "c/\\x1b[2J\\x1b[31mred.png" in cap.out and "c/cr\\x0dover.png" in cap.out and "c/nl\\x0aline.png" in cap.out
    assert len(cap.out.splitlines()) == 1 + len(HOSTILE_NAMES)  # no name broke a line
    assert search_main([onnx, str(gal), str(query), "-k", "3", "--json", "-q"]) == 0
    out = capsys.readouterr().out
    clean(out)
    doc = json.loads(out)  # escaped as JSON: the exact names come back
    assert doc["results"][0]["query"] == str(query) and doc["results"][0]["hits"][0]["id"] == f"c/{HOSTILE_NAMES[0]}"
    assert embed_main([onnx, str(query), "-o", str(tmp_path / "e\x1b[5m.npy"), "-q"]) == 0
    clean(capsys.readouterr().out)
    assert embed_main([onnx, str(query), "-o", "x.npy", "--\x1b[31mbogus"]) == 2  # argparse quotes the argument
    err = capsys.readouterr().err
    clean(err)
    assert "--\\x1b[31mbogus" in err


@posix_only
def test_non_utf8_names_are_printed_as_bytes(model, tmp_path, capsys):
    root = tmp_path / "bytes"
    (root / "c").mkdir(parents=True)
    raw = os.path.join(os.fsencode(root / "c"), b"caf\xe9\x1b.png")
    with open(raw, "wb") as f:
        f.write(_png(9))
    (root / "c" / "ok.png").write_bytes(_png(10))
    name = os.fsdecode(raw)
    assert embed_main([str(model.onnx_path), name, "-o", str(tmp_path / "o.npy"), "-q"]) == 0
    gal = str(tmp_path / "gal")
    assert index_main([str(model.onnx_path), str(root), "-o", gal, "--skip-bad", "--no-progress"]) == 0
    cap = capsys.readouterr()
    assert "caf\\xe9\\x1b.png" in cap.err and "not valid UTF-8" in cap.err and "(1 skipped)" in cap.out
    assert search_main([str(model.onnx_path), gal, name, "-k", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith("caf\\xe9\\x1b.png")
