"""Triton Inference Server model repository for a verified ISFE ONNX model.

Layout::

    DIR/<name>/config.pbtxt
    DIR/<name>/1/model.onnx

``config.pbtxt`` (protobuf text format of Triton's ModelConfig): platform
``onnxruntime_onnx``, ``max_batch_size``, input/output names, data types and
dims without the batch dimension, and dynamic batching with preferred batch
sizes and a maximum queue delay.  Start Triton with
``tritonserver --model-repository DIR``.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import onnx

from .common import ExportError, default_dir_mode

__all__ = ["ONNX_TO_TRITON", "render_config", "triton_name", "write_triton_repo"]

#: ONNX element type -> Triton data type.
ONNX_TO_TRITON = {
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.INT8: "TYPE_INT8",
    onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT64: "TYPE_INT64",
}


def triton_name(name: str) -> str:
    """A model name safe as a folder and Triton model name ([A-Za-z0-9_.-], no leading dot)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._")
    if not safe:
        raise ExportError(f"model name {name!r} has no usable characters; pass --model-name with letters/digits")
    return safe


def _io(model: onnx.ModelProto) -> tuple[list[tuple[str, str, list[int]]], list[tuple[str, str, list[int]]]]:
    """[(name, triton type, dims without batch)] for inputs and outputs; batch axis must be symbolic."""
    inits = {i.name for i in model.graph.initializer}

    def one(vi: onnx.ValueInfoProto) -> tuple[str, str, list[int]]:
        t = vi.type.tensor_type
        if t.elem_type not in ONNX_TO_TRITON:
            raise ExportError(f"tensor {vi.name}: ONNX type {t.elem_type} has no Triton equivalent")
        dims = list(t.shape.dim)
        if not dims or not dims[0].dim_param:
            raise ExportError(f"tensor {vi.name} has no dynamic batch axis; Triton batching needs one (re-export)")
        rest = []
        for d in dims[1:]:
            if d.dim_param or d.dim_value <= 0:
                raise ExportError(f"tensor {vi.name}: only the batch axis may be dynamic")
            rest.append(int(d.dim_value))
        return vi.name, ONNX_TO_TRITON[t.elem_type], rest

    return [one(i) for i in model.graph.input if i.name not in inits], [one(o) for o in model.graph.output]


def _preferred(max_batch: int) -> list[int]:
    sizes = [s for s in (4, 8, 16, 32, 64, 128, 256) if s <= max_batch]
    return sizes[-3:] if sizes else [max_batch]


def render_config(
    name: str,
    inputs: list[tuple[str, str, list[int]]],
    outputs: list[tuple[str, str, list[int]]],
    max_batch_size: int,
    preferred_batch_sizes: list[int],
    max_queue_delay_us: int,
) -> str:
    """The config.pbtxt text."""

    def block(kind: str, items: list[tuple[str, str, list[int]]]) -> str:
        entries = []
        for n, dt, dims in items:
            entries.append(
                "  {\n"
                f'    name: "{n}"\n'
                f"    data_type: {dt}\n"
                f"    dims: [ {', '.join(str(d) for d in dims)} ]\n"
                "  }"
            )
        return f"{kind} [\n" + ",\n".join(entries) + "\n]\n"

    return (
        f'name: "{name}"\n'
        'platform: "onnxruntime_onnx"\n'
        f"max_batch_size: {int(max_batch_size)}\n"
        + block("input", inputs)
        + block("output", outputs)
        + "dynamic_batching {\n"
        f"  preferred_batch_size: [ {', '.join(str(s) for s in preferred_batch_sizes)} ]\n"
        f"  max_queue_delay_microseconds: {int(max_queue_delay_us)}\n"
        "}\n"
        "version_policy: { latest: { num_versions: 1 } }\n"
    )


def write_triton_repo(
    repo_dir: str | os.PathLike,
    onnx_path: str | os.PathLike,
    name: str,
    max_batch_size: int = 64,
    max_queue_delay_us: int = 500,
    preferred_batch_sizes: list[int] | None = None,
) -> Path:
    """Write ``repo_dir/<name>/{config.pbtxt,1/model.onnx}``; returns the model folder.

    ``repo_dir`` is created when missing (its parent must exist).  The model
    folder is assembled under a temporary name and renamed into place; an
    existing model folder of the same name is replaced.
    """
    repo = Path(repo_dir)
    if not repo.exists():
        if not repo.parent.is_dir():
            raise ExportError(f"--triton-repo {repo}: parent directory {repo.parent} does not exist; create it first")
        repo.mkdir()
    elif not repo.is_dir():
        raise ExportError(f"--triton-repo {repo} is a file, not a directory")
    if max_batch_size < 1:
        raise ExportError(f"Triton max_batch_size must be >= 1, got {max_batch_size}")
    name = triton_name(name)
    model = onnx.load(str(onnx_path), load_external_data=False)
    inputs, outputs = _io(model)
    prefs = sorted(set(preferred_batch_sizes or _preferred(max_batch_size)))
    if any(p < 1 or p > max_batch_size for p in prefs):
        raise ExportError(f"preferred batch sizes {prefs} must lie in 1..{max_batch_size}")
    text = render_config(name, inputs, outputs, max_batch_size, prefs, max_queue_delay_us)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=repo))
    try:
        (staging / "1").mkdir()
        shutil.copyfile(onnx_path, staging / "1" / "model.onnx")
        (staging / "config.pbtxt").write_text(text, encoding="utf-8")
        os.chmod(staging, default_dir_mode())
        final = repo / name
        old = None
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{name}.old.", dir=repo))
            os.replace(final, old / name)
        os.replace(staging, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return final
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
