"""Pure-Python parts of export: parity metrics and gates, image loading, fp16 ONNX, TensorRT plans, Triton text."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.common import ExportError
from export.parity import (
    GATES,
    Gate,
    _knn_top1,
    check_gate,
    compare,
    load_folder_images,
    neighbours_excluding_self,
    run_parity,
)
from isfe_model.preprocess import PreprocessSpec
from tests.test_export_support import make_labelled_folder


def unit_rows(n: int, d: int, seed: int = 0) -> np.ndarray:
    e = np.random.default_rng(seed).normal(size=(n, d))
    return (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float32)


# --------------------------------------------------------------------------- parity metrics


def test_neighbours_excluding_self_matches_brute_force():
    e = unit_rows(57, 8, seed=1)
    e[10] = e[3]  # an exact tie
    sc, idx = neighbours_excluding_self(e, 5, chunk_rows=16)
    sims = e.astype(np.float64) @ e.astype(np.float64).T
    for i in range(len(e)):
        order = sorted((j for j in range(len(e)) if j != i), key=lambda j: (-sims[i, j], j))[:5]
        assert idx[i].tolist() == order
        np.testing.assert_allclose(sc[i], sims[i, order], rtol=1e-6)


def test_neighbours_excluding_self_when_other_rows_outrank_the_row_itself():
    e = unit_rows(12, 4, seed=3)
    e[[4, 5, 6]] = 3 * e[0]  # not unit: they score 3 against row 0, above its self-similarity 1
    e[9] = e[8]
    sims = e.astype(np.float64) @ e.astype(np.float64).T
    for k in (1, 2, 3, 11, 20):
        sc, idx = neighbours_excluding_self(e, k, chunk_rows=5)
        assert idx.shape == (12, min(k, 11))
        for i in range(len(e)):
            order = sorted((j for j in range(len(e)) if j != i), key=lambda j: (-sims[i, j], j))[: min(k, 11)]
            assert idx[i].tolist() == order
            np.testing.assert_allclose(sc[i], sims[i, order], rtol=1e-5, atol=1e-6)


def test_knn_top1_matches_loop():
    e = unit_rows(40, 6, seed=2)
    labels = np.random.default_rng(2).integers(0, 3, 40)
    sc, idx = neighbours_excluding_self(e, 10)
    sims = e.astype(np.float64) @ e.astype(np.float64).T
    correct = 0
    for i in range(40):
        votes = {}
        for j in idx[i]:
            votes[labels[j]] = votes.get(labels[j], 0.0) + np.exp(sims[i, j] / 0.1)
        correct += max(votes, key=votes.get) == labels[i]
    assert _knn_top1(idx, sc, labels) == pytest.approx(100.0 * correct / 40)


def test_compare_identical_and_noisy():
    ref = unit_rows(120, 16)
    labels = np.arange(120) % 4
    m = compare(ref, ref.copy(), labels)
    assert (m["max_abs"] == 0 and m["min_cosine"] == pytest.approx(1.0) and m["topk_identical"] == 1.0
            and m["top1_agreement"] == 1.0)
    assert m["knn_top1_drop"] == 0.0 and m["nonfinite"] == 0
    assert all(r["passed"] for r in check_gate(m, GATES["onnxruntime-fp32"]))
    noisy = ref + np.random.default_rng(5).normal(0, 0.05, ref.shape).astype(np.float32)
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    m2 = compare(ref, noisy, labels)
    assert m2["min_cosine"] < 0.999 and m2["topk_identical"] < 1.0
    rows = {r["metric"]: r["passed"] for r in check_gate(m2, GATES["onnxruntime-fp32"])}
    assert (rows["max_abs"] is False and rows["min_cosine"] is False and rows["topk_identical"] is False
            and rows["nonfinite"] is True)
    # cosine computed by hand (slow twin)
    cos = [float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))
           for a, b in zip(ref.astype(np.float64), noisy.astype(np.float64))]
    assert m2["min_cosine"] == pytest.approx(min(cos)) and m2["mean_cosine"] == pytest.approx(np.mean(cos))


def test_compare_nan_and_norm_failures():
    ref = unit_rows(30, 8)
    bad = ref.copy()
    bad[4, 2] = np.nan
    m = compare(ref, bad)
    assert m["nonfinite"] == 1 and m["min_cosine"] == -1.0
    assert not any(r["passed"] for r in check_gate(m, GATES["onnxruntime-fp32"]))
    scaled = ref * 1.01  # same directions, rows not unit
    m = compare(ref, scaled)
    assert m["min_cosine"] == pytest.approx(1.0) and m["max_norm_dev"] == pytest.approx(0.01, rel=1e-3)
    assert {r["metric"]: r["passed"] for r in check_gate(m, GATES["tensorrt-fp16"])}["max_norm_dev"] is False


def test_ties_do_not_count_as_disagreement():
    ref = unit_rows(20, 8)
    ref[7] = ref[2]  # rows 2 and 7 are identical: tied neighbours of everyone
    cand = ref.copy()
    cand[7] = ref[2] + np.float32(2e-7)  # numerically tiny change flips the tie order
    m = compare(ref, cand)
    assert m["topk_identical"] == 1.0 and m["top1_agreement"] == 1.0


def test_knn_gate_needs_labels():
    ref = unit_rows(20, 8)
    rows = check_gate(compare(ref, ref, labels=None), GATES["onnxruntime-int8"])
    knn = next(r for r in rows if r["metric"] == "knn_top1_drop")
    assert knn["passed"] is False and "labelled" in knn["note"]


def test_run_parity_writes_report(tmp_path):
    from export.parity import ParityImages

    x = np.random.default_rng(0).random((12, 3, 4, 4), dtype=np.float32)
    w = np.random.default_rng(1).normal(size=(48, 8)).astype(np.float32)

    def embed(b):  # one row at a time: a batched matmul may sum in another order per batch size (BLAS kernels)
        z = np.stack([row.reshape(-1) @ w for row in b])
        return z / np.linalg.norm(z, axis=1, keepdims=True)

    imgs = ParityImages(x, None, "test")
    lines = []
    rep = run_parity("onnxruntime-fp32", embed, imgs, embed(x), tmp_path / "a.onnx", batch_size=5, log=lines.append)
    assert rep.passed
    saved = json.loads((tmp_path / "a.onnx.parity.json").read_text())
    assert saved["passed"] is True and saved["n_images"] == 12 and saved["metrics"]["max_abs"] == 0.0
    assert "=> PASSED" in lines[0] and "max_abs" in lines[0]
    rep = run_parity("x", lambda b: embed(b) * 0 + np.nan, imgs, embed(x), tmp_path / "b.onnx",
                     gate=Gate(min_cosine=0.9), log=None)
    assert not rep.passed
    assert json.loads((tmp_path / "b.onnx.parity.json").read_text())["metrics"]["max_abs"] is None


# --------------------------------------------------------------------------- images


def test_folder_images_labels_and_skips(tmp_path):
    make_labelled_folder(tmp_path / "lab", per_class=3, classes={"a": (200, 0, 0), "b": (0, 0, 200)})
    (tmp_path / "lab" / "a" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    (tmp_path / "lab" / ".hidden").mkdir()
    spec = PreprocessSpec(input_size=8, resize_size=10)
    im = load_folder_images(tmp_path / "lab", spec, None)
    assert im.x.shape == (6, 3, 8, 8) and im.x.dtype == np.float32 and 0 <= im.x.min() and im.x.max() <= 1
    assert im.classes == ["a", "b"] and im.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert len(im.skipped) == 1 and im.skipped[0]["path"].endswith("broken.jpg")
    sample = load_folder_images(tmp_path / "lab", spec, 4)
    assert len(sample) <= 4
    # a flat folder has no labels
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in list((tmp_path / "lab" / "b").iterdir()):
        (flat / p.name).write_bytes(p.read_bytes())
    assert load_folder_images(flat, spec, None).labels is None
    with pytest.raises(ExportError, match="no image files"):
        load_folder_images(tmp_path / "lab" / ".hidden", spec, None)
    with pytest.raises(ExportError, match="no such folder"):
        load_folder_images(tmp_path / "missing", spec, None)


def test_default_dataset_images():
    pytest.importorskip("sklearn")
    from export.parity import load_parity_images

    im = load_parity_images(PreprocessSpec(input_size=12, resize_size=16), max_images=20)
    assert im.x.shape == (20, 3, 12, 12) and im.labels is not None and im.source == "digits:test"


# --------------------------------------------------------------------------- ONNX export helpers


def tiny_convnet(batch: int | str = "batch", seed: int = 0) -> onnx.ModelProto:
    """(x-mean)/std -> Conv -> Relu -> Conv -> Add(skip) -> Relu -> GlobalAveragePool -> Flatten -> Gemm
    -> L2 normalise."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(np.array([0.5, 0.4, 0.3], np.float32).reshape(1, 3, 1, 1), "mean"),
        numpy_helper.from_array(np.array([0.2, 0.25, 0.3], np.float32).reshape(1, 3, 1, 1), "std"),
        numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.1, (8,)).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.normal(0, 0.2, (8, 8, 3, 3)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.normal(0, 0.2, (6, 8)).astype(np.float32), "wh"),
        numpy_helper.from_array(np.zeros(6, np.float32), "bh"),
        numpy_helper.from_array(np.array([1], np.int64), "axes"),
    ]
    nodes = [
        helper.make_node("Sub", ["image", "mean"], ["c"]),
        helper.make_node("Div", ["c", "std"], ["n"]),
        helper.make_node("Conv", ["n", "w1", "b1"], ["h1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["h2"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["h2", "r1"], ["s"]),
        helper.make_node("Relu", ["s"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "wh", "bh"], ["z"], transB=1),
        helper.make_node("ReduceL2", ["z", "axes"], ["nrm"], keepdims=1),
        helper.make_node("Div", ["z", "nrm"], ["embedding"]),
    ]
    g = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [batch, 6])],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 9
    onnx.checker.check_model(m, full_check=True)
    return m


def test_check_dynamic_batch_rejects_frozen_axis(tmp_path):
    from export.to_onnx import check_dynamic_batch

    onnx.save(tiny_convnet(batch="batch"), tmp_path / "dyn.onnx")
    info = check_dynamic_batch(tmp_path / "dyn.onnx", 8, batches=(1, 3, 9))
    assert info["batches"] == [1, 3, 9] and info["max_abs_vs_batch1"] < 1e-5
    onnx.save(tiny_convnet(batch=2), tmp_path / "frozen.onnx")
    with pytest.raises(ExportError, match="batch"):
        check_dynamic_batch(tmp_path / "frozen.onnx", 8, batches=(1, 3, 9))


def test_signature_check_names_a_frozen_batch_axis():
    from export.to_onnx import _check_signature
    from isfe_model.metadata import ModelMetadata

    md = ModelMetadata(embedding_dim=6, preprocess=PreprocessSpec(8, 8), checkpoint_sha256="x")
    _check_signature(tiny_convnet("batch"), md)
    with pytest.raises(ExportError, match="froze the batch axis"):
        _check_signature(tiny_convnet(2), md)
    with pytest.raises(ExportError, match=r"\[batch, 7\]"):
        _check_signature(tiny_convnet("batch"),
                         ModelMetadata(embedding_dim=7, preprocess=PreprocessSpec(8, 8), checkpoint_sha256="x"))


def test_export_onnx_refuses_batch_of_one(tmp_path):
    import torch

    from export.to_onnx import export_onnx
    from isfe_model.metadata import ModelMetadata

    md = ModelMetadata(embedding_dim=4, preprocess=PreprocessSpec(8, 8), checkpoint_sha256="x")
    with pytest.raises(ExportError, match="at least 2|>= 2"):
        export_onnx(torch.nn.Identity(), tmp_path / "m.onnx", md, example_batch=1)
    with pytest.raises(ExportError, match="does not exist"):
        export_onnx(torch.nn.Identity(), tmp_path / "no" / "m.onnx", md)
    assert list(tmp_path.iterdir()) == []


def test_summarize_train_config():
    from export.to_onnx import summarize_train_config

    s = summarize_train_config({"lr": 0.1, "sched": {"kind": "step", "milestones": [120, 160]}, "obj": object(),
                                "long": "x" * 500, "big": list(range(100))})
    assert s["lr"] == 0.1 and s["sched.kind"] == "step" and s["sched.milestones"] == [120, 160]
    assert "obj" not in s and "big" not in s and len(s["long"]) == 200
    json.dumps(s)


# --------------------------------------------------------------------------- fp16 ONNX (TensorRT 11 path)


def test_fp16_trunk_conversion_on_tiny_net():
    from export.fp16 import convert_trunk_to_fp16, fp16_region

    m = tiny_convnet()
    assert [m.graph.node[i].op_type for i in fp16_region(m.graph)] == ["Conv", "Relu", "Conv", "Add", "Relu"]
    h = convert_trunk_to_fp16(m)
    types = {t.name: t.data_type for t in h.graph.initializer}
    assert types["w1"] == types["w2"] == types["b1"] == TensorProto.FLOAT16
    assert types["mean"] == types["std"] == types["wh"] == TensorProto.FLOAT  # normalisation and head stay fp32
    assert h.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert h.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    casts = [(n.input[0], helper.get_attribute_value(n.attribute[0])) for n in h.graph.node if n.op_type == "Cast"]
    assert casts == [("n", TensorProto.FLOAT16), ("r2__fp16", TensorProto.FLOAT)]
    x = np.random.default_rng(0).random((5, 3, 8, 8), dtype=np.float32)
    y32 = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    y16 = ort.InferenceSession(h.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    assert y16.dtype == np.float32
    cos = (y32 * y16).sum(1) / np.linalg.norm(y32, axis=1) / np.linalg.norm(y16, axis=1)
    assert cos.min() > 0.999 and not np.array_equal(y32, y16)


def test_fp16_conversion_needs_convolutions():
    from export.fp16 import convert_trunk_to_fp16

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    with pytest.raises(ValueError, match="no Conv"):
        convert_trunk_to_fp16(helper.make_model(g))


# --------------------------------------------------------------------------- TensorRT (pure parts)


def test_trt_version_detection_and_plans():
    from export.to_tensorrt import build_plan, trt_major

    assert trt_major("10.13.2.6") == 10 and trt_major("11.0.0") == 11
    with pytest.raises(ExportError):
        trt_major("garbage")
    p = build_plan(10, "fp32")
    assert not p.strongly_typed and p.set_flags == () and "TF32" in p.clear_flags and p.onnx_variant == "fp32"
    p = build_plan(10, "fp16")
    assert not p.strongly_typed and p.set_flags == ("FP16", "OBEY_PRECISION_CONSTRAINTS") and p.pin_fp32_layers
    p = build_plan(11, "fp16")
    assert p.strongly_typed and p.set_flags == () and p.onnx_variant == "fp16-trunk" and not p.pin_fp32_layers
    p = build_plan(12, "fp32")
    assert p.strongly_typed and p.onnx_variant == "fp32"
    with pytest.raises(ExportError, match="too old"):
        build_plan(8, "fp32")
    with pytest.raises(ExportError, match="fp32 or fp16"):
        build_plan(10, "int8")


def test_profile_validation():
    from export.to_tensorrt import Profile

    assert Profile(1, 8, 64).opt == 8
    for bad in ((0, 1, 2), (1, 9, 8), (2, 1, 4)):
        with pytest.raises(ExportError, match="min <= opt <= max"):
            Profile(*bad)


def test_engine_sidecar_content():
    from export.to_tensorrt import Profile, build_plan, engine_sidecar

    side = engine_sidecar("10.9.0", "NVIDIA H100", (9, 0), "ab" * 32, Profile(1, 16, 64), "fp16",
                          build_plan(10, "fp16"), "image", "embedding", {"isfe.embedding_dim": "128"}, "cd" * 32)
    assert (side["tensorrt_version"] == "10.9.0" and side["gpu_name"] == "NVIDIA H100"
            and side["compute_capability"] == "9.0")
    assert side["profile"] == {"input": "image", "min": 1, "opt": 16, "max": 64}
    assert (side["precision"] == "fp16" and side["tf32"] is False
            and side["builder_flags"] == ["FP16", "OBEY_PRECISION_CONSTRAINTS"])
    assert side["onnx_sha256"] == "ab" * 32 and side["isfe_metadata"]["isfe.embedding_dim"] == "128"
    json.dumps(side)


def test_tensorrt_missing_reason():
    import importlib.util

    import torch

    from export.to_tensorrt import tensorrt_missing

    why = tensorrt_missing()
    if importlib.util.find_spec("tensorrt") is None:
        assert why == "TensorRT is not installed (pip install tensorrt; it needs an NVIDIA GPU and driver)"
    elif not torch.cuda.is_available():
        assert why is not None and "no CUDA device" in why
    else:
        assert why is None


# --------------------------------------------------------------------------- Triton text


def test_triton_name_and_config_text():
    from export.triton_repo import render_config, triton_name

    assert triton_name("isfe resnet/18 (v1)") == "isfe_resnet_18_v1"
    with pytest.raises(ExportError):
        triton_name("///")
    text = render_config("m", [("image", "TYPE_FP32", [3, 32, 32])], [("embedding", "TYPE_FP32", [128])], 64,
                         [16, 32, 64], 500)
    assert 'platform: "onnxruntime_onnx"' in text and "max_batch_size: 64" in text and "dims: [ 3, 32, 32 ]" in text
    assert "preferred_batch_size: [ 16, 32, 64 ]" in text and "max_queue_delay_microseconds: 500" in text


def test_triton_repo_rejects_static_batch(tmp_path):
    from export.triton_repo import write_triton_repo

    onnx.save(tiny_convnet(batch=2), tmp_path / "frozen.onnx")
    with pytest.raises(ExportError, match="dynamic batch"):
        write_triton_repo(tmp_path / "repo", tmp_path / "frozen.onnx", "m")
    assert list((tmp_path / "repo").iterdir()) == []


# --------------------------------------------------------------------------- writing artifacts


def test_an_artifact_that_cannot_be_written_is_named_not_its_temporary_file(tmp_path, monkeypatch):
    """A folder that takes no new files (as /proc), or a write that fails: the error names the artifact."""
    import errno
    import tempfile
    from types import SimpleNamespace

    from export.cli import gated
    from export.common import temp_path_for

    final = tmp_path / "model.onnx"

    def refuse(*a, dir=None, **k):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", f"{dir}/.model.onnx.x1.tmp.onnx")

    with monkeypatch.context() as m:
        m.setattr(tempfile, "mkstemp", refuse)
        with pytest.raises(OSError) as ei:
            temp_path_for(final, ".onnx")
    assert (ei.value.filename, ei.value.strerror) == (str(final), "cannot be written (No such file or directory)")

    def disk_full(tmp):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp))

    with pytest.raises(OSError) as ei:
        gated(SimpleNamespace(), kind="ONNX fp32", backend="onnxruntime", final=final, suffix=".onnx", what="x",
              build=disk_full)
    assert (ei.value.errno, ei.value.filename) == (errno.ENOSPC, str(final))
    assert ei.value.strerror == "cannot be written (No space left on device)"
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the temporary file is gone
