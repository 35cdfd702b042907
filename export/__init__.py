"""ISFE export: PyTorch checkpoint -> ONNX / TensorRT / INT8 ONNX / Triton repository, each with a parity proof.

Run ``python -m export --help``.  Library use::

    from export.to_onnx import export_onnx, metadata_for_encoder
    from training.model import load_encoder
    enc = load_encoder("runs/x/checkpoint.pt")
    export_onnx(enc, "model.onnx", metadata_for_encoder(enc))
"""

from __future__ import annotations

from typing import Any

__all__ = ["export_onnx", "metadata_for_encoder", "main"]


def __getattr__(name: str) -> Any:  # lazy: `import export` stays cheap (no torch import)
    if name in ("export_onnx", "metadata_for_encoder"):
        from . import to_onnx

        return getattr(to_onnx, name)
    if name == "main":
        from .cli import main

        return main
    raise AttributeError(name)
