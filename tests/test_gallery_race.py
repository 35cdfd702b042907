"""Readers racing writers: a gallery loaded while ``save(overwrite=True)`` replaces it is the old or the new one, whole.

Every version of the test gallery encodes itself: row ``i`` of version ``v`` is the unit vector
along ``(v + 1, i + 1, 1, 0, ...)``, its id is ``"v{v}/{i}"`` and the manifest says ``writer_version: v``.
A load that pairs ids with another version's rows (or the manifest with other files) is caught by
decoding every row.  All versions have the same row count and dimension, so no count or shape check
can hide a torn read: only a real snapshot (or a checksum) can.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import isfe_model.atomic as atomic
import isfe_model.gallery as gallery_mod
from isfe_model import Gallery, GalleryError

ROWS, DIM = 48, 8


def _version(v: int) -> Gallery:
    raw = np.zeros((ROWS, DIM), np.float64)
    raw[:, 0], raw[:, 1], raw[:, 2] = v + 1, np.arange(ROWS) + 1, 1.0
    emb = (raw / np.linalg.norm(raw, axis=1, keepdims=True)).astype(np.float32)
    items = [{"id": f"v{v}/{i}", "label": f"v{v}", "metadata": {"row": i}} for i in range(ROWS)]
    return Gallery(emb, items, {"dim": DIM, "fingerprint": "race", "writer_version": v})


def torn_rows(g: Gallery) -> int:
    """Rows whose id, metadata or manifest belong to another version than the row's embedding (0 = consistent)."""
    emb = np.asarray(g.embeddings, np.float64)
    ver = np.rint(emb[:, 0] / emb[:, 2]).astype(int) - 1
    row = np.rint(emb[:, 1] / emb[:, 2]).astype(int) - 1
    bad = 0
    for it, v, i in zip(g.items, ver, row, strict=True):
        if it["id"] != f"v{v}/{i}" or it["metadata"].get("row") != i or v != g.manifest.get("writer_version"):
            bad += 1
    return bad + abs(len(g) - ROWS)


def race(folder: Path, seconds: float = 30.0, loads: int = 600, saves: int = 40, writers: int = 2,
         readers: int = 3) -> dict:
    """Writers replace ``folder`` with alternating versions while readers load it; counts what the readers saw.

    Runs until at least ``loads`` loads and ``saves`` saves have happened, or ``seconds`` have passed (a cap for
    slow machines: in one full CI run a 2-core host reached only 147 loads in 8 s; the tests need 200).
    """
    versions = [_version(v) for v in range(4)]
    versions[0].save(folder)
    stop = threading.Event()
    lock = threading.Lock()
    seen = {"loads": 0, "ok": 0, "torn": 0, "changed": 0, "other": [], "saves": 0}

    def write(w: int) -> None:
        n = w
        while not stop.is_set():
            try:
                versions[n % len(versions)].save(folder, overwrite=True)
            except Exception as e:  # noqa: BLE001 - a failed save is a failure the test reports
                with lock:
                    seen["other"].append(f"writer: {type(e).__name__}: {e}")
                return
            n += writers
            with lock:
                seen["saves"] += 1

    def read() -> None:
        while not stop.is_set():
            try:
                g = Gallery.load(folder, mmap=bool(seen["loads"] % 2))
            except GalleryError as e:
                with lock:
                    seen["loads"] += 1
                    if "changed while it was read" in str(e):
                        seen["changed"] += 1
                    else:
                        seen["other"].append(str(e))
                continue
            except Exception as e:  # noqa: BLE001 - anything else is a failure the test reports
                with lock:
                    seen["loads"] += 1
                    seen["other"].append(f"{type(e).__name__}: {e}")
                continue
            bad = torn_rows(g)
            with lock:
                seen["loads"] += 1
                seen["ok"] += 1
                seen["torn"] += bad > 0

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    threads += [threading.Thread(target=read) for _ in range(readers)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and (seen["loads"] < loads or seen["saves"] < saves) and not seen["other"]:
        time.sleep(0.02)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    return seen


def test_versions_decode_themselves():
    """The checker itself: a consistent gallery has no torn rows; a gallery mixing two versions does."""
    a, b = _version(1), _version(2)
    assert torn_rows(a) == 0 and torn_rows(b) == 0
    mixed = Gallery(np.asarray(a.embeddings), b.items, a.manifest)  # ids of version 2 on rows of version 1
    assert torn_rows(mixed) == ROWS
    swapped = Gallery(np.asarray(a.embeddings)[::-1].copy(), a.items, a.manifest)  # rows paired with the wrong ids
    assert torn_rows(swapped) == ROWS


def test_readers_racing_writers_see_whole_galleries(tmp_path):
    seen = race(tmp_path / "gal")
    assert seen["other"] == [], seen["other"][:3]
    assert seen["torn"] == 0, f"{seen['torn']} of {seen['ok']} loads paired ids with the wrong embeddings"
    assert seen["saves"] >= 20 and seen["ok"] >= 200, seen  # the race really ran
    assert seen["changed"] <= seen["loads"] // 4, seen  # retries absorb nearly every overlap
    assert [p.name for p in tmp_path.iterdir()] == ["gal"]  # no temporary or old folders left behind
    assert torn_rows(Gallery.load(tmp_path / "gal")) == 0


@pytest.mark.parametrize("mmap", [False, True])
def test_a_file_changed_in_place_is_refused(tmp_path, mmap):
    """A writer that rewrites one file in place (not through save) cannot pass as a gallery: the checksums say so."""
    out = _version(1).save(tmp_path / "gal")
    emb = np.load(out / "embeddings.npy")
    np.save(out / "embeddings.npy", emb[::-1])  # valid rows, right shape: only the checksum can tell
    with pytest.raises(GalleryError, match=r"embeddings\.npy does not match the checksum in manifest\.json"):
        Gallery.load(out, mmap=mmap)
    _version(2).save(out, overwrite=True)
    lines = (out / "items.jsonl").read_text().splitlines()
    (out / "items.jsonl").write_text("\n".join(lines[1:] + lines[:1]) + "\n")  # rotated ids
    with pytest.raises(GalleryError, match=r"items\.jsonl does not match the checksum"):
        Gallery.load(out, mmap=mmap)


def test_readers_racing_writers_without_an_atomic_exchange(tmp_path, monkeypatch):
    """Where the system cannot exchange two folders (not Linux), save moves the old folder aside first: loads retry."""
    monkeypatch.setattr(atomic, "exchange_paths", lambda a, b: False)
    seen = race(tmp_path / "gal", loads=400, saves=30)
    assert seen["torn"] == 0 and seen["ok"] >= 200, seen
    assert not [e for e in seen["other"] if e.startswith("writer")], seen["other"][:3]
    assert [p.name for p in tmp_path.iterdir()] == ["gal"]


@pytest.mark.skipif(atomic._renameat2() is None, reason="needs Linux renameat2")
def test_exchange_paths_swaps_two_folders_in_one_step(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "from_a").write_text("a")
    (b / "from_b").write_text("b")
    assert atomic.exchange_paths(a, b)
    assert [p.name for p in a.iterdir()] == ["from_b"] and [p.name for p in b.iterdir()] == ["from_a"]
    with pytest.raises(FileNotFoundError):
        atomic.exchange_paths(a, tmp_path / "missing")


def test_manifest_records_checksums_and_old_galleries_still_load(tmp_path):
    out = _version(3).save(tmp_path / "gal")
    manifest = json.loads((out / "manifest.json").read_text())
    for name in ("embeddings.npy", "items.jsonl"):
        data = (out / name).read_bytes()
        assert manifest["files"][name] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    # a gallery saved before checksums were recorded: no "files", still loads (and is checked on its next save)
    del manifest["files"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    g = Gallery.load(out)
    assert torn_rows(g) == 0 and "files" not in g.manifest
    g.save(out, overwrite=True)
    assert "files" in json.loads((out / "manifest.json").read_text())
    # a damaged "files" entry is named, not ignored
    for files in ({"embeddings.npy": {"bytes": 1}}, "abc", {"embeddings.npy": {"bytes": -1, "sha256": "0" * 64},
                                                         "items.jsonl": {"bytes": 1, "sha256": "0" * 64}}):
        (out / "manifest.json").write_text(json.dumps({**manifest, "files": files}))
        with pytest.raises(GalleryError, match=r"manifest\.json has files .*sha256"):
            Gallery.load(out)


@pytest.mark.parametrize("mmap", [False, True])
@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_digest_of_the_rows_read_equals_the_file_digest(tmp_path, mmap, order, dtype):
    """load hashes the header and rows it holds (no second read); the twin hashes the file's bytes."""
    rows = np.asarray(_version(0).embeddings, dtype=dtype)
    path = tmp_path / "e.npy"
    np.save(path, np.asfortranarray(rows) if order == "F" else rows)
    with open(path, "rb") as f:
        emb, digest = gallery_mod._read_embeddings(f, tmp_path, {"dim": DIM, "count": ROWS}, mmap)
    assert digest == gallery_mod._file_digest(path) == {"bytes": len(path.read_bytes()),
                                                        "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    assert np.array_equal(np.asarray(emb), rows) and isinstance(emb, np.memmap) == mmap
