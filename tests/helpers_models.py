"""Small real ISFE models and images for the tests and the benchmarks.

``make_model(dir)`` trains nothing: it builds a seeded EmbeddingNet, saves a
real checkpoint (training.model.save_checkpoint) and exports it to ONNX with
ISFE metadata through ``export.to_onnx.export_onnx`` (the project's export
code).  ``build_model(onnx_path)`` is the same model addressed by the ONNX
path (serving, demo and ``benchmarks/serve_bench.py`` use it).  Random
weights embed images deterministically, which is all serving, latency and
parity checks need.  Needs torch (the tests' environment has it; the
isfe_model package itself never imports it).

Images: ``make_images`` (coloured shapes on noisy backgrounds, one class per
shape) and ``make_image_folder`` / ``photo`` (smooth photo-like pictures);
``make_split_folder`` (a tiny train/test class folder for training runs) and
``make_tgz`` (an archive of given files).  Command lines: ``clean_stderr`` and
``main_stderr`` (a ``main(argv)``'s exit code and stderr); ``free_port`` for servers.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from isfe_model.metadata import ModelMetadata
from isfe_model.preprocess import PreprocessSpec

EMBED_DIM = 32
INPUT_SIZE = 16
RESIZE_SIZE = 20


@dataclass
class ModelFiles:
    onnx_path: Path
    checkpoint_path: Path
    metadata: ModelMetadata
    via: str  # "export.to_onnx"


def make_model(out_dir: Path, seed: int = 0, embedding_dim: int = EMBED_DIM, input_size: int = INPUT_SIZE,
               resize_size: int = RESIZE_SIZE, arch: str = "resnet18", name: str = "model",
               max_batch: int = 4) -> ModelFiles:
    """A seeded encoder -> ``out_dir/<name>.pt`` + ``out_dir/<name>.onnx`` with ISFE metadata (seconds on CPU).

    ``export_onnx`` checks the ONNX file against PyTorch with ONNX Runtime at batch 1, 3 and ``max_batch``.
    """
    import torch

    from export.to_onnx import export_onnx  # the project's export code
    from training.model import ModelConfig, build_encoder, file_sha256, save_checkpoint

    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    spec = PreprocessSpec(input_size=input_size, resize_size=resize_size)
    cfg = ModelConfig(arch=arch, embedding_dim=embedding_dim, preprocess=spec)
    model = build_encoder(cfg).eval()
    # random but non-trivial BatchNorm statistics, so eval mode is a real test
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    ckpt = save_checkpoint(out_dir / f"{name}.pt", model, cfg, config={"seed": seed, "purpose": "isfe_model tests"})
    metadata = ModelMetadata(
        embedding_dim=embedding_dim,
        preprocess=spec,
        checkpoint_sha256=file_sha256(ckpt),
        model_name=f"test-{name}",
        model_version="0",
        arch=arch,
        train_config={"seed": seed},
    )
    onnx_path = out_dir / f"{name}.onnx"
    export_onnx(model, onnx_path, metadata, max_batch=max_batch)
    via = "export.to_onnx"
    return ModelFiles(onnx_path, ckpt, metadata, via)


def build_model(onnx_path: str | os.PathLike, arch: str = "resnet18", embedding_dim: int = 32, input_size: int = 16,
                resize_size: int | None = None, seed: int = 0, max_batch: int = 8) -> Path:
    """:func:`make_model` addressed by its ONNX path (checkpoint ``<stem>.pt`` beside it); returns ``onnx_path``."""
    onnx_path = Path(onnx_path)
    files = make_model(onnx_path.parent, seed=seed, embedding_dim=embedding_dim, input_size=input_size,
                       resize_size=resize_size or input_size, arch=arch, name=onnx_path.stem, max_batch=max_batch)
    return files.onnx_path


def shared_model(tmp_path_factory) -> ModelFiles:
    """One exported model per pytest session, shared by all isfe_model test files."""
    base = tmp_path_factory.getbasetemp() / "isfe_shared_model"
    done = base / "ready.json"
    if done.exists():
        info = json.loads(done.read_text())
        md = ModelMetadata.from_props(info["props"])
        return ModelFiles(Path(info["onnx"]), Path(info["ckpt"]), md, info["via"])
    files = make_model(base)
    done.write_text(json.dumps({"onnx": str(files.onnx_path), "ckpt": str(files.checkpoint_path), "via": files.via,
                                "props": files.metadata.to_props()}))
    return files


def with_props(src: Path, dst: Path, **changes: str | None) -> Path:
    """Copy an ONNX file with some metadata_props changed (value None: removed)."""
    import onnx

    proto = onnx.load(str(src))
    props = {p.key: p.value for p in proto.metadata_props}
    for k, v in changes.items():
        key = k if k.startswith("isfe.") else "isfe." + k
        if v is None:
            props.pop(key, None)
        else:
            props[key] = v
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, props)
    onnx.save(proto, str(dst))
    return dst


# --------------------------------------------------------------------------- images


def photo(w: int, h: int, seed: int = 0) -> np.ndarray:
    """A smooth, photo-like uint8 [h, w, 3] image (gradients + blobs; compresses like a photo)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        a, b, f = rng.uniform(-1, 1), rng.uniform(-1, 1), rng.uniform(2, 8)
        img[..., c] = 127 + 100 * np.sin(f * (a * xx / max(w, 1) + b * yy / max(h, 1)) + rng.uniform(0, 6))
    for _ in range(3):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.1, 0.4) * max(w, h)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
        img += blob[..., None] * rng.uniform(-80, 80, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_image(path: Path, arr: np.ndarray, fmt: str | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt, **kw)
    return path


def make_image_folder(root: Path, classes: dict[str, int], size: tuple[int, int] = (24, 20),
                      seed: int = 0) -> list[Path]:
    """root/<class>/<n>.png|jpg with photo-like images; returns the files (sorted)."""
    files = []
    n = 0
    for c, count in classes.items():
        for i in range(count):
            w, h = size[0] + (n % 5) * 3, size[1] + (n % 3) * 4
            ext = "png" if i % 2 == 0 else "jpg"
            files.append(write_image(root / c / f"{i:03d}.{ext}", photo(w, h, seed + n)))
            n += 1
    return sorted(files)


CLASSES = ("circle", "square", "stripes")


def _shape_picture(kind: str, rng: np.random.Generator, size: int) -> Image.Image:
    """A ``size``x``size`` RGB picture: a random ``kind`` shape (circle, square, else stripes) on a noisy background."""
    bg = rng.integers(0, 256, size=3)
    noise = rng.integers(-30, 31, size=(size, size, 3))
    im = Image.fromarray(np.clip(bg[None, None, :] + noise, 0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(im)
    fg = tuple(int(v) for v in rng.integers(0, 256, size=3))
    a, b = int(rng.integers(1, size // 4 + 1)), int(rng.integers(size // 2, size))
    if kind == "circle":
        d.ellipse([a, a, b, b], fill=fg)
    elif kind == "square":
        d.rectangle([a, a, b, b], fill=fg)
    else:
        step = max(2, size // 6)
        for x in range(0, size, 2 * step):
            d.rectangle([x, 0, x + step - 1, size], fill=fg)
    return im


def make_images(folder: str | os.PathLike, per_class: int = 8, size: int = 24, seed: int = 0,
                classes: tuple[str, ...] = CLASSES) -> list[Path]:
    """Write ``per_class`` shape pictures into ``folder/<class>/NNN.png|jpg`` (alternating); return them sorted."""
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    paths: list[Path] = []
    for cls in classes:
        (folder / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            im = _shape_picture(cls, rng, size)
            p = folder / cls / f"{i:03d}.{'png' if i % 2 == 0 else 'jpg'}"
            if p.suffix == ".jpg":
                im.save(p, quality=95)
            else:
                im.save(p)
            paths.append(p)
    return sorted(paths)


def make_split_folder(root: Path) -> Path:
    """``root/data/{train,test}/{a,b}/<i>.png``: 32 train and 8 test 8x8 noisy images a class (a dark, b light).

    Seeded (the same pixels every call); returns ``root / "data"``, the training folder ``--data`` takes.
    """
    rng = np.random.default_rng(0)
    for split, count in (("train", 32), ("test", 8)):
        for c in ("a", "b"):
            d = root / "data" / split / c
            d.mkdir(parents=True)
            for i in range(count):
                img = np.clip(rng.normal(60 if c == "a" else 180, 40, (8, 8, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")
    return root / "data"


def make_tgz(path: Path, files: dict[str, bytes]) -> Path:
    """A gzipped tar at ``path`` holding ``files`` (member name -> bytes), in that order."""
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


# --------------------------------------------------------------------------- command lines


def clean_stderr(capsys) -> str:
    """What the command wrote on stderr since the last read (asserting it holds no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def main_stderr(main: Callable[[list[str]], int], argv: list[str]) -> tuple[int, str]:
    """``main(argv)`` with stderr captured: (exit code, stderr text)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()


def refuse_listing(monkeypatch, name: str) -> None:
    """Make ``os.scandir`` refuse folders called ``name`` with PermissionError (EACCES).

    Simulates an unreadable folder where chmod cannot (root ignores it); the walk sees the OS's answer.
    """
    real = os.scandir

    def scandir(path):
        if Path(path).name == name:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def busy_port_argv(main: Callable[[list[str]], int], tmp_path: Path) -> tuple[int, int]:
    """``main(--model, --gallery, --port P)`` while another socket listens on 127.0.0.1:P; returns (exit code, P).

    The model and gallery paths do not exist: a server that checks its port first never gets to them.
    """
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(["--model", str(tmp_path / "no.onnx"), "--gallery", str(tmp_path / "nogal"), "--port", str(port)])
    return code, port
