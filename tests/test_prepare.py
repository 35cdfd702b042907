"""Dataset preparation from tiny fake archives in the official layouts (no downloads)."""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers_models import make_tgz
from training.data import load_split
from training.prepare import load_unlabeled, main, read_dataset_info, read_stl10_binary


def jpeg(seed: int, size=(40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def cub_files(n_classes: int = 4, per_class: int = 3) -> dict[str, bytes]:
    """CUB_200_2011.tgz layout: images.txt, image_class_labels.txt, classes.txt, images/<class>/..."""
    files, images, labels, classes = {}, [], [], []
    names = ["Black_footed_Albatross", "Laysan_Albatross", "Sooty_Albatross", "Groove_billed_Ani", "Crested_Auklet",
             "Least_Auklet"]
    i = 1
    for c in range(1, n_classes + 1):
        cname = f"{c:03d}.{names[c - 1]}"
        classes.append(f"{c} {cname}")
        for k in range(per_class):
            rel = f"{cname}/{names[c - 1]}_{k:04d}_{i}.jpg"
            files[f"CUB_200_2011/images/{rel}"] = jpeg(i)
            images.append(f"{i} {rel}")
            labels.append(f"{i} {c}")
            i += 1
    files["CUB_200_2011/images.txt"] = ("\n".join(images) + "\n").encode()
    files["CUB_200_2011/image_class_labels.txt"] = ("\n".join(labels) + "\n").encode()
    files["CUB_200_2011/classes.txt"] = ("\n".join(classes) + "\n").encode()
    files["attributes.txt"] = b"1 has_bill_shape::curved\n"
    return files


def test_cub200_from_tgz_splits_by_class_id_and_squashes(tmp_path, capsys):
    arc = make_tgz(tmp_path / "CUB_200_2011.tgz", cub_files())
    out = tmp_path / "cub"
    assert main(["cub200", str(arc), "--out", str(out), "--resize", "24", "--workers", "2"]) == 0
    assert sorted(p.name for p in (out / "train").iterdir()) == ["001.Black_footed_Albatross", "002.Laysan_Albatross"]
    assert sorted(p.name for p in (out / "test").iterdir()) == ["003.Sooty_Albatross", "004.Groove_billed_Ani"]
    files = sorted((out / "train").rglob("*.jpg"))
    assert len(files) == 6 and all(Image.open(f).size == (24, 24) for f in files)  # 40x30 squashed, aspect not kept
    info = json.loads((out / "dataset.json").read_text())
    assert info["name"] == "cub200" and info["recall_ks"] == [1, 2, 4, 8] and info["protocol"] == "unseen"
    assert info["splits"] == {"test": {"images": 6, "classes": 2}, "train": {"images": 6, "classes": 2}}
    assert not any(p.name.startswith(".cub.partial") for p in tmp_path.iterdir())
    text = capsys.readouterr().out
    assert "classes 1-2 train, 3-4 test" in text and "(5864/5924)" in text
    # the project reads it back; the splits share no class
    tr, te = load_split(str(out), "train", use_cache=False), load_split(str(out), "test", use_cache=False)
    assert len(tr) == 6 and len(te) == 6 and set(tr.classes).isdisjoint(te.classes)


def test_cub200_from_folder_hard_links_the_originals(tmp_path):
    files = cub_files()
    write_tree(tmp_path / "src", files)
    out = tmp_path / "cub"
    assert main(["cub200", str(tmp_path / "src"), "--out", str(out), "--resize", "0"]) == 0
    dst = out / "test" / "003.Sooty_Albatross" / "Sooty_Albatross_0000_7.jpg"
    src = tmp_path / "src" / "CUB_200_2011" / "images" / "003.Sooty_Albatross" / "Sooty_Albatross_0000_7.jpg"
    assert dst.read_bytes() == src.read_bytes() and os.stat(dst).st_ino == os.stat(src).st_ino
    out2 = tmp_path / "cub_copy"
    assert main(["cub200", str(tmp_path / "src"), "--out", str(out2), "--resize", "0", "--copy"]) == 0
    dst2 = out2 / dst.relative_to(out)
    assert dst2.read_bytes() == src.read_bytes() and os.stat(dst2).st_ino != os.stat(src).st_ino


def test_cub200_bad_inputs_leave_nothing_behind(tmp_path, capsys):
    files = cub_files()
    del files["CUB_200_2011/images/002.Laysan_Albatross/Laysan_Albatross_0001_5.jpg"]
    arc = make_tgz(tmp_path / "incomplete.tgz", files)
    out = tmp_path / "cub"
    assert main(["cub200", str(arc), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Laysan_Albatross_0001_5.jpg" in err and "incomplete" in err and "Traceback" not in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["incomplete.tgz"]

    arc = make_tgz(tmp_path / "nometa.tgz", {"CUB_200_2011/images/001.A/x.jpg": jpeg(0)})
    assert main(["cub200", str(arc), "--out", str(out)]) == 2
    assert "has no images.txt" in capsys.readouterr().err

    (tmp_path / "garbage.tgz").write_bytes(b"not a tar archive at all")
    assert main(["cub200", str(tmp_path / "garbage.tgz"), "--out", str(out)]) == 2
    assert "not a readable tar archive" in capsys.readouterr().err

    files = cub_files()
    files["CUB_200_2011/images/004.Groove_billed_Ani/Groove_billed_Ani_0000_10.jpg"] = b"\xff\xd8 truncated"
    arc = make_tgz(tmp_path / "corrupt.tgz", files)
    assert main(["cub200", str(arc), "--out", str(out), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "Groove_billed_Ani_0000_10.jpg" in err and "--skip-bad" in err
    assert not out.exists()
    assert main(["cub200", str(arc), "--out", str(out), "--skip-bad"]) == 0
    info = read_dataset_info(out)
    assert info["splits"]["test"]["images"] == 5 and "Groove_billed_Ani_0000_10.jpg" in info["skipped"][0]["path"]

    assert main(["cub200", str(arc), "--out", str(out)]) == 2  # out is not empty now
    assert "already exists" in capsys.readouterr().err


def cars_mat(path: Path, records: list[tuple[str, int]], class_names: list[str]) -> None:
    import scipy.io

    dt = [(k, "O") for k in ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test")]
    ann = np.zeros((1, len(records)), dtype=dt)
    for i, (rel, cls) in enumerate(records):
        ann[0, i] = (rel, np.array([[1]]), np.array([[2]]), np.array([[30]]), np.array([[20]]),
                     np.array([[cls]], dtype=np.uint8), np.array([[i % 2]], dtype=np.uint8))
    names = np.empty((1, len(class_names)), dtype=object)
    for j, n in enumerate(class_names):
        names[0, j] = n
    scipy.io.savemat(path, {"annotations": ann, "class_names": names})


def test_cars196_first_half_of_class_ids_train(tmp_path):
    class_names = ["AM General Hummer SUV 2000", "Ram C/V Cargo Van Minivan 2012", "Acura RL Sedan 2012", "Audi R8 "
                                                                                                          "Coupe 2012"]
    records = [(f"car_ims/{i + 1:06d}.jpg", cls) for i, cls in enumerate([1, 2, 3, 4, 1, 3, 4, 2, 4])]
    arc = make_tgz(tmp_path / "car_ims.tgz", {rel: jpeg(i) for i, (rel, _) in enumerate(records)})
    cars_mat(tmp_path / "cars_annos.mat", records, class_names)
    out = tmp_path / "cars"
    assert main(["cars196", str(arc), str(tmp_path / "cars_annos.mat"), "--out", str(out), "--resize", "0"]) == 0
    train = {p.name: sorted(f.name for f in p.iterdir()) for p in (out / "train").iterdir()}
    test = {p.name: sorted(f.name for f in p.iterdir()) for p in (out / "test").iterdir()}
    assert train == {"001.AM_General_Hummer_SUV_2000": ["000001.jpg", "000005.jpg"],
                     "002.Ram_C_V_Cargo_Van_Minivan_2012": ["000002.jpg", "000008.jpg"]}
    assert test == {"003.Acura_RL_Sedan_2012": ["000003.jpg", "000006.jpg"],
                    "004.Audi_R8_Coupe_2012": ["000004.jpg", "000007.jpg", "000009.jpg"]}
    assert (out / "test" / "004.Audi_R8_Coupe_2012" / "000009.jpg").read_bytes() == jpeg(8)
    # a folder holding car_ims/ and cars_annos.mat works the same
    write_tree(tmp_path / "cars_src", {rel: jpeg(i) for i, (rel, _) in enumerate(records)})
    (tmp_path / "cars_src" / "cars_annos.mat").write_bytes((tmp_path / "cars_annos.mat").read_bytes())
    assert main(["cars196", str(tmp_path / "cars_src"), "--out", str(tmp_path / "cars2"), "--resize", "0"]) == 0
    assert read_dataset_info(tmp_path / "cars2")["splits"] == read_dataset_info(out)["splits"]


def test_cars196_wrong_annotation_file(tmp_path, capsys):
    arc = make_tgz(tmp_path / "car_ims.tgz", {"car_ims/000001.jpg": jpeg(0)})
    (tmp_path / "cars_annos.mat").write_bytes(b"MATLAB 5.0 junk")
    assert main(["cars196", str(arc), str(tmp_path / "cars_annos.mat"), "--out", str(tmp_path / "o")]) == 2
    assert "not the Cars196 annotation file" in capsys.readouterr().err
    assert main(["cars196", str(arc), "--out", str(tmp_path / "o")]) == 2
    assert "no cars_annos.mat" in capsys.readouterr().err


def test_sop_official_split_files(tmp_path):
    rows = {"train": [(1, 1, "bicycle_final/111_0.JPG"), (2, 1, "bicycle_final/111_1.JPG"),
                      (3, 2, "bicycle_final/222_0.JPG"), (4, 3, "chair_final/333_0.JPG")],
            "test": [(5, 4, "chair_final/444_0.JPG"), (6, 4, "chair_final/444_1.JPG"),
                     (7, 5, "kettle_final/555_0.JPG")]}
    files = {}
    for split, rs in rows.items():
        lines = ["image_id class_id super_class_id path"] + [f"{i} {c} 1 {p}" for i, c, p in rs]
        files[f"Stanford_Online_Products/Ebay_{split}.txt"] = ("\n".join(lines) + "\n").encode()
        for i, _, p in rs:
            files[f"Stanford_Online_Products/{p}"] = jpeg(i, (50, 50))
    arc = tmp_path / "Stanford_Online_Products.zip"
    with zipfile.ZipFile(arc, "w") as zf:
        for n, d in files.items():
            zf.writestr(n, d)
    out = tmp_path / "sop"
    assert main(["sop", str(arc), "--out", str(out), "--resize", "16"]) == 0
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.jpg")) == [
        "test/00004/444_0.jpg", "test/00004/444_1.jpg", "test/00005/555_0.jpg",
        "train/00001/111_0.jpg", "train/00001/111_1.jpg", "train/00002/222_0.jpg", "train/00003/333_0.jpg"]
    info = read_dataset_info(out)
    assert info["recall_ks"] == [1, 10, 100] and info["name"] == "sop"
    assert (info["splits"]["train"] == {"images": 4, "classes": 3}
            and info["splits"]["test"] == {"images": 3, "classes": 2})


def fake_stl10(root: Path, n_train=4, n_test=3, n_unlabeled=5, seed=0) -> dict[str, np.ndarray]:
    """The binary layout of stl10_binary/: column-major 3x96x96 planes, labels 1..10."""
    rng = np.random.default_rng(seed)
    d = root / "stl10_binary"
    d.mkdir(parents=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test), ("unlabeled", n_unlabeled)):
        raw = rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)
        raw.tofile(d / f"{split}_X.bin")
        out[split] = raw
        if split != "unlabeled":
            y = (np.arange(n) % 10 + 1).astype(np.uint8)
            y.tofile(d / f"{split}_y.bin")
            out[split + "_y"] = y
    (d / "class_names.txt").write_text(
        "\n".join(["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]) + "\n"
    )
    return out


def test_stl10_reader_matches_torchvision(tmp_path, monkeypatch):
    import torchvision

    fake_stl10(tmp_path)
    monkeypatch.setattr(torchvision.datasets.STL10, "_check_integrity", lambda self: True)  # fake files, real reader
    for split in ("train", "test", "unlabeled"):
        ref = torchvision.datasets.STL10(str(tmp_path), split=split, download=False)
        ours, labels = read_stl10_binary(tmp_path / "stl10_binary", split)
        np.testing.assert_array_equal(ours, ref.data.transpose(0, 2, 3, 1))  # torchvision: [N, 3, H, W]
        if split == "unlabeled":
            assert labels is None and (ref.labels == -1).all()
        else:
            np.testing.assert_array_equal(labels, ref.labels)


def test_stl10_writes_pngs_and_unlabeled(tmp_path):
    raw = fake_stl10(tmp_path / "root")
    out = tmp_path / "stl10"
    assert main(["stl10", str(tmp_path / "root"), "--out", str(out)]) == 0
    info = read_dataset_info(out)
    assert info["splits"] == {"test": {"images": 3, "classes": 3}, "train": {"images": 4, "classes": 4},
                              "unlabeled": {"images": 5}}
    png = np.asarray(Image.open(out / "train" / "bird" / "00001.png"))  # image 1 has label 2 = bird
    np.testing.assert_array_equal(png, raw["train"][1].transpose(2, 1, 0))
    tr = load_split(str(out), "train", resize_size=96, use_cache=False)
    assert len(tr) == 4 and tr.classes == ["airplane", "bird", "car", "cat"]
    monkey = pytest.MonkeyPatch()
    monkey.setenv("ISFE_CACHE", str(tmp_path / "cache"))
    try:
        u = load_unlabeled(out, 96)
        assert u.shape == (5, 96, 96, 3)
        np.testing.assert_array_equal(u[3], raw["unlabeled"][3].transpose(2, 1, 0))
        assert load_unlabeled(out, 96).shape == (5, 96, 96, 3)  # from the cache
    finally:
        monkey.undo()
    out2 = tmp_path / "stl10_nounl"
    assert main(["stl10", str(tmp_path / "root"), "--out", str(out2), "--no-unlabeled"]) == 0
    assert not (out2 / "unlabeled").exists()
    from training.data import DataError

    with pytest.raises(DataError, match="no unlabeled/ folder"):
        load_unlabeled(out2, 96)


def test_stl10_missing_or_damaged(tmp_path, capsys):
    assert main(["stl10", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no STL-10 binaries" in capsys.readouterr().err
    fake_stl10(tmp_path / "root")
    with open(tmp_path / "root" / "stl10_binary" / "test_X.bin", "ab") as f:
        f.write(b"xx")
    assert main(["stl10", str(tmp_path / "root"), "--out", str(tmp_path / "o")]) == 2
    assert "not a whole number" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_split_classes_of_any_folder(tmp_path):
    src = tmp_path / "photos"
    for c in ["zebra", "apple", "cat", "dog", "bee"]:
        for k in range(2):
            write_tree(src, {f"{c}/{k}.jpg": jpeg(k)})
    (src / "notes.txt").write_text("not an image folder")
    out = tmp_path / "split"
    assert main(["split-classes", str(src), "--out", str(out)]) == 0
    # first half (5 // 2) of the sorted names
    assert sorted(p.name for p in (out / "train").iterdir()) == ["apple", "bee"]
    assert sorted(p.name for p in (out / "test").iterdir()) == ["cat", "dog", "zebra"]
    info = read_dataset_info(out)
    assert info["train_classes"] == ["apple", "bee"] and info["protocol"] == "unseen"
    assert os.stat(out / "train" / "apple" / "0.jpg").st_ino == os.stat(src / "apple" / "0.jpg").st_ino
    assert main(["split-classes", str(src), "--out", str(tmp_path / "s3"), "--train-classes", "3"]) == 0
    assert sorted(p.name for p in (tmp_path / "s3" / "train").iterdir()) == ["apple", "bee", "cat"]


def test_split_classes_pools_train_and_test(tmp_path, capsys):
    src = tmp_path / "cifarlike"
    for split in ("train", "test"):
        for c in ["a", "b", "c", "d"]:
            write_tree(src, {f"{split}/{c}/0.jpg": jpeg(ord(c))})
    out = tmp_path / "split"
    assert main(["split-classes", str(src), "--out", str(out), "--resize", "8"]) == 0
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.jpg")) == [
        "test/c/test/0.jpg", "test/c/train/0.jpg", "test/d/test/0.jpg", "test/d/train/0.jpg",
        "train/a/test/0.jpg", "train/a/train/0.jpg", "train/b/test/0.jpg", "train/b/train/0.jpg"]
    tr = load_split(str(out), "train", use_cache=False)
    assert tr.classes == ["a", "b"] and len(tr) == 4
    assert main(["split-classes", str(tmp_path / "split" / "train" / "a" / "train"), "--out", str(tmp_path / "x")]) == 2
    assert "at least 2" in capsys.readouterr().err
    assert main(["split-classes", str(src), "--out", str(tmp_path / "y"), "--train-classes", "4"]) == 2
    assert "--train-classes must be between 1 and 3" in capsys.readouterr().err
