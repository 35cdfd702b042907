"""Verified ONNX -> serialized TensorRT engine (fp32 or fp16), run with torch CUDA tensors.

TensorRT 10.x (weak typing): fp32 = no precision flags; fp16 = BuilderFlag.FP16
plus OBEY_PRECISION_CONSTRAINTS, with the layers before the first convolution
(input normalisation) and after the last one (pooling, head, L2 norm) pinned to
fp32.  TensorRT 11.x removed the precision flags (every network is strongly
typed): fp16 = a mixed-precision ONNX (:mod:`export.fp16`, trunk in fp16)
built as a strongly typed network.  TF32 is cleared in every build so that
"fp32" means fp32.  The engine has one optimisation profile for the batch
axis (min, opt, max).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .common import ExportError
from .fp16 import convert_trunk_to_fp16

__all__ = [
    "BuildPlan",
    "Profile",
    "TrtRunner",
    "build_engine",
    "build_plan",
    "engine_sidecar",
    "tensorrt_missing",
    "trt_major",
]

INSTALL_HINT = "pip install tensorrt; it needs an NVIDIA GPU and driver"


def tensorrt_missing() -> str | None:
    """Why TensorRT engines cannot be built here, or None when they can."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return f"TensorRT is not installed ({INSTALL_HINT})"
    except Exception as e:  # a broken install (missing libnvinfer) raises OSError and friends
        return f"TensorRT is installed but cannot be imported ({type(e).__name__}: {e}); reinstall it: {INSTALL_HINT}"
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed; the engine is run with torch CUDA tensors (pip install torch)"
    if not torch.cuda.is_available():
        return "no CUDA device (TensorRT engines need an NVIDIA GPU; torch.cuda.is_available() is False)"
    return None


def trt_major(version: str) -> int:
    """Major version of a TensorRT version string ("10.13.2.6" -> 10)."""
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        raise ExportError(f"cannot read the TensorRT version {version!r}") from None


@dataclass(frozen=True)
class Profile:
    """Optimisation profile of the batch axis: 1 <= min <= opt <= max."""

    min: int = 1
    opt: int = 32
    max: int = 64

    def __post_init__(self) -> None:
        if not (1 <= self.min <= self.opt <= self.max):
            raise ExportError(f"batch profile needs 1 <= min <= opt <= max, got min={self.min}, opt={self.opt}, "
                              f"max={self.max}; fix --opt-batch/--max-batch")


@dataclass(frozen=True)
class BuildPlan:
    """How to build for a TensorRT major version and a precision (pure data, unit-tested)."""

    trt_major: int
    precision: str
    strongly_typed: bool
    onnx_variant: str  # "fp32" or "fp16-trunk" (export.fp16)
    set_flags: tuple[str, ...]
    clear_flags: tuple[str, ...]
    pin_fp32_layers: bool  # TensorRT 10 fp16: keep normalisation/head layers in fp32


def build_plan(major: int, precision: str) -> BuildPlan:
    """What to do for TensorRT ``major`` (10 or 11+) and ``precision`` ("fp32" or "fp16")."""
    if precision not in ("fp32", "fp16"):
        raise ExportError(f"--precision must be fp32 or fp16, got {precision!r}")
    if major < 10:
        raise ExportError(f"TensorRT {major}.x is too old; need 10.x or newer (pip install -U tensorrt)")
    if major == 10:
        if precision == "fp32":
            return BuildPlan(major, precision, False, "fp32", (), ("TF32",), False)
        return BuildPlan(major, precision, False, "fp32", ("FP16", "OBEY_PRECISION_CONSTRAINTS"), ("TF32",), True)
    # 11.x+: precision flags are gone; strong typing is always on.
    return BuildPlan(major, precision, True, "fp16-trunk" if precision == "fp16" else "fp32", (), ("TF32",), False)


def engine_sidecar(
    trt_version: str,
    gpu_name: str,
    compute_capability: tuple[int, int],
    onnx_sha256: str,
    profile: Profile,
    precision: str,
    plan: BuildPlan,
    input_name: str,
    output_name: str,
    isfe_props: dict[str, str],
    engine_sha256: str | None = None,
) -> dict[str, Any]:
    """The JSON written next to an engine (``<engine>.meta.json``).

    An engine only runs on the TensorRT version and GPU class it was built
    for; the sidecar says which, and carries the ISFE metadata of the ONNX
    model (embedding dim, preprocessing, fingerprint) that the engine lacks.
    """
    return {
        "format": "isfe-tensorrt-engine",
        "tensorrt_version": trt_version,
        "gpu_name": gpu_name,
        "compute_capability": f"{compute_capability[0]}.{compute_capability[1]}",
        "precision": precision,
        "tf32": False,
        "strongly_typed": plan.strongly_typed,
        "onnx_variant": plan.onnx_variant,
        "builder_flags": list(plan.set_flags),
        "profile": {"input": input_name, "min": profile.min, "opt": profile.opt, "max": profile.max},
        "input_name": input_name,
        "output_name": output_name,
        "onnx_sha256": onnx_sha256,
        "engine_sha256": engine_sha256,
        "isfe_metadata": dict(isfe_props),
    }


def _pin_fp32(network: Any, trt: Any) -> int:
    """TensorRT 10 fp16: pin float layers before the first / after the last convolution to fp32."""
    n = network.num_layers
    convs = [i for i in range(n) if network.get_layer(i).type == trt.LayerType.CONVOLUTION]
    if not convs:
        return 0
    pinned = 0
    floaty = (trt.float32, trt.float16)
    for i in range(n):
        if convs[0] <= i <= convs[-1]:
            continue
        layer = network.get_layer(i)
        if layer.type in (trt.LayerType.CONSTANT, trt.LayerType.SHAPE):
            continue
        outs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if not outs or any(o.dtype not in floaty for o in outs):
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
        pinned += 1
    return pinned


def build_engine(
    onnx_path: str | os.PathLike,
    precision: str,
    profile: Profile,
    input_name: str = "image",
    input_size: int = 32,
    workspace_gib: float = 4.0,
    log: Callable[[str], None] = print,
) -> tuple[bytes, BuildPlan]:
    """Build a serialized engine from a verified ONNX file.

    Returns:
        (engine bytes, the BuildPlan used).
    Raises:
        ExportError: TensorRT/GPU missing, parser errors, or a failed build.
    """
    why = tensorrt_missing()
    if why:
        raise ExportError(f"--trt: {why}")
    import onnx
    import tensorrt as trt

    plan = build_plan(trt_major(trt.__version__), precision)
    model = onnx.load(str(onnx_path))
    if plan.onnx_variant == "fp16-trunk":
        model = convert_trunk_to_fp16(model)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = (1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)) if plan.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model.SerializeToString()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {onnx_path}: {errors or 'unknown parser error'}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    for name in plan.clear_flags:
        if hasattr(trt.BuilderFlag, name):
            config.clear_flag(getattr(trt.BuilderFlag, name))
    for name in plan.set_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    if plan.pin_fp32_layers:
        log(f"  TensorRT {trt.__version__}: fp16 with {_pin_fp32(network, trt)} normalisation/head layers pinned "
            "to fp32")
    opt_profile = builder.create_optimization_profile()
    shape = (3, int(input_size), int(input_size))
    opt_profile.set_shape(input_name, (profile.min, *shape), (profile.opt, *shape), (profile.max, *shape))
    config.add_optimization_profile(opt_profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT {trt.__version__} failed to build a {precision} engine from {onnx_path} (see the "
                          "TensorRT log above)")
    return bytes(serialized), plan


class TrtRunner:
    """Run a serialized engine: float32 [b,3,S,S] numpy -> [b,D] numpy, through torch CUDA tensors."""

    def __init__(self, engine_bytes: bytes, input_name: str = "image", output_name: str = "embedding"):
        why = tensorrt_missing()
        if why:
            raise ExportError(why)
        import tensorrt as trt
        import torch

        self._torch = torch
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise ExportError("TensorRT could not deserialize the engine (built for another TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        self.input_name, self.output_name = input_name, output_name
        dtypes = {trt.float32: torch.float32, trt.float16: torch.float16}
        self.out_dtype = dtypes[self.engine.get_tensor_dtype(output_name)]
        self.in_dtype = dtypes[self.engine.get_tensor_dtype(input_name)]
        self.max_batch = int(self.engine.get_tensor_profile_shape(input_name, 0)[2][0])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        torch = self._torch
        outs = []
        for s in range(0, x.shape[0], self.max_batch):
            xb = torch.from_numpy(np.ascontiguousarray(x[s : s + self.max_batch]))
            xb = xb.to("cuda", self.in_dtype).contiguous()
            self.context.set_input_shape(self.input_name, tuple(xb.shape))
            out_shape = tuple(self.context.get_tensor_shape(self.output_name))
            y = torch.empty(out_shape, dtype=self.out_dtype, device="cuda")
            self.context.set_tensor_address(self.input_name, xb.data_ptr())
            self.context.set_tensor_address(self.output_name, y.data_ptr())
            stream = torch.cuda.current_stream()
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise ExportError("TensorRT execute_async_v3 failed")
            stream.synchronize()
            outs.append(y.float().cpu().numpy())
        return np.concatenate(outs)


def gpu_info() -> tuple[str, tuple[int, int]]:
    """(GPU name, compute capability) of the current CUDA device."""
    import torch

    return torch.cuda.get_device_name(), tuple(torch.cuda.get_device_capability())  # type: ignore[return-value]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sidecar_path(engine_path: str | os.PathLike) -> Path:
    return Path(f"{engine_path}.meta.json")
