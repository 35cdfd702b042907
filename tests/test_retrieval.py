"""The one top-k search (training.retrieval) against a brute-force loop; the bank embedding; strict JSON outputs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from isfe_model.preprocess import PreprocessSpec
from training.model import ModelConfig, build_encoder
from training.retrieval import embed_images, eval_tensors, topk_similar


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def loop_topk(queries, bank, k, exclude=None):
    """Slow twin: per query, every bank row's float64 score, sorted by (-score, index), excluded row dropped."""
    q64, b64 = np.asarray(queries, dtype=np.float64), np.asarray(bank, dtype=np.float64)
    scores, indices = [], []
    for i in range(q64.shape[0]):
        cand = [(float(np.dot(q64[i], b64[j])), j) for j in range(b64.shape[0]) if exclude is None or j != exclude[i]]
        cand.sort(key=lambda t: (-t[0], t[1]))
        scores.append([s for s, _ in cand[:k]])
        indices.append([j for _, j in cand[:k]])
    return np.array(scores).reshape(len(scores), -1), np.array(indices, dtype=np.int64).reshape(len(indices), -1)


def with_ties(n: int, d: int, seed: int) -> torch.Tensor:
    """Unit rows with exact duplicates (ties of every kind: in the selection and across the k-th place)."""
    base = unit(n, d, seed)
    base[5] = base[2]
    base[9] = base[2]
    base[n - 1] = base[0]
    return base


@pytest.mark.parametrize("chunk_size", [3, 7, 1024])
@pytest.mark.parametrize("k", [1, 4, 39])
def test_topk_matches_loop_queries_vs_bank(k, chunk_size):
    bank = with_ties(40, 6, 0)
    queries = torch.cat([bank[[2, 0, 17]], unit(8, 6, 1)])  # queries equal to tied bank rows, and fresh ones
    scores, idx = topk_similar(queries, bank, k, chunk_size=chunk_size, dtype=torch.float64)
    ref_s, ref_i = loop_topk(queries.double(), bank.double(), k)
    assert idx.dtype == torch.int64 and idx.shape == (11, k) and scores.dtype == torch.float64
    assert idx.tolist() == ref_i.tolist()
    np.testing.assert_allclose(scores.numpy(), ref_s, rtol=0, atol=1e-12)
    assert idx[0, :3].tolist() == [2, 5, 9][:k]  # three identical rows: ascending index


@pytest.mark.parametrize("chunk_size", [4, 1024])
def test_topk_exclude_self_matches_loop(chunk_size):
    bank = with_ties(30, 5, 2)
    n = bank.shape[0]
    for k in (1, 3, n - 1, n + 5):  # k = N - 1 returns every other row; larger k is clipped to it
        scores, idx = topk_similar(bank, bank, k, exclude_self=True, chunk_size=chunk_size, dtype=torch.float64)
        ref_s, ref_i = loop_topk(bank.double(), bank.double(), min(k, n - 1), exclude=list(range(n)))
        assert idx.tolist() == ref_i.tolist()
        np.testing.assert_allclose(scores.numpy(), ref_s, atol=1e-12)
        assert not (idx == torch.arange(n)[:, None]).any()
    # k = N - 1: each row is a permutation of the other rows
    _, idx = topk_similar(bank, bank, n - 1, exclude_self=True, chunk_size=chunk_size)
    for i in range(n):
        assert sorted(idx[i].tolist()) == [j for j in range(n) if j != i]


def test_topk_exclude_index_per_query_float32():
    bank = with_ties(50, 8, 3)
    sub = np.array([2, 9, 5, 0, 49, 13])
    scores, idx = topk_similar(bank[sub], bank, 4, exclude=sub, chunk_size=4)
    ref_s, ref_i = loop_topk(bank[sub].double(), bank.double(), 4, exclude=sub)
    assert scores.dtype == torch.float32
    assert idx.tolist() == ref_i.tolist()
    np.testing.assert_allclose(scores.numpy(), ref_s, atol=1e-6)
    # the tied duplicates, with the query's own row left out
    assert idx[0, :2].tolist() == [5, 9] and idx[1, :2].tolist() == [2, 5]


def test_topk_all_tied_and_non_finite_rows():
    same = torch.ones(6, 3) / math.sqrt(3)
    _, idx = topk_similar(same, same, 2, exclude_self=True, chunk_size=4)
    assert idx.tolist() == [[1, 2], [0, 2], [0, 1], [0, 1], [0, 1], [0, 1]]
    bank = unit(5, 4, 4)
    queries = torch.cat([torch.full((1, 4), float("nan")), bank[:1]])
    # a NaN query scores -inf everywhere: every bank row ties, the excluded one still never comes back
    scores, idx = topk_similar(queries, bank, 4, exclude=[1, 0])
    assert idx[0].tolist() == [0, 2, 3, 4] and torch.isinf(scores[0]).all()
    assert 0 not in idx[1].tolist()


def test_topk_numpy_inputs_empty_and_bad_arguments():
    bank = unit(10, 4, 5)
    s_np, i_np = topk_similar(bank.numpy(), bank.numpy(), 3)
    s_t, i_t = topk_similar(bank, bank, 3)
    assert torch.equal(i_np, i_t) and torch.equal(s_np, s_t) and i_t[:, 0].tolist() == list(range(10))
    s, i = topk_similar(bank[:0], bank, 3)
    assert s.shape == (0, 3) and i.shape == (0, 3)
    s, i = topk_similar(bank[:1], bank[:1], 5, exclude_self=True)
    assert s.shape == (1, 0)
    with pytest.raises(ValueError, match="Q == N"):
        topk_similar(bank[:3], bank, 2, exclude_self=True)
    with pytest.raises(ValueError, match="one bank index per query"):
        topk_similar(bank[:3], bank, 2, exclude=[0, 1])
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        topk_similar(bank[:2], bank, 2, exclude=[0, 10])
    with pytest.raises(ValueError, match="same D"):
        topk_similar(bank[:, :3], bank, 2)
    with pytest.raises(ValueError, match="not both"):
        topk_similar(bank, bank, 2, exclude=list(range(10)), exclude_self=True)


def test_topk_ignores_autocast():
    bank = unit(64, 16, 6)
    ref_s, ref_i = topk_similar(bank, bank, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s, i = topk_similar(bank, bank, 5)
    assert s.dtype == torch.float32 and torch.equal(i, ref_i) and torch.equal(s, ref_s)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return build_encoder(ModelConfig(embedding_dim=16, preprocess=PreprocessSpec(input_size=8, resize_size=12))).eval()


def test_embed_images_numpy_tensor_batches_and_mode():
    model = tiny_model()
    images = np.random.default_rng(0).integers(0, 256, (11, 12, 12, 3), dtype=np.uint8)
    spec = model.cfg.preprocess
    with torch.no_grad():  # slow twin: one forward pass of the central 8x8 of all 11 images
        ref = model(torch.from_numpy(images[:, 2:10, 2:10].copy()).permute(0, 3, 1, 2).float() / 255)
        back = F.normalize(model.features(eval_tensors(images, spec)), dim=1)
    for src in (images, torch.from_numpy(images)):
        for bs in (3, 11, 64):
            torch.testing.assert_close(embed_images(model, src, spec, bs), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(embed_images(model, images, spec, 4, features="backbone"), back, rtol=1e-4, atol=1e-5)
    bf16 = embed_images(model, images, spec, 4, amp=True)
    assert bf16.dtype == torch.float32 and F.cosine_similarity(bf16, ref).min() > 0.98
    model.train()
    embed_images(model, images, spec)
    assert model.training  # mode restored
    assert embed_images(model, images[:0], spec).shape == (0, 0)
    with pytest.raises(ValueError, match="features must be one of"):
        embed_images(model, images, spec, features="pixels")


# --------------------------------------------------------------------------- strict JSON outputs


def _strict_loads(text: str):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_parity_json_is_strict_with_nan_metrics(tmp_path):
    from export.parity import Gate, ParityImages, run_parity

    x = np.random.default_rng(0).random((6, 3, 4, 4), dtype=np.float32)
    ref = np.eye(6, 8, dtype=np.float32)
    rep = run_parity("x", lambda b: np.full((len(b), 8), np.nan, np.float32), ParityImages(x, None, "test"), ref,
                     tmp_path / "m.onnx", gate=Gate(max_abs=1e-4), log=None)
    assert not rep.passed and math.isinf(rep.metrics["max_abs"])
    saved = _strict_loads((tmp_path / "m.onnx.parity.json").read_text())
    assert saved["metrics"]["max_abs"] is None and saved["metrics"]["nonfinite"] == 48
    assert saved["checks"][1]["metric"] == "max_abs" and saved["checks"][1]["passed"] is False


def test_report_json_is_strict_with_non_finite_metrics(tmp_path):
    from training.model import save_checkpoint
    from training.report import main as report_main

    run = tmp_path / "run"
    run.mkdir()
    model = tiny_model()
    save_checkpoint(run / "checkpoint.pt", model, model.cfg, {"data": None})
    rows = [{"epoch": 0, "knn_top1": float("nan")}, {"epoch": 1, "loss": float("inf"), "knn_top1": 10.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))  # Python writes NaN / Infinity
    assert report_main(["--run", str(run), "--out", str(tmp_path / "out"), "--max-queries", "20", "--queries", "2",
                        "--top-k", "2", "--device", "cpu"]) == 0
    rep = _strict_loads((tmp_path / "out" / "report.json").read_text())
    assert rep["final_metrics"] == {"epoch": 1, "loss": None, "knn_top1": 10.0}
    assert rep["run_summaries"][0]["loss"] is None
