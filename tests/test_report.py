"""Visual reports (training/report.py) on a real short training run.

The numbers in report.json are recomputed here independently: embeddings with
a plain forward pass, neighbours with a numpy brute force (Fig. 5: each
query's nearest within its class and within the other classes, by a plain
loop), the means with numpy and the AUC with scikit-learn's roc_auc_score.
"""

from __future__ import annotations

import base64
import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

import training.report as report_module
from training.data import load_split
from training.model import build_encoder, load_encoder
from training.report import (
    ReportError,
    RunRecord,
    class_neighbours,
    curves_figure,
    figure_png,
    load_run,
    main,
    read_metrics,
    roc_auc,
)
from training.retrieval import topk_similar

HOSTILE = 'abl<i>&"x'


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    """One real (short) training run of the embedded default data."""
    from training.train import main as train_main

    out = tmp_path_factory.mktemp("report") / "run"
    rc = train_main(["--epochs", "1", "--batch-size", "64", "--input-size", "8", "--resize-size", "8",
                     "--embedding-dim", "32", "--out", str(out)])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def report_dir(run_dir, tmp_path_factory):
    """The full report for the run, with a second run (hostile folder name, metrics only) overlaid on the curves."""
    base = tmp_path_factory.mktemp("report_out")
    other = base / HOSTILE
    other.mkdir()
    shutil.copy(run_dir / "metrics.jsonl", other / "metrics.jsonl")
    out = base / "report"
    rc = main(["--run", str(run_dir), "--run", str(other), "--out", str(out),
               "--max-queries", "100", "--queries", "4", "--top-k", "5"])
    assert rc == 0
    return out


def _check_png(path, min_w, min_h):
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
        assert w >= min_w and h >= min_h, (path.name, im.size)
        rgb = np.asarray(im.convert("RGB"))
    # not blank: many colours and real contrast
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 50
    assert rgb.std() > 10
    return rgb


def test_figures_are_valid_non_blank_pngs(report_dir):
    for name, (w, h) in {"curves.png": (800, 350), "similarity.png": (800, 350), "retrieval.png": (600, 400)}.items():
        _check_png(report_dir / name, w, h)


def test_retrieval_frames_are_green_and_red(report_dir):
    rgb = _check_png(report_dir / "retrieval.png", 600, 400).astype(int)
    green = ((abs(rgb[..., 0] - 0x2C) < 8) & (abs(rgb[..., 1] - 0xA0) < 8) & (abs(rgb[..., 2] - 0x2C) < 8)).sum()
    red = ((abs(rgb[..., 0] - 0xD6) < 8) & (abs(rgb[..., 1] - 0x27) < 8) & (abs(rgb[..., 2] - 0x28) < 8)).sum()
    rep = json.loads((report_dir / "report.json").read_text())
    test = load_split(None, "test", 8)
    same = (test.labels[np.array(rep["retrieval"]["neighbour_indices"])]
            == test.labels[np.array(rep["retrieval"]["query_indices"])][:, None])
    assert np.array(rep["retrieval"]["neighbour_indices"]).shape == (4, 5)
    assert rep["retrieval"]["same_class_fraction"] == pytest.approx(same.mean())
    assert (green > 100) == bool(same.any()) and (red > 100) == bool((~same).any())


def _embed(net, images):
    with torch.no_grad():
        x = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float() / 255.0
        return net(x).double().numpy()


def loop_fig5(s: np.ndarray, yq: np.ndarray, yb: np.ndarray, k: int, exclude=None):
    """The paper's Fig. 5 by a plain loop over a score matrix s [M, N]: per query, the k best bank columns of its
    class (itself excluded) and the k best of the other classes -> ([(j, score), ...] same, [...] other) per query."""
    same, other = [], []
    for i in range(s.shape[0]):
        own = [j for j in range(s.shape[1]) if yb[j] == yq[i] and (exclude is None or j != exclude[i])]
        rest = [j for j in range(s.shape[1]) if yb[j] != yq[i]]
        same.append([(j, s[i, j]) for j in sorted(own, key=lambda j: (-s[i, j], j))[:k]])
        other.append([(j, s[i, j]) for j in sorted(rest, key=lambda j: (-s[i, j], j))[:k]])
    return same, other


def _check_stats(st, same, other):
    a = np.array([v for row in same for _, v in row])
    b = np.array([v for row in other for _, v in row])
    assert st["n_same"] == a.size and st["n_other"] == b.size and st["n_pairs"] == a.size + b.size
    assert st["mean_same"] == pytest.approx(a.mean(), abs=1e-6)
    assert st["mean_other"] == pytest.approx(b.mean(), abs=1e-6)
    assert st["mean_gap"] == pytest.approx(a.mean() - b.mean(), abs=1e-6)
    y = np.r_[np.ones(a.size, bool), np.zeros(b.size, bool)]
    assert st["auc"] == pytest.approx(roc_auc_score(y, np.r_[a, b]), abs=1e-6)


def test_report_json_numbers_recomputed_independently(run_dir, report_dir):
    rep = json.loads((report_dir / "report.json").read_text())
    sim = rep["similarity"]
    model = load_encoder(run_dir / "checkpoint.pt")
    # no crop: a plain forward is the eval transform
    assert model.cfg.preprocess.input_size == model.cfg.preprocess.resize_size == 8
    train, test = load_split(None, "train", 8), load_split(None, "test", 8)
    q = np.sort(np.random.default_rng(0).choice(len(test), size=100, replace=False))
    assert sim["query_indices"] == q.tolist() and sim["num_queries"] == 100 and sim["nn_k"] == 5
    assert sim["bank_split"] == "train" and "WITHIN ITS OWN CLASS" in sim["definition"]
    torch.manual_seed(0)
    random_net = build_encoder(model.cfg).eval()
    for which, net in (("trained", model), ("random", random_net)):
        bank, queries = _embed(net, train.images), _embed(net, test.images)[q]
        same, other = loop_fig5(queries @ bank.T, test.labels[q], train.labels, 5)
        assert sim[which]["n_same"] == sim[which]["n_other"] == 500  # 5 of each per query: every class has >= 5
        _check_stats(sim[which], same, other)
    assert rep["final_metrics"] == json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert rep["config"]["epochs"] == 1 and rep["data"] == "digits"


def test_report_with_the_test_split_as_bank(run_dir, tmp_path):
    """--bank test: queries search the test split itself, each excluded from its own neighbours."""
    out = tmp_path / "rep"
    assert main(["--run", str(run_dir), "--out", str(out), "--bank", "test", "--max-queries", "60", "--nn-k", "3"]) == 0
    sim = json.loads((out / "report.json").read_text())["similarity"]
    assert sim["bank_split"] == "test" and sim["nn_k"] == 3
    model = load_encoder(run_dir / "checkpoint.pt")
    test = load_split(None, "test", 8)
    q = np.array(sim["query_indices"])
    feats = _embed(model, test.images)
    same, other = loop_fig5(feats[q] @ feats.T, test.labels[q], test.labels, 3, exclude=q)
    assert all(j != qi for row, qi in zip(same, q) for j, _ in row)
    _check_stats(sim["trained"], same, other)


@pytest.mark.parametrize("exclude_self", [False, True])
def test_class_neighbours_match_a_loop(exclude_self, monkeypatch):
    """Exact same-class / other-class top-k, ties by the lower bank index, rows with fewer candidates padded."""
    rng = np.random.default_rng(5)
    n, d, k = 90, 6, 4
    bank = rng.integers(-2, 3, size=(n, d)).astype(np.float32)  # small integers: exact scores, many ties
    yb = rng.integers(0, 4, size=n)
    yb[:3] = 7  # a class with 3 (< k) bank rows
    yb[3] = 8  # a class with a single row: with self-exclusion it has no same-class neighbour
    if exclude_self:
        qi = np.r_[0, 1, 3, rng.choice(np.arange(4, n), 30, replace=False)]
        queries, yq, ex = bank[qi], yb[qi], qi
    else:
        queries = rng.integers(-2, 3, size=(25, d)).astype(np.float32)
        yq = np.r_[7, 8, 9, rng.integers(0, 4, size=22)]  # class 9: not in the bank at all
        ex = None
    monkeypatch.setattr(report_module, "_CANDIDATE_BUDGET", 20)  # several row slices per class
    ss, si, os_, oi = class_neighbours(torch.from_numpy(queries), torch.from_numpy(bank), yq, yb, k, ex,
                                       chunk_size=3)
    scores = queries.astype(np.float64) @ bank.astype(np.float64).T
    same, other = loop_fig5(scores, yq, yb, k, ex)
    for i in range(len(yq)):
        for got_s, got_i, want in ((ss[i], si[i], same[i]), (os_[i], oi[i], other[i])):
            w = len(want)
            assert list(got_i[:w]) == [j for j, _ in want] and (got_i[w:] == -1).all(), i
            assert np.array_equal(got_s[:w], [v for _, v in want]) and np.isnan(got_s[w:]).all(), i
    assert (si >= 0).sum() < len(yq) * k and (oi >= 0).sum() == len(yq) * k  # padded same-class rows exist
    with pytest.raises(ValueError, match="own bank row"):
        class_neighbours(torch.from_numpy(bank[:2]), torch.from_numpy(bank), yb[:2], yb, k, np.array([3, 3]))  # class 8


def test_html_is_self_contained_and_escaped(run_dir, report_dir):
    page = (report_dir / "report.html").read_text()
    srcs = re.findall(r'src="([^"]*)"', page)
    assert len(srcs) == 3
    for src, name in zip(srcs, ("curves.png", "similarity.png", "retrieval.png")):
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]) == (report_dir / name).read_bytes()
    assert not re.search(r'(src|href)="(?!data:)', page) and "<link" not in page and "<script" not in page
    assert HOSTILE not in page and "abl&lt;i&gt;&amp;&quot;x" in page
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert "knn_top1" in page and f"{last['knn_top1']:.4g}" in page
    assert "Runs compared" in page


def test_training_writes_curves(run_dir):
    _check_png(run_dir / "curves.png", 800, 350)


def test_curves_overlay_one_line_per_run(run_dir, tmp_path):
    a = load_run(run_dir)
    b = RunRecord(path=tmp_path / "ablation", name="ablation", rows=[
        {"epoch": 0, "knn_top1": 10.0}, {"epoch": 2, "knn_top1": 30.0, "loss": 4.0},
        {"epoch": 4, "knn_top1": 50.0, "loss": 3.0}], config={})
    fig = curves_figure([a, b])
    ax_loss, ax_knn = fig.axes
    assert [t.get_text() for t in ax_knn.get_legend().get_texts()] == [a.name, "ablation"]
    lines = {ln.get_label(): ln for ln in ax_knn.get_lines()}
    assert list(lines["ablation"].get_ydata()) == [10.0, 30.0, 50.0]
    assert list(lines[a.name].get_xdata()) == [r["epoch"] for r in a.rows]
    loss_lines = {ln.get_label(): ln for ln in ax_loss.get_lines()}
    assert list(loss_lines["ablation"].get_xdata()) == [2, 4]  # epoch 0 has no loss
    assert ax_knn.get_xlabel() == "epoch" and ax_knn.get_ylabel() and ax_loss.get_title()
    b.name = r"lr $\frac$ x"  # '$' in a folder name is shown literally (as mathtext this would raise ValueError)
    fig = curves_figure([a, b])
    assert fig.axes[1].get_legend().get_texts()[1].get_text() == r"lr \$\frac\$ x"
    assert figure_png(fig).startswith(b"\x89PNG")


def test_curves_only_needs_no_checkpoint(run_dir, tmp_path, capsys):
    other = tmp_path / "running"
    other.mkdir()
    shutil.copy(run_dir / "metrics.jsonl", other / "metrics.jsonl")
    with (other / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 2, "knn_to')  # a line being written right now
    assert main(["--run", str(other), "--curves-only"]) == 0
    assert sorted(p.name for p in (other / "report").iterdir()) == ["curves.png"]
    _check_png(other / "report" / "curves.png", 800, 350)


def test_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(3)
    for _ in range(20):
        n = int(rng.integers(2, 300))
        scores = np.round(rng.normal(size=n), int(rng.integers(0, 3)))  # many ties
        y = rng.random(n) < rng.uniform(0.1, 0.9)
        if y.all() or not y.any():
            assert roc_auc(scores, y) is None
            continue
        assert roc_auc(scores, y) == pytest.approx(roc_auc_score(y, scores), abs=1e-12)


def test_report_float64_neighbours_match_brute_force():
    rng = np.random.default_rng(1)
    bank = rng.normal(size=(300, 16))
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    bank[7] = bank[3]  # an exact tie: the lower index comes first
    queries = bank[[3, 10, 50, 299]] + 0.01 * rng.normal(size=(4, 16))
    sims, idx = (t.numpy() for t in topk_similar(torch.from_numpy(queries).float(), torch.from_numpy(bank).float(), 6,
                                                 chunk_size=3, dtype=torch.float64))  # the report's float64 neighbours
    b32 = torch.from_numpy(bank).float().double().numpy()
    q32 = torch.from_numpy(queries).float().double().numpy()
    ref = q32 @ b32.T
    ref_idx = np.argsort(-ref, axis=1, kind="stable")[:, :6]
    assert (idx == ref_idx).all() and np.allclose(sims, np.take_along_axis(ref, ref_idx, 1), atol=1e-12)
    assert list(idx[0, :2]) == [3, 7]
    ex = np.array([3, 10, 50, 299])
    _, idx_ex = (t.numpy() for t in topk_similar(bank[ex], bank, 4, exclude=ex, dtype=torch.float64))
    assert not (idx_ex == ex[:, None]).any()


def test_metrics_reader_rejects_damaged_lines(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"epoch": 0, "knn_top1": 1}\nnot json\n{"epoch": 1, "knn_top1": 2}\n')
    with pytest.raises(ReportError, match="line 2"):
        read_metrics(p)
    p.write_text("")
    with pytest.raises(ReportError, match="no metrics rows"):
        read_metrics(p)


@pytest.mark.parametrize("case", ["missing", "empty-folder", "no-checkpoint", "damaged-metrics", "a-file", "bad-data",
                                  "bad-nn-k", "bad-device", "bad-bank"])
def test_bad_input_one_line_exit_2(case, run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    extra: list[str] = []
    run = tmp_path / "run"
    if case == "missing":
        pass
    elif case == "empty-folder":
        run.mkdir()
    elif case == "no-checkpoint":
        run.mkdir()
        shutil.copy(run_dir / "metrics.jsonl", run / "metrics.jsonl")
    elif case == "damaged-metrics":
        run.mkdir()
        (run / "metrics.jsonl").write_text('{"epoch": 0}\n{oops\n{"epoch": 1}\n')
        (run / "checkpoint.pt").write_bytes(b"x")
    elif case == "a-file":
        run.write_text("hello")
    else:
        run = run_dir
        extra = {"bad-data": ["--data", str(tmp_path / "nope")], "bad-nn-k": ["--nn-k", "0"],
                 "bad-device": ["--device", "cuda:7" if not torch.cuda.is_available() else "nonsense"],
                 "bad-bank": ["--bank", "val"]}[case]
    rc = main(["--run", str(run), "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # nothing written
