"""Encoder: an exported ISFE ONNX model run by ONNX Runtime.

The model file carries everything needed (ISFE metadata: embedding size,
preprocessing, fingerprint), so ``Encoder("model.onnx").embed(paths)`` is the
whole API.  Images are decoded and preprocessed by :mod:`isfe_model.preprocess`
(the same code as the training evaluation transform) by a pool of decode
threads while ONNX Runtime runs the previous batch; :meth:`Encoder.embed_iter`
streams any iterable of images in bounded memory and ``embed`` collects it.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import stat
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, Union

import numpy as np
import onnxruntime as ort
from PIL import Image

from .metadata import ModelError, ModelMetadata, short_repr
from .packages import PRECISION_CHOICES, QUANTIZATION, ModelPackage, locate, sha256_file
from .preprocess import DEFAULT_MAX_PIXELS, ImageError, ImageInput, PreprocessSpec, describe_source, preprocess
from .progress import Progress

__all__ = [
    "Encoder",
    "default_decode_threads",
    "GPU_PROVIDERS",
    "ModelError",
    "PREFERRED_PROVIDERS",
    "onnxruntime_packages",
    "resolve_providers",
    "runtime_info",
]

logger = logging.getLogger("isfe_model")

#: Order in which execution providers are picked when ``providers=None``.
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "ROCMExecutionProvider",
                 "MIGraphXExecutionProvider",
                 "DmlExecutionProvider", "CoreMLExecutionProvider", "OpenVINOExecutionProvider")
#: Short names accepted for ``providers`` (and the CLI's ``--providers``).
PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "gpu": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "dml": "DmlExecutionProvider",
    "directml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
}
#: Largest batch a TensorRT optimisation profile is built for (bigger inputs are split).
TRT_MAX_BATCH = 256
#: An output row with a smaller L2 norm has no direction: it is an error, not an embedding.
MIN_OUTPUT_NORM = 1e-12

ProviderSpec = Union[str, tuple[str, dict[str, Any]]]


def _dist_text(info: Path, name: str) -> str:
    try:
        return (info / name).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _dist_label(info: Path) -> str:
    """``"Name Version"`` from a .dist-info folder's METADATA headers (the folder's name where they are missing).

    Read directly: importing importlib.metadata (email, zipfile, ...) would add ~35 ms to every start.
    """
    fields: dict[str, str] = {}
    for line in _dist_text(info, "METADATA").splitlines():
        if not line.strip():
            break  # the headers end at the first blank line
        key, sep, value = line.partition(":")
        if sep and key in ("Name", "Version"):
            fields.setdefault(key, value.strip())
    name, _, version = info.name[: -len(".dist-info")].partition("-")
    return f"{fields.get('Name', name)} {fields.get('Version', version)}"


@functools.lru_cache(maxsize=1)
def _onnxruntime_packages() -> tuple[str, ...]:
    found = set()
    for entry in sys.path:
        folder = Path(entry or ".")
        if not folder.is_dir():
            continue
        try:
            infos = [d for d in folder.iterdir() if d.name.endswith(".dist-info")
                     and d.name.lower().replace("-", "_").startswith(("onnxruntime", "ort_nightly"))]
        except OSError:
            continue
        for info in infos:
            top = _dist_text(info, "top_level.txt").split()
            if "onnxruntime" in top or "\nonnxruntime/__init__.py," in "\n" + _dist_text(info, "RECORD"):
                found.add(_dist_label(info))
    return tuple(sorted(found))


def onnxruntime_packages() -> list[str]:
    """Installed distributions that provide the ``onnxruntime`` module (e.g. ``['onnxruntime-gpu 1.22.0']``).

    onnxruntime, onnxruntime-gpu (and -directml, -openvino, ...) all install the
    same module; with two of them installed one silently overwrites the other.
    """
    return list(_onnxruntime_packages())


def runtime_info() -> dict[str, Any]:
    """Which ONNX Runtime build is installed and what it can run on (JSON-able)."""
    return {
        "onnxruntime_version": ort.__version__,
        "onnxruntime_packages": onnxruntime_packages(),
        "available_providers": list(ort.get_available_providers()),
        "device": ort.get_device(),
    }


def _provider_name(p: ProviderSpec) -> str:
    return p[0] if isinstance(p, tuple) else p


def resolve_providers(providers: str | Sequence[ProviderSpec] | None,
                      available: Sequence[str] | None = None) -> list[ProviderSpec]:
    """Turn ``providers`` into ONNX Runtime's list (CPU always last as the fallback).

    Args:
        providers: None (TensorRT -> CUDA -> CPU, those installed), a
            comma-separated string (``"cuda,cpu"``) or a list of names or
            ``(name, options)`` pairs; short aliases (cpu, cuda, tensorrt, ...)
            are accepted.
        available: ``onnxruntime.get_available_providers()`` (for tests).

    Raises:
        ValueError: a provider that this onnxruntime build does not have,
            with the list it does have and the install hint.
    """
    available = list(ort.get_available_providers() if available is None else available)
    if providers is None:
        chosen: list[ProviderSpec] = [p for p in PREFERRED_PROVIDERS if p in available]
    else:
        if isinstance(providers, str):
            providers = [s.strip() for s in providers.split(",") if s.strip()]
        chosen = []
        for p in providers:
            name = _provider_name(p)
            full = PROVIDER_ALIASES.get(name.lower(), name)
            if full not in available:
                hint = ""
                if full in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
                    hint = (" For NVIDIA GPUs install onnxruntime-gpu *instead of* onnxruntime "
                            "(pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu).")
                raise ValueError(f"execution provider {name!r} is not available in this onnxruntime "
                                 f"({ort.__version__}; available: {', '.join(available)}).{hint}")
            chosen.append((full, p[1]) if isinstance(p, tuple) else full)
        if not chosen:
            raise ValueError("providers is empty; name at least one, e.g. 'cpu'")
    if "CPUExecutionProvider" in available and "CPUExecutionProvider" not in [_provider_name(p) for p in chosen]:
        chosen.append("CPUExecutionProvider")
    return chosen


def _dim(d: Any) -> int | None:
    return d if isinstance(d, int) and d > 0 else None


def _as_iterable(images: Iterable[ImageInput] | ImageInput) -> tuple[Iterable[ImageInput], int | None]:
    """One image or an iterable of images -> (iterable, count or None when unknown); a uint8 [N,H,W,C] array is N
    images.  Nothing is copied: a generator stays lazy."""
    if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)):
        return [images], 1
    if isinstance(images, np.ndarray):
        return (images, images.shape[0]) if images.ndim == 4 else ([images], 1)
    if isinstance(images, Iterable):
        try:
            return images, len(images)  # type: ignore[arg-type]
        except TypeError:
            return images, None
    return [images], 1


def _check_model_file(path: Path) -> None:
    """ModelError unless ``path`` is a non-empty regular file (a FIFO would block, /dev/zero never ends)."""
    fix = "export one with `python -m export --checkpoint CHECKPOINT --onnx MODEL.onnx`"
    if not path.exists():
        raise ModelError(f"model {path}: no such file; {fix}")
    if path.is_dir():
        raise ModelError(f"model {path} is a folder; pass the .onnx file inside it")
    try:
        st = path.stat()
    except OSError as e:
        raise ModelError(f"model {path}: cannot read it ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ModelError(f"model {path} is not a regular file (a device, FIFO or socket); pass the .onnx file")
    if st.st_size == 0:
        raise ModelError(f"model {path} is empty (0 bytes); the copy or export did not finish — {fix}")


def _precision_of(md: ModelMetadata, precision: str, path: Path, package: ModelPackage | None) -> str:
    """The precision of the loaded file ("fp32"/"int8", or the file's quantization); checks a requested one."""
    actual = next((p for p, q in QUANTIZATION.items() if q == md.quantization), md.quantization)
    if package is None and precision != "auto" and precision != actual:
        raise ModelError(f"model {path} is {actual} (metadata isfe.quantization {md.quantization!r}), not {precision}; "
                         f"pass precision='auto' or the file of that precision")
    return actual


class Encoder:
    """Embeds images with an exported ISFE ONNX model.

    Args:
        model_path: the ``.onnx`` file written by ``python -m export``, a model
            package folder (``python -m export --package DIR``), the name of an
            installed model wheel, or ``hf:ORG/REPO[@REVISION]`` (see
            :mod:`isfe_model.packages`).
        providers: ONNX Runtime execution providers; None picks TensorRT ->
            CUDA -> CPU among those installed (see :func:`resolve_providers`).
        threads: intra-op threads of ONNX Runtime (None: its default, all cores).
        spinning: whether ONNX Runtime's idle intra-op threads busy-wait for the next
            operator (True: its default, fastest when inference has the cores to
            itself).  False lets them sleep, so that decoding threads running at the
            same time (:meth:`embed_iter` over files) get the cores; the command line
            tools use False.
        max_pixels: refuse images with more decoded pixels (decompression
            bombs); None disables the check.
        decode_threads: threads that decode and preprocess images, separate from ONNX Runtime's
            ``threads`` (None: the cores this process may use, :func:`default_decode_threads`);
            decoding overlaps inference (:meth:`embed_iter`).
        workers: the former name of ``decode_threads`` (give one of the two).
        precision: for a package: "fp32", "int8" or "auto" (INT8 when the
            first provider is the CPU and the package has a gated INT8 model);
            for a .onnx file "auto" or the file's own precision.

    Attributes:
        metadata: :class:`ModelMetadata` read from the model.
        dim: embedding size D.  spec: :class:`PreprocessSpec` (input S x S).
        providers: the providers ONNX Runtime actually uses (it falls back to
            CPU silently when a GPU provider cannot start; this logs it).
        fingerprint: the training checkpoint's sha256 (same for the fp32,
            INT8 and TensorRT versions of one model).
        model_sha256: sha256 of this ONNX file.  model_path: its path.
        precision: "fp32" or "int8" (the loaded file's).  package: the
            :class:`~isfe_model.packages.ModelPackage` it came from, or None.

    Raises:
        ModelError: missing, empty or corrupt file, not an ONNX model, or
            inputs/outputs that do not match the metadata.
        MetadataError: an ONNX model without ISFE metadata.
        ValueError: an unknown or unavailable provider, threads < 1, spinning not a bool.
    """

    def __init__(self, model_path: str | os.PathLike, providers: str | Sequence[ProviderSpec] | None = None,
                 threads: int | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS, workers: int | None = None,
                 precision: str = "auto", decode_threads: int | None = None, spinning: bool = True):
        located = locate(model_path)
        self.package: ModelPackage | None = located if isinstance(located, ModelPackage) else None
        if threads is not None and int(threads) < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if max_pixels is not None and int(max_pixels) < 1:
            raise ValueError(f"max_pixels must be >= 1 (or None for no limit), got {max_pixels}")
        if not isinstance(spinning, (bool, np.bool_)):  # "off" or 0 would silently mean something else
            raise ValueError(f"spinning must be True or False, got {short_repr(spinning)}")
        if precision not in PRECISION_CHOICES:
            raise ModelError(f"precision {short_repr(precision)} is not known; choose one of "
                             f"{', '.join(PRECISION_CHOICES)}")
        if self.package is not None:
            requested = resolve_providers(providers)
            precision = self.package.choose(precision, cpu_first=_provider_name(requested[0]) == "CPUExecutionProvider")
            path = self.package.model_file(precision)
        else:
            path = located
        _check_model_file(path)
        self.model_path = path
        self.max_pixels = None if max_pixels is None else int(max_pixels)
        if workers is not None and decode_threads is not None and int(workers) != int(decode_threads):
            raise ValueError(f"workers ({workers}) is the former name of decode_threads ({decode_threads}); give one")
        chosen = decode_threads if decode_threads is not None else workers
        if chosen is not None and int(chosen) < 1:
            raise ValueError(f"decode_threads must be >= 1, got {chosen}")
        self.decode_threads = int(chosen) if chosen is not None else default_decode_threads()
        try:
            self.model_sha256 = sha256_file(path)
        except OSError as e:
            raise ModelError(f"model {path}: cannot read it ({e.strerror or e})") from None
        if self.package is not None:
            self.package.check_sha256(precision, path, self.model_sha256)

        packages = onnxruntime_packages()
        if len(packages) > 1:
            logger.warning("several onnxruntime packages are installed (%s); they share the module name 'onnxruntime' "
                           "and overwrite each other. Keep one: pip uninstall -y onnxruntime onnxruntime-gpu && "
                           "pip install onnxruntime-gpu (NVIDIA GPU) or onnxruntime (CPU)", ", ".join(packages))
        requested = resolve_providers(providers)
        so = ort.SessionOptions()
        so.log_severity_level = 3  # errors only; the fallback is reported through logging below
        if threads is not None:
            so.intra_op_num_threads = int(threads)
            so.inter_op_num_threads = 1
        self.threads = threads
        self.spinning = bool(spinning)
        if not self.spinning:  # documented keys of onnxruntime_session_options_config_keys.h
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        # TensorRT's optimisation profile needs the input size from the metadata: read it
        # with a plain CPU session first, then build the TensorRT one.
        use_trt = any(_provider_name(p) == "TensorrtExecutionProvider" for p in requested)
        session = self._open(path, so, ["CPUExecutionProvider"] if use_trt else requested)
        meta_props = session.get_modelmeta().custom_metadata_map
        self.metadata: ModelMetadata = ModelMetadata.from_props(meta_props, source=f"model {path}")
        if self.package is not None:
            self.package.check_metadata(precision, path, self.metadata)
        self.precision: str = _precision_of(self.metadata, precision, path, self.package)
        self.dim: int = self.metadata.embedding_dim
        self.spec: PreprocessSpec = self.metadata.preprocess
        if use_trt:
            requested = self._with_trt_options(requested)
            session = self._open(path, so, requested)
        self._session = session
        self.fingerprint: str = self.metadata.checkpoint_sha256
        self._check_io()
        self.requested_providers = [_provider_name(p) for p in requested]
        self.providers: list[str] = list(session.get_providers())
        self._log_providers()

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, precision: str = "auto",
                        providers: str | Sequence[ProviderSpec] | None = None, **kwargs: Any) -> "Encoder":
        """An installed model package by name, a package folder, a .onnx file or ``hf:ORG/REPO[@REVISION]``.

        ``precision``: "fp32", "int8", or "auto" (INT8 when the first execution
        provider is the CPU and the package has a gated INT8 model, else fp32).
        Other keyword arguments as for :class:`Encoder`.
        """
        return cls(name_or_path, providers=providers, precision=precision, **kwargs)

    # ------------------------------------------------------------------ setup

    @staticmethod
    def _open(path: Path, so: ort.SessionOptions, providers: list[ProviderSpec]) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(str(path), sess_options=so, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types (InvalidProtobuf, Fail, ...)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(
                f"model {path} is not a valid ONNX model or cannot be loaded by onnxruntime {ort.__version__} "
                f"({first[:300]}); re-export it with `python -m export`, or copy it again if the file is truncated"
            ) from None

    def _with_trt_options(self, providers: list[ProviderSpec]) -> list[ProviderSpec]:
        """Default TensorRT options: engine cache and a dynamic-batch optimisation profile."""
        s, name = self.spec.input_size, self.metadata.input_name
        cache = Path(os.environ.get("ISFE_TRT_CACHE", Path.home() / ".cache" / "isfe" / "trt"))
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError:
            cache = Path(os.environ.get("TMPDIR", "/tmp")) / "isfe-trt"
            cache.mkdir(parents=True, exist_ok=True)
        defaults = {
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": "True",
            "trt_profile_min_shapes": f"{name}:1x3x{s}x{s}",
            "trt_profile_opt_shapes": f"{name}:64x3x{s}x{s}",
            "trt_profile_max_shapes": f"{name}:{TRT_MAX_BATCH}x3x{s}x{s}",
        }
        out: list[ProviderSpec] = []
        for p in providers:
            if _provider_name(p) == "TensorrtExecutionProvider":
                opts = dict(defaults)
                if isinstance(p, tuple):
                    opts.update(p[1])
                out.append(("TensorrtExecutionProvider", opts))
            else:
                out.append(p)
        return out

    def _check_io(self) -> None:
        md, path = self.metadata, self.model_path
        inputs = self._session.get_inputs()
        names = [i.name for i in inputs]
        if md.input_name not in names:
            raise ModelError(f"model {path}: metadata names input {md.input_name!r} but the graph's inputs are "
                             f"{names}; re-export it")
        if len(inputs) != 1:
            raise ModelError(f"model {path} has {len(inputs)} inputs {names}; an ISFE model has exactly one; "
                             "re-export it")
        inp = inputs[0]
        shape = list(inp.shape)
        s = self.spec.input_size
        if len(shape) != 4 or (_dim(shape[1]) not in (None, 3)) or any(_dim(v) not in (None, s) for v in shape[2:]):
            raise ModelError(f"model {path}: input {inp.name!r} has shape {shape}, "
                             f"but its metadata says [B, 3, {s}, {s}]; re-export it")
        if inp.type not in ("tensor(float)", "tensor(float16)"):
            raise ModelError(f"model {path}: input {inp.name!r} is {inp.type}; "
                             f"ISFE models take tensor(float) [B, 3, {s}, {s}] in [0, 1]")
        self._input_dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
        self._fixed_batch = _dim(shape[0])
        outs = self._session.get_outputs()
        onames = [o.name for o in outs]
        if md.output_name not in onames:
            raise ModelError(f"model {path}: metadata names output {md.output_name!r} but the graph's outputs are "
                             f"{onames}; re-export it")
        out = outs[onames.index(md.output_name)]
        oshape = list(out.shape)
        if len(oshape) != 2 or _dim(oshape[1]) not in (None, self.dim):
            raise ModelError(f"model {path}: output {out.name!r} has shape {oshape}, "
                             f"but its metadata says [B, {self.dim}]; re-export it")
        on_trt = "TensorrtExecutionProvider" in self._session.get_providers()
        self._max_batch = self._fixed_batch or (TRT_MAX_BATCH if on_trt else None)

    def _log_providers(self) -> None:
        wanted_gpu = [p for p in self.requested_providers if p in GPU_PROVIDERS]
        used_gpu = [p for p in self.providers if p in GPU_PROVIDERS]
        logger.info("model %s (dim %d, input %dx%d): onnxruntime %s uses %s", self.model_path, self.dim,
                    self.spec.input_size, self.spec.input_size, ort.__version__, ", ".join(self.providers))
        missing = [p for p in wanted_gpu if p not in self.providers]
        if missing:
            logger.warning("onnxruntime could not start %s and runs model %s on %s instead (check the "
                           "CUDA/cuDNN/TensorRT libraries that onnxruntime-gpu %s needs)", ", ".join(missing),
                           self.model_path, ", ".join(self.providers), ort.__version__)
        elif not used_gpu and not wanted_gpu and "CUDAExecutionProvider" not in ort.get_available_providers():
            logger.info("running on CPU: this onnxruntime build has no GPU providers (install onnxruntime-gpu instead "
                        "of onnxruntime to use an NVIDIA GPU)")

    @property
    def workers(self) -> int:
        """The former name of :attr:`decode_threads`."""
        return self.decode_threads

    @property
    def on_gpu(self) -> bool:
        """True when ONNX Runtime runs the model on a GPU provider."""
        return any(p in GPU_PROVIDERS for p in self.providers)

    def info(self) -> dict[str, Any]:
        """JSON-able description: metadata, sizes, providers, hashes, onnxruntime build."""
        md = self.metadata
        return {
            "model_path": str(self.model_path),
            "precision": self.precision,
            "package": None if self.package is None else self.package.summary(),
            "model_sha256": self.model_sha256,
            "fingerprint": self.fingerprint,
            "model_name": md.model_name,
            "model_version": md.model_version,
            "arch": md.arch,
            "quantization": md.quantization,
            "dim": self.dim,
            "input_size": self.spec.input_size,
            "preprocess": self.spec.to_dict(),
            "input_name": md.input_name,
            "output_name": md.output_name,
            "providers": list(self.providers),
            "requested_providers": list(self.requested_providers),
            "max_pixels": self.max_pixels,
            "decode": self.spec.decode,
            "decode_threads": self.decode_threads,
            "threads": self.threads,
            "spinning": self.spinning,
            **runtime_info(),
        }

    def __repr__(self) -> str:
        return (f"Encoder({str(self.model_path)!r}, dim={self.dim}, input={self.spec.input_size}, "
                f"precision={self.precision}, providers={self.providers}, fingerprint={self.fingerprint[:12]})")

    # ------------------------------------------------------------------ inference

    def preprocess(self, src: ImageInput, name: str | None = None) -> np.ndarray:
        """One image -> float32 [3, S, S] in [0, 1] (raises ImageError naming ``name``/the source)."""
        return preprocess(src, self.spec, max_pixels=self.max_pixels, name=name)

    def embed_arrays(self, x: np.ndarray) -> np.ndarray:
        """Preprocessed float [B, 3, S, S] in [0, 1] -> float32 [B, D] unit rows (any B >= 0).

        Raises:
            ValueError: wrong type, rank, shape or non-finite values (names the expected shape).
            ModelError: the model failed, or produced non-finite or all-zero embeddings.
        """
        return self._embed_arrays(x)

    def _embed_arrays(self, x: np.ndarray, names: Sequence[str] | None = None) -> np.ndarray:
        """:meth:`embed_arrays`; ``names`` (one per row) name the images in errors about their outputs."""
        s = self.spec.input_size
        if not isinstance(x, np.ndarray) or not np.issubdtype(x.dtype, np.floating):
            kind = x.dtype if isinstance(x, np.ndarray) else type(x).__name__
            raise ValueError(f"embed_arrays needs a float32 array [B, 3, {s}, {s}] in [0, 1], got {kind}; "
                             f"use embed() for images or uint8 arrays")
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, s, s):
            raise ValueError(f"embed_arrays needs shape [B, 3, {s}, {s}] for this model, got {list(x.shape)}")
        if x.shape[0] == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        if not np.isfinite(x).all():
            raise ValueError("embed_arrays input contains NaN or infinite values")
        step = self._max_batch or x.shape[0]
        outs = [self._run(x[i : i + step], None if names is None else names[i : i + step])
                for i in range(0, x.shape[0], step)]
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    def _run(self, x: np.ndarray, names: Sequence[str] | None = None) -> np.ndarray:
        """[b, 3, S, S] -> [b, D] float32 unit rows (b <= max batch).

        Raises ModelError for output rows that are not finite or have no direction (norm below
        MIN_OUTPUT_NORM, e.g. all zeros): normalising them would return garbage as "unit rows".
        """
        b = x.shape[0]
        feed = np.ascontiguousarray(x, dtype=self._input_dtype)
        if self._fixed_batch is not None and b != self._fixed_batch:
            pad = np.zeros((self._fixed_batch - b,) + feed.shape[1:], dtype=feed.dtype)
            feed = np.concatenate([feed, pad])
        try:
            out = self._session.run([self.metadata.output_name], {self.metadata.input_name: feed})[0]
        except Exception as e:  # onnxruntime's own exception types
            why = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise ModelError(f"model {self.model_path}: onnxruntime failed on a batch of {b} ({why})") from None
        out = np.asarray(out, dtype=np.float32)[:b]
        if out.shape != (b, self.dim):
            raise ModelError(f"model {self.model_path} returned shape {list(out.shape)}, expected [{b}, {self.dim}]; "
                             "re-export it")
        finite = np.isfinite(out).all(axis=1)
        # float64: the squares of large float32 values would overflow to inf (and the row become 0)
        norms = np.sqrt(np.einsum("ij,ij->i", out, out, dtype=np.float64))
        bad = np.flatnonzero(~finite | ~(norms >= MIN_OUTPUT_NORM))
        if bad.size:
            r = int(bad[0])
            what = "a NaN/inf" if not finite[r] else f"an all-zero (norm {norms[r]:.3g})"
            who = f"image {names[r]}" if names is not None else f"row {r} of a batch of {b}"
            more = f" (and {bad.size - 1} more in the same batch)" if bad.size > 1 else ""
            raise ModelError(f"model {self.model_path} produced {what} embedding for {who}{more}; such a row has no "
                             f"direction and cannot be compared — the model file is damaged or was exported wrongly "
                             f"(re-export it with `python -m export`)")
        return (out / norms[:, None]).astype(np.float32)

    def embed(self, images: Iterable[ImageInput] | ImageInput, batch_size: int = 64,
              progress: bool = False, decode_threads: int | None = None) -> np.ndarray:
        """Images -> float32 [N, D] unit rows, in input order (:meth:`embed_iter` collected).

        Args:
            images: one image or an iterable of them; each a file path, encoded bytes,
                a PIL image or a uint8 array (HxW, HxWx3, HxWx4); a uint8
                [N, H, W, 3] array counts as N images.
            batch_size: images per ONNX Runtime call.
            progress: print a progress line on stderr.
            decode_threads: threads that decode images (None: the encoder's ``decode_threads``).

        Raises:
            ImageError: naming the first input that is not a usable image.
        """
        return self.embed_partial(images, batch_size=batch_size, progress=progress, skip_bad=False,
                                  decode_threads=decode_threads)[0]

    def embed_partial(self, images: Iterable[ImageInput] | ImageInput, batch_size: int = 64, progress: bool = False,
                      skip_bad: bool = True, names: Sequence[str] | None = None, label: str = "embedding",
                      decode_threads: int | None = None) -> tuple[np.ndarray, list[int], list[ImageError]]:
        """Like :meth:`embed` but bad images can be skipped.

        Returns:
            (embeddings float32 [M, D] of the good images in input order,
            their indices into ``images`` (length M), the ImageErrors of the
            skipped ones).  With ``skip_bad=False`` the first bad image raises.
        """
        errors: list[ImageError] = []
        embs: list[np.ndarray] = []
        kept: list[int] = []
        for idx, vecs in self.embed_iter(images, batch_size=batch_size, decode_threads=decode_threads,
                                         progress=progress, names=names, label=label,
                                         on_error=(lambda i, e: errors.append(e)) if skip_bad else None):
            kept.extend(idx.tolist())
            embs.append(vecs)
        emb = np.concatenate(embs) if len(embs) > 1 else embs[0] if embs else np.zeros((0, self.dim), np.float32)
        return emb, kept, errors

    def embed_iter(self, inputs: Iterable[ImageInput] | ImageInput, batch_size: int = 64,
                   decode_threads: int | None = None, progress: bool = False, names: Sequence[str] | None = None,
                   label: str = "embedding", on_error: Callable[[int, ImageError], None] | None = None,
                   ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream images -> batches ``(indices int64 [b], embeddings float32 [b, D] unit rows)``, in input order.

        ``inputs`` is any iterable (a generator too: it is consumed lazily) or one image.  A pool
        of ``decode_threads`` threads decodes and preprocesses at most ``batch_size + max(batch_size,
        2 x decode_threads)`` images ahead of the batch ONNX Runtime is running, so decoding and
        inference overlap and memory holds a bounded number of decoded images however many
        inputs there are (only what the caller keeps of the yielded batches grows).
        ``indices`` are the positions in ``inputs``; with ``on_error`` a bad image is reported
        as ``on_error(index, ImageError)`` and left out, otherwise its ImageError is raised
        when its batch is reached.  ``names`` (indexable by position) name the inputs in errors.
        Closing the generator early (or Ctrl-C) cancels the queued decodes.

        Raises:
            ImageError: the first bad image (without ``on_error``).  ValueError: batch_size or
            decode_threads < 1, or ``names`` of another length than a sized ``inputs``.
        """
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        threads = self.decode_threads if decode_threads is None else int(decode_threads)
        if threads < 1:
            raise ValueError(f"decode_threads must be >= 1, got {decode_threads}")
        items, total = _as_iterable(inputs)
        if names is not None and total is not None and len(names) != total:
            raise ValueError(f"names has {len(names)} entries for {total} images")
        return self._stream(items, total, int(batch_size), threads, names, label, on_error, progress)

    def _prep(self, item: ImageInput, name: str) -> np.ndarray | ImageError:
        """One input -> float32 [3, S, S], or the ImageError saying why it is not usable (runs in a decode thread)."""
        try:
            return preprocess(item, self.spec, max_pixels=self.max_pixels, name=name)
        except ImageError as e:
            return e
        except MemoryError:
            return ImageError(name, "not enough memory to decode this image; lower max_pixels or free memory")

    def _stream(self, items: Iterable[ImageInput], total: int | None, batch_size: int, threads: int,
                names: Sequence[str] | None, label: str, on_error: Callable[[int, ImageError], None] | None,
                progress: bool) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The generator behind :meth:`embed_iter`: a bounded deque of decode futures, one batch run at a time."""
        single = total == 1

        def name_of(i: int, item: ImageInput) -> str:
            return names[i] if names is not None else describe_source(item, None if single else i)

        pool = ThreadPoolExecutor(threads, thread_name_prefix="isfe-decode") if threads > 1 and total != 1 else None
        ahead = batch_size + max(batch_size, 2 * threads)  # decoded or decoding, not yet run
        source = enumerate(items)
        pending: collections.deque[tuple[int, str, Future | np.ndarray | ImageError]] = collections.deque()
        bar = Progress(total, label, enabled=progress)

        def fill() -> None:
            while len(pending) < ahead:
                nxt = next(source, None)
                if nxt is None:
                    return
                i, item = nxt
                name = name_of(i, item)
                pending.append((i, name, pool.submit(self._prep, item, name) if pool else self._prep(item, name)))

        try:
            fill()
            while pending:
                batch = [pending.popleft() for _ in range(min(batch_size, len(pending)))]
                fill()  # the next images decode while this batch waits and runs
                good: list[tuple[int, str, np.ndarray]] = []
                for i, name, r in batch:
                    r = r.result() if isinstance(r, Future) else r
                    if isinstance(r, ImageError):
                        if on_error is None:
                            raise r
                        on_error(i, r)
                    else:
                        good.append((i, name, r))
                bar.update(len(batch))
                if good:
                    x = np.stack([a for _, _, a in good])
                    yield (np.fromiter((i for i, _, _ in good), np.int64, len(good)),
                           self._embed_arrays(x, [n for _, n, _ in good]))
        finally:
            bar.close()
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)


def default_decode_threads() -> int:
    """The CPU cores this process may run on (``os.sched_getaffinity``; ``os.cpu_count()`` elsewhere)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
