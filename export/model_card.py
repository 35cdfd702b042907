"""The README.md of a model package: a model card in the Hugging Face Hub convention.

YAML front matter (``library_name``, ``tags``, ``pipeline_tag:
image-feature-extraction``, ``license``), then: how to load it (three lines),
what it was trained on and how, the kNN / Recall@K numbers from the run's
``metrics.jsonl`` and its curve (``curves.png``), the parity table of every
model file, the files with their sha256, intended use and limitations.
Everything is read from the package's config.json, so the card and the
config cannot disagree.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["model_card"]

PAPER = ("*Unsupervised Embedding Learning via Invariant and Spreading Instance Feature* "
         "(Ye, Zhang, Yuen, Chang, CVPR 2019)")


def _num(v: Any, digits: int = 2) -> str:
    if isinstance(v, bool) or v is None:
        return "-" if v is None else str(v)
    if isinstance(v, float):
        return f"{v:.3e}" if v != 0 and abs(v) < 1e-3 else f"{v:.{digits}f}"
    return str(v)


def _front_matter(cfg: dict[str, Any]) -> str:
    tags = ["isfe", "image-feature-extraction", "onnx", "self-supervised", "embeddings",
            str(cfg.get("arch") or "encoder")]
    return ("---\nlibrary_name: isfe-model\n" + "tags:\n" + "".join(f"- {t}\n" for t in tags)
            + "pipeline_tag: image-feature-extraction\nlicense: mit\n---\n")


def _eval_rows(rows: list[dict[str, Any]]) -> str:
    evals = [r for r in rows if any(k.startswith(("knn_", "recall@")) for k in r)]
    if not evals:
        return "The run folder had no evaluation rows (no `metrics.jsonl`, or no test split).\n"
    keys = [k for k in evals[-1] if k.startswith(("knn_", "recall@"))]
    lines = ["| epoch | " + " | ".join(f"{k} (%)" for k in keys) + " |", "|---|" + "---|" * len(keys)]
    for r in evals:
        lines.append(f"| {r.get('epoch', '?')} | " + " | ".join(_num(r.get(k)) for k in keys) + " |")
    return "\n".join(lines) + ("\n\nEpoch 0 is the randomly initialised encoder. kNN: weighted k-nearest-neighbour "
                               "top-1/top-5 on the test split with the training split as the bank.\n")


def _parity_rows(cfg: dict[str, Any], failed: list[str]) -> str:
    lines = ["| file | precision | backend | images | max abs | min cosine | mean cosine | top-1 agreement | kNN drop "
             "(pt) | gate |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for precision, e in cfg.get("precisions", {}).items():
        p = e.get("parity") or {}
        m = p.get("metrics") or {}
        lines.append(f"| `{e['file']}` | {precision} | {p.get('backend')} | {p.get('n_images')} | "
                     f"{_num(m.get('max_abs'))} | {_num(m.get('min_cosine'), 6)} | {_num(m.get('mean_cosine'), 6)} | "
                     f"{_num(m.get('top1_agreement'), 3)} | {_num(m.get('knn_top1_drop'))} | "
                     f"{'passed' if p.get('passed') else 'FAILED'} |")
    text = "\n".join(lines) + "\n\nReference: the PyTorch fp32 encoder on CPU, on real images; reports in `parity/`.\n"
    for precision in failed:
        text += (f"\nAn {precision} model was built but failed its parity gate and is **not** included "
                 "(report in `parity/`).\n")
    return text


def _use_lines(name: str, dim: int) -> str:
    """The three lines that load and use the model, comments aligned."""
    lines = [("from isfe_model import Encoder", f"pip install isfe-model isfe-model-{name}"),
             (f"enc = Encoder.from_pretrained({json.dumps(name)})", 'or this folder\'s path; precision="auto" | '
                                                                    '"fp32" | "int8"'),
             ('emb = enc.embed(["a.jpg", "b.jpg"])',
              f"float32 [2, {dim}], unit rows: emb @ emb.T is cosine similarity")]
    width = max(len(code) for code, _ in lines) + 2
    return "\n".join(f"{code.ljust(width)}# {comment}" for code, comment in lines)


def _data_name(data: Any) -> str:
    return data if isinstance(data, str) else json.dumps(data) if data is not None else "unknown data"


def model_card(cfg: dict[str, Any], rows: list[dict[str, Any]], failed: list[str] | None = None,
               curves: bool = False) -> str:
    """README.md of a package: its config (as written), the run's metrics rows, whether curves.png is there."""
    name, version, dim = cfg["name"], cfg["version"], cfg["dim"]
    pre = cfg.get("preprocess") or {}
    tr = cfg.get("training") or {}
    s, r = pre.get("input_size"), pre.get("resize_size")
    keys = ("data", "epochs", "batch_size", "lr", "temperature", "loss", "preset", "seed")
    recipe_rows = "".join(f"| {k} | `{_data_name(tr[k])}` |\n" for k in keys if tr.get(k) is not None)
    precisions = ", ".join(cfg.get("precisions", {}))
    curve = "![training curves](curves.png)\n" if curves else ""
    return f"""{_front_matter(cfg)}
# {name} {version}

ISFE image encoder: {cfg.get('arch')} → {dim}-d L2-normalised embeddings, trained **without labels** with the
instance loss of {PAPER}. Precisions in this package: {precisions}. Fingerprint (sha256 of the training
checkpoint): `{cfg.get('fingerprint')}`.

## Use

```python
{_use_lines(name, dim)}
```

Command line: `isfe-embed {name} IMAGE... -o emb.npy`, `isfe-index {name} FOLDER -o GALLERY`.
`precision="auto"` runs the INT8 model on the CPU when the package has one that passed its gate, fp32 otherwise.

## Training

| | |
|---|---|
{recipe_rows}
Preprocessing (inside `config.json` and the ONNX metadata): resize to {r}
({pre.get('resize_policy')}, {pre.get('interpolation')}), center crop {s}×{s}, RGB in [0, 1]; the mean/std
normalisation is inside the graph.

## Results

{_eval_rows(rows)}
{curve}
## Parity: every file against the trained weights

{_parity_rows(cfg, failed or [])}
## Intended use

Image similarity, retrieval and near-duplicate search on images like the training data; a feature extractor
for kNN or linear classifiers. Embeddings of two models (or two fingerprints) are not comparable.

## Limitations

- Input is resized and cropped to {s}×{s} pixels: fine detail below that resolution is lost.
- Trained on `{_data_name(tr.get('data'))}` only; embeddings of images from other domains are less meaningful.
- Unsupervised: neighbours are visually similar, not guaranteed to share a class; no identity or safety use.
- The INT8 model approximates the fp32 one (see the parity table); galleries built with either are accepted by
  the other.
"""
