"""Gallery and exact search: brute-force references, save/load, model checks, editing."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from isfe_model import Encoder, Gallery, GalleryError, ImageError
from isfe_model import gallery as gallery_mod
from isfe_model.search import FaissIndex, faiss_available, topk_inner_product
from tests.helpers_models import EMBED_DIM, make_image_folder, with_props


def brute_force(gallery: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The obviously-correct twin: all scores in float64, stable sort (ties -> lower index)."""
    s = queries.astype(np.float64) @ gallery.astype(np.float64).T
    idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, idx, 1), idx


def _unit(rng, n, d, dtype=np.float32):
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(dtype)


def _items(n, prefix="x"):
    return [{"id": f"{prefix}{i}", "label": ["a", "b", None][i % 3], "metadata": {"i": i}} for i in range(n)]


# --------------------------------------------------------------------------- search kernel


@pytest.mark.parametrize("n,q,k,chunk", [(1, 1, 1, None), (50, 3, 5, 7), (1000, 17, 10, 64), (1000, 5, 1000, 100),
                                         (999, 4, 1500, 128), (300, 2, 3, 1), (5000, 40, 20, None),
                                         (500, 1, 7, None), (2000, 1, 10, None), (5000, 1, 10, 700),
                                         (40000, 1, 5, None)])
def test_topk_equals_brute_force_on_integer_data_with_ties(n, q, k, chunk):
    """Integer-valued vectors: float32 dot products are exact, so ties are real and must go to the lower index."""
    rng = np.random.default_rng(n + q + k)
    g = rng.integers(-2, 3, (n, 8)).astype(np.float32)
    qs = rng.integers(-2, 3, (q, 8)).astype(np.float32)
    s, i = topk_inner_product(g, qs, k, chunk_rows=chunk)
    rs, ri = brute_force(g, qs, min(k, n))
    assert s.dtype == np.float32 and i.dtype == np.int64
    assert np.array_equal(i, ri)
    assert np.array_equal(s, rs.astype(np.float32))


def test_topk_on_unit_float_data_matches_brute_force():
    rng = np.random.default_rng(0)
    g = _unit(rng, 20000, 64)
    qs = _unit(rng, 30, 64)
    for chunk in (None, 1000, 4096):
        s, i = topk_inner_product(g, qs, 10, chunk_rows=chunk)
        rs, ri = brute_force(g, qs, 10)
        assert np.array_equal(i, ri)
        assert np.allclose(s, rs, atol=1e-6)


def test_block_selection_paths_equal_a_stable_sort():
    """Both selection paths of one chunk: threshold filter (+ floor) and argpartition (the tie fallback)."""
    from isfe_model.search import _block_topk, _block_topk_partition

    rng = np.random.default_rng(7)
    for trial in range(20):
        q, c, k = int(rng.integers(1, 9)), int(rng.integers(12, 3000)), int(rng.integers(1, 11))
        ties = trial % 2 == 0
        s = (rng.integers(0, 6, (q, c)) if ties else rng.standard_normal((q, c))).astype(np.float32)
        ref = np.argsort(-s, axis=1, kind="stable")[:, :k]
        for fn in (_block_topk, _block_topk_partition):
            vals, cols = fn(s, k)
            order = np.lexsort((cols, -vals), axis=-1)
            assert np.array_equal(np.take_along_axis(cols, order, 1), ref), (fn.__name__, q, c, k)
        floor = np.take_along_axis(s, ref, 1)[:, -1] + np.where(np.arange(q) % 2 == 0, 0.5, 0.0).astype(np.float32)
        vals, cols = _block_topk(s, k, floor)  # a floor above the k-th best leaves fewer candidates: padded with -inf
        for r in range(q):
            got = [int(cc) for v, cc in sorted(zip(vals[r], cols[r]), key=lambda t: (-t[0], t[1])) if np.isfinite(v)]
            assert got == [int(j) for j in ref[r] if s[r, j] >= floor[r]]


def test_topk_float16_gallery(monkeypatch):
    import isfe_model.search as search_mod

    rng = np.random.default_rng(1)
    g = _unit(rng, 3000, 32, np.float16)
    qs = _unit(rng, 5, 32)
    for convert_bytes in (search_mod.CONVERT_BYTES, 4 * 32 * 100):  # one conversion piece, or many of 100 rows
        monkeypatch.setattr(search_mod, "CONVERT_BYTES", convert_bytes)
        for q, chunk in ((qs, 512), (qs, None), (qs[:1], None), (qs[:1], 700)):
            s, i = topk_inner_product(g, q, 7, chunk_rows=chunk)
            rs, ri = brute_force(g.astype(np.float32), q, 7)
            assert np.array_equal(i, ri) and np.allclose(s, rs, atol=1e-5)


def test_topk_empty_cases():
    g = np.zeros((0, 4), np.float32)
    s, i = topk_inner_product(g, np.ones((3, 4), np.float32), 5)
    assert s.shape == (3, 0) and i.shape == (3, 0)
    s, i = topk_inner_product(np.ones((4, 4), np.float32), np.ones((0, 4), np.float32), 5)
    assert s.shape == (0, 4)


@pytest.mark.skipif(not faiss_available(), reason="faiss is not installed (pip install 'isfe-model[faiss]')")
def test_faiss_backend_matches_numpy():
    rng = np.random.default_rng(2)
    g = _unit(rng, 5000, 48)
    qs = _unit(rng, 20, 48)
    fs, fi = FaissIndex(g).search(qs, 10)
    ns, ni = topk_inner_product(g, qs, 10)
    assert np.array_equal(fi, ni) and np.allclose(fs, ns, atol=1e-5)
    gal = Gallery(g, _items(5000), {"dim": 48, "fingerprint": "f"}, backend="faiss")
    r = gal.search(qs, 10)
    assert np.array_equal(r.indices, ni)
    gal.remove(["x0", "x1"])
    gal.add(g[:1], [{"id": "again", "label": None}])
    r = gal.search(qs, 10)
    ref = Gallery(np.concatenate([g[2:], g[:1]]), _items(5000)[2:] + [{"id": "again", "label": None}],
                  {"dim": 48, "fingerprint": "f"})
    assert np.array_equal(r.indices, ref.search(qs, 10).indices)


# --------------------------------------------------------------------------- Gallery in memory


def test_gallery_search_hits_and_validation():
    rng = np.random.default_rng(3)
    g = _unit(rng, 100, 16)
    gal = Gallery(g, _items(100), {"dim": 16, "fingerprint": "abc"})
    r = gal.search(g[7], k=3)  # one query as [D]
    assert r.indices.shape == (1, 3) and r.indices[0, 0] == 7
    hits = r.hits(0)
    assert hits[0] == {"rank": 1, "id": "x7", "score": pytest.approx(1.0, abs=1e-6), "label": "b", "metadata": {"i": 7}}
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert gal.search(g[:2], k=500).indices.shape == (2, 100)  # k clipped to the gallery
    with pytest.raises(GalleryError, match="dimension 8"):
        gal.search(np.zeros((1, 8), np.float32))
    with pytest.raises(GalleryError, match="k must be"):
        gal.search(g[0], k=0)
    with pytest.raises(GalleryError, match="NaN"):
        gal.search(np.full(16, np.nan, np.float32))
    with pytest.raises(GalleryError, match="twice"):
        Gallery(g[:2], [{"id": "same"}, {"id": "same"}], {"dim": 16})
    with pytest.raises(GalleryError, match="2 embeddings but 1 items"):
        Gallery(g[:2], [{"id": "one"}], {"dim": 16})
    with pytest.raises(GalleryError, match="NaN"):
        Gallery(np.full((1, 16), np.nan, np.float32), [{"id": "n"}], {"dim": 16})
    with pytest.raises(GalleryError, match="float32 or float16"):
        Gallery(np.zeros((1, 16), np.int32), [{"id": "n"}], {"dim": 16})


def test_add_and_remove_keep_search_exact():
    rng = np.random.default_rng(4)
    g = _unit(rng, 200, 16)
    gal = Gallery(g[:150], _items(150), {"dim": 16, "fingerprint": "f"})
    gal.add(g[150:], _items(50, prefix="new"))
    assert len(gal) == 200 and gal.manifest["count"] == 200
    with pytest.raises(GalleryError, match="already in the gallery"):
        gal.add(g[:1], [{"id": "x3"}])
    with pytest.raises(GalleryError, match="dimension"):
        gal.add(np.zeros((1, 8), np.float32), [{"id": "z"}])
    assert gal.remove(["x0", "x5", "new3", "not-there"]) == 3
    assert gal.remove("x0") == 0
    assert len(gal) == 197 and "x5" not in gal and "x6" in gal
    keep = [i for i in range(200) if i not in (0, 5, 153)]
    ref_g = g[keep]
    qs = _unit(rng, 6, 16)
    r = gal.search(qs, 10)
    _, ri = brute_force(ref_g, qs, 10)
    assert np.array_equal(r.indices, ri)
    assert [r.items[j]["id"] for j in r.indices[0]] == [gal.ids[j] for j in ri[0]]


def test_concurrent_searches_and_edits():
    rng = np.random.default_rng(5)
    g = _unit(rng, 2000, 16)
    gal = Gallery(g, _items(2000), {"dim": 16, "fingerprint": "f"})
    qs = _unit(rng, 4, 16)
    errors: list[BaseException] = []

    def searcher():
        try:
            for _ in range(30):
                r = gal.search(qs, 5)
                for row in range(4):
                    for h in r.hits(row):
                        assert h["id"].startswith(("x", "new"))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=searcher) for _ in range(3)]
    for t in threads:
        t.start()
    for n in range(30):
        gal.add(_unit(rng, 1, 16), [{"id": f"new{n}"}])
        gal.remove([f"x{n}"])
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert len(gal) == 2000


# --------------------------------------------------------------------------- with a real model


@pytest.fixture()
def photos(tmp_path):
    root = tmp_path / "photos"
    make_image_folder(root, {"cat": 3, "dog": 3})
    make_image_folder(root, {"": 1}, seed=50)  # one image directly in the root (no label)
    (root / ".hidden.jpg").write_bytes(b"ignored")
    (root / ".thumbs").mkdir()
    (root / ".thumbs" / "x.jpg").write_bytes(b"ignored")
    return root


def test_build_from_folder_ids_labels_and_bad_files(enc, photos):
    gal = Gallery.build(enc, photos)
    assert gal.ids == [
        "000.png", "cat/000.png", "cat/001.jpg", "cat/002.png", "dog/000.png", "dog/001.jpg", "dog/002.png"
    ]
    assert gal.labels == [None, "cat", "cat", "cat", "dog", "dog", "dog"]
    assert gal.dim == EMBED_DIM and gal.fingerprint == enc.fingerprint
    assert np.allclose(gal.embeddings, enc.embed([photos / i for i in gal.ids]), atol=1e-6)
    (photos / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    (photos / "readme.txt").write_text("not an image")
    with pytest.raises(ImageError, match="broken.jpg"):
        Gallery.build(enc, photos)
    gal = Gallery.build(enc, photos, skip_bad=True, metadata={"cat/000.png": {"note": "first"}})
    assert len(gal) == 7
    assert sorted(Path(s["path"]).name for s in gal.manifest["skipped"]) == ["broken.jpg", "readme.txt"]
    assert all(s["reason"] for s in gal.manifest["skipped"])
    assert gal.items[1]["metadata"] == {"note": "first"}


def test_build_from_list_and_errors(enc, photos, tmp_path):
    files = [photos / "dog" / "001.jpg", photos / "cat" / "000.png"]
    gal = Gallery.build(enc, files)
    assert gal.ids == ["dog/001.jpg", "cat/000.png"] and gal.labels == ["dog", "cat"]
    with pytest.raises(GalleryError, match="no such folder"):
        Gallery.build(enc, tmp_path / "none")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(GalleryError, match="holds no files"):
        Gallery.build(enc, tmp_path / "emptydir")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("x")
    with pytest.raises(GalleryError, match="none of the 1 files"):
        Gallery.build(enc, tmp_path / "junk", skip_bad=True)
    with pytest.raises(GalleryError, match="twice"):
        Gallery.build(enc, [files[0], files[0]])


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_save_load_round_trip(enc, photos, tmp_path, dtype):
    gal = Gallery.build(enc, photos, dtype=dtype)
    out = gal.save(tmp_path / "gal")
    assert sorted(p.name for p in out.iterdir()) == ["embeddings.npy", "items.jsonl", "manifest.json"]
    raw = np.load(out / "embeddings.npy", allow_pickle=False)
    assert raw.dtype == np.dtype(dtype) and raw.shape == (7, EMBED_DIM)
    m = json.loads((out / "manifest.json").read_text())
    for key in ("model_sha256", "fingerprint", "dim", "dtype", "count", "created", "skipped", "isfe_model_version"):
        assert key in m, key
    assert m["model_sha256"] == enc.model_sha256 and m["dim"] == EMBED_DIM and m["count"] == 7 and m["dtype"] == dtype
    for mmap in (False, True):
        back = Gallery.load(out, encoder=enc, mmap=mmap)
        assert back.ids == gal.ids and back.labels == gal.labels and back.items == gal.items
        assert back.dtype == dtype and np.array_equal(np.asarray(back.embeddings), np.asarray(gal.embeddings))
        q = enc.embed(photos / "cat" / "001.jpg")
        assert np.array_equal(back.search(q, 3).indices, gal.search(q, 3).indices)
        assert back.search(q, 1).hits()[0]["id"] == "cat/001.jpg"
    # editing a memory-mapped gallery and saving it again
    back = Gallery.load(out, encoder=enc, mmap=True)
    back.remove(["000.png"])
    back.save(out, overwrite=True)
    assert len(Gallery.load(out, encoder=enc)) == 6


def test_load_refuses_another_model_and_damaged_folders(enc, model, photos, tmp_path):
    out = Gallery.build(enc, photos).save(tmp_path / "gal")
    other = Encoder(with_props(model.onnx_path, tmp_path / "other.onnx", checkpoint_sha256="f" * 64))
    with pytest.raises(GalleryError, match="built with another model"):
        Gallery.load(out, encoder=other)

    class Dim16:
        dim = 16
        fingerprint = enc.fingerprint

    with pytest.raises(GalleryError, match="32-d embeddings but the model makes 16-d"):
        Gallery.load(out, encoder=Dim16())
    Gallery.load(out)  # without an encoder: no model check

    def damaged(name: str, edit) -> Path:
        d = tmp_path / name
        d.mkdir()
        for f in out.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        edit(d)
        return d

    cases = {
        "no_manifest": (lambda d: (d / "manifest.json").unlink(), "lacks manifest.json"),
        "bad_json": (lambda d: (d / "manifest.json").write_text("{not json"), "unreadable"),
        "not_gallery": (lambda d: (d / "manifest.json").write_text('{"format": "other"}'), "not an ISFE gallery"),
        "truncated_npy": (lambda d: (d / "embeddings.npy").write_bytes((d / "embeddings.npy").read_bytes()[:200]),
                          "damaged"),
        "pickle_npy": (lambda d: np.save(d / "embeddings.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True),
                       "damaged|not a plain"),
        "wrong_rows": (lambda d: np.save(d / "embeddings.npy", np.zeros((3, EMBED_DIM), np.float32)), "manifest says"),
        "int_npy": (lambda d: np.save(d / "embeddings.npy", np.zeros((7, EMBED_DIM), np.int64)), "expected float32"),
        "few_items": (lambda d: (d / "items.jsonl").write_text('{"id": "a", "label": null, "metadata": {}}\n'),
                      "1 items for 7"),
        "bad_item": (lambda d: (d / "items.jsonl").write_text("nope\n" * 7), "line 1 is unreadable"),
        "dup_ids": (lambda d: (d / "items.jsonl").write_text('{"id": "a"}\n' * 7), "twice"),
        "npy_folder": (lambda d: ((d / "embeddings.npy").unlink(), (d / "embeddings.npy").mkdir()),
                       r"embeddings\.npy is not a regular file \(a folder, device or pipe\); the gallery is damaged"),
    }
    if Path("/dev/zero").exists():  # a link to a device is there, but is no file: not "lacks embeddings.npy"
        def to_device(d: Path) -> None:
            (d / "embeddings.npy").unlink()
            (d / "embeddings.npy").symlink_to("/dev/zero")

        cases["npy_device"] = (to_device, r"embeddings\.npy is not a regular file")
    for name, (edit, msg) in cases.items():
        with pytest.raises(GalleryError, match=msg):
            Gallery.load(damaged(name, edit))
    with pytest.raises(GalleryError, match="no such folder"):
        Gallery.load(tmp_path / "missing")


def test_save_refuses_to_clobber_and_is_atomic(enc, photos, tmp_path, monkeypatch):
    gal = Gallery.build(enc, photos)
    out = gal.save(tmp_path / "gal")
    with pytest.raises(GalleryError, match="--overwrite"):
        gal.save(out)
    other = tmp_path / "documents"
    other.mkdir()
    (other / "thesis.txt").write_text("precious")
    with pytest.raises(GalleryError, match="not an ISFE gallery"):
        gal.save(other, overwrite=True)
    assert (other / "thesis.txt").read_text() == "precious"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(GalleryError, match="not a folder"):
        gal.save(tmp_path / "afile", overwrite=True)
    (tmp_path / "emptydir").mkdir()
    gal.save(tmp_path / "emptydir")  # an empty folder is filled
    # a failure half-way leaves the old gallery untouched and no temporary folder behind
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    gal.remove(["000.png"])

    def boom(path, arr):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gallery_mod, "atomic_save_npy", boom)
    with pytest.raises(OSError, match="No space"):
        gal.save(out, overwrite=True)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    monkeypatch.undo()
    gal.save(out, overwrite=True)
    assert len(Gallery.load(out)) == 6


def test_search_bench_runs_and_reports(tmp_path):
    """benchmarks/search_bench.py on tiny galleries: the JSON it writes, and that numpy and FAISS agree."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "search_bench", Path(__file__).resolve().parents[1] / "benchmarks" / "search_bench.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    assert bench.main(
        ["--sizes", "300,1200", "--reps", "1", "--batch", "8", "--threads", "default", "--out", str(out)]
    ) == 0
    doc = json.loads(out.read_text())
    assert doc["device"].startswith("cpu") and [r["gallery_size"] for r in doc["results"]] == [300, 1200]
    res = doc["results"][1]["by_threads"]["default"]
    assert res["numpy"]["single_query_qps"] > 0 and res["numpy"]["batch_qps"] > 0
    if doc["faiss_installed"]:
        assert doc["results"][1]["faiss_topk_rows_identical_to_numpy"] == 1.0
        assert doc["goal"]["worst_ratio"] is not None


# --------------------------------------------------------------------------- hostile items, files and rows


def _deep(levels: int) -> str:
    return "[" * levels + "]" * levels


def test_items_must_be_strict_json():
    """NaN/inf, sets, bytes, non-str keys, deep nesting, broken text: refused by add/build/constructor,
    naming the item."""
    rng = np.random.default_rng(8)
    g = _unit(rng, 3, 16)
    gal = Gallery(g[:1], _items(1), {"dim": 16, "fingerprint": "f"})
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    bad = {
        "nan": ({"score": float("nan")}, r"metadata\['score'\] is nan"),
        "inf": ({"a": [1, float("-inf")]}, r"metadata\['a'\]\[1\] is -inf"),
        "np_inf": ({"s": np.float64("inf")}, "is inf"),
        "set": ({"tags": {"a", "b"}}, r"metadata\['tags'\] is .* \(type set\)"),
        "bytes": ({"raw": b"\x00"}, r"is b'\\x00' \(type bytes\)"),
        "np_int": ({"n": np.int64(3)}, r"\(type int64\)"),
        "int_key": ({1: "one"}, "key 1 \\(int\\); JSON object keys are strings"),
        "deep": ({"d": deep}, "nested more than 100 levels"),
        "surrogate": ({"name": "caf\udce9"}, "not valid Unicode"),
        "huge_int": ({"n": 10 ** 5000}, "cannot be written as JSON"),
    }
    for item_id, (meta, msg) in bad.items():
        with pytest.raises(GalleryError, match=msg) as info:
            gal.add(g[1], [{"id": item_id, "label": None, "metadata": meta}])
        assert repr(item_id) in str(info.value) and "JSON" in str(info.value)
    with pytest.raises(GalleryError, match=r"item 'caf\\udce9\.jpg': its id is text that is not valid Unicode"):
        gal.add(g[1], [{"id": "caf\udce9.jpg"}])
    with pytest.raises(GalleryError, match="its label is text"):
        gal.add(g[1], [{"id": "ok", "label": "\ud800"}])
    with pytest.raises(GalleryError, match="is nan"):
        Gallery(g[:1], [{"id": "n", "metadata": {"v": float("nan")}}], {"dim": 16})
    with pytest.raises(GalleryError, match=r"manifest\['x'\] is nan"):
        Gallery(g[:1], [{"id": "n"}], {"dim": 16, "x": float("nan")})
    assert gal.ids == ["x0"]  # nothing half-added
    # accepted metadata is copied as JSON: a later change by the caller does not reach the gallery,
    # and tuples are lists already (as after a save/load round trip)
    meta = {"tags": ("a", "b"), "nested": {"k": [1, 2.5, None, True]}}
    gal.add(g[1], [{"id": "good", "label": "l", "metadata": meta}])
    meta["nested"]["k"].append(float("nan"))
    assert gal.items[1]["metadata"] == {"tags": ["a", "b"], "nested": {"k": [1, 2.5, None, True]}}
    json.dumps(gal.search(g[1], 2).hits(0), allow_nan=False)


def test_build_refuses_metadata_that_is_not_json(enc, photos):
    with pytest.raises(GalleryError, match=r"item 'cat/000\.png': metadata\['v'\] is nan"):
        Gallery.build(enc, photos, metadata={"cat/000.png": {"v": float("nan")}})
    with pytest.raises(GalleryError, match=r"metadata\['s'\] is \{1\} \(type set\)"):
        Gallery.build(enc, photos, metadata={"dog/001.jpg": {"s": {1}}})

    # a file name that is not UTF-8 cannot be an id (it could not be saved): named, with the fix,
    # before anything is embedded; with skip_bad it is skipped and listed with an escape
    import os

    name = os.fsdecode(b"caf\xe9.png")
    try:
        (photos / "cat" / name).write_bytes((photos / "cat" / "000.png").read_bytes())
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses non-UTF-8 file names")
    with pytest.raises(GalleryError,
                       match=r"item 'cat/caf\\udce9\.png': its id is text that is not valid Unicode.*rename"):
        Gallery.build(enc, photos)
    gal = Gallery.build(enc, photos, skip_bad=True)  # skip_bad: skipped (and listed) like a bad image
    assert len(gal) == 7 and [Path(s["path"]).name for s in gal.manifest["skipped"]] == ["caf\\xe9.png"]
    assert "not valid UTF-8" in gal.manifest["skipped"][0]["reason"]
    assert Gallery.load(gal.save(photos.parent / "gal")).manifest["skipped"] == gal.manifest["skipped"]


def _gallery_copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_load_refuses_items_and_manifests_that_are_not_json(enc, photos, tmp_path):
    out = Gallery.build(enc, photos).save(tmp_path / "gal")
    lines = (out / "items.jsonl").read_text().splitlines()
    manifest = json.loads((out / "manifest.json").read_text())

    def with_line(name: str, line: str) -> Path:
        d = _gallery_copy(out, tmp_path / name)
        (d / "items.jsonl").write_text("\n".join(lines[:2] + [line] + lines[3:]) + "\n")
        return d

    cases = {
        "nan": ('{"id": "n", "label": null, "metadata": {"score": NaN}}',
                r"line 3 is unreadable \(NaN is not valid JSON"),
        "inf_literal": ('{"id": "n", "label": null, "metadata": {"score": 1e999}}',
                        r"item 'n': metadata\['score'\] is inf"),
        "deep_metadata": ('{"id": "n", "metadata": {"d": ' + _deep(100_000) + "}}", "line 3 is nested too deeply"),
        "deep_item": (_deep(100_000), "line 3 is nested too deeply"),
        "deep_but_parseable": ('{"id": "n", "metadata": {"d": ' + _deep(300) + "}}", "nested more than 100 levels"),
        "surrogate": ('{"id": "\\udce9", "metadata": {}}', "not valid Unicode"),
    }
    for name, (line, msg) in cases.items():
        with pytest.raises(GalleryError, match=msg) as info:
            Gallery.load(with_line(name, line))
        assert "items.jsonl" in str(info.value) and str(tmp_path / name) in str(info.value), name

    def with_manifest(name: str, text: str) -> Path:
        d = _gallery_copy(out, tmp_path / name)
        (d / "manifest.json").write_text(text)
        return d

    m_cases = {
        "m_deep": (json.dumps({**manifest, "extra": 0})[:-1] + ', "deep": ' + _deep(100_000) + "}",
                   "nested too deeply"),
        "m_nan": (json.dumps({**manifest, "extra": float("nan")}), "NaN is not valid JSON"),
        "m_dim_str": (json.dumps({**manifest, "dim": str(manifest["dim"])}),
                      r"has dim '32' \(str\); it must be an integer >= 1"),
        "m_count_float": (json.dumps({**manifest, "count": 7.0}), r"has count 7\.0 \(float\); it must be an integer"),
        "m_version_str": (json.dumps({**manifest, "format_version": "1"}),
                          r"format_version '1' \(str\); it must be an integer"),
        "m_fingerprint": (json.dumps({**manifest, "fingerprint": None}), "fingerprint None; it must be a string"),
    }
    for name, (text, msg) in m_cases.items():
        with pytest.raises(GalleryError, match=msg) as info:
            Gallery.load(with_manifest(name, text))
        assert "manifest.json" in str(info.value), name
    with pytest.raises(GalleryError, match="format version 2 is not supported"):
        Gallery.load(with_manifest("m_v2", json.dumps({**manifest, "format_version": 2})))


def test_load_checks_the_npy_header_before_reading(enc, photos, tmp_path):
    """A header claiming 10**11 rows must not reach np.load (MemoryError); nor a manifest claiming them."""
    out = Gallery.build(enc, photos).save(tmp_path / "gal")
    manifest = json.loads((out / "manifest.json").read_text())

    def with_header(name: str, shape, descr="<f4", data=b"\0" * 64) -> Path:
        d = _gallery_copy(out, tmp_path / name)
        with open(d / "embeddings.npy", "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": descr, "fortran_order": False, "shape": shape})
            f.write(data)
        return d

    huge = with_header("huge", (10 ** 11, EMBED_DIM))
    for mmap in (False, True):
        with pytest.raises(GalleryError,
                           match=r"embeddings\.npy is damaged: its header says 100000000000 x 32 float32"):
            Gallery.load(huge, mmap=mmap)
    m = _gallery_copy(out, tmp_path / "huge_manifest")
    (m / "manifest.json").write_text(json.dumps({**manifest, "count": 10 ** 11}))
    with pytest.raises(GalleryError, match=r"is 7 x 32 but the manifest says 100000000000 x 32"):
        Gallery.load(m, mmap=False)
    with pytest.raises(GalleryError, match="holds Python objects|damaged"):
        Gallery.load(with_header("objects", (1,), descr="|O"))
    with pytest.raises(GalleryError, match=r"header says 7 x 32 float32 \(896 bytes of data\) but the file holds 64"):
        Gallery.load(with_header("short", (7, EMBED_DIM)))
    junk = _gallery_copy(out, tmp_path / "junk")
    (junk / "embeddings.npy").write_bytes(b"\x93NUMPY\x01\x00\x10\x00{'descr': [[[[[")
    with pytest.raises(GalleryError, match=r"embeddings\.npy is damaged or not a plain \.npy"):
        Gallery.load(junk)


def test_rows_must_be_unit_vectors(enc, photos, tmp_path):
    rng = np.random.default_rng(9)
    g = _unit(rng, 4, 16)
    gal = Gallery(g[:1], _items(1), {"dim": 16, "fingerprint": "f"})
    for rows, norm in ((g[1:2] * 1000, "1000"), (np.zeros((1, 16), np.float32), "0"), (g[1:3] * 0.99, "0.99")):
        with pytest.raises(GalleryError, match=rf"add: row 0 has L2 norm {norm}\b.*Encoder\.embed"):
            gal.add(rows, [{"id": f"r{i}"} for i in range(len(rows))])
    with pytest.raises(GalleryError, match="row 1 has L2 norm 2"):
        Gallery(np.stack([g[0], 2 * g[1]]), _items(2), {"dim": 16})
    assert len(gal) == 1
    # float16 storage (or float16 input) rounds unit rows by up to ~5e-4 of norm: still accepted
    half = Gallery(g[:1].astype(np.float16), _items(1), {"dim": 16})
    big = _unit(rng, 2000, 512)
    half16 = Gallery(np.zeros((0, 512), np.float16), [], {"dim": 512})
    half16.add(big, _items(2000))
    half16.add(big.astype(np.float16), _items(2000, prefix="h"))
    assert np.abs(np.linalg.norm(half16.embeddings.astype(np.float64), axis=1) - 1).max() < 1e-3
    half.add(g[1:] * np.float32(1 + 2e-4), _items(3, prefix="n"))
    assert len(half) == 4
    # a saved gallery whose rows are not unit (edited, or written by something else) is refused on load
    out = Gallery.build(enc, photos).save(tmp_path / "gal")
    np.save(out / "embeddings.npy", np.load(out / "embeddings.npy") * 3)
    with pytest.raises(GalleryError, match=r"embeddings\.npy: row 0 has L2 norm 3.*rebuild"):
        Gallery.load(out)
