"""isfe_model.Encoder on a real exported model: metadata, providers, parity with PyTorch, bad models."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import isfe_model
from isfe_model import Encoder, ImageError, MetadataError, ModelError
from isfe_model import encoder as encoder_mod
from isfe_model.encoder import resolve_providers
from tests.helpers_models import EMBED_DIM, INPUT_SIZE, RESIZE_SIZE, make_image_folder, photo, with_props, write_image

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("enc_images")
    return make_image_folder(d, {"a": 4, "b": 3}, size=(30, 22))


def test_encoder_reads_metadata_and_reports_providers(enc, model):
    assert enc.dim == EMBED_DIM
    assert enc.spec.input_size == INPUT_SIZE and enc.spec.resize_size == RESIZE_SIZE
    assert enc.fingerprint == model.metadata.checkpoint_sha256
    from training.model import file_sha256

    assert enc.fingerprint == file_sha256(model.checkpoint_path)
    assert enc.model_sha256 == file_sha256(model.onnx_path)
    assert enc.providers == ["CPUExecutionProvider"]  # this machine has no GPU
    assert not enc.on_gpu
    info = enc.info()
    assert json.loads(json.dumps(info)) == info
    assert info["dim"] == EMBED_DIM and info["providers"] == ["CPUExecutionProvider"]
    assert any(p.startswith("onnxruntime") for p in info["onnxruntime_packages"])
    assert "CPUExecutionProvider" in info["available_providers"]


def test_embed_shapes_dtype_unit_rows_and_input_kinds(enc, images):
    z = enc.embed(images)
    assert z.shape == (len(images), EMBED_DIM) and z.dtype == np.float32
    assert np.allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-6)
    one = images[0]
    decoded = np.asarray(Image.open(one).convert("RGB"))
    variants = [str(one), one, one.read_bytes(), Image.open(one), decoded]
    for v in variants:
        zi = enc.embed(v)
        assert zi.shape == (1, EMBED_DIM)
        assert np.allclose(zi[0], z[0], atol=1e-6), type(v)
    batch = np.stack([decoded, decoded])  # uint8 [N, H, W, 3] = N images
    assert enc.embed(batch).shape == (2, EMBED_DIM)
    assert enc.embed([]).shape == (0, EMBED_DIM)


def test_batching_and_threads_do_not_change_results(model, enc, images):
    ref = enc.embed(images, batch_size=64)
    for bs in (1, 2, 3):
        assert np.allclose(enc.embed(images, batch_size=bs), ref, atol=1e-5)
    single = Encoder(model.onnx_path, threads=1, workers=1)
    assert single.workers == 1
    assert np.allclose(single.embed(images, batch_size=3), ref, atol=1e-5)
    with pytest.raises(ValueError, match="batch_size"):
        enc.embed(images, batch_size=0)


def test_spinning_off_reaches_onnxruntime_and_keeps_results(model, enc, images):
    """spinning=False sets ONNX Runtime's documented allow_spinning keys to "0" and changes no output."""
    key = "session.intra_op.allow_spinning"
    quiet = Encoder(model.onnx_path, threads=2, spinning=False)
    busy = Encoder(model.onnx_path, threads=2)
    assert quiet._session.get_session_options().get_session_config_entry(key) == "0"
    assert quiet._session.get_session_options().get_session_config_entry("session.inter_op.allow_spinning") == "0"
    with pytest.raises(RuntimeError, match="does not have configuration"):  # unset: ONNX Runtime's default
        busy._session.get_session_options().get_session_config_entry(key)
    assert (quiet.info()["spinning"], busy.info()["spinning"], quiet.info()["threads"]) == (False, True, 2)
    assert np.allclose(quiet.embed(images), busy.embed(images), atol=1e-6)
    assert np.allclose(quiet.embed(images), enc.embed(images), atol=1e-5)
    for bad in ("off", 0, None):
        with pytest.raises(ValueError, match="spinning must be True or False"):
            Encoder(model.onnx_path, spinning=bad)


def test_embed_arrays_validates_input(enc):
    s = INPUT_SIZE
    x = np.random.default_rng(0).random((5, 3, s, s), dtype=np.float32)
    z = enc.embed_arrays(x)
    assert z.shape == (5, EMBED_DIM)
    assert np.allclose(enc.embed_arrays(x[:1]), z[:1], atol=1e-5)
    assert np.allclose(enc.embed_arrays(x[0]), z[:1], atol=1e-5)  # [3, S, S] = one image
    assert np.allclose(enc.embed_arrays(x.astype(np.float64)), z, atol=1e-5)
    assert enc.embed_arrays(np.zeros((0, 3, s, s), np.float32)).shape == (0, EMBED_DIM)
    with pytest.raises(ValueError, match=rf"\[B, 3, {s}, {s}\]"):
        enc.embed_arrays(np.zeros((2, 3, s + 1, s), np.float32))
    with pytest.raises(ValueError, match="float32"):
        enc.embed_arrays((x * 255).astype(np.uint8))
    bad = x.copy()
    bad[1, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        enc.embed_arrays(bad)


def test_matches_pytorch_load_encoder(model, enc, images, tmp_path):
    """Embeddings of the same image files: ONNX Runtime vs training.model.load_encoder (cosine >= 0.99999)."""
    torch = pytest.importorskip("torch")
    from training.model import load_encoder

    net = load_encoder(model.checkpoint_path)
    assert net.checkpoint_sha256 == enc.fingerprint
    extra = [write_image(tmp_path / "big.jpg", photo(97, 61, seed=3)),
             write_image(tmp_path / "tiny.png", photo(2, 5, seed=4))]
    files = list(images) + extra
    x = np.stack([enc.preprocess(f) for f in files])
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    ours = enc.embed(files)
    cos = np.sum(ours * ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.99999, cos.min()


def test_bad_images_name_the_first_bad_input(enc, images, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"<html>nope</html>")
    with pytest.raises(ImageError) as ei:
        enc.embed([images[0], bad, tmp_path / "missing.png"], batch_size=2)
    assert ei.value.source == str(bad) and "HTML" in ei.value.reason
    with pytest.raises(ImageError, match=r"input #1 \(5 bytes\)"):
        enc.embed([images[0].read_bytes(), b"12345"])
    emb, kept, errors = enc.embed_partial([images[0], bad, images[1]], batch_size=2)
    assert kept == [0, 2] and emb.shape == (2, EMBED_DIM)
    assert [e.source for e in errors] == [str(bad)]
    assert np.allclose(emb, enc.embed([images[0], images[1]]), atol=1e-6)


def test_max_pixels_is_applied(model, images):
    small = Encoder(model.onnx_path, max_pixels=100)
    with pytest.raises(ImageError, match="over the limit of 100"):
        small.embed(images[0])
    with pytest.raises(ValueError, match="max_pixels"):
        Encoder(model.onnx_path, max_pixels=0)


# --------------------------------------------------------------------------- providers


def test_resolve_providers_order_aliases_and_errors():
    avail = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers(None, avail) == avail
    assert resolve_providers(None, ["CUDAExecutionProvider", "CPUExecutionProvider", "AzureExecutionProvider"]) == [
        "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers(None, ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert resolve_providers("cuda", avail) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers(["trt", "cpu"], avail) == ["TensorrtExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers([("cuda", {"device_id": "1"})], avail) == [
        ("CUDAExecutionProvider", {"device_id": "1"}), "CPUExecutionProvider"]
    with pytest.raises(ValueError, match="onnxruntime-gpu"):
        resolve_providers("cuda", ["CPUExecutionProvider"])
    with pytest.raises(ValueError, match="not available"):
        resolve_providers("nosuch", avail)
    with pytest.raises(ValueError, match="empty"):
        resolve_providers("", avail)


@pytest.mark.filterwarnings("ignore:Specified provider:UserWarning")
def test_silent_cpu_fallback_is_logged(model, monkeypatch, caplog):
    """Ask for CUDA on a build without it (as when CUDA libraries are missing): ORT runs on CPU, we say so."""
    real = encoder_mod.ort.get_available_providers
    monkeypatch.setattr(encoder_mod.ort, "get_available_providers", lambda: ["CUDAExecutionProvider"] + list(real()))
    with caplog.at_level(logging.INFO, logger="isfe_model"):
        e = Encoder(model.onnx_path)  # providers=None -> CUDA, CPU
    assert e.requested_providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert e.providers == ["CPUExecutionProvider"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("could not start CUDAExecutionProvider" in r.getMessage() for r in warnings)
    assert e.embed_arrays(np.zeros((1, 3, INPUT_SIZE, INPUT_SIZE), np.float32)).shape == (1, EMBED_DIM)


def test_cpu_run_is_logged_with_providers(model, caplog):
    with caplog.at_level(logging.INFO, logger="isfe_model"):
        Encoder(model.onnx_path, providers="cpu")
    assert any("uses CPUExecutionProvider" in r.getMessage() for r in caplog.records)


def test_two_onnxruntime_packages_are_warned_about(model, monkeypatch, caplog):
    monkeypatch.setattr(encoder_mod, "onnxruntime_packages", lambda: ["onnxruntime 1.20.0", "onnxruntime-gpu 1.20.0"])
    with caplog.at_level(logging.WARNING, logger="isfe_model"):
        Encoder(model.onnx_path)
    assert any("several onnxruntime packages" in r.getMessage() for r in caplog.records)


def test_onnxruntime_packages_finds_every_provider_of_the_module(tmp_path, monkeypatch):
    """A second distribution that installs the onnxruntime module (as onnxruntime-gpu does) is detected."""
    info = tmp_path / "onnxruntime_gpu-1.99.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: onnxruntime-gpu\nVersion: 1.99.0\n")
    (info / "RECORD").write_text("onnxruntime/__init__.py,sha256=x,10\n")
    other = tmp_path / "onnxruntime_extensions-0.1.dist-info"  # a different module: not counted
    other.mkdir()
    (other / "METADATA").write_text("Metadata-Version: 2.1\nName: onnxruntime-extensions\nVersion: 0.1\n")
    (other / "top_level.txt").write_text("onnxruntime_extensions\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    encoder_mod._onnxruntime_packages.cache_clear()
    try:
        found = encoder_mod.onnxruntime_packages()
    finally:
        encoder_mod._onnxruntime_packages.cache_clear()
    assert "onnxruntime-gpu 1.99.0" in found
    assert any(f.startswith("onnxruntime ") for f in found)
    assert not any("extensions" in f for f in found)


def test_dist_label_reads_what_importlib_metadata_reads(tmp_path):
    """The slow twin of the direct METADATA read: importlib.metadata, on the installed onnxruntime and on odd files."""
    import importlib.metadata

    body = tmp_path / "onnxruntime_x-2.0.dist-info"  # a description whose text has header-like lines
    body.mkdir()
    (body / "METADATA").write_text("Metadata-Version: 2.1\nName: onnxruntime-x\nVersion: 2.0\nSummary: s\n\n"
                                   "Name: not-this\nVersion: 9\n")
    installed = next(f for f in importlib.metadata.distribution("onnxruntime").files or [] if f.name == "METADATA")
    infos = [body, Path(installed.locate()).parent]
    for info in infos:
        d = importlib.metadata.PathDistribution(info)
        assert encoder_mod._dist_label(info) == f"{d.metadata['Name']} {d.version}"
    bare = tmp_path / "onnxruntime_gpu-1.5.0.dist-info"  # no METADATA: the folder's name
    bare.mkdir()
    assert encoder_mod._dist_label(bare) == "onnxruntime_gpu 1.5.0"


def test_fixed_batch_model_is_fed_padded_batches(model, enc, tmp_path, images):
    """A model exported with a fixed batch (here 2) gets padded / split batches."""
    onnx = pytest.importorskip("onnx")
    proto = onnx.load(str(model.onnx_path))
    for vi in list(proto.graph.input) + list(proto.graph.output):
        d0 = vi.type.tensor_type.shape.dim[0]
        d0.Clear()
        d0.dim_value = 2
    fixed = tmp_path / "fixed.onnx"
    onnx.save(proto, str(fixed))
    e2 = Encoder(fixed)
    assert e2._fixed_batch == 2
    assert np.allclose(e2.embed(images, batch_size=5), enc.embed(images), atol=1e-5)


# --------------------------------------------------------------------------- bad model files


def test_bad_model_files_are_refused_with_clear_messages(model, tmp_path):
    with pytest.raises(ModelError, match="no such file"):
        Encoder(tmp_path / "nope.onnx")
    with pytest.raises(ModelError, match="is a folder"):
        Encoder(tmp_path)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ModelError, match="empty"):
        Encoder(empty)
    if hasattr(os, "mkfifo"):  # would block forever if it were opened
        os.mkfifo(tmp_path / "pipe.onnx")
        with pytest.raises(ModelError, match="not a regular file"):
            Encoder(tmp_path / "pipe.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(os.urandom(5000))
    with pytest.raises(ModelError, match="not a valid ONNX model"):
        Encoder(junk)
    data = model.onnx_path.read_bytes()
    trunc = tmp_path / "truncated.onnx"
    trunc.write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelError, match="truncated|not a valid ONNX"):
        Encoder(trunc)
    image = write_image(tmp_path / "image.onnx", photo(8, 8), fmt="PNG")
    with pytest.raises(ModelError, match="not a valid ONNX"):
        Encoder(image)


def test_models_without_or_with_wrong_metadata_are_refused(model, tmp_path):
    pytest.importorskip("onnx")
    bare = with_props(model.onnx_path, tmp_path / "bare.onnx", **{k: None for k in model.metadata.to_props()})
    with pytest.raises(MetadataError, match="not an ISFE model"):
        Encoder(bare)
    wrong_dim = with_props(model.onnx_path, tmp_path / "dim.onnx", embedding_dim="64")
    with pytest.raises(ModelError, match=r"\[B, 64\]"):
        Encoder(wrong_dim)
    wrong_size = with_props(model.onnx_path, tmp_path / "size.onnx", input_size="12", resize_size="12")
    with pytest.raises(ModelError, match="metadata says"):
        Encoder(wrong_size)
    wrong_name = with_props(model.onnx_path, tmp_path / "name.onnx", input_name="pixels")
    with pytest.raises(ModelError, match="'pixels'"):
        Encoder(wrong_name)
    future = with_props(model.onnx_path, tmp_path / "future.onnx", format_version="99")
    with pytest.raises(MetadataError, match="not supported"):
        Encoder(future)


def test_absurd_or_hostile_metadata_is_refused_at_load(model, tmp_path):
    """Sizes far beyond any real model, deep JSON, bad mean/std, an empty fingerprint: MetadataError naming the
    model."""
    from isfe_model.metadata import MAX_IMAGE_SIDE, ModelMetadata

    props = model.metadata.to_props()
    deep = "[" * 100_000 + "]" * 100_000
    cases = {
        "resize_size": ("100000", rf"isfe\.resize_size is 100000; it must be between 1 and {MAX_IMAGE_SIDE} pixels"),
        "input_size": ("1000000000", rf"isfe\.input_size is 1000000000; it must be between 1 and {MAX_IMAGE_SIDE}"),
        "embedding_dim": ("0", "isfe.embedding_dim is 0; it must be between 1 and"),
        "mean": (deep, r"isfe\.mean is nested too deeply"),
        "std": ("[0.2, 0.2, 0]", r"isfe\.std is .*3 positive numbers"),
        "train_config": ('{"a": ' + deep + "}", r"isfe\.train_config is nested too deeply"),
        "checkpoint_sha256": ("", r"isfe\.checkpoint_sha256 \(the model's fingerprint\) is empty"),
    }
    for key, (value, msg) in cases.items():
        with pytest.raises(MetadataError, match=msg) as info:
            ModelMetadata.from_props({**props, f"isfe.{key}": value}, source="model m.onnx")
        assert "model m.onnx" in str(info.value) and "re-export" in str(info.value), key
    for value in ("1e9", "9" * 5000, "12.5"):
        with pytest.raises(MetadataError, match="not an integer"):
            ModelMetadata.from_props({**props, "isfe.resize_size": value})
    with pytest.raises(MetadataError, match="isfe.mean is .*3 finite numbers"):
        ModelMetadata.from_props({**props, "isfe.mean": "[NaN, 0, 0]"})
    # end to end: the real model file with an absurd resize size / empty fingerprint
    pytest.importorskip("onnx")
    for name, change, msg in (("huge.onnx", {"resize_size": str(10 ** 5)}, "between 1 and 4096"),
                              ("nofp.onnx", {"checkpoint_sha256": ""}, "fingerprint"),
                              ("deep.onnx", {"train_config": deep}, "nested too deeply")):
        with pytest.raises(MetadataError, match=msg) as info:
            Encoder(with_props(model.onnx_path, tmp_path / name, **change))
        assert name in str(info.value)


def _scaled_output(src: Path, dst: Path, scale: float) -> Path:
    """A copy of the model whose output is multiplied by ``scale`` (an extra Mul node)."""
    onnx = pytest.importorskip("onnx")
    from onnx import helper, numpy_helper

    proto = onnx.load(str(src))
    out = proto.graph.output[0].name
    for node in proto.graph.node:
        for i, o in enumerate(node.output):
            if o == out:
                node.output[i] = out + "_unscaled"
    proto.graph.initializer.append(numpy_helper.from_array(np.array(scale, np.float32), "isfe_test_scale"))
    proto.graph.node.append(helper.make_node("Mul", [out + "_unscaled", "isfe_test_scale"], [out]))
    onnx.save(proto, str(dst))
    return dst


def test_zero_or_non_finite_model_output_is_a_model_error(model, enc, images, tmp_path):
    zero = Encoder(_scaled_output(model.onnx_path, tmp_path / "zero.onnx", 0.0))
    with pytest.raises(ModelError, match=rf"zero\.onnx produced an all-zero \(norm 0\) embedding for image {images[0]} "
                                         r"\(and 2 more in the same batch\).*re-export"):
        zero.embed(images[:3])
    with pytest.raises(ModelError, match="all-zero .* for row 0 of a batch of 1"):
        zero.embed_arrays(np.zeros((1, 3, INPUT_SIZE, INPUT_SIZE), np.float32))
    with pytest.raises(ModelError, match="all-zero"):
        zero.embed_partial(images[:2], skip_bad=True)  # not an image problem: never skipped
    nan = Encoder(_scaled_output(model.onnx_path, tmp_path / "nan.onnx", float("nan")))
    with pytest.raises(ModelError, match="produced a NaN/inf embedding"):
        nan.embed(images[0])
    # huge (but finite) outputs: the norm is taken in float64, so they still become the same unit rows
    big = Encoder(_scaled_output(model.onnx_path, tmp_path / "big.onnx", 1e30))
    assert np.allclose(big.embed(images[:3]), enc.embed(images[:3]), atol=1e-6)


# --------------------------------------------------------------------------- import hygiene


def test_import_isfe_model_imports_no_torch_and_no_app_folder():
    """In this environment torch *is* installed: importing the whole package must still not load it."""
    code = (
        "import sys, json\n"
        "import isfe_model, isfe_model.cli, isfe_model.gallery, isfe_model.search, isfe_model.encoder\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'torchvision', 'training', 'export', 'serving', 'demo', 'onnx', 'tests', 'faiss', 'tqdm', "
        "'sklearn'))\nprint(json.dumps(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_public_api_is_exported():
    for name in ("Encoder", "Gallery", "GalleryError", "SearchResult", "ModelError", "ImageError", "MetadataError",
                 "PreprocessSpec", "ModelMetadata", "load_image", "preprocess", "__version__"):
        assert hasattr(isfe_model, name), name
    assert (Path(isfe_model.__file__).parent / "py.typed").exists()
