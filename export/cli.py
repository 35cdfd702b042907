"""``python -m export``: checkpoint -> gated stages (ONNX [onnxslim], INT8, TensorRT, Triton) [-> package + wheel].

Every stage that makes a model goes through one helper, :func:`gated`:
build the artifact under a temporary name -> parity against PyTorch fp32 on
real images -> publish it under its final name when its gate passed, or keep
only the report (``<artifact>.parity.json``) when it failed.  One failure
policy for every backend:

* exit 0: every artifact written passed its parity gate;
* exit 1: a parity gate failed (that artifact is not written, its report is;
  a failed ONNX fp32 gate stops the run, since every other stage builds on
  the verified fp32 file);
* exit 2: bad input (missing/corrupt checkpoint, missing folder, bad flags,
  TensorRT/GPU missing, ...).

Library use (keyword arguments named like the flags, as ``timm``'s
``onnx_export``)::

    from export.cli import export_checkpoint
    result = export_checkpoint("runs/x/checkpoint.pt", onnx="model.onnx", int8="model-int8.onnx")
    result.artifacts   # [Artifact(kind="ONNX fp32", path=..., passed=True, ...), ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from isfe_model.atomic import about_temporary, unwritable_error
from isfe_model.metadata import ModelMetadata
from isfe_model.preprocess import PreprocessSpec
from training.model import CheckpointError, file_sha256, load_encoder

from . import package as model_package
from .common import ExportError, check_output_path, publish, remove_quietly, temp_path_for, write_json_atomic
from .parity import ParityImages, load_parity_images, ort_embedder, reference_embeddings, report_path, run_parity
from .quantize import quantize_int8
from .to_onnx import export_onnx, metadata_for_encoder, read_props
from .to_tensorrt import (
    Profile,
    TrtRunner,
    build_engine,
    engine_sidecar,
    gpu_info,
    sha256_bytes,
    sidecar_path,
    tensorrt_missing,
)
from .triton_repo import write_triton_repo

__all__ = ["Artifact", "ExportOptions", "ExportResult", "GateFailed", "STAGES", "Stage", "build_parser",
           "export_checkpoint", "gated", "main", "run"]


class GateFailed(ExportError):
    """An artifact failed its parity gate (exit code 1)."""


@dataclass
class ExportOptions:
    """Every option of ``python -m export`` (one field per flag; see :func:`build_parser` for the help)."""

    checkpoint: str
    onnx: str | None = None
    simplify: bool = False
    opset: int = 18
    images: str | None = None
    data: str | None = None
    max_images: int = 512
    max_batch: int = 64
    opt_batch: int | None = None
    trt: str | None = None
    precision: str | None = None
    workspace_gib: float = 4.0
    int8: str | None = None  # "" = the default name (model-int8.onnx in --package, <onnx stem>-int8.onnx otherwise)
    calib: str | None = None
    calib_count: int = 256
    calib_method: str = "minmax"
    triton_repo: str | None = None
    model_name: str | None = None
    model_version: str = "1"
    package: str | None = None
    wheel: str | None = None


@dataclass
class Artifact:
    """One output of the run; ``passed`` None = not gated (derived from a verified artifact)."""

    kind: str
    path: str
    backend: str | None = None
    passed: bool | None = None
    summary: str = ""
    extra: list[str] = field(default_factory=list)
    report: Any = None  # the ParityReport, when gated


@dataclass
class Context:
    """What the stages share: the options, the PyTorch model, the parity images and their reference embeddings."""

    opts: ExportOptions
    model: Any
    meta: ModelMetadata
    spec: PreprocessSpec
    images: ParityImages
    reference: np.ndarray
    artifacts: list[Artifact] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


@dataclass
class ExportResult:
    artifacts: list[Artifact]
    failures: list[str]
    package: Path | None = None
    wheel: Path | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class Stage:
    """A step of the export: ``run(ctx)`` returns its artifact; ``required``: later stages build on it."""

    name: str
    enabled: Callable[[ExportOptions], bool]
    run: Callable[[Context], Artifact]
    required: bool = False


# --------------------------------------------------------------------------- the one gate helper


Embedder = Callable[[np.ndarray], np.ndarray]


def gated(ctx: Context, *, kind: str, backend: str, final: Path, suffix: str, what: str,
          build: Callable[[Path], Embedder], on_pass: Callable[[Path], list[str]] | None = None,
          batch_size: int = 64) -> Artifact:
    """build -> parity -> publish, or keep only the report.

    ``build(tmp)`` writes the artifact to ``tmp`` (a fresh name beside
    ``final``) and returns its embedder, float32 [b,3,S,S] -> [b,D].  The
    parity report is written to ``<final>.parity.json`` either way; the
    artifact is renamed to ``final`` only when its gate passed (after
    ``on_pass(tmp)``, which may write sidecars and returns summary lines).
    A failed gate is recorded in ``ctx.failures`` (exit code 1).
    """
    tmp = temp_path_for(final, suffix)
    try:
        embedder = build(tmp)
        rep = run_parity(backend, embedder, ctx.images, ctx.reference, final, batch_size=batch_size)
        extra: list[str] = []
        if rep.passed:
            extra = on_pass(tmp) if on_pass is not None else []
            publish(tmp, final)
        else:
            ctx.failures.append(f"{final}: {kind_label(kind)} parity gate failed (report: {report_path(final)}); "
                                f"{what} was not written")
        return Artifact(kind, str(final), backend, rep.passed, _headline(rep), extra, rep)
    except OSError as e:  # a write to the temporary file failed (full disk, ...): name the artifact
        if about_temporary(e, tmp):
            raise unwritable_error(e, final) from e
        raise
    finally:
        remove_quietly(tmp)


def kind_label(kind: str) -> str:
    return {"ONNX fp32": "ONNX Runtime fp32", "ONNX int8": "INT8"}.get(kind, kind)


# --------------------------------------------------------------------------- stages


def _onnx_stage(ctx: Context) -> Artifact:
    o = ctx.opts
    print(f"\n[onnx] exporting (opset {o.opset}, dynamic batch checked at 1, 3, "
          f"{o.max_batch}{', onnxslim' if o.simplify else ''})")

    def build(tmp: Path):
        export_onnx(ctx.model, tmp, ctx.meta, opset=o.opset, example_batch=2, max_batch=o.max_batch,
                    simplify=o.simplify)
        return ort_embedder(tmp)

    return gated(ctx, kind="ONNX fp32", backend="onnxruntime-fp32", final=Path(o.onnx), suffix=".onnx",
                 what="the model", build=build)


def _int8_stage(ctx: Context) -> Artifact:
    o = ctx.opts
    calib = load_parity_images(ctx.spec, o.calib, o.data, "train", o.calib_count, flag="--calib", seed=1)
    print(f"\n[int8] static QDQ quantization, {o.calib_method} calibration on {len(calib)} images from {calib.source}")

    def build(tmp: Path):
        quantize_int8(o.onnx, tmp, calib.x, calib.source, method=o.calib_method)
        return ort_embedder(tmp)

    return gated(ctx, kind="ONNX int8", backend="onnxruntime-int8", final=Path(o.int8), suffix=".onnx",
                 what="the model", build=build)


def _tensorrt_stage(ctx: Context) -> Artifact:
    import tensorrt as trt  # optional, GPU only (checked by _validate)

    o = ctx.opts
    precision = o.precision or "fp32"
    prof = Profile(1, o.opt_batch or min(32, o.max_batch), o.max_batch)
    final = Path(o.trt)
    print(f"\n[tensorrt] building {precision} engine, batch profile {prof.min}/{prof.opt}/{prof.max}")
    built: dict[str, Any] = {}

    def build(tmp: Path):
        engine, plan = build_engine(o.onnx, precision, prof, ctx.meta.input_name, ctx.spec.input_size, o.workspace_gib)
        built.update(engine=engine, plan=plan)
        tmp.write_bytes(engine)
        return TrtRunner(tmp.read_bytes(), ctx.meta.input_name, ctx.meta.output_name)

    def on_pass(tmp: Path) -> list[str]:
        name, cc = gpu_info()
        side = engine_sidecar(trt.__version__, name, cc, file_sha256(o.onnx), prof, precision, built["plan"],
                              ctx.meta.input_name, ctx.meta.output_name, read_props(o.onnx),
                              sha256_bytes(built["engine"]))
        write_json_atomic(sidecar_path(final), side)
        return [f"sidecar {sidecar_path(final)}"]

    return gated(ctx, kind=f"TensorRT {precision}", backend=f"tensorrt-{precision}", final=final, suffix=".plan",
                 what="the engine", build=build, on_pass=on_pass, batch_size=min(64, prof.max))


def _triton_stage(ctx: Context) -> Artifact:
    o = ctx.opts
    folder = write_triton_repo(o.triton_repo, o.onnx, ctx.meta.model_name, max_batch_size=o.max_batch)
    summary = f"config.pbtxt + 1/model.onnx (max_batch_size {o.max_batch})"
    return Artifact("Triton repo", str(folder), None, None, summary)


#: The export, in order.  The ONNX fp32 stage (with onnxslim when --simplify: the simplified graph is what is
#: gated and written) is required: INT8, TensorRT and Triton are all built from the verified fp32 file.
STAGES: tuple[Stage, ...] = (
    Stage("onnx", lambda o: True, _onnx_stage, required=True),
    Stage("int8", lambda o: o.int8 is not None, _int8_stage),
    Stage("tensorrt", lambda o: o.trt is not None, _tensorrt_stage),
    Stage("triton", lambda o: o.triton_repo is not None, _triton_stage),
)


# --------------------------------------------------------------------------- the command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m export",
        description="Export an ISFE checkpoint to ONNX (and optionally TensorRT, INT8 ONNX, a Triton repository, a "
        "model package and its wheel); every artifact is checked against PyTorch fp32 on real images and kept only "
        "if it passes.",
        epilog="Exit codes: 0 every artifact written passed its parity gate; 1 a parity gate failed (that artifact is "
        "not written); 2 bad input (checkpoint, paths, flags, TensorRT/GPU missing). Reports: <artifact>.parity.json.",
    )
    p.add_argument("--checkpoint", required=True, metavar="CKPT",
                   help="checkpoint.pt written by `python -m training` (or its run folder)")
    p.add_argument("--onnx", default=None, metavar="MODEL.onnx", help="output ONNX file (opset 18, dynamic batch, "
                   "ISFE metadata); required unless --package is given")
    p.add_argument("--simplify", action="store_true", help="simplify the graph with onnxslim (re-verified)")
    p.add_argument("--opset", type=int, default=18, metavar="N", help="ONNX opset (default 18)")
    p.add_argument("--images", metavar="DIR", help="parity images: a folder (class subfolders give labels); default: "
                                                   "--data test split")
    p.add_argument("--data", default=None, metavar="SOURCE", help="training.data source for default "
                        "parity/calibration images (default: the checkpoint's training data when that folder or "
                        "archive is on this machine, else the embedded digits)")
    p.add_argument("--max-images", type=int, default=512, metavar="N",
                   help="parity images to use (random fixed sample; default 512)")
    p.add_argument("--max-batch", type=int, default=64, metavar="N",
                   help="largest batch: ONNX check, TensorRT profile max, Triton max_batch_size (default 64)")
    p.add_argument("--opt-batch", type=int, default=None, metavar="N",
                   help="TensorRT profile opt batch (default min(32, max))")
    p.add_argument("--trt", metavar="ENGINE.plan", help="output TensorRT engine (.plan); needs TensorRT and a CUDA GPU")
    p.add_argument("--precision", choices=("fp32", "fp16"), default=None, help="TensorRT precision (default fp32)")
    p.add_argument("--workspace-gib", type=float, default=4.0, metavar="GIB", help="TensorRT builder workspace (GiB)")
    p.add_argument("--int8", nargs="?", const="", default=None, metavar="MODEL-int8.onnx",
                   help="output INT8 ONNX (ONNX Runtime static QDQ quantization, for CPU); without a file name: "
                        "model-int8.onnx in --package, else <--onnx stem>-int8.onnx")
    p.add_argument("--calib", metavar="DIR", help="calibration images folder for --int8 (default: --data train split)")
    p.add_argument("--calib-count", type=int, default=256, metavar="N", help="calibration images (default 256)")
    p.add_argument("--calib-method", choices=("minmax", "entropy", "percentile"), default="minmax")
    p.add_argument("--triton-repo", metavar="DIR", help="write a Triton model repository here "
                                                        "(DIR/<name>/1/model.onnx + config.pbtxt)")
    p.add_argument("--model-name", "--name", dest="model_name", default=None, metavar="NAME",
                   help="model name (metadata, Triton, package; the wheel is isfe-model-NAME); default "
                        "isfe-<arch>-<dim>d")
    p.add_argument("--model-version", "--version", dest="model_version", default="1", metavar="VERSION",
                   help="model version stored in the metadata and the package (a PEP 440 version for --wheel; "
                        "default 1)")
    p.add_argument("--package", metavar="DIR", help="write a model package folder: model.onnx [model-int8.onnx], "
                   "config.json, README.md (model card), curves.png, parity/*.json, metrics.jsonl (atomic; only "
                   "replaces an older package)")
    p.add_argument("--wheel", metavar="DIST", help="also build a pip wheel of the package into folder DIST "
                   "(distribution isfe-model-NAME, entry point group isfe_model.models); needs --package")
    return p


def options_from_args(args: argparse.Namespace) -> ExportOptions:
    return ExportOptions(**{f.name: getattr(args, f.name) for f in fields(ExportOptions)})


def _validate(o: ExportOptions) -> None:
    """Bad input -> ExportError (exit 2) before anything is built; output paths are resolved in place."""
    if o.max_images < 2:
        raise ExportError(f"--max-images must be >= 2, got {o.max_images}")
    if o.max_batch < 3:
        raise ExportError("--max-batch must be >= 3 (the batch axis is checked at 1, 3 and the maximum), got "
                          f"{o.max_batch}")
    if o.calib_count < 1:
        raise ExportError(f"--calib-count must be >= 1, got {o.calib_count}")
    if o.opset != 18:
        print(f"note: --opset {o.opset} (ISFE models are tested with opset 18)")
    if o.onnx is None and o.package is None:
        raise ExportError("give --onnx MODEL.onnx (the exported file) or --package DIR (a model package folder)")
    if o.wheel is not None and o.package is None:
        raise ExportError(f"--wheel {o.wheel} builds a wheel of the model package; add --package DIR")
    if o.package is not None:
        model_package.check_package_target(o.package, o.wheel, o.model_name, o.model_version)
    if o.onnx is not None:
        o.onnx = str(check_output_path(o.onnx, "--onnx"))  # a symlink's target is what gets written
    if o.int8 == "" and o.package is None:
        o.int8 = str(Path(o.onnx).with_name(Path(o.onnx).stem + "-int8.onnx"))
    outputs = {"--onnx": Path(o.onnx).resolve()} if o.onnx else {}
    for flag, attr in (("--trt", "trt"), ("--int8", "int8")):
        if getattr(o, attr):
            setattr(o, attr, str(check_output_path(getattr(o, attr), flag)))
            outputs[flag] = Path(getattr(o, attr)).resolve()
    seen: dict[Path, str] = {}
    for flag, path in outputs.items():
        if path in seen:
            raise ExportError(f"{flag} and {seen[path]} name the same file {path}; give each artifact its own name")
        seen[path] = flag
    if o.precision and not o.trt:
        raise ExportError("--precision applies to the TensorRT engine; add --trt ENGINE.plan")
    if o.calib and o.int8 is None:
        raise ExportError("--calib is for INT8 calibration; add --int8 MODEL-int8.onnx")
    for flag, folder in (("--images", o.images), ("--calib", o.calib)):
        if folder and not Path(folder).is_dir():
            raise ExportError(f"{flag} {folder}: no such folder; give a folder of images (optionally in "
                              "class subfolders)")
    if o.triton_repo:
        repo = Path(o.triton_repo)
        if repo.exists() and not repo.is_dir():
            raise ExportError(f"--triton-repo {repo} is a file, not a directory")
        if not repo.exists() and not repo.resolve().parent.is_dir():
            raise ExportError(f"--triton-repo {repo}: parent directory {repo.resolve().parent} does not exist; "
                              "create it first")
    if o.trt:
        why = tensorrt_missing()
        if why:
            raise ExportError(f"--trt {o.trt}: {why}. Run without --trt to export ONNX only.")


def _size(path: str | Path) -> str:
    n = Path(path).stat().st_size
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _headline(report: Any) -> str:
    m = report.metrics
    parts = [f"max_abs {m['max_abs']:.1e}", f"min_cos {m['min_cosine']:.8f}", f"top1 {m['top1_agreement']:.1%}"]
    if "knn_top1_drop" in m:
        parts.append(f"kNN drop {m['knn_top1_drop']:+.2f} pt")
    return ", ".join(parts)


def _training_data(model: Any) -> str | None:
    """The checkpoint's training data when it is a folder or archive on this machine, else None (embedded digits)."""
    data = ((getattr(model, "checkpoint", None) or {}).get("config") or {}).get("data")
    if isinstance(data, str) and data not in ("digits", "cifar10") and Path(data).exists():
        return data
    return None


def _context(o: ExportOptions) -> Context:
    """Load the checkpoint, the parity images and their PyTorch fp32 reference embeddings."""
    try:
        model = load_encoder(o.checkpoint)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    cfg = model.cfg
    meta = metadata_for_encoder(model, o.model_name, o.model_version)
    spec = cfg.preprocess
    print(f"checkpoint {o.checkpoint}: {cfg.arch}, {cfg.embedding_dim}-d, input {spec.input_size}x{spec.input_size}, "
          f"sha256 {meta.checkpoint_sha256[:12]}…")
    if o.data is None and (o.images is None or (o.int8 is not None and o.calib is None)):
        o.data = _training_data(model)
    images = load_parity_images(spec, o.images, o.data, "test", o.max_images)
    if len(images) < 2:
        raise ExportError(f"parity needs at least 2 readable images; {images.source} gave {len(images)}")
    if o.int8 is not None and images.labels is None:
        raise ExportError(
            f"--int8 is gated on kNN top-1 accuracy, which needs labelled parity images: {images.source} has no class "
            "subfolders. Give --images DIR with DIR/<class>/*.jpg, or leave out --images to use the --data test split"
        )
    skipped = (f" ({len(images.skipped)} skipped: unreadable images, links to folders, special files)"
               if images.skipped else "")
    print(f"parity images: {len(images)} from {images.source}{skipped}")
    return Context(o, model, meta, spec, images, reference_embeddings(model, images.x))


def run_stages(ctx: Context) -> None:
    """Run the enabled stages in order; a failed required stage stops the run (GateFailed)."""
    for stage in STAGES:
        if not stage.enabled(ctx.opts):
            continue
        artifact = stage.run(ctx)
        ctx.artifacts.append(artifact)
        if stage.required and artifact.passed is False:
            raise GateFailed("; ".join(ctx.failures))


def export_checkpoint(checkpoint: str, **options: Any) -> ExportResult:
    """The export as a library call: ``export_checkpoint(CKPT, onnx=..., int8=..., package=..., ...)``.

    Keyword arguments are the :class:`ExportOptions` fields (the flags without
    dashes).  Raises :class:`ExportError` (bad input) or :class:`GateFailed`
    (after the summary, when a gate failed; the passing artifacts are written).
    """
    unknown = sorted(set(options) - {f.name for f in fields(ExportOptions)})
    if unknown:
        raise ExportError(f"unknown export option(s) {', '.join(unknown)}; see `python -m export --help`")
    return _export(ExportOptions(checkpoint=str(checkpoint), **options))


def _export(o: ExportOptions) -> ExportResult:
    t0 = time.time()
    _validate(o)
    result = ExportResult([], [])
    if o.package is not None:
        result.package, result.wheel, ctx = model_package.export_package(o, lambda opts: _run_in(opts, result))
    else:
        ctx = _run_in(o, result)
    result.seconds = time.time() - t0
    _print_summary(result)
    if ctx.failures:
        raise GateFailed("; ".join(ctx.failures))
    print("\nnext: embed images with the torch-free package:")
    print(f"  isfe-embed {result.package or o.onnx} IMAGE... -o emb.npy")
    if o.triton_repo:
        print(f"  tritonserver --model-repository {Path(o.triton_repo).resolve()}")
    return result


def _run_in(o: ExportOptions, result: ExportResult) -> Context:
    ctx = _context(o)
    result.artifacts, result.failures = ctx.artifacts, ctx.failures
    run_stages(ctx)
    return ctx


def run(args: argparse.Namespace) -> int:
    """The export pipeline for parsed arguments; raises ExportError (or GateFailed) with a user-facing message."""
    _export(options_from_args(args))
    return 0


def _print_summary(result: ExportResult) -> None:
    print(f"\nsummary ({result.seconds:.0f} s)")
    rows = [("artifact", "path", "size", "parity", "details")]
    extras: list[list[str]] = [[]]
    shown = list(result.artifacts)
    if result.package is not None:
        shown.append(Artifact("Model package", str(result.package), None, None, "config.json, README.md, parity/"))
    if result.wheel is not None:
        shown.append(Artifact("Wheel", str(result.wheel), None, None, "pip install it; load by name"))
    for a in shown:
        size = _size(a.path) if Path(a.path).is_file() else ("-" if not Path(a.path).exists() else "dir")
        verdict = "-" if a.passed is None else ("PASSED" if a.passed else "FAILED (not written)")
        rows.append((a.kind, a.path, size, verdict, a.summary))
        extras.append(a.extra)
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r, extra in zip(rows, extras):
        print("  " + "  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4])
        for e in extra:
            print("  " + " " * (sum(widths) + 8) + e)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except GateFailed as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 1
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions, ... while writing
        print(f"error: {e.filename or ''}: {e.strerror or e}; nothing half-written was kept", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; no partial artifact was kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
