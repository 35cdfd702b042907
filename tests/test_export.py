"""`python -m export` end to end: ONNX + INT8 + Triton repository, parity gates, bad input.

One real export of a small untrained ResNet-18 (16x16 input, 32-d) is shared by
the module; parity images are a generated labelled folder.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.common import ExportError
from isfe_model.metadata import ModelMetadata
from tests.test_export_support import make_checkpoint, make_labelled_folder

MAX_BATCH = 8


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Runs the CLI once: --onnx --int8 --triton-repo on a labelled folder."""
    from export.cli import main

    d = tmp_path_factory.mktemp("export")
    ckpt = make_checkpoint(d / "run" / "checkpoint.pt")
    images = d / "images"
    make_labelled_folder(images, per_class=15, seed=1)
    calib = d / "calib"
    make_labelled_folder(calib, per_class=6, seed=2)
    out = d / "out"
    out.mkdir()
    argv = [
        "--checkpoint", str(ckpt), "--onnx", str(out / "model.onnx"), "--images", str(images),
        "--int8", str(out / "model-int8.onnx"), "--calib", str(calib), "--calib-count", "24",
        "--triton-repo", str(out / "triton"), "--max-batch", str(MAX_BATCH), "--model-name", "isfe-test",
    ]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(argv)
    return {"rc": rc, "stdout": buf.getvalue(), "dir": d, "out": out, "ckpt": ckpt, "images": images}


def test_cli_succeeds_and_writes_only_final_files(exported):
    assert exported["rc"] == 0
    names = sorted(p.name for p in exported["out"].iterdir())
    assert names == ["model-int8.onnx", "model-int8.onnx.parity.json", "model.onnx", "model.onnx.parity.json", "triton"]


def test_cli_prints_reports_summary_and_next_command(exported):
    text = exported["stdout"]
    assert "parity onnxruntime-fp32" in text and "parity onnxruntime-int8" in text and "=> PASSED" in text
    assert "summary" in text and "ONNX fp32" in text and "ONNX int8" in text and "Triton repo" in text
    assert f"isfe-embed {exported['out'] / 'model.onnx'} IMAGE... -o emb.npy" in text


def test_onnx_contract_metadata_and_checker(exported):
    from training.model import file_sha256, load_encoder

    path = exported["out"] / "model.onnx"
    m = onnx.load(str(path))
    onnx.checker.check_model(m, full_check=True)
    assert {o.domain: o.version for o in m.opset_import}[""] == 18
    props = {p.key: p.value for p in m.metadata_props}
    md = ModelMetadata.from_props(props, str(path))
    enc = load_encoder(exported["ckpt"])
    assert md.embedding_dim == 32 and md.preprocess == enc.cfg.preprocess
    assert md.checkpoint_sha256 == file_sha256(exported["ckpt"])
    assert (md.model_name == "isfe-test" and md.model_version == "1" and md.arch == "resnet18"
            and md.quantization == "none")
    assert md.train_config["lr"] == 0.03 and md.train_config["data.name"] == "synthetic"
    assert props["isfe.exporter"] == "torch.onnx.export(dynamo=True)"
    assert props["isfe.torch_version"] == torch.__version__ and props["isfe.onnx_version"] == onnx.__version__
    inp, out = m.graph.input[0], m.graph.output[0]
    assert inp.name == "image" and out.name == "embedding"
    assert inp.type.tensor_type.shape.dim[0].dim_param and out.type.tensor_type.shape.dim[0].dim_param


def test_onnx_dynamic_batch_matches_pytorch(exported):
    """Batch 1, 3, the maximum and beyond; slow twin: PyTorch fp32 on the same input, image by image."""
    from training.model import load_encoder

    enc = load_encoder(exported["ckpt"])
    sess = ort.InferenceSession(str(exported["out"] / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 3, MAX_BATCH, 11):
        x = np.random.default_rng(batch).random((batch, 3, 16, 16), dtype=np.float32)
        y = sess.run(None, {"image": x})[0]
        assert y.shape == (batch, 32) and y.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-5)
        with torch.no_grad():
            ref = np.concatenate([enc(torch.from_numpy(x[i : i + 1])).numpy() for i in range(batch)])
        np.testing.assert_allclose(y, ref, atol=1e-4)


def test_parity_reports(exported):
    rep = json.loads((exported["out"] / "model.onnx.parity.json").read_text())
    assert rep["backend"] == "onnxruntime-fp32" and rep["passed"] is True and rep["n_images"] == 60
    m = rep["metrics"]
    assert m["max_abs"] <= 1e-4 and m["min_cosine"] >= 0.99999 and m["topk_identical"] == 1.0 and m["nonfinite"] == 0
    assert {c["metric"] for c in rep["checks"]} >= {"max_abs", "min_cosine", "topk_identical", "nonfinite"}
    q = json.loads((exported["out"] / "model-int8.onnx.parity.json").read_text())
    assert q["backend"] == "onnxruntime-int8" and q["passed"] is True
    assert q["metrics"]["mean_cosine"] >= 0.99 and q["metrics"]["knn_top1_drop"] <= 1.0


def test_int8_model_is_quantized_and_keeps_fingerprint(exported):
    fp = onnx.load(str(exported["out"] / "model.onnx"))
    q = onnx.load(str(exported["out"] / "model-int8.onnx"))
    p_fp = {p.key: p.value for p in fp.metadata_props}
    p_q = {p.key: p.value for p in q.metadata_props}
    assert p_q["isfe.quantization"] == "int8-qdq"
    assert p_q["isfe.checkpoint_sha256"] == p_fp["isfe.checkpoint_sha256"]
    assert "24 images" in p_q["isfe.int8_calibration"]
    ops = {n.op_type for n in q.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert (exported["out"] / "model-int8.onnx").stat().st_size < 0.5 * (exported["out"] / "model.onnx").stat().st_size
    # the INT8 model also runs at any batch size
    sess = ort.InferenceSession(str(exported["out"] / "model-int8.onnx"), providers=["CPUExecutionProvider"])
    for b in (1, 5):
        assert sess.run(
            None, {"image": np.random.default_rng(b).random((b, 3, 16, 16), dtype=np.float32)}
        )[0].shape == (b, 32)


def _parse_pbtxt(text: str):
    """A tiny protobuf text-format parser (enough for Triton configs): dicts, lists, scalars."""
    import re

    tokens = re.findall(r'"[^"]*"|[{}\[\]:,]|[^\s{}\[\]:,]+', text)
    pos = 0

    def value():
        nonlocal pos
        t = tokens[pos]
        if t == "{":
            pos += 1
            return message("}")
        if t == "[":
            pos += 1
            items = []
            while tokens[pos] != "]":
                items.append(value())
                if tokens[pos] == ",":
                    pos += 1
            pos += 1
            return items
        pos += 1
        if t.startswith('"'):
            return t[1:-1]
        return int(t) if re.fullmatch(r"-?\d+", t) else t

    def message(end):
        nonlocal pos
        out = {}
        while pos < len(tokens) and tokens[pos] != end:
            key = tokens[pos]
            pos += 1
            if tokens[pos] == ":":
                pos += 1
            out[key] = value()
            if pos < len(tokens) and tokens[pos] == ",":
                pos += 1
        pos += 1
        return out

    return message(None)


def test_triton_repository(exported):
    folder = exported["out"] / "triton" / "isfe-test"
    assert sorted(p.name for p in folder.iterdir()) == ["1", "config.pbtxt"]
    assert (folder / "1" / "model.onnx").read_bytes() == (exported["out"] / "model.onnx").read_bytes()
    cfg = _parse_pbtxt((folder / "config.pbtxt").read_text())
    assert cfg["name"] == "isfe-test" and cfg["platform"] == "onnxruntime_onnx" and cfg["max_batch_size"] == MAX_BATCH
    m = onnx.load(str(folder / "1" / "model.onnx"))
    (inp,), (out,) = cfg["input"], cfg["output"]
    assert inp["name"] == m.graph.input[0].name and out["name"] == m.graph.output[0].name
    assert inp["data_type"] == "TYPE_FP32" and out["data_type"] == "TYPE_FP32"
    assert inp["dims"] == [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim[1:]] == [3, 16, 16]
    assert out["dims"] == [32]
    db = cfg["dynamic_batching"]
    assert db["max_queue_delay_microseconds"] > 0
    assert db["preferred_batch_size"] and all(1 <= s <= MAX_BATCH for s in db["preferred_batch_size"])


def test_triton_repo_replaces_existing_model(exported, tmp_path):
    from export.triton_repo import write_triton_repo

    repo = tmp_path / "repo"
    write_triton_repo(repo, exported["out"] / "model.onnx", "m", max_batch_size=4)
    (repo / "m" / "stale.txt").write_text("old")
    folder = write_triton_repo(repo, exported["out"] / "model.onnx", "m", max_batch_size=16)
    assert sorted(p.name for p in folder.iterdir()) == ["1", "config.pbtxt"]
    assert "max_batch_size: 16" in (folder / "config.pbtxt").read_text()
    assert sorted(p.name for p in repo.iterdir()) == ["m"]  # no staging folders left


def test_embedding_with_isfe_model_matches(exported):
    """The exported file describes itself: isfe_model embeds images like PyTorch on the preprocessed input."""
    Encoder = pytest.importorskip("isfe_model.encoder").Encoder
    from isfe_model.preprocess import preprocess
    from training.model import load_encoder

    files = sorted(exported["images"].rglob("*.png"))[:4]
    emb = Encoder(exported["out"] / "model.onnx").embed([str(f) for f in files])
    enc = load_encoder(exported["ckpt"])
    x = np.stack([preprocess(f, enc.cfg.preprocess) for f in files])
    with torch.no_grad():
        ref = enc(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(emb, ref, atol=1e-4)


# --------------------------------------------------------------------------- failures


def test_failed_gate_keeps_nothing_under_final_name(exported, tmp_path, monkeypatch, capsys):
    """A gate that cannot be met (threshold above 1): exit 1, clear message, no int8 file, no temp files.

    Also exercises --simplify (the ONNX model is simplified, re-verified and kept)."""
    from export import parity
    from export.cli import main

    monkeypatch.setitem(parity.GATES, "onnxruntime-int8", parity.Gate(mean_cosine=1.5))
    out = tmp_path / "o"
    out.mkdir()
    rc = main(["--checkpoint", str(exported["ckpt"]), "--onnx", str(out / "m.onnx"), "--simplify",
               "--images", str(exported["images"]), "--int8", str(out / "q.onnx"), "--calib", str(exported["images"]),
               "--calib-count", "8", "--max-batch", "4", "--max-images", "24"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "INT8 parity gate failed" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["m.onnx", "m.onnx.parity.json", "q.onnx.parity.json"]
    assert json.loads((out / "q.onnx.parity.json").read_text())["passed"] is False
    sess = ort.InferenceSession(str(out / "m.onnx"), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"image": np.zeros((2, 3, 16, 16), np.float32)})[0].shape == (2, 32)


def _run_cli(argv, capsys):
    from export.cli import main

    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr()


def test_missing_checkpoint(tmp_path, capsys):
    rc, cap = _run_cli(["--checkpoint", tmp_path / "nope.pt", "--onnx", tmp_path / "m.onnx"], capsys)
    assert rc == 2 and "does not exist" in cap.err and "python -m training" in cap.err and "Traceback" not in cap.err
    assert list(tmp_path.iterdir()) == []


def test_corrupt_checkpoint(exported, tmp_path, capsys):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(exported["ckpt"].read_bytes()[:5000])
    rc, cap = _run_cli(["--checkpoint", bad, "--onnx", tmp_path / "m.onnx"], capsys)
    assert rc == 2 and "truncated or corrupt" in cap.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_checkpoint_of_another_architecture(tmp_path, capsys):
    from tests.test_export_support import small_config
    from training.model import build_encoder, save_checkpoint

    # weights of a 64-d encoder saved under a model_config that declares 32-d
    save_checkpoint(
        tmp_path / "c.pt", build_encoder(small_config(embedding_dim=64)), small_config(embedding_dim=32), {}
    )
    rc, cap = _run_cli(["--checkpoint", tmp_path / "c.pt", "--onnx", tmp_path / "m.onnx"], capsys)
    assert rc == 2 and "do not fit" in cap.err and "Traceback" not in cap.err
    assert not (tmp_path / "m.onnx").exists()


def test_non_isfe_torch_file(tmp_path, capsys):
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "other.pt")
    rc, cap = _run_cli(["--checkpoint", tmp_path / "other.pt", "--onnx", tmp_path / "m.onnx"], capsys)
    assert rc == 2 and "not an ISFE checkpoint" in cap.err


def test_output_directory_missing(exported, tmp_path, capsys):
    rc, cap = _run_cli(["--checkpoint", exported["ckpt"], "--onnx", tmp_path / "nodir" / "m.onnx"], capsys)
    assert rc == 2 and "output directory" in cap.err and "does not exist" in cap.err
    rc, cap = _run_cli(
        ["--checkpoint", exported["ckpt"], "--onnx", tmp_path / "m.onnx", "--int8", tmp_path / "x" / "q.onnx"], capsys
    )
    assert rc == 2 and "--int8" in cap.err
    rc, cap = _run_cli(
        ["--checkpoint", exported["ckpt"], "--onnx", tmp_path / "m.onnx", "--triton-repo", tmp_path / "a" / "b"],
        capsys,
    )
    assert rc == 2 and "--triton-repo" in cap.err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs")
def test_output_that_is_a_fifo_or_device_is_refused(exported, tmp_path, capsys):
    fifo = tmp_path / "m.onnx"
    os.mkfifo(fifo)
    rc, cap = _run_cli(["--checkpoint", exported["ckpt"], "--onnx", fifo], capsys)
    assert rc == 2 and "--onnx" in cap.err and "not a regular file" in cap.err
    assert stat.S_ISFIFO(fifo.lstat().st_mode) and [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_bad_flag_combinations(exported, tmp_path, capsys):
    ck = exported["ckpt"]
    for extra, needle in (
        (["--precision", "fp16"], "add --trt"),
        (["--calib", tmp_path], "add --int8"),
        (["--int8", tmp_path / "m.onnx"], "same file"),
        (["--images", tmp_path / "missing"], "no such folder"),
        (["--max-batch", "2"], "--max-batch"),
    ):
        rc, cap = _run_cli(["--checkpoint", ck, "--onnx", tmp_path / "m.onnx", *extra], capsys)
        assert rc == 2 and needle in cap.err, (extra, cap.err)
    with pytest.raises(SystemExit) as e:
        _run_cli(
            ["--checkpoint", ck, "--onnx", tmp_path / "m.onnx", "--trt", tmp_path / "e.plan", "--precision", "int4"],
            capsys,
        )
    assert e.value.code == 2
    assert list(tmp_path.iterdir()) == []


def test_trt_without_tensorrt_or_gpu_says_what_is_missing(exported, tmp_path, capsys):
    from export.to_tensorrt import tensorrt_missing

    why = tensorrt_missing()
    if why is None:
        pytest.skip("TensorRT and a CUDA GPU are present here; the engine test covers --trt")
    rc, cap = _run_cli(
        ["--checkpoint", exported["ckpt"], "--onnx", tmp_path / "m.onnx", "--trt", tmp_path / "m.plan"], capsys
    )
    assert rc == 2 and why in cap.err and ("pip install tensorrt" in cap.err or "no CUDA device" in cap.err)
    assert list(tmp_path.iterdir()) == []


def test_image_folder_without_readable_images(exported, tmp_path, capsys):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (imgs / "a.jpg").write_bytes(b"not a jpeg")
    (imgs / "b.png").write_bytes(b"")
    out = tmp_path / "out"
    out.mkdir()
    rc, cap = _run_cli(["--checkpoint", exported["ckpt"], "--onnx", out / "m.onnx", "--images", imgs], capsys)
    assert rc == 2 and "none of the 2 image files could be read" in cap.err
    assert list(out.iterdir()) == []


# --------------------------------------------------------------------------- fp16 ONNX and TensorRT


def test_fp16_trunk_of_real_encoder_meets_fp16_gate(exported):
    """The mixed-precision ONNX used for TensorRT 11 fp16 builds, run here with ONNX Runtime CPU."""
    from export.fp16 import convert_trunk_to_fp16
    from export.parity import load_folder_images, reference_embeddings, run_parity
    from training.model import load_encoder

    m16 = convert_trunk_to_fp16(onnx.load(str(exported["out"] / "model.onnx")))
    convs = [n for n in m16.graph.node if n.op_type == "Conv"]
    inits = {t.name: t.data_type for t in m16.graph.initializer}
    assert convs and all(inits[n.input[1]] == onnx.TensorProto.FLOAT16 for n in convs)
    first_ops = [n.op_type for n in m16.graph.node][:4]
    assert "Sub" in first_ops and "Div" in first_ops  # normalisation before the first Cast, in fp32
    assert [n.op_type for n in m16.graph.node][-1] == "Div"  # L2 normalisation last, fp32 output
    enc = load_encoder(exported["ckpt"])
    images = load_folder_images(exported["images"], enc.cfg.preprocess, None)
    sess = ort.InferenceSession(m16.SerializeToString(), providers=["CPUExecutionProvider"])
    rep = run_parity("tensorrt-fp16", lambda b: sess.run(None, {"image": b})[0], images,
                     reference_embeddings(enc, images.x), "fp16-trunk", save=False, log=None)
    assert rep.passed, rep.table()
    assert rep.metrics["max_abs"] > 0  # it really computes something different from fp32


def _trt_reason() -> str:
    from export.to_tensorrt import tensorrt_missing

    return tensorrt_missing() or ""


@pytest.mark.skipif(bool(_trt_reason()), reason=_trt_reason() or "TensorRT available")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_engine_parity(exported, tmp_path, precision, capsys):
    """Real TensorRT build via the CLI: engine, sidecar and parity report; gates from the issue."""
    from export.cli import main

    out = tmp_path / "o"
    out.mkdir()
    rc = main(["--checkpoint", str(exported["ckpt"]), "--onnx", str(out / "m.onnx"),
               "--images", str(exported["images"]), "--trt", str(out / "m.plan"), "--precision", precision,
               "--max-batch", "16", "--opt-batch", "8"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    side = json.loads((out / "m.plan.meta.json").read_text())
    assert side["precision"] == precision and side["profile"] == {"input": "image", "min": 1, "opt": 8, "max": 16}
    assert side["compute_capability"] and side["gpu_name"] and side["tensorrt_version"]
    rep = json.loads((out / "m.plan.parity.json").read_text())
    assert rep["backend"] == f"tensorrt-{precision}" and rep["passed"] is True
    if precision == "fp32":
        assert rep["metrics"]["max_abs"] <= 1e-4 and rep["metrics"]["min_cosine"] >= 0.99999
    else:
        assert rep["metrics"]["min_cosine"] >= 0.999 and rep["metrics"]["top1_agreement"] >= 0.99


def test_int8_needs_labelled_images(exported, tmp_path, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted(exported["images"].rglob("*.png"))[:6]:
        (flat / f"{p.parent.name}-{p.name}").write_bytes(p.read_bytes())
    out = tmp_path / "out"
    out.mkdir()
    rc, cap = _run_cli(
        ["--checkpoint", exported["ckpt"], "--onnx", out / "m.onnx", "--images", flat, "--int8", out / "q.onnx"], capsys
    )
    assert rc == 2 and "labelled parity images" in cap.err
    assert list(out.iterdir()) == []


# --------------------------------------------------------------------------- the library call and the options


def test_library_call_takes_the_flags_as_keywords(tmp_path):
    from export.cli import ExportOptions, _validate, build_parser, export_checkpoint, options_from_args

    with pytest.raises(ExportError, match="unknown export option.*bogus"):
        export_checkpoint(tmp_path / "c.pt", onnx=tmp_path / "m.onnx", bogus=1)
    opts = options_from_args(
        build_parser().parse_args(["--checkpoint", "c.pt", "--onnx", str(tmp_path / "m.onnx"), "--int8"])
    )
    assert opts == ExportOptions(checkpoint="c.pt", onnx=str(tmp_path / "m.onnx"), int8="")
    _validate(opts)  # a bare --int8 is named after --onnx
    assert opts.int8 == str(tmp_path / "m-int8.onnx")
    assert list(tmp_path.iterdir()) == []


def test_stage_list_order_and_which_are_enabled():
    """ONNX first and required (the rest is built from the verified file); INT8, TensorRT, Triton when asked for."""
    from export.cli import STAGES, ExportOptions

    assert [s.name for s in STAGES] == ["onnx", "int8", "tensorrt", "triton"]
    assert [s.required for s in STAGES] == [True, False, False, False]
    on = ExportOptions(checkpoint="c", onnx="m.onnx", int8="q.onnx", trt="e.plan", triton_repo="t")
    assert all(s.enabled(on) for s in STAGES)
    assert [s.name for s in STAGES if s.enabled(ExportOptions(checkpoint="c", onnx="m.onnx"))] == ["onnx"]
