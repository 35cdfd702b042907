"""Model packages: `python -m export --package/--wheel`, loading by folder / name / precision, damaged packages.

One real export (small untrained ResNet-18, 16x16 input, 32-d, fp32 + INT8)
writes a package folder and its wheel; the wheel test installs isfe-model and
the model wheel into a fresh virtual environment without torch and loads the
model by name there.  No test uses the network (the Hub test runs offline).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from isfe_model import Encoder, Gallery, ModelError, ModelPackage
from isfe_model._version import __version__ as ISFE_VERSION
from isfe_model.metadata import ModelMetadata
from isfe_model.packages import distribution_name, list_models, module_name, sha256_file
from tests.test_export_support import make_checkpoint, make_labelled_folder

NAME, VERSION = "tiny-test", "0.1"
ROOT = Path(__file__).resolve().parents[1]


def _export(argv: list) -> tuple[int, str, str]:
    from export.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """--onnx + --package + --int8 + --wheel from a run folder with metrics.jsonl and curves.png."""
    d = tmp_path_factory.mktemp("package")
    run = d / "run"
    ckpt = make_checkpoint(run / "checkpoint.pt")
    (run / "metrics.jsonl").write_text('{"epoch": 0, "knn_top1": 41.5, "knn_top5": 90.0}\n'
                                       '{"epoch": 2, "knn_top1": 62.25, "knn_top5": 97.5, "loss": 3.1}\n')
    Image.new("RGB", (40, 30), (20, 120, 200)).save(run / "curves.png")
    images = d / "images"
    make_labelled_folder(images, per_class=10, seed=1)
    (d / "out").mkdir()
    argv = ["--checkpoint", ckpt, "--onnx", d / "out" / "model.onnx", "--package", d / "pkg", "--name", NAME,
            "--version", VERSION, "--images", images, "--int8", "--calib", images, "--calib-count", 16,
            "--max-batch", 4, "--wheel", d / "dist"]
    rc, out, err = _export(argv)
    return {"rc": rc, "out": out, "err": err, "d": d, "pkg": d / "pkg", "ckpt": ckpt, "images": images,
            "files": sorted(images.rglob("*.png"))[:6]}


def test_export_writes_the_package_the_wheel_and_nothing_else(built):
    assert built["rc"] == 0, built["err"]
    d = built["d"]
    assert sorted(p.name for p in d.iterdir()) == ["dist", "images", "out", "pkg", "run"]  # no staging folder left
    assert sorted(p.name for p in (d / "out").iterdir()) == ["model.onnx", "model.onnx.parity.json"]
    assert sorted(p.name for p in built["pkg"].iterdir()) == [
        "README.md", "config.json", "curves.png", "metrics.jsonl", "model-int8.onnx", "model.onnx", "parity"]
    reports = sorted(p.name for p in (built["pkg"] / "parity").iterdir())
    assert reports == ["model-int8.onnx.parity.json", "model.onnx.parity.json"]
    assert (built["pkg"] / "model.onnx").read_bytes() == (d / "out" / "model.onnx").read_bytes()
    assert [p.name for p in (d / "dist").iterdir()] == [f"{module_name(NAME)}-{VERSION}-py3-none-any.whl"]
    assert f"isfe-embed {built['pkg']} IMAGE..." in built["out"] and "Model package" in built["out"]
    assert ".tmp" not in built["out"].split("summary")[1]  # the summary names final paths


def test_config_describes_every_file_and_agrees_with_the_onnx_metadata(built):
    pkg = built["pkg"]
    cfg = json.loads((pkg / "config.json").read_text())
    assert cfg["format"] == "isfe-model-package" and cfg["name"] == NAME and cfg["version"] == VERSION
    assert cfg["dim"] == 32
    assert cfg["requires"] == f"isfe-model>={ISFE_VERSION}"
    for rel, entry in cfg["files"].items():  # slow twin of the loader's checks: hash every file
        assert sha256_file(pkg / rel) == entry["sha256"] and (pkg / rel).stat().st_size == entry["bytes"], rel
    assert set(cfg["files"]) == {p.relative_to(pkg).as_posix() for p in pkg.rglob("*") if p.is_file()} - {"config.json"}
    assert set(cfg["precisions"]) == {"fp32", "int8"}
    for precision, entry in cfg["precisions"].items():
        props = {p.key: p.value for p in onnx.load(str(pkg / entry["file"]), load_external_data=False).metadata_props}
        md = ModelMetadata.from_props(props)
        assert md.fingerprint == cfg["fingerprint"] and md.model_name == NAME and md.model_version == VERSION
        assert md.preprocess.to_dict() == cfg["preprocess"] and md.quantization == entry["quantization"]
        report = json.loads((pkg / entry["parity"]["report"]).read_text())
        assert report["passed"] is True and entry["parity"]["passed"] is True
        assert report["backend"] == entry["parity"]["backend"]
    assert cfg["training"]["final_eval"]["knn_top1"] == 62.25 and cfg["training"]["lr"] == 0.03


def test_model_card_has_hub_front_matter_results_parity_and_loading_lines(built):
    text = (built["pkg"] / "README.md").read_text()
    assert text.startswith("---\n")
    front = text.split("---\n")[1]
    keys = dict(line.split(": ", 1) for line in front.splitlines() if ": " in line and not line.startswith("- "))
    assert keys["library_name"] == "isfe-model" and keys["pipeline_tag"] == "image-feature-extraction"
    assert keys["license"] == "mit"
    assert "- image-feature-extraction" in front and "tags:" in front
    assert "![training curves](curves.png)" in text and "| 2 | 62.25 | 97.50 |" in text
    assert "| `model.onnx` | fp32 | onnxruntime-fp32 |" in text
    assert "| `model-int8.onnx` | int8 | onnxruntime-int8 |" in text
    assert f'Encoder.from_pretrained("{NAME}")' in text and f"pip install isfe-model isfe-model-{NAME}" in text
    assert "## Limitations" in text and "16×16" in text


def test_wheel_metadata_entry_point_and_files(built):
    wheel = next((built["d"] / "dist").glob("*.whl"))
    mod = module_name(NAME)
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        info = f"{mod}-{VERSION}.dist-info"
        meta = z.read(f"{info}/METADATA").decode()
        eps = z.read(f"{info}/entry_points.txt").decode()
        assert z.read(f"{mod}/model.onnx") == (built["pkg"] / "model.onnx").read_bytes()
    assert f"Name: {distribution_name(NAME)}\n" in meta and f"Version: {VERSION}\n" in meta
    assert f"Requires-Dist: isfe-model>={ISFE_VERSION}" in meta
    assert "[isfe_model.models]" in eps and f"{NAME} = {mod}:model_dir" in eps
    rels = {p.relative_to(built["pkg"]).as_posix() for p in built["pkg"].rglob("*") if p.is_file()}
    assert {f"{mod}/{r}" for r in rels} | {f"{mod}/__init__.py"} <= names
    assert {n.split("/")[0] for n in names} == {mod, info}


# --------------------------------------------------------------------------- loading


def test_folder_loads_fp32_equal_to_the_onnx_file_and_auto_picks_int8_on_cpu(built):
    pkg, files = built["pkg"], built["files"]
    ref = Encoder(pkg / "model.onnx").embed(files)
    fp32 = Encoder.from_pretrained(pkg, precision="fp32")
    assert fp32.precision == "fp32" and fp32.model_path == pkg / "model.onnx"
    assert np.abs(fp32.embed(files) - ref).max() <= 1e-6
    auto = Encoder(pkg)  # CPU execution provider here: the gated INT8 model
    assert auto.precision == "int8" and auto.model_path == pkg / "model-int8.onnx"
    assert auto.providers[0] == "CPUExecutionProvider"
    np.testing.assert_array_equal(auto.embed(files), Encoder(pkg / "model-int8.onnx").embed(files))
    info = auto.info()
    assert info["precision"] == "int8" and info["package"]["name"] == NAME
    assert info["package"]["precisions"] == ["fp32", "int8"]
    assert Encoder(str(pkg), precision="int8").precision == "int8"
    assert auto.fingerprint == fp32.fingerprint


def test_auto_choice_rule():
    """fp32 unless the first provider is the CPU and a gated INT8 model is there."""
    def pkg(int8_passed):
        precisions = {"fp32": {"parity": {"passed": True}}}
        if int8_passed is not None:
            precisions["int8"] = {"parity": {"passed": int8_passed}}
        return ModelPackage(Path("p"), {"name": "p", "precisions": precisions})

    assert pkg(True).choose("auto", cpu_first=True) == "int8"
    assert pkg(True).choose("auto", cpu_first=False) == "fp32"
    assert pkg(False).choose("auto", cpu_first=True) == "fp32"
    assert pkg(None).choose("auto", cpu_first=True) == "fp32"
    with pytest.raises(ModelError, match="has no int8 model"):
        pkg(False).choose("int8", cpu_first=True)


def test_a_plain_onnx_file_still_loads_and_checks_a_requested_precision(built):
    enc = Encoder(built["pkg"] / "model.onnx")
    assert enc.precision == "fp32" and enc.package is None
    with pytest.raises(ModelError, match="is fp32 .* not int8"):
        Encoder(built["pkg"] / "model.onnx", precision="int8")


def _copy(pkg: Path, dst: Path, real: tuple[str, ...] = ()) -> Path:
    """A copy of the package; model files hard-linked unless named in ``real`` (those are copied, safe to damage)."""
    shutil.copytree(pkg, dst, copy_function=os.link)
    for name in ("config.json", *real):  # config.json and damaged files must not share the original's inode
        (dst / name).unlink()
        shutil.copyfile(pkg / name, dst / name)
    return dst


def _edit_config(folder: Path, change) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    change(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_damaged_packages_are_model_errors_naming_the_file_and_the_fix(built, tmp_path):
    pkg = built["pkg"]
    missing = _copy(pkg, tmp_path / "missing")
    (missing / "model.onnx").unlink()
    with pytest.raises(ModelError, match=r"model\.onnx is missing .*re-export the package"):
        Encoder(missing, precision="fp32")
    large = _copy(pkg, tmp_path / "large", real=("model.onnx",))
    with open(large / "model.onnx", "ab") as f:
        f.write(b"\0" * 4096)
    with pytest.raises(ModelError, match=r"model\.onnx is [\d,]+ bytes but config\.json records \d{1,3}(,\d{3})+ — "):
        Encoder(large, precision="fp32")
    flipped = _copy(pkg, tmp_path / "flipped", real=("model-int8.onnx",))
    data = bytearray((flipped / "model-int8.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (flipped / "model-int8.onnx").write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"model-int8\.onnx has sha256 .* but config\.json records .*damaged"):
        Encoder(flipped)
    disagree = _copy(pkg, tmp_path / "disagree")
    _edit_config(disagree, lambda c: c.update(dim=64))
    with pytest.raises(ModelError, match=r"config\.json says dim 64 but model-int8\.onnx's ONNX metadata says 32"):
        Encoder(disagree)
    other = _copy(pkg, tmp_path / "other")
    _edit_config(other, lambda c: c.update(fingerprint="0" * 64))
    with pytest.raises(ModelError, match="config.json says fingerprint"):
        Encoder(other, precision="fp32")
    with pytest.raises(ModelError, match="precision 'fp16' is not known; choose one of auto, fp32, int8"):
        Encoder(pkg, precision="fp16")
    no_int8 = _copy(pkg, tmp_path / "no_int8")
    _edit_config(no_int8, lambda c: c["precisions"].pop("int8"))
    assert Encoder(no_int8).precision == "fp32"
    with pytest.raises(ModelError, match=r"has no int8 model \(it has fp32\)"):
        Encoder(no_int8, precision="int8")


def test_folders_that_are_not_packages(built, tmp_path):
    with pytest.raises(ModelError, match="is a folder but not a model package"):
        Encoder(tmp_path)
    bad_json = _copy(built["pkg"], tmp_path / "bad_json")
    (bad_json / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match=r"config\.json is not readable JSON"):
        Encoder(bad_json)
    huge = _copy(built["pkg"], tmp_path / "huge")
    (huge / "config.json").write_bytes(b" " * (1 << 20) + b"{}")
    with pytest.raises(ModelError, match=r"config\.json is 1,048,578 bytes"):
        Encoder(huge)
    foreign = _copy(built["pkg"], tmp_path / "foreign")
    (foreign / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ModelError, match="not an ISFE model package config"):
        Encoder(foreign)


def test_unknown_name_lists_the_installed_ones():
    installed = [m["name"] for m in list_models()]
    listed = ", ".join(installed) if installed else "none"
    with pytest.raises(ModelError, match=r"model 'no-such-model': no such file, folder or installed model package "
                                         rf"\(installed: {listed}\)"):
        Encoder("no-such-model")


def test_hub_offline_and_without_huggingface_hub(tmp_path):
    """hf:ORG/REPO with the Hub unreachable (HF_HUB_OFFLINE=1, empty cache), and with huggingface_hub not importable."""
    code = ("import sys\nfrom isfe_model import Encoder, ModelError\n"
            "if sys.argv[1] == 'missing': sys.modules['huggingface_hub'] = None\n"
            "try:\n    Encoder('hf:isfe-org/no-such-model@v1')\nexcept ModelError as e:\n    print('ModelError:', e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(ROOT)}
    for mode, needle in (("offline", "cannot be reached"), ("missing", 'pip install "isfe-model[hub]"')):
        r = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=120, env=env,
                           cwd=tmp_path)
        assert r.returncode == 0, (mode, r.stderr)
        assert r.stdout.startswith("ModelError: model 'hf:isfe-org/no-such-model@v1'"), (mode, r.stdout, r.stderr)
        assert needle in r.stdout, r.stdout


# --------------------------------------------------------------------------- galleries and precisions


def test_a_gallery_built_with_fp32_is_accepted_by_int8_and_agrees(built, tmp_path):
    """Decision: one fingerprint = one model; the INT8 sibling may query an fp32 gallery (agreement measured)."""
    pkg = built["pkg"]
    fp32, int8 = Encoder(pkg, precision="fp32"), Encoder(pkg, precision="int8")
    gal = Gallery.build(fp32, built["images"])
    gal.save(tmp_path / "gal")
    loaded = Gallery.load(tmp_path / "gal", encoder=int8)  # accepted: same fingerprint
    assert loaded.manifest["model_sha256"] == fp32.model_sha256 != int8.model_sha256
    queries = tmp_path / "queries"
    make_labelled_folder(queries, per_class=10, seed=7)
    qfiles = sorted(p for p in queries.rglob("*") if p.is_file())
    k = 5
    a = loaded.search(fp32.embed(qfiles), k=k).indices
    b = loaded.search(int8.embed(qfiles), k=k).indices
    labels = np.array([it["label"] for it in loaded.items])
    top1 = float(np.mean(a[:, 0] == b[:, 0]))
    same_class = float(np.mean(labels[a[:, 0]] == labels[b[:, 0]]))
    overlap = float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a.tolist(), b.tolist())]))
    print(f"fp32 gallery, int8 vs fp32 queries ({len(qfiles)}): top-1 identical {top1:.3f}, top-1 same class "
          f"{same_class:.3f}, top-{k} overlap {overlap:.3f}")
    assert top1 >= 0.5 and same_class >= 0.9 and overlap >= 0.8


# --------------------------------------------------------------------------- export: bad input and gates


def test_bad_package_arguments_exit_2_and_write_nothing(built, tmp_path):
    ck = built["ckpt"]
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    for argv, needle in (
        (["--package", taken], "is not a model package"),
        (["--package", tmp_path / "p", "--name", "bad name!"], "--name: model package name"),
        (["--package", tmp_path / "p", "--wheel", tmp_path / "dist", "--version", "v-one"], "not a PEP 440 version"),
        (["--onnx", tmp_path / "m.onnx", "--wheel", tmp_path / "dist"], "add --package DIR"),
        ([], "give --onnx MODEL.onnx"),
        (["--package", tmp_path / "no" / "p"], "parent directory"),
    ):
        rc, out, err = _export(["--checkpoint", ck, *argv])
        assert rc == 2 and needle in err and "Traceback" not in err, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"] and (taken / "notes.txt").read_text() == "mine"


def test_failed_int8_gate_writes_the_package_without_it_and_replaces_an_older_package(built, tmp_path, monkeypatch):
    from export import parity

    old = tmp_path / "pkg"
    old.mkdir()
    (old / "config.json").write_text('{"format": "isfe-model-package", "format_version": "1"}')
    (old / "stale.txt").write_text("old")
    monkeypatch.setitem(parity.GATES, "onnxruntime-int8", parity.Gate(mean_cosine=1.5))
    rc, out, err = _export(["--checkpoint", built["ckpt"], "--package", old, "--name", NAME,
                            "--images", built["images"], "--int8", "--calib", built["images"], "--calib-count", 8,
                            "--max-batch", 4, "--max-images", 24])
    assert rc == 1 and "INT8 parity gate failed" in err, err
    assert f"(report: {old / 'parity' / 'model-int8.onnx.parity.json'})" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]
    names = sorted(p.name for p in old.iterdir())
    assert names == ["README.md", "config.json", "curves.png", "metrics.jsonl", "model.onnx", "parity"]
    assert json.loads((old / "parity" / "model-int8.onnx.parity.json").read_text())["passed"] is False
    assert list(json.loads((old / "config.json").read_text())["precisions"]) == ["fp32"]
    assert "failed its parity gate and is **not** included" in (old / "README.md").read_text()
    assert Encoder(old).precision == "fp32"


# --------------------------------------------------------------------------- a fresh environment without torch


@pytest.fixture(scope="module")
def venv(built, tmp_path_factory):
    """A new venv with the isfe-model wheel (built from a copy of the project) and the model wheel."""
    from tests.test_wheel import _copy_project, _run

    work = tmp_path_factory.mktemp("pkgvenv")
    src = _copy_project(work / "src")
    r = _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--skip-dependency-check",
              "--outdir", str(work / "dist"), str(src)], cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    env = work / "env"
    assert _run([sys.executable, "-m", "venv", str(env)], cwd=work, timeout=300).returncode == 0
    wheels = [*map(str, (work / "dist").glob("isfe_model-*.whl")), *map(str, (built["d"] / "dist").glob("*.whl"))]
    pip = [str(env / "bin" / "python"), "-m", "pip", "install", "--no-input", "--disable-pip-version-check",
           "--no-compile"]
    r = _run([*pip, *wheels], cwd=work, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return env


def test_installed_model_loads_by_name_without_torch(built, venv, tmp_path):
    from tests.test_wheel import _run

    py, files = str(venv / "bin" / "python"), built["files"]
    code = ("import sys, json, time, numpy as np, isfe_model\nfrom isfe_model import Encoder, ModelError\nt = "
            "time.perf_counter(); enc = Encoder.from_pretrained(sys.argv[1], precision='fp32'); t = "
            "time.perf_counter() - t\nnp.save(sys.argv[2], enc.embed(sys.argv[3:]))\ntry:\n    "
            "Encoder('not-installed')\nexcept ModelError as e:\n    err = str(e)\ntry:\n    "
            "Encoder('hf:org/repo')\nexcept ModelError as e:\n    hub = str(e)\nprint(json.dumps({'models': "
            "isfe_model.list_models(), 'precision': enc.precision, 'auto': Encoder(sys.argv[1]).precision, 'torch': "
            "'torch' in sys.modules, 'err': err, 'hub': hub, 'seconds': t, 'path': str(enc.model_path)}))\n")
    r = _run([py, "-c", code, NAME, str(tmp_path / "e.npy"), *map(str, files)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"load by name in the fresh venv: {doc['seconds']:.3f} s")
    ref = Encoder(built["pkg"] / "model.onnx").embed(files)
    assert np.abs(np.load(tmp_path / "e.npy") - ref).max() <= 1e-6
    assert doc["precision"] == "fp32" and doc["auto"] == "int8" and doc["torch"] is False
    assert Path(doc["path"]).resolve().is_relative_to(venv.resolve())
    (m,) = doc["models"]
    assert m["name"] == NAME and m["version"] == VERSION and m["dim"] == 32 and m["precisions"] == ["fp32", "int8"]
    assert m["distribution"] == distribution_name(NAME)
    assert f"(installed: {NAME})" in doc["err"] and 'pip install "isfe-model[hub]"' in doc["hub"]
    r = _run([py, "-m", "isfe_model.packages"], cwd=tmp_path)
    assert r.returncode == 0 and NAME in r.stdout and "fp32,int8" in r.stdout, r.stdout + r.stderr
    r = _run([str(venv / "bin" / "isfe-embed"), NAME, *map(str, files), "-o", str(tmp_path / "cli.npy")], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    int8 = Encoder(built["pkg"] / "model-int8.onnx").embed(files)
    np.testing.assert_allclose(np.load(tmp_path / "cli.npy"), int8, atol=1e-6)


def test_failed_fp32_gate_writes_no_package_and_keeps_the_report_beside_it(tmp_path, monkeypatch):
    from export import parity

    ckpt = make_checkpoint(tmp_path / "run" / "checkpoint.pt")
    images = tmp_path / "images"
    make_labelled_folder(images, per_class=4, seed=3)
    monkeypatch.setitem(parity.GATES, "onnxruntime-fp32", parity.Gate(min_cosine=1.5))
    rc, out, err = _export(["--checkpoint", ckpt, "--package", tmp_path / "pkg", "--images", images, "--max-batch", 4,
                            "--wheel", tmp_path / "dist"])
    kept = tmp_path / "pkg-model.onnx.parity.json"
    assert rc == 1 and "ONNX Runtime fp32 parity gate failed" in err and f"(report: {kept})" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "pkg-model.onnx.parity.json", "run"]
    assert json.loads(kept.read_text())["passed"] is False


def test_wheel_into_a_relative_folder(built, tmp_path, monkeypatch):
    """`--wheel dist` relative to the working folder (as `make quickstart` passes it): the build runs in a
    folder of its own, so the output folder must not be resolved there."""
    from export.package import main as package_main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "relative").mkdir()
    assert package_main([str(built["pkg"]), "--wheel", "relative/dist"]) == 0
    wheels = list((tmp_path / "relative" / "dist").glob("*.whl"))
    assert [w.name for w in wheels] == [f"{module_name(NAME)}-{VERSION}-py3-none-any.whl"]
    assert not [p for p in (tmp_path / "relative" / "dist").iterdir() if p.name.startswith(".")]  # no staging left
