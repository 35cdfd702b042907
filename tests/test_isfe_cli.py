"""isfe-embed / isfe-index / isfe-search: outputs, exit codes, and one clear line for every bad input."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from isfe_model import Gallery
from isfe_model.cli import embed_main, index_main, main, search_main
from tests.helpers_models import EMBED_DIM, make_image_folder, with_props
from tests.helpers_models import clean_stderr as _err_line
from tests.test_preprocess import _unusual_files, hostile_files

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def photos(tmp_path):
    root = tmp_path / "photos"
    make_image_folder(root, {"cat": 3, "dog": 2})
    return root


def test_embed_writes_npy_in_input_order(model, enc, photos, tmp_path, capsys):
    files = sorted(photos.rglob("*.*"))
    out = tmp_path / "emb.npy"
    assert embed_main([str(model.onnx_path), *map(str, files), "-o", str(out)]) == 0
    cap = capsys.readouterr()
    assert f"wrote {out}: {len(files)} x {EMBED_DIM} float32 embeddings" in cap.out
    assert "CPUExecutionProvider" in cap.err  # the provider choice is visible
    z = np.load(out, allow_pickle=False)
    assert z.dtype == np.float32 and np.allclose(z, enc.embed(files), atol=1e-6)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary files left


def test_cli_encoder_lets_onnxruntime_threads_sleep(model):
    """The tools decode while ONNX Runtime runs: their encoder has spinning off (see Encoder's ``spinning``)."""
    import argparse

    from isfe_model.cli import _open_encoder

    args = argparse.Namespace(model=str(model.onnx_path), providers=None, threads=None, max_pixels=50_000_000,
                              decode_threads=None, quiet=True)
    enc = _open_encoder(args, "isfe-index")
    assert enc.spinning is False
    assert enc._session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_unusual_images_are_embedded_by_the_cli(model, tmp_path, capsys):
    files = _unusual_files(tmp_path / "unusual")
    out = tmp_path / "u.npy"
    assert embed_main([str(model.onnx_path), *map(str, files.values()), "-o", str(out), "-q"]) == 0
    assert np.load(out).shape == (len(files), EMBED_DIM)


def test_every_hostile_file_gives_one_clear_error(model, tmp_path, capsys):
    out = tmp_path / "never.npy"
    for kind, (path, _reason) in hostile_files(tmp_path / "hostile").items():
        rc = embed_main([str(model.onnx_path), str(path), "-o", str(out), "-q"])
        err = _err_line(capsys)
        assert rc == 1, kind
        assert err.startswith("isfe-embed: error: ") and str(path) in err, (kind, err)
        assert len(err.strip().splitlines()) == 1, err
        assert not out.exists()


def test_max_pixels_flag(model, photos, tmp_path, capsys):
    img = str(sorted(photos.rglob("*.png"))[0])
    rc = embed_main([str(model.onnx_path), img, "-o", str(tmp_path / "o.npy"), "--max-pixels", "100", "-q"])
    assert rc == 1 and "over the limit of 100" in _err_line(capsys)
    import logging

    from PIL import Image

    limit, logger = Image.MAX_IMAGE_PIXELS, logging.getLogger("isfe_model")
    handlers = list(logger.handlers)
    assert embed_main([str(model.onnx_path), img, "-o", str(tmp_path / "o.npy"), "--max-pixels", "none", "-q"]) == 0
    # process state restored
    assert Image.MAX_IMAGE_PIXELS == limit and logger.handlers == handlers and logger.propagate
    assert embed_main([str(model.onnx_path), img, "-o", str(tmp_path / "o.npy"), "--max-pixels", "lots"]) == 2
    assert "--max-pixels" in _err_line(capsys)


def test_bad_models_and_paths(model, photos, tmp_path, capsys):
    img = str(sorted(photos.rglob("*.png"))[0])
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07junk" * 100)
    bare = with_props(model.onnx_path, tmp_path / "bare.onnx", **{k: None for k in model.metadata.to_props()})
    cases = [
        ([str(tmp_path / "missing.onnx"), img, "-o", str(tmp_path / "o.npy")], "no such file"),
        ([str(junk), img, "-o", str(tmp_path / "o.npy")], "not a valid ONNX model"),
        ([str(bare), img, "-o", str(tmp_path / "o.npy")], "not an ISFE model"),
        ([str(model.onnx_path), img, "-o", str(tmp_path / "nodir" / "o.npy")], "does not exist"),
        ([str(model.onnx_path), img, "-o", str(tmp_path)], "is a folder"),
        ([str(model.onnx_path), img, "-o", str(tmp_path / "o.npy"), "--providers", "cuda"], "onnxruntime-gpu"),
    ]
    for argv, msg in cases:
        assert embed_main(argv) == 1, argv
        err = _err_line(capsys)
        assert msg in err, (msg, err)
    assert embed_main([str(model.onnx_path)]) == 2  # usage error: argparse's message
    assert "required" in _err_line(capsys) or "arguments" in capsys.readouterr().err


def test_index_and_search(model, enc, photos, tmp_path, capsys):
    gal = tmp_path / "gal"
    assert index_main([str(model.onnx_path), str(photos), "-o", str(gal), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"indexed 5 images (0 skipped) from {photos} into {gal}: dim {EMBED_DIM}, float32, 2 labels" in out
    g = Gallery.load(gal, encoder=enc)
    assert g.ids == ["cat/000.png", "cat/001.jpg", "cat/002.png", "dog/000.png", "dog/001.jpg"]
    q = photos / "dog" / "001.jpg"
    assert search_main([str(model.onnx_path), str(gal), str(q), "-k", "3", "-q"]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0] == f"query {q}"
    assert text[1].split() == ["1", "1.0000", "dog/001.jpg", "[dog]"]
    assert len(text) == 4
    assert search_main(
        [str(model.onnx_path), str(gal), str(q), str(photos / "cat" / "000.png"), "-k", "2", "--json"]
    ) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["k"] == 2 and doc["fingerprint"] == enc.fingerprint and doc["gallery_size"] == 5
    r0, r1 = doc["results"]
    assert r0["query"] == str(q) and r0["hits"][0]["id"] == "dog/001.jpg" and r0["hits"][0]["label"] == "dog"
    assert r1["hits"][0]["id"] == "cat/000.png"
    # the same through the library: the CLI adds nothing of its own
    ref = g.search(enc.embed([q]), 2).hits(0)
    assert [h["id"] for h in r0["hits"]] == [h["id"] for h in ref]
    assert [h["score"] for h in r0["hits"]] == pytest.approx([h["score"] for h in ref], abs=1e-6)


def test_index_bad_files_skip_bad_and_overwrite(model, photos, tmp_path, capsys):
    (photos / "dog" / "page.jpg").write_bytes(b"<html></html>")
    (photos / "empty.png").write_bytes(b"")
    gal = tmp_path / "gal"
    assert index_main([str(model.onnx_path), str(photos), "-o", str(gal), "-q"]) == 1
    err = _err_line(capsys)
    assert "--skip-bad" in err and ("empty.png" in err or "page.jpg" in err)
    assert not gal.exists()  # nothing half-written
    assert index_main([str(model.onnx_path), str(photos), "-o", str(gal), "--skip-bad"]) == 0
    cap = capsys.readouterr()
    assert "skipped 2 file(s)" in cap.err and "page.jpg" in cap.err and "(2 skipped)" in cap.out
    skipped = json.loads((gal / "manifest.json").read_text())["skipped"]
    assert sorted(Path(s["path"]).name for s in skipped) == ["empty.png", "page.jpg"]
    # an existing gallery: refused without --overwrite, replaced with it
    assert index_main([str(model.onnx_path), str(photos), "-o", str(gal), "--skip-bad", "-q"]) == 1
    assert "--overwrite" in _err_line(capsys)
    (photos / "dog" / "page.jpg").unlink()
    (photos / "empty.png").unlink()
    assert index_main(
        [str(model.onnx_path), str(photos), "-o", str(gal), "--overwrite", "--dtype", "float16", "-q"]
    ) == 0
    m = json.loads((gal / "manifest.json").read_text())
    assert m["skipped"] == [] and m["dtype"] == "float16" and m["count"] == 5
    # never replaces a folder that is not a gallery
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("keep")
    assert index_main([str(model.onnx_path), str(photos), "-o", str(docs), "--overwrite", "-q"]) == 1
    assert "not an ISFE gallery" in _err_line(capsys) and (docs / "a.txt").read_text() == "keep"
    # the output folder inside the image folder is not indexed on the next run
    inner = photos / "gallery"
    assert index_main([str(model.onnx_path), str(photos), "-o", str(inner), "-q"]) == 0
    assert index_main([str(model.onnx_path), str(photos), "-o", str(inner), "--overwrite", "-q"]) == 0
    assert json.loads((inner / "manifest.json").read_text())["count"] == 5
    assert index_main([str(model.onnx_path), str(tmp_path / "nope"), "-o", str(tmp_path / "g2"), "-q"]) == 1
    assert "no such folder" in _err_line(capsys)


def test_overwrite_never_deletes_files_that_are_not_the_gallery(model, photos, tmp_path, capsys):
    gal = tmp_path / "gal"
    assert index_main([str(model.onnx_path), str(photos), "-o", str(gal), "-q"]) == 0
    # a user keeps other files in the gallery folder: --overwrite must not delete them
    (gal / "notes.txt").write_text("keep")
    assert index_main([str(model.onnx_path), str(photos), "-o", str(gal), "--overwrite", "-q"]) == 1
    err = _err_line(capsys)
    assert "not part of the gallery (notes.txt)" in err and (gal / "notes.txt").read_text() == "keep"
    (gal / "notes.txt").unlink()
    # the images being indexed live inside the old gallery folder: refused before anything is embedded
    inside = gal / "photos"
    os.rename(photos, inside)
    assert index_main([str(model.onnx_path), str(inside), "-o", str(gal), "--overwrite", "-q"]) == 1
    assert "inside the output folder" in _err_line(capsys)
    assert sorted(p.name for p in (inside / "cat").iterdir()) and (gal / "manifest.json").exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo") or os.name != "posix", reason="needs POSIX FIFOs and symlinks")
def test_outputs_that_are_links_fifos_or_devices(model, photos, tmp_path, capsys):
    img = str(next(photos.rglob("*.png")))
    # a FIFO (or a device such as /dev/null) is refused, never renamed over
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    assert embed_main([str(model.onnx_path), img, "-o", str(fifo), "-q"]) == 1
    assert "not a regular file" in _err_line(capsys)
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    # a symlink is written through: the link stays, its target gets the embeddings
    target = tmp_path / "real.npy"
    target.write_bytes(b"old")
    link = tmp_path / "link.npy"
    link.symlink_to(target)
    assert embed_main([str(model.onnx_path), img, "-o", str(link), "-q"]) == 0
    assert link.is_symlink() and np.load(target).shape == (1, EMBED_DIM)
    # new outputs get the umask's permissions (tempfile would leave 0600 files and 0700 folders)
    old = os.umask(0o022)
    try:
        assert embed_main([str(model.onnx_path), img, "-o", str(tmp_path / "new.npy"), "-q"]) == 0
        assert index_main([str(model.onnx_path), str(photos), "-o", str(tmp_path / "g"), "-q"]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new.npy").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "g").stat().st_mode) == 0o755
    assert {stat.S_IMODE(f.stat().st_mode) for f in (tmp_path / "g").iterdir()} == {0o644}


def test_an_output_that_cannot_be_written_is_named_not_its_temporary_file(model, photos, tmp_path, capsys,
                                                                          monkeypatch):
    """The write fails (a full disk, a folder that takes no new files): one line naming -o's file, nothing left."""
    import errno
    import tempfile

    from isfe_model import atomic

    img = str(next(photos.rglob("*.png")))
    out = tmp_path / "emb.npy"

    def disk_full(f, arr, allow_pickle=False):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(atomic.np, "save", disk_full)
        assert embed_main([str(model.onnx_path), img, "-o", str(out), "-q"]) == 1
    assert _err_line(capsys) == f"isfe-embed: error: {out} cannot be written (No space left on device)\n"
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    def no_new_files(*a, dir=None, **k):  # as on /proc: the folder exists but refuses to create files
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", os.path.join(dir, ".emb.npy.x1y2.tmp"))

    with monkeypatch.context() as m:
        m.setattr(tempfile, "mkstemp", no_new_files)
        assert embed_main([str(model.onnx_path), img, "-o", str(out), "-q"]) == 1
    assert _err_line(capsys) == f"isfe-embed: error: {out} cannot be written (No such file or directory)\n"
    # a gallery folder the same way: the message names -o's folder
    gal = tmp_path / "gal"
    with monkeypatch.context() as m:
        m.setattr(atomic.np, "save", disk_full)
        assert index_main([str(model.onnx_path), str(photos), "-o", str(gal), "-q"]) == 1
    assert _err_line(capsys) == f"isfe-index: error: {gal} cannot be written (No space left on device)\n"
    assert not gal.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs")
def test_a_fifo_among_the_images_is_skipped_not_waited_for(model, photos, tmp_path, capsys):
    os.mkfifo(photos / "cat" / "stream.png")
    gal = tmp_path / "gal"
    assert index_main([str(model.onnx_path), str(photos), "-o", str(gal), "-q"]) == 1
    assert "stream.png" in (err := _err_line(capsys)) and "named pipe" in err
    assert index_main([str(model.onnx_path), str(photos), "-o", str(gal), "--skip-bad", "-q"]) == 0
    skipped = json.loads((gal / "manifest.json").read_text())["skipped"]
    assert [Path(s["path"]).name for s in skipped] == ["stream.png"]


def test_search_refuses_gallery_of_another_model(model, photos, tmp_path, capsys):
    gal = tmp_path / "gal"
    assert index_main([str(model.onnx_path), str(photos), "-o", str(gal), "-q"]) == 0
    other = with_props(model.onnx_path, tmp_path / "other.onnx", checkpoint_sha256="0" * 64)
    img = str(photos / "cat" / "000.png")
    assert search_main([str(other), str(gal), img, "-q"]) == 1
    err = _err_line(capsys)
    assert "built with another model" in err and "isfe-index" in err
    assert search_main([str(model.onnx_path), str(tmp_path / "nogal"), img, "-q"]) == 1
    assert "no such folder" in _err_line(capsys)
    assert search_main([str(model.onnx_path), str(gal), str(tmp_path / "missing.jpg"), "-q"]) == 1
    assert "missing.jpg: no such file" in _err_line(capsys)


def test_progress_line_when_asked(model, photos, tmp_path, capsys):
    files = [str(p) for p in sorted(photos.rglob("*.*"))]
    assert embed_main(
        [str(model.onnx_path), *files, "-o", str(tmp_path / "p.npy"), "--progress", "--batch-size", "2"]
    ) == 0
    err = capsys.readouterr().err
    assert "embedding" in err and f"{len(files)}/{len(files)}" in err and "img/s" in err
    assert embed_main([str(model.onnx_path), *files, "-o", str(tmp_path / "p.npy")]) == 0
    assert "img/s" not in capsys.readouterr().err  # stderr is not a terminal here


def test_python_m_isfe_model_in_a_real_process(model, photos, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run(*a: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "isfe_model", *a], capture_output=True, text=True, timeout=300, env=env
        )

    r = run("info", str(model.onnx_path))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["dim"] == EMBED_DIM
    bad = tmp_path / "x.svg"
    bad.write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    r = run("embed", str(model.onnx_path), str(bad), "-o", str(tmp_path / "o.npy"))
    assert r.returncode == 1 and "Traceback" not in r.stderr and "SVG" in r.stderr
    r = run("frobnicate")
    assert r.returncode == 2 and "unknown command" in r.stderr
    assert main(["--version"]) == 0


def test_the_cli_lets_pillow_reuse_image_blocks_during_a_run(model, photos, tmp_path, monkeypatch):
    """isfe-embed/-index/-search keep freed image blocks for the next decode, and put Pillow's setting back."""
    from PIL import Image

    import isfe_model.cli as cli

    real, seen = cli.reuse_image_memory, []
    monkeypatch.setattr(cli, "reuse_image_memory", lambda: seen.append(real()) or seen[-1])
    monkeypatch.delenv("PILLOW_BLOCKS_MAX", raising=False)
    before = Image.core.get_blocks_max()
    img = str(sorted(photos.rglob("*.png"))[0])
    assert embed_main([str(model.onnx_path), img, "-o", str(tmp_path / "o.npy"), "-q"]) == 0
    assert seen == [8] and Image.core.get_blocks_max() == before
