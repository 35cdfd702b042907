"""ISFE export: checkpoint -> ONNX / INT8 ONNX / TensorRT / Triton repository / model package, each parity-gated.

Run ``python -m export --help``.  Library use (keyword arguments named like the flags)::

    from export import export_checkpoint
    result = export_checkpoint("runs/x/checkpoint.pt", onnx="model.onnx", int8="model-int8.onnx",
                               package="runs/x/package", model_name="x", wheel="dist")

or one step::

    from export.to_onnx import export_onnx, metadata_for_encoder
    from training.model import load_encoder
    enc = load_encoder("runs/x/checkpoint.pt")
    export_onnx(enc, "model.onnx", metadata_for_encoder(enc))
"""

from __future__ import annotations

from typing import Any

__all__ = ["export_checkpoint", "export_onnx", "main", "metadata_for_encoder"]


def __getattr__(name: str) -> Any:  # lazy: `import export` stays cheap (no torch import)
    if name in ("export_onnx", "metadata_for_encoder"):
        from . import to_onnx

        return getattr(to_onnx, name)
    if name in ("main", "export_checkpoint"):
        from . import cli

        return getattr(cli, name)
    raise AttributeError(name)
