"""``python -m export``: checkpoint -> ONNX [+ TensorRT] [+ INT8 ONNX] [+ Triton repository], each parity-gated.

Exit codes: 0 every artifact written passed its parity gate; 1 a parity gate
failed (the failing artifact is not kept); 2 bad input (missing/corrupt
checkpoint, missing folder, TensorRT/GPU missing, ...).  Artifacts are written
under temporary names and renamed only once verified.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .common import ExportError, check_output_path, publish, remove_quietly, temp_path_for, write_json_atomic

__all__ = ["GateFailed", "build_parser", "main", "run"]


class GateFailed(ExportError):
    """An artifact failed its parity gate (exit code 1)."""


@dataclass
class Artifact:
    kind: str
    path: str
    backend: str | None = None
    passed: bool | None = None
    summary: str = ""
    extra: list[str] = field(default_factory=list)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m export",
        description="Export an ISFE checkpoint to ONNX (and optionally TensorRT, INT8 ONNX, a Triton repository); "
        "every artifact is checked against PyTorch fp32 on real images and kept only if it passes.",
        epilog="Exit codes: 0 every artifact written passed its parity gate; 1 a parity gate failed (that artifact is not written); "
        "2 bad input (checkpoint, paths, flags, TensorRT/GPU missing). Reports: <artifact>.parity.json.",
    )
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="checkpoint.pt written by `python -m training` (or its run folder)")
    p.add_argument("--onnx", required=True, metavar="MODEL.onnx", help="output ONNX file (opset 18, dynamic batch, ISFE metadata)")
    p.add_argument("--simplify", action="store_true", help="simplify the graph with onnxslim (re-verified)")
    p.add_argument("--opset", type=int, default=18, metavar="N", help="ONNX opset (default 18)")
    p.add_argument("--images", metavar="DIR", help="parity images: a folder (class subfolders give labels); default: --data test split")
    p.add_argument("--data", default=None, metavar="SOURCE", help="training.data source for default parity/calibration images (default: the checkpoint's training data "
                        "when that folder or archive is on this machine, else the embedded digits)")
    p.add_argument("--max-images", type=int, default=512, metavar="N", help="parity images to use (random fixed sample; default 512)")
    p.add_argument("--max-batch", type=int, default=64, metavar="N", help="largest batch: ONNX check, TensorRT profile max, Triton max_batch_size (default 64)")
    p.add_argument("--opt-batch", type=int, default=None, metavar="N", help="TensorRT profile opt batch (default min(32, max))")
    p.add_argument("--trt", metavar="ENGINE.plan", help="output TensorRT engine (.plan); needs TensorRT and a CUDA GPU")
    p.add_argument("--precision", choices=("fp32", "fp16"), default=None, help="TensorRT precision (default fp32)")
    p.add_argument("--workspace-gib", type=float, default=4.0, metavar="GIB", help="TensorRT builder workspace (GiB)")
    p.add_argument("--int8", metavar="MODEL-int8.onnx", help="output INT8 ONNX (ONNX Runtime static QDQ quantization, for CPU)")
    p.add_argument("--calib", metavar="DIR", help="calibration images folder for --int8 (default: --data train split)")
    p.add_argument("--calib-count", type=int, default=256, metavar="N", help="calibration images (default 256)")
    p.add_argument("--calib-method", choices=("minmax", "entropy", "percentile"), default="minmax")
    p.add_argument("--triton-repo", metavar="DIR", help="write a Triton model repository here (DIR/<name>/1/model.onnx + config.pbtxt)")
    p.add_argument("--model-name", default=None, metavar="NAME", help="model name (metadata, Triton); default isfe-<arch>-<dim>d")
    p.add_argument("--model-version", default="1", metavar="VERSION", help="model version string stored in the metadata (default 1)")
    return p


def _validate(args: argparse.Namespace) -> None:
    if args.max_images < 2:
        raise ExportError(f"--max-images must be >= 2, got {args.max_images}")
    if args.max_batch < 3:
        raise ExportError(f"--max-batch must be >= 3 (the batch axis is checked at 1, 3 and the maximum), got {args.max_batch}")
    if args.calib_count < 1:
        raise ExportError(f"--calib-count must be >= 1, got {args.calib_count}")
    if args.opset != 18:
        print(f"note: --opset {args.opset} (ISFE models are tested with opset 18)")
    args.onnx = str(check_output_path(args.onnx, "--onnx"))  # a symlink's target is what gets written
    outputs = {"--onnx": Path(args.onnx).resolve()}
    for flag, attr in (("--trt", "trt"), ("--int8", "int8")):
        if getattr(args, attr):
            setattr(args, attr, str(check_output_path(getattr(args, attr), flag)))
            outputs[flag] = Path(getattr(args, attr)).resolve()
    seen: dict[Path, str] = {}
    for flag, path in outputs.items():
        if path in seen:
            raise ExportError(f"{flag} and {seen[path]} name the same file {path}; give each artifact its own name")
        seen[path] = flag
    if args.precision and not args.trt:
        raise ExportError("--precision applies to the TensorRT engine; add --trt ENGINE.plan")
    if args.calib and not args.int8:
        raise ExportError("--calib is for INT8 calibration; add --int8 MODEL-int8.onnx")
    for flag, folder in (("--images", args.images), ("--calib", args.calib)):
        if folder and not Path(folder).is_dir():
            raise ExportError(f"{flag} {folder}: no such folder; give a folder of images (optionally in class subfolders)")
    if args.triton_repo:
        repo = Path(args.triton_repo)
        if repo.exists() and not repo.is_dir():
            raise ExportError(f"--triton-repo {repo} is a file, not a directory")
        if not repo.exists() and not repo.resolve().parent.is_dir():
            raise ExportError(f"--triton-repo {repo}: parent directory {repo.resolve().parent} does not exist; create it first")
    if args.trt:
        from .to_tensorrt import tensorrt_missing

        why = tensorrt_missing()
        if why:
            raise ExportError(f"--trt {args.trt}: {why}. Run without --trt to export ONNX only.")


def _size(path: str | os.PathLike) -> str:
    n = Path(path).stat().st_size
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _headline(report: Any) -> str:
    m = report.metrics
    parts = [f"max_abs {m['max_abs']:.1e}", f"min_cos {m['min_cosine']:.8f}", f"top1 {m['top1_agreement']:.1%}"]
    if "knn_top1_drop" in m:
        parts.append(f"kNN drop {m['knn_top1_drop']:+.2f} pt")
    return ", ".join(parts)


def _training_data(model: Any) -> str | None:
    """The checkpoint's training data when it is a folder or archive on this machine, else None (the embedded digits)."""
    data = ((getattr(model, "checkpoint", None) or {}).get("config") or {}).get("data")
    if isinstance(data, str) and data not in ("digits", "cifar10") and Path(data).exists():
        return data
    return None


def run(args: argparse.Namespace) -> int:
    """The export pipeline; raises ExportError (or GateFailed) with a user-facing message."""
    t0 = time.time()
    _validate(args)
    import numpy as np

    from training.model import CheckpointError, file_sha256, load_encoder

    from .parity import load_parity_images, ort_embedder, reference_embeddings, run_parity
    from .to_onnx import export_onnx, metadata_for_encoder

    try:
        model = load_encoder(args.checkpoint)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    cfg = model.cfg
    meta = metadata_for_encoder(model, args.model_name, args.model_version)
    spec = cfg.preprocess
    print(f"checkpoint {args.checkpoint}: {cfg.arch}, {cfg.embedding_dim}-d, input {spec.input_size}x{spec.input_size}, sha256 {meta.checkpoint_sha256[:12]}…")
    if args.data is None and (args.images is None or (args.int8 and args.calib is None)):
        args.data = _training_data(model)
    images = load_parity_images(spec, args.images, args.data, "test", args.max_images)
    if len(images) < 2:
        raise ExportError(f"parity needs at least 2 readable images; {images.source} gave {len(images)}")
    if args.int8 and images.labels is None:
        raise ExportError(
            f"--int8 is gated on kNN top-1 accuracy, which needs labelled parity images: {images.source} has no class "
            "subfolders. Give --images DIR with DIR/<class>/*.jpg, or leave out --images to use the --data test split"
        )
    print(f"parity images: {len(images)} from {images.source}" + (f" ({len(images.skipped)} unreadable skipped)" if images.skipped else ""))
    reference = reference_embeddings(model, images.x)
    artifacts: list[Artifact] = []
    failures: list[str] = []

    # 1. ONNX (everything else is built from the verified file)
    onnx_final = Path(args.onnx)
    tmp = temp_path_for(onnx_final, ".onnx")
    try:
        print(f"\n[onnx] exporting (opset {args.opset}, dynamic batch checked at 1, 3, {args.max_batch}{', onnxslim' if args.simplify else ''})")
        export_onnx(model, tmp, meta, opset=args.opset, example_batch=2, max_batch=args.max_batch, simplify=args.simplify)
        rep = run_parity("onnxruntime-fp32", ort_embedder(tmp), images, reference, onnx_final)
        if not rep.passed:
            raise GateFailed(f"{onnx_final}: ONNX Runtime fp32 parity gate failed (report: {onnx_final}.parity.json); the model was not written")
        publish(tmp, onnx_final)
    finally:
        remove_quietly(tmp)
    artifacts.append(Artifact("ONNX fp32", str(onnx_final), "onnxruntime-fp32", True, _headline(rep)))

    # 2. INT8 (CPU)
    if args.int8:
        from .quantize import quantize_int8

        int8_final = Path(args.int8)
        calib = load_parity_images(spec, args.calib, args.data, "train", args.calib_count, flag="--calib", seed=1)
        print(f"\n[int8] static QDQ quantization, {args.calib_method} calibration on {len(calib)} images from {calib.source}")
        tmp = temp_path_for(int8_final, ".onnx")
        try:
            quantize_int8(onnx_final, tmp, calib.x, calib.source, method=args.calib_method)
            rep = run_parity("onnxruntime-int8", ort_embedder(tmp), images, reference, int8_final)
            if rep.passed:
                publish(tmp, int8_final)
                artifacts.append(Artifact("ONNX int8", str(int8_final), "onnxruntime-int8", True, _headline(rep)))
            else:
                failures.append(f"{int8_final}: INT8 parity gate failed (report: {int8_final}.parity.json); the model was not written")
                artifacts.append(Artifact("ONNX int8", str(int8_final), "onnxruntime-int8", False, _headline(rep)))
        finally:
            remove_quietly(tmp)

    # 3. TensorRT
    if args.trt:
        from .to_tensorrt import Profile, TrtRunner, build_engine, engine_sidecar, gpu_info, sha256_bytes, sidecar_path

        precision = args.precision or "fp32"
        prof = Profile(1, args.opt_batch or min(32, args.max_batch), args.max_batch)
        trt_final = Path(args.trt)
        print(f"\n[tensorrt] building {precision} engine, batch profile {prof.min}/{prof.opt}/{prof.max}")
        engine, plan = build_engine(onnx_final, precision, prof, meta.input_name, spec.input_size, args.workspace_gib)
        tmp = temp_path_for(trt_final, ".plan")
        try:
            tmp.write_bytes(engine)
            runner = TrtRunner(tmp.read_bytes(), meta.input_name, meta.output_name)
            rep = run_parity(f"tensorrt-{precision}", runner, images, reference, trt_final, batch_size=min(64, prof.max))
            if rep.passed:
                import tensorrt as trt

                name, cc = gpu_info()
                props = {p: v for p, v in _props(onnx_final).items()}
                side = engine_sidecar(trt.__version__, name, cc, file_sha256(onnx_final), prof, precision, plan,
                                      meta.input_name, meta.output_name, props, sha256_bytes(engine))
                write_json_atomic(sidecar_path(trt_final), side)
                publish(tmp, trt_final)
                artifacts.append(Artifact(f"TensorRT {precision}", str(trt_final), f"tensorrt-{precision}", True, _headline(rep),
                                          [f"sidecar {sidecar_path(trt_final)}"]))
            else:
                failures.append(f"{trt_final}: TensorRT {precision} parity gate failed (report: {trt_final}.parity.json); the engine was not written")
                artifacts.append(Artifact(f"TensorRT {precision}", str(trt_final), f"tensorrt-{precision}", False, _headline(rep)))
        finally:
            remove_quietly(tmp)

    # 4. Triton repository (the verified fp32 ONNX)
    if args.triton_repo:
        from .triton_repo import write_triton_repo

        folder = write_triton_repo(args.triton_repo, onnx_final, meta.model_name, max_batch_size=args.max_batch)
        artifacts.append(Artifact("Triton repo", str(folder), None, None, f"config.pbtxt + 1/model.onnx (max_batch_size {args.max_batch})"))

    _print_summary(artifacts, time.time() - t0)
    if failures:
        raise GateFailed("; ".join(failures))
    print("\nnext: embed images with the torch-free package:")
    print(f"  isfe-embed {onnx_final} IMAGE... -o emb.npy")
    if args.triton_repo:
        print(f"  tritonserver --model-repository {Path(args.triton_repo).resolve()}")
    return 0


def _props(path: Path) -> dict[str, str]:
    from .to_onnx import read_props

    return read_props(path)


def _print_summary(artifacts: list[Artifact], seconds: float) -> None:
    print(f"\nsummary ({seconds:.0f} s)")
    rows = [("artifact", "path", "size", "parity", "details")]
    for a in artifacts:
        size = _size(a.path) if Path(a.path).is_file() else ("-" if not Path(a.path).exists() else "dir")
        verdict = "-" if a.passed is None else ("PASSED" if a.passed else "FAILED (not written)")
        rows.append((a.kind, a.path, size, verdict, a.summary))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  " + "  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4])
        for e in next((a.extra for a in artifacts if a.kind == r[0] and a.path == r[1]), []):
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
