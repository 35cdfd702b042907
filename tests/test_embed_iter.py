"""Encoder.embed_iter: streaming in bounded memory, decode threads, and isfe-index on it (issue 18 items 2-3)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from isfe_model import Encoder, Gallery, ImageError
from isfe_model.cli import index_main
from isfe_model.encoder import default_decode_threads
from tests.helpers_models import EMBED_DIM, make_image_folder

ROOT = Path(__file__).resolve().parents[1]


def _arrays(n: int, side: int = 24, seed: int = 0):
    """A generator of ``n`` seeded uint8 [side, side + 4, 3] images (nothing is kept)."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield rng.integers(0, 256, size=(side, side + 4, 3), dtype=np.uint8)


def test_embed_iter_on_a_generator_equals_embed_on_the_list(enc):
    listed = list(_arrays(1000))
    ref = enc.embed(listed, batch_size=64)
    idx, rows = [], []
    for i, v in enc.embed_iter(_arrays(1000), batch_size=64):
        assert i.dtype == np.int64 and v.shape == (len(i), EMBED_DIM) and v.dtype == np.float32
        idx.append(i)
        rows.append(v)
    assert np.array_equal(np.concatenate(idx), np.arange(1000))
    np.testing.assert_allclose(np.concatenate(rows), ref, atol=1e-6)
    # one thread (no pool) and other batch sizes: the same rows
    one = np.concatenate([v for _, v in enc.embed_iter(iter(listed[:100]), batch_size=7, decode_threads=1)])
    np.testing.assert_allclose(one, ref[:100], atol=1e-5)
    assert enc.embed(iter(listed[:5])).shape == (5, EMBED_DIM)  # embed takes any iterable too


def test_the_generator_is_consumed_a_bounded_way_ahead(enc):
    taken = 0

    def counted():
        nonlocal taken
        for a in _arrays(10_000):
            taken += 1
            yield a

    stream = enc.embed_iter(counted(), batch_size=8, decode_threads=2)
    next(stream)
    assert taken <= 8 + 8 + 8  # the batch run, the next one decoding (batch + max(batch, 2 x threads)), no more
    stream.close()  # stops early: queued decodes cancelled, threads gone
    time.sleep(0.1)
    assert not [t for t in threading.enumerate() if t.name.startswith("isfe-decode")]
    assert taken < 100


def _peak(enc, n: int, side: int = 128) -> int:
    tracemalloc.start()
    try:
        for _ in enc.embed_iter(_arrays(n, side), batch_size=16, decode_threads=2):
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_number_of_inputs(enc):
    """tracemalloc peak (numpy buffers of the inputs and the decoded images) over 150 vs 600 images of 49 KB."""
    _peak(enc, 20)  # warm-up (ONNX Runtime's first run, thread start-up)
    small, large = _peak(enc, 150), _peak(enc, 600)
    held_all = 600 * 128 * 132 * 3  # what keeping every input would cost: 30 MB
    assert large < 1.25 * small + (1 << 20), (small, large)
    assert large < held_all / 4, (large, held_all)


def test_bad_inputs_in_a_stream_keep_their_named_errors(enc):
    def stream():
        for n, a in enumerate(_arrays(20)):
            yield b"12345" if n == 13 else a

    with pytest.raises(ImageError, match=r"input #13 \(5 bytes\)"):
        for _ in enc.embed_iter(stream(), batch_size=4):
            pass
    bad: list[tuple[int, ImageError]] = []
    got = [i for i, _ in enc.embed_iter(stream(), batch_size=4, on_error=lambda i, e: bad.append((i, e)))]
    assert np.array_equal(np.concatenate(got), np.delete(np.arange(20), 13))
    assert [i for i, _ in bad] == [13] and bad[0][1].kind == "not_an_image"
    emb, kept, errors = enc.embed_partial(stream(), batch_size=4)
    assert emb.shape == (19, EMBED_DIM) and kept == [i for i in range(20) if i != 13] and len(errors) == 1


def test_decode_threads_parameter(model):
    assert Encoder(model.onnx_path).decode_threads == default_decode_threads() == len(os.sched_getaffinity(0))
    e = Encoder(model.onnx_path, decode_threads=3, threads=1)
    assert e.decode_threads == 3 and e.workers == 3 and e.threads == 1  # ONNX Runtime's threads stay separate
    assert Encoder(model.onnx_path, workers=2).decode_threads == 2  # the former name
    for bad in ({"decode_threads": 0}, {"workers": 1, "decode_threads": 2}):
        with pytest.raises(ValueError, match="decode_threads"):
            Encoder(model.onnx_path, **bad)
    with pytest.raises(ValueError, match="decode_threads"):
        e.embed_iter([], decode_threads=0)
    assert Encoder(model.onnx_path).info()["decode_threads"] == default_decode_threads()


def test_gallery_build_and_index_stream_with_decode_threads(model, enc, tmp_path, capsys):
    photos = tmp_path / "photos"
    make_image_folder(photos, {"cat": 5, "dog": 4})
    (photos / "dog" / "page.jpg").write_bytes(b"<html></html>")
    gal = Gallery.build(enc, photos, skip_bad=True, decode_threads=2, batch_size=3)
    ids = sorted(p.relative_to(photos).as_posix() for p in photos.rglob("*.*") if p.name != "page.jpg")
    assert gal.ids == ids and gal.embeddings.shape == (9, EMBED_DIM)
    np.testing.assert_allclose(gal.embeddings, enc.embed([photos / i for i in ids]), atol=1e-6)
    out = tmp_path / "gal"
    assert index_main([str(model.onnx_path), str(photos), "-o", str(out), "--skip-bad", "--decode-threads", "2",
                       "--batch-size", "4"]) == 0
    cap = capsys.readouterr()
    assert "skipped 1 file(s)" in cap.err and "page.jpg" in cap.err and "HTML" in cap.err
    assert json.loads((out / "manifest.json").read_text())["count"] == 9
    assert index_main([str(model.onnx_path), str(photos), "-o", str(tmp_path / "g2"), "--decode-threads", "0"]) == 2


def test_ctrl_c_leaves_no_partial_gallery(model, tmp_path):
    """SIGINT in the middle of isfe-index --overwrite: exit 130, the old gallery intact, nothing else written."""
    from PIL import Image

    from tests.helpers_models import photo

    folder = tmp_path / "many"
    folder.mkdir()
    big = folder / "0000.jpg"
    Image.fromarray(photo(1600, 1200, seed=1)).save(big, quality=90)
    for n in range(1, 400):
        os.link(big, folder / f"{n:04d}.jpg")  # 400 files; one full decode each (~20-40 ms)
    out = tmp_path / "gallery"
    few = tmp_path / "few"
    make_image_folder(few, {"a": 2})
    assert index_main([str(model.onnx_path), str(few), "-o", str(out), "-q"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    listing = sorted(p.name for p in tmp_path.iterdir())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "isfe_model", "index", str(model.onnx_path), str(folder), "-o",
                             str(out), "--overwrite", "--progress", "--batch-size", "2", "--decode-threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stderr.readline()
        while line and "indexing" not in line:  # the first progress line: embedding has started
            line = proc.stderr.readline()
        assert "indexing" in line, line
        proc.send_signal(signal.SIGINT)
        out_text, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, (proc.returncode, err)
    assert "interrupted" in err and "Traceback" not in err and "indexed" not in out_text
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old gallery, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == listing  # no temporary or partial folder left
    assert len(Gallery.load(out)) == 2
