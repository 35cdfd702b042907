"""The wheel: only isfe_model inside, only numpy/pillow/onnxruntime required, and it works in a fresh venv
without torch.

Builds the wheel from a copy of the project (the checkout stays clean), installs
it into a new virtual environment under tmp_path (dependencies come from the
package index / pip's cache as pip is configured), and runs the installed
console scripts on real images with a model exported by the export code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

from isfe_model import Encoder
from tests.helpers_models import EMBED_DIM, make_image_folder, shared_model

ROOT = Path(__file__).resolve().parents[1]
APP_FOLDERS = ("training", "export", "serving", "demo", "tests", "benchmarks")


def _run(
    cmd: list[str], cwd: Path, timeout: int = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**base, **(env or {})})


def _copy_project(dst: Path) -> Path:
    """pyproject.toml, README.md and isfe_model/ (what the wheel is built from) into dst."""
    dst.mkdir(parents=True)
    shutil.copy2(ROOT / "pyproject.toml", dst / "pyproject.toml")
    if (ROOT / "README.md").exists():
        shutil.copy2(ROOT / "README.md", dst / "README.md")
    else:  # pyproject's readme; the checkout should have it
        warnings.warn("README.md is missing from the checkout; building the test wheel with a stub", stacklevel=2)
        (dst / "README.md").write_text("# isfe-model\n")
    shutil.copytree(ROOT / "isfe_model", dst / "isfe_model", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dst


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    src = _copy_project(work / "src")
    out = work / "dist"
    r = _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--skip-dependency-check",
              "--outdir", str(out), str(src)], cwd=work)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # setuptools warns (and will stop building) on deprecated project fields, e.g. a TOML-table licence
    assert "deprecat" not in (r.stdout + r.stderr).lower(), (r.stdout + r.stderr)[-3000:]
    wheels = list(out.glob("isfe_model-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_contains_only_isfe_model_and_declares_three_dependencies(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        dist_info = [n.split("/")[0] for n in names if ".dist-info/" in n][0]
        metadata = z.read(f"{dist_info}/METADATA").decode()
        entry_points = z.read(f"{dist_info}/entry_points.txt").decode()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"isfe_model", dist_info}, tops
    source = {p.relative_to(ROOT).as_posix() for p in (ROOT / "isfe_model").rglob("*.py")}
    assert source <= set(names), source - set(names)
    assert "isfe_model/py.typed" in names
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    core = sorted(re.split(r"[<>=!~ ;\[]", r, maxsplit=1)[0].lower() for r in requires if "extra ==" not in r)
    assert core == ["numpy", "onnxruntime", "pillow"], requires
    assert "License-Expression: MIT" in metadata.splitlines(), metadata[:600]
    assert any(r.startswith("faiss-cpu") and "extra == \"faiss\"" in r for r in requires)
    for script, target in (("isfe-embed", "embed_main"), ("isfe-index", "index_main"), ("isfe-search", "search_main")):
        assert re.search(rf"^{script}\s*=\s*isfe_model\.cli:{target}$", entry_points, re.M), entry_points


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment with only the wheel (and what pip resolves for it) installed."""
    d = tmp_path_factory.mktemp("venv") / "env"
    r = _run([sys.executable, "-m", "venv", str(d)], cwd=d.parent, timeout=300)
    assert r.returncode == 0, r.stderr
    py = d / "bin" / "python"
    r = _run([str(py), "-m", "pip", "install", "--no-input", "--disable-pip-version-check", "--no-compile", str(wheel)],
             cwd=d.parent, timeout=900)
    assert r.returncode == 0, "pip install of the wheel failed:\n" + r.stdout[-4000:] + r.stderr[-4000:]
    return d


def test_fresh_venv_has_no_torch_and_imports_cleanly(venv, tmp_path):
    py = str(venv / "bin" / "python")
    r = _run([py, "-m", "pip", "list", "--format=json", "--disable-pip-version-check"], cwd=tmp_path)
    installed = {p["name"].lower() for p in json.loads(r.stdout)}
    assert {"isfe-model", "numpy", "pillow", "onnxruntime"} <= installed
    assert not installed & {"torch", "torchvision", "onnx", "faiss-cpu", "tqdm"}, installed
    code = (
        "import sys, json, isfe_model, isfe_model.cli, isfe_model.gallery\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', "
        + ", ".join(repr(a) for a in APP_FOLDERS) + "))\n"
        "print(json.dumps({'file': isfe_model.__file__, 'bad': bad}))\n"
    )
    r = _run([py, "-c", code], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["bad"] == []
    assert Path(doc["file"]).resolve().is_relative_to(venv.resolve())  # the installed copy, not the checkout
    r = _run([py, "-c", "import torch"], cwd=tmp_path)
    assert r.returncode != 0 and "No module named 'torch'" in r.stderr


def test_installed_console_scripts_on_real_images(venv, tmp_path, tmp_path_factory):
    model = shared_model(tmp_path_factory)  # exported by export.to_onnx (needs torch here, not in the venv)
    photos = tmp_path / "photos"
    files = make_image_folder(photos, {"cat": 3, "dog": 3}, size=(40, 30))
    bindir = venv / "bin"
    out = tmp_path / "emb.npy"
    r = _run([str(bindir / "isfe-embed"), str(model.onnx_path), *map(str, files), "-o", str(out)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "CPUExecutionProvider" in r.stderr
    z = np.load(out, allow_pickle=False)
    ref = Encoder(model.onnx_path).embed(files)  # in this (torch) environment, from the checkout
    assert z.shape == (len(files), EMBED_DIM)
    assert np.abs(z - ref).max() < 1e-5  # the venv may resolve another onnxruntime release
    gal = tmp_path / "gal"
    r = _run([str(bindir / "isfe-index"), str(model.onnx_path), str(photos), "-o", str(gal)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "indexed 6 images" in r.stdout
    q = photos / "dog" / "001.jpg"
    r = _run([str(bindir / "isfe-search"), str(model.onnx_path), str(gal), str(q), "-k", "3", "--json"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    hits = json.loads(r.stdout)["results"][0]["hits"]
    assert hits[0]["id"] == "dog/001.jpg" and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    # brute force on the installed tool's own embeddings: same order
    scores = z @ z[files.index(q)]
    expect = [files[i].relative_to(photos).as_posix() for i in np.argsort(-scores, kind="stable")[:3]]
    assert [h["id"] for h in hits] == expect
    r = _run([str(bindir / "isfe-search"), str(model.onnx_path), str(gal), str(tmp_path / "nope.jpg")], cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "no such file" in r.stderr
