"""INT8 for CPU: ONNX Runtime static quantization (QDQ, per-channel weights).

Activations uint8 (asymmetric), weights int8 per output channel, calibrated
(MinMax by default) on real images preprocessed exactly like inference input.
The model is first pre-processed with ``quant_pre_process`` (ONNX shape
inference + ONNX Runtime graph optimisation, which folds constants and fuses
where it can).  Input normalisation and the L2 normalisation stay float32
because ONNX Runtime's QDQ quantizer does not quantize Sub/Div/ReduceL2.

The result keeps the fp32 model's metadata and fingerprint, with
``isfe.quantization = "int8-qdq"`` and the calibration recorded.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np
import onnx

from isfe_model.metadata import ModelMetadata

from .common import ExportError, publish, remove_quietly, temp_path_for
from .to_onnx import library_versions, set_props

__all__ = ["CALIBRATION_METHODS", "quantize_int8"]

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


def _reader(x: np.ndarray, input_name: str, batch_size: int):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        """Feeds calibration batches float32 [b,3,S,S]."""

        def __init__(self) -> None:
            self._it = iter(range(0, len(x), batch_size))

        def get_next(self):  # type: ignore[override]
            i = next(self._it, None)
            return None if i is None else {input_name: np.ascontiguousarray(x[i : i + batch_size], dtype=np.float32)}

    return Reader()


def _int8_metadata(meta: ModelMetadata, method: str, per_channel: bool, n_calib: int,
                   calib_source: str) -> ModelMetadata:
    """The fp32 model's metadata, marked int8-qdq, with how it was quantized and calibrated."""
    extra = dict(meta.extra)
    extra.update(
        {
            "isfe.int8_format": f"QDQ, per-{'channel' if per_channel else 'tensor'} int8 weights, uint8 activations",
            "isfe.int8_calibration": f"{method}, {n_calib} images" + (f" from {calib_source}" if calib_source else ""),
            "isfe.onnxruntime_version": library_versions()["onnxruntime"],
            "isfe.source_model_quantization": meta.quantization,
        }
    )
    return dataclasses.replace(meta, quantization="int8-qdq", extra=extra)


def quantize_int8(
    onnx_path: str | os.PathLike,
    out_path: str | os.PathLike,
    calib_x: np.ndarray,
    calib_source: str = "",
    method: str = "minmax",
    per_channel: bool = True,
    batch_size: int = 32,
) -> Path:
    """Quantize a verified fp32 ISFE ONNX model to INT8 (QDQ) with calibration images.

    Args:
        onnx_path: the fp32 model (ISFE metadata required).
        out_path: where the INT8 model goes (atomic write; its folder must exist).
        calib_x: float32 [N, 3, S, S] in [0, 1], N >= 1.
        calib_source: description of the calibration images (metadata).
        method: "minmax", "entropy" or "percentile".
    Raises:
        ExportError: bad arguments or a failed quantization.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in CALIBRATION_METHODS:
        raise ExportError(f"--calib-method must be one of {', '.join(CALIBRATION_METHODS)}, got {method!r}")
    if calib_x.ndim != 4 or len(calib_x) < 1:
        raise ExportError(f"calibration needs float32 [N,3,S,S] images with N >= 1, got shape {tuple(calib_x.shape)}")
    src = onnx.load(str(onnx_path))
    props = {p.key: p.value for p in src.metadata_props}
    meta = ModelMetadata.from_props(props, str(onnx_path))
    out_path = Path(out_path)
    pre = temp_path_for(out_path, ".pre.onnx")
    tmp = temp_path_for(out_path, ".onnx")
    qlog = logging.getLogger("onnxruntime.quantization")
    old_level = logging.getLogger().level
    try:
        try:
            # Symbolic shape inference cannot follow the Expand of the L2 norm; ONNX shape inference can.
            quant_pre_process(str(onnx_path), str(pre), skip_symbolic_shape=True)
            model_in = pre
        except Exception as e:  # pre-processing is an optimisation: quantize the original if it fails
            print(f"  note: quant_pre_process failed ({type(e).__name__}); quantizing the model as exported")
            model_in = Path(onnx_path)
        calib = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                 "percentile": CalibrationMethod.Percentile}[method]
        qlog.setLevel(logging.ERROR)
        logging.getLogger().setLevel(max(old_level, logging.WARNING))
        try:
            quantize_static(
                str(model_in),
                str(tmp),
                _reader(calib_x, meta.input_name, batch_size),
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=calib,
            )
        except Exception as e:  # onnxruntime raises many types
            raise ExportError(f"INT8 quantization failed: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from None
        q = onnx.load(str(tmp))
        set_props(q, _int8_metadata(meta, method, per_channel, len(calib_x), calib_source).to_props())
        q.doc_string = (src.doc_string + " (INT8 QDQ)").strip()
        try:
            onnx.checker.check_model(q, full_check=True)
        except onnx.checker.ValidationError as e:
            raise ExportError(f"onnx.checker rejected the INT8 model: {str(e).splitlines()[0]}") from None
        onnx.save_model(q, str(tmp), save_as_external_data=False)
        return publish(tmp, out_path)
    finally:
        qlog.setLevel(logging.NOTSET)
        logging.getLogger().setLevel(old_level)
        remove_quietly(pre, tmp)
