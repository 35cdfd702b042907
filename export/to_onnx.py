"""PyTorch encoder -> self-describing ONNX model (opset 18, dynamic batch).

The exported graph has the same contract as :func:`training.model.load_encoder`:

* input ``image``: float32 [B, 3, S, S], RGB in [0, 1] (mean/std normalisation
  is inside the graph);
* output ``embedding``: float32 [B, D], L2-normalised rows.

The batch axis is symbolic (``batch``).  The export uses an example batch of at
least 2 (with a batch of 1 an exporter may freeze the axis to 1), then the file
is run with ONNX Runtime at batch 1, 3 and the maximum batch to prove it.
ISFE metadata (:class:`isfe_model.metadata.ModelMetadata`) is stored in the
ONNX ``metadata_props`` so that :class:`isfe_model.Encoder` needs nothing else.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import torch
from torch import nn

from isfe_model.metadata import ModelMetadata

from .common import ExportError, publish, remove_quietly, temp_path_for

__all__ = [
    "EXPORTER",
    "check_dynamic_batch",
    "export_onnx",
    "library_versions",
    "metadata_for_encoder",
    "read_props",
    "set_props",
    "simplify_onnx",
    "summarize_train_config",
]

#: Which torch.onnx exporter is used; passed explicitly as ``dynamo=True`` so a
#: torch upgrade cannot silently switch exporters.
EXPORTER = "torch.onnx.export(dynamo=True)"
BATCH_AXIS = "batch"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape the exported graph (for metadata and reports)."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxscript": _version("onnxscript"),
        "onnxruntime": _version("onnxruntime"),
        "onnxslim": _version("onnxslim"),
    }


def summarize_train_config(config: dict[str, Any] | None, max_len: int = 200) -> dict[str, Any]:
    """The JSON-scalar part of a training config (nested dicts flattened with dots).

    Long strings are cut to ``max_len`` characters; lists are kept when they
    hold at most 16 scalars.  Anything else (tensors, objects) is dropped.
    """
    out: dict[str, Any] = {}

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                visit(f"{prefix}.{k}" if prefix else str(k), v)
        elif value is None or isinstance(value, (bool, int, float)):
            out[prefix] = value
        elif isinstance(value, str):
            out[prefix] = value if len(value) <= max_len else value[: max_len - 3] + "..."
        elif isinstance(value, (list, tuple)) and len(value) <= 16 and all(
            v is None or isinstance(v, (bool, int, float, str)) for v in value
        ):
            out[prefix] = list(value)

    visit("", config or {})
    return out


def metadata_for_encoder(model: nn.Module, model_name: str | None = None, model_version: str = "1") -> ModelMetadata:
    """ISFE metadata of an encoder returned by :func:`training.model.load_encoder`.

    Uses ``model.cfg`` (architecture, embedding dim, preprocessing: the checkpoint's training spec,
    whose ``decode`` policy becomes ``isfe.decode`` -- "full" for checkpoints from before the field,
    "draft" when training decoded JPEGs in draft mode, so inference sees the pixels training saw),
    ``model.checkpoint_sha256`` (the fingerprint) and ``model.checkpoint``
    (training config and bookkeeping such as the epoch).
    """
    cfg = model.cfg  # type: ignore[attr-defined]
    ckpt: dict[str, Any] = dict(getattr(model, "checkpoint", {}) or {})
    sha = getattr(model, "checkpoint_sha256", None)
    if not sha:
        raise ExportError("the model has no checkpoint_sha256; load it with training.model.load_encoder(CHECKPOINT)")
    summary = summarize_train_config(ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {})
    for key, value in ckpt.items():  # bookkeeping scalars saved next to the weights (epoch, torch_version, ...)
        if key not in ("format", "version", "model_config", "config", "path") and (
            value is None or isinstance(value, (bool, int, float, str))
        ):
            summary.setdefault(f"checkpoint.{key}", value)
    return ModelMetadata(
        embedding_dim=int(cfg.embedding_dim),
        preprocess=cfg.preprocess,
        checkpoint_sha256=str(sha),
        model_name=model_name or f"isfe-{cfg.arch}-{int(cfg.embedding_dim)}d",
        model_version=str(model_version),
        arch=str(cfg.arch),
        quantization="none",
        train_config=summary,
    )


def _with_exporter_info(metadata: ModelMetadata, opset: int) -> ModelMetadata:
    versions = library_versions()
    extra = dict(metadata.extra)
    extra.update(
        {
            "isfe.exporter": EXPORTER,
            "isfe.opset": str(opset),
            "isfe.torch_version": versions["torch"],
            "isfe.onnx_version": versions["onnx"],
            "isfe.onnxscript_version": versions["onnxscript"],
        }
    )
    return dataclasses.replace(metadata, extra=extra)


def set_props(model: onnx.ModelProto, props: dict[str, str]) -> onnx.ModelProto:
    """Replace the model's ``isfe.*`` metadata_props with ``props`` (other keys are kept)."""
    keep = [(p.key, p.value) for p in model.metadata_props if not p.key.startswith("isfe.") and p.key not in props]
    del model.metadata_props[:]
    for k, v in keep + sorted(props.items()):
        entry = model.metadata_props.add()
        entry.key, entry.value = str(k), str(v)
    return model


def read_props(path: str | os.PathLike) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file (weights are not loaded)."""
    m = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in m.metadata_props}


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param if d.dim_param else int(d.dim_value) for d in value_info.type.tensor_type.shape.dim]


def _check_signature(model: onnx.ModelProto, metadata: ModelMetadata) -> None:
    """The graph has one float input [batch, 3, S, S] and one float output [batch, D]."""
    g = model.graph
    inits = {i.name for i in g.initializer}
    inputs = [i for i in g.input if i.name not in inits]
    if [i.name for i in inputs] != [metadata.input_name] or [o.name for o in g.output] != [metadata.output_name]:
        raise ExportError(
            f"exported graph has inputs {[i.name for i in inputs]} and outputs {[o.name for o in g.output]}, "
            f"expected [{metadata.input_name!r}] and [{metadata.output_name!r}]"
        )
    s = metadata.preprocess.input_size
    in_dims, out_dims = _dims(inputs[0]), _dims(g.output[0])
    if len(in_dims) != 4 or in_dims[1:] != [3, s, s] or len(out_dims) != 2 or out_dims[1] != metadata.embedding_dim:
        raise ExportError(f"exported graph has input {in_dims} and output {out_dims}; "
                          f"expected [batch, 3, {s}, {s}] -> [batch, {metadata.embedding_dim}]")
    if not isinstance(in_dims[0], str) or not isinstance(out_dims[0], str):
        raise ExportError(
            f"the exporter froze the batch axis (input {in_dims}, output {out_dims}); "
            "export with an example batch of at least 2 and a dynamic batch dimension"
        )
    float32 = onnx.TensorProto.FLOAT
    if inputs[0].type.tensor_type.elem_type != float32 or g.output[0].type.tensor_type.elem_type != float32:
        raise ExportError("exported graph input/output must be float32")


def check_dynamic_batch(
    onnx_path: str | os.PathLike,
    input_size: int,
    batches: Sequence[int] = (1, 3, 64),
    model: nn.Module | None = None,
    atol: float = 1e-4,
    seed: int = 0,
) -> dict[str, Any]:
    """Run an ONNX file with ONNX Runtime (CPU) at several batch sizes.

    Checks for each batch b: output shape [b, D], finite unit rows, row i equal
    (within ``atol``) to the same image run alone at batch 1 (no frozen batch
    axis, no cross-talk between rows) and, when ``model`` is given, to PyTorch.

    Returns ``{"batches": [...], "max_abs_vs_batch1": x, "max_abs_vs_torch": y}``.
    Raises :class:`ExportError` on the first failed check.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    in_name = sess.get_inputs()[0].name
    rng = np.random.default_rng(seed)
    bmax = max(batches)
    x_all = rng.random((bmax, 3, input_size, input_size), dtype=np.float32)

    def run(x: np.ndarray) -> np.ndarray:
        try:
            return sess.run(None, {in_name: x})[0]
        except Exception as e:  # onnxruntime raises its own exception types
            raise ExportError(
                f"{onnx_path}: ONNX Runtime failed at batch {len(x)} ({str(e).splitlines()[0]}); the batch axis is "
                "not dynamic"
            ) from None

    single = np.concatenate([run(x_all[i : i + 1]) for i in range(min(bmax, 3))])
    worst_b1 = 0.0
    worst_torch = 0.0
    for b in sorted(set(int(v) for v in batches)):
        y = run(x_all[:b])
        if y.ndim != 2 or y.shape[0] != b:
            raise ExportError(f"{onnx_path}: batch {b} gave output shape {tuple(y.shape)}, expected [{b}, D]")
        if not np.isfinite(y).all():
            raise ExportError(f"{onnx_path}: batch {b} gave NaN/Inf embeddings")
        norm_dev = float(np.abs(np.linalg.norm(y, axis=1) - 1.0).max())
        if norm_dev > 1e-4:
            raise ExportError(f"{onnx_path}: batch {b} gave rows with norm off 1 by {norm_dev:.2e}")
        n = min(b, single.shape[0])
        worst_b1 = max(worst_b1, float(np.abs(y[:n] - single[:n]).max()))
        if model is not None:
            with torch.no_grad():
                ref = model(torch.from_numpy(x_all[:b])).float().numpy()
            worst_torch = max(worst_torch, float(np.abs(y - ref).max()))
    if worst_b1 > atol:
        raise ExportError(f"{onnx_path}: rows differ by {worst_b1:.2e} between batch 1 and larger batches (> {atol:g})")
    if worst_torch > atol:
        raise ExportError(f"{onnx_path}: ONNX Runtime differs from PyTorch by {worst_torch:.2e} on random input "
                          f"(> {atol:g})")
    return {"batches": sorted(set(int(v) for v in batches)), "max_abs_vs_batch1": worst_b1,
            "max_abs_vs_torch": worst_torch if model is not None else None}


def simplify_onnx(model: onnx.ModelProto) -> onnx.ModelProto:
    """Graph simplification with onnxslim (constant folding, fusions); keeps metadata_props."""
    try:
        import onnxslim
    except ImportError:
        raise ExportError("--simplify needs onnxslim: pip install onnxslim") from None
    props = {p.key: p.value for p in model.metadata_props}
    slim = onnxslim.slim(model)
    if not isinstance(slim, onnx.ModelProto):
        raise ExportError("onnxslim returned no model")
    return set_props(slim, props)


def _trace_to_onnx(model: nn.Module, example: torch.Tensor, metadata: ModelMetadata, opset: int) -> onnx.ModelProto:
    """torch.onnx.export (dynamo) with a symbolic batch axis -> the ModelProto, with producer and doc string."""
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                model,
                (example,),
                None,
                dynamo=True,
                opset_version=int(opset),
                input_names=[metadata.input_name],
                output_names=[metadata.output_name],
                dynamic_shapes=({0: torch.export.Dim(BATCH_AXIS, min=1, max=1 << 16)},),
                external_data=False,
                verbose=False,
            )
    except Exception as e:  # exporter failures come in many types
        raise ExportError(f"torch.onnx.export failed: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from None
    proto = program.model_proto
    got_opset = {o.domain: o.version for o in proto.opset_import}.get("", None)
    if got_opset != int(opset):
        raise ExportError(f"the exporter wrote opset {got_opset}, expected {opset}")
    s = metadata.preprocess.input_size
    proto.producer_name = "isfe-export"
    proto.producer_version = f"torch {torch.__version__}"
    proto.doc_string = (
        f"ISFE image encoder {metadata.arch}: {metadata.input_name} float32 [batch,3,{s},{s}] RGB in [0,1] "
        f"-> {metadata.output_name} float32 [batch,{metadata.embedding_dim}] L2-normalised"
    )
    return proto


def export_onnx(
    model: nn.Module,
    onnx_path: str | os.PathLike,
    metadata: ModelMetadata,
    opset: int = 18,
    example_batch: int = 2,
    *,
    max_batch: int = 64,
    simplify: bool = False,
    verify: bool = True,
) -> Path:
    """Export an encoder to a single-file ONNX model with ISFE metadata.

    Args:
        model: an EmbeddingNet-like module: float32 [B,3,S,S] in [0,1] -> [B,D]
            unit rows (moved to CPU float32 eval mode for the export).
        onnx_path: the final file; its folder must exist.  Written atomically:
            nothing appears under this name unless all checks passed.
        metadata: what the file says about itself; exporter and library
            versions are added to ``metadata.extra`` ("isfe.exporter",
            "isfe.torch_version", "isfe.onnx_version", ...).
        opset: ONNX opset (18).
        example_batch: batch of the example input, >= 2 so that the batch
            axis stays symbolic.
        max_batch: largest batch the file is run at in the verification.
        simplify: run onnxslim on the graph (re-verified afterwards).
        verify: run the file with ONNX Runtime at batch 1, 3 and ``max_batch``
            against PyTorch (random input; real-image parity is ``export.parity``).

    Returns:
        ``Path(onnx_path)``.

    Raises:
        ExportError: on a failed export or check (message names the problem).
    """
    if example_batch < 2:
        raise ExportError(f"example_batch must be >= 2 (got {example_batch}); with a batch of 1 the exporter can "
                          "freeze the batch axis")
    onnx_path = Path(onnx_path)
    parent = onnx_path.parent if str(onnx_path.parent) else Path(".")
    if not parent.is_dir():
        raise ExportError(f"output directory {parent} does not exist; create it first")
    metadata = _with_exporter_info(metadata, opset)
    model = model.to("cpu", torch.float32).eval()
    s = metadata.preprocess.input_size
    example = torch.rand(example_batch, 3, s, s, generator=torch.Generator().manual_seed(0))
    tmp = temp_path_for(onnx_path, ".onnx")
    try:
        proto = _trace_to_onnx(model, example, metadata, opset)
        set_props(proto, metadata.to_props())
        if simplify:
            proto = simplify_onnx(proto)
        _check_signature(proto, metadata)
        try:
            onnx.checker.check_model(proto, full_check=True)
        except onnx.checker.ValidationError as e:
            raise ExportError(f"onnx.checker rejected the exported model: {str(e).splitlines()[0]}") from None
        onnx.save_model(proto, str(tmp), save_as_external_data=False)
        if verify:
            check_dynamic_batch(tmp, s, batches=(1, 3, max(int(max_batch), 3)), model=model)
        return publish(tmp, onnx_path)
    finally:
        remove_quietly(tmp)
