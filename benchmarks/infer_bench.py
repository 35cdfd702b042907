"""Inference throughput of the export backends, in one run on the same images.

    python benchmarks/infer_bench.py [--checkpoint runs/x/checkpoint.pt] [--data SOURCE] [--seconds 3]

CPU (always): PyTorch eager fp32, ONNX Runtime fp32 and ONNX Runtime INT8
(static QDQ) at batch 1 and 64, images/s and the ratios ORT fp32 / PyTorch
and INT8 / ORT fp32.  CUDA (when present): PyTorch eager fp32 (TF32 off) and
fp16 autocast, and TensorRT fp32/fp16 engines when TensorRT is installed,
all end to end from host arrays (copy in, run, copy out).

Without --checkpoint it saves a randomly initialised EmbeddingNet (ResNet-18,
CIFAR stem, 32x32, 128-d): speed does not depend on training.  Images: the
test split of --data (default: the embedded digits, resized to the model's
input) -- real images, the same arrays for every backend.  Every backend's
embeddings are checked against PyTorch before it is timed.

Threads: PyTorch uses torch.set_num_threads(cores) (intra-op) and 1 inter-op
thread; ONNX Runtime uses intra_op_num_threads = cores, inter_op 1,
sequential execution, ORT_ENABLE_ALL graph optimisation.  ``--threads N``
sets both to N (the file name then ends in -<N>thread): on a machine shared
with other busy processes, spinning thread pools of 2+ threads collapse, and
1 thread gives the steadier comparison.  Backends are timed
in interleaved rounds (each round times every backend once) and the median
round is reported, so load from other processes hits all of them alike.

JSON: benchmarks/results/infer_bench-<device>.json ("device": cpu<N> or the GPU).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.common import RESULTS, cpu_model, device_tag, load_average, write_result  # noqa: E402
from export.common import ExportError  # noqa: E402
from export.parity import compare, load_parity_images, ort_embedder  # noqa: E402
from export.quantize import quantize_int8  # noqa: E402
from export.to_onnx import export_onnx, library_versions, metadata_for_encoder  # noqa: E402
from isfe_model.preprocess import PreprocessSpec  # noqa: E402
from training.model import ModelConfig, build_encoder, load_encoder, save_checkpoint  # noqa: E402

GOALS = {"ort_fp32_vs_torch_b64": 1.5, "int8_vs_ort_fp32_b64": 1.5}


def time_rounds(fns: dict[str, Callable[[], Any]], images_per_call: int, seconds: float,
                min_rounds: int = 5) -> dict[str, dict[str, float]]:
    """Interleaved timing: each round calls every fn once (after one warm-up call each).

    Returns per name: images_per_s (median round), ms_per_call (median), rounds.
    """
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    while True:
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
        rounds = len(next(iter(times.values())))
        if rounds >= min_rounds and time.perf_counter() - start >= seconds * len(fns):
            break
    out = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = {"images_per_s": images_per_call / med, "ms_per_call": med * 1e3, "rounds": len(ts)}
    return out


Embedder = Callable[[np.ndarray], np.ndarray]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="checkpoint.pt (default: an untrained ResNet-18 32x32 128-d)")
    p.add_argument("--data", default=None, help="image source for training.data.load_split (default: embedded digits)")
    p.add_argument("--batches", default="1,64", help="batch sizes (default 1,64)")
    p.add_argument("--seconds", type=float, default=3.0, help="approximate timing budget per backend and batch size")
    p.add_argument("--calib", type=int, default=128, help="INT8 calibration images")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads for PyTorch and ONNX Runtime (default: all cores)")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def _checkpoint(args: argparse.Namespace, work: Path) -> Path:
    """--checkpoint, or an untrained ResNet-18 (CIFAR stem, 32x32, 128-d) saved into ``work``."""
    if args.checkpoint:
        return Path(args.checkpoint)
    torch.manual_seed(0)
    cfg = ModelConfig(arch="resnet18", embedding_dim=128, preprocess=PreprocessSpec(input_size=32, resize_size=32))
    return save_checkpoint(work / "checkpoint.pt", build_encoder(cfg), cfg, {"note": "untrained, for infer_bench"})


def _cuda_backends(ckpt: Path, onnx_path: Path, input_size: int,
                   max_batch: int) -> tuple[dict[str, Embedder], list[str]]:
    """PyTorch CUDA fp32 (TF32 off) and fp16 autocast, TensorRT fp32/fp16 when installed; notes on what was skipped."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    gmodel = load_encoder(ckpt).cuda().eval()

    def torch_cuda(b: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return gmodel(torch.from_numpy(b).cuda(non_blocking=False)).cpu().numpy()

    def torch_cuda_fp16(b: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
            return gmodel(torch.from_numpy(b).cuda()).float().cpu().numpy()

    backends: dict[str, Embedder] = {"pytorch-eager-fp32-cuda": torch_cuda,
                                     "pytorch-eager-fp16-autocast-cuda": torch_cuda_fp16}
    notes: list[str] = []
    from export.to_tensorrt import Profile, TrtRunner, build_engine, tensorrt_missing

    why = tensorrt_missing()
    if why:
        return backends, [f"TensorRT skipped: {why}"]
    for prec in ("fp32", "fp16"):
        try:
            eng, _ = build_engine(onnx_path, prec, Profile(1, max_batch, max_batch), "image", input_size)
            backends[f"tensorrt-{prec}"] = TrtRunner(eng)
        except ExportError as e:
            notes.append(f"TensorRT {prec} failed: {e}")
    return backends, notes


def _agreement(model: torch.nn.Module, backends: dict[str, Embedder], x: np.ndarray) -> dict[str, dict[str, float]]:
    """Every backend's embeddings of ``x`` against PyTorch's; exits when one disagrees (min cosine < 0.98)."""
    with torch.inference_mode():
        ref = model(torch.from_numpy(x)).numpy()
    checks = {}
    for name, fn in backends.items():
        m = compare(ref, fn(x))
        checks[name] = {"min_cosine": m["min_cosine"], "max_abs": m["max_abs"]}
        if m["min_cosine"] < 0.98:
            raise SystemExit(f"{name} disagrees with PyTorch (min cosine {m['min_cosine']:.4f}); not timing it")
    return checks


def _ratios(results: dict[str, dict[str, Any]], batches: list[int]) -> dict[str, float]:
    """images/s ratios per batch: ORT fp32 / PyTorch, INT8 / ORT fp32, INT8 / PyTorch, GPU backends / PyTorch CUDA."""
    def ips(name: str, b: int) -> float:
        return results[name][str(b)]["images_per_s"]

    ratios = {}
    for b in batches:
        base = ips("pytorch-eager-fp32-cpu", b)
        ratios[f"ort_fp32_vs_torch_b{b}"] = ips("onnxruntime-fp32-cpu", b) / base
        ratios[f"int8_vs_ort_fp32_b{b}"] = ips("onnxruntime-int8-cpu", b) / ips("onnxruntime-fp32-cpu", b)
        ratios[f"int8_vs_torch_b{b}"] = ips("onnxruntime-int8-cpu", b) / base
        if "pytorch-eager-fp32-cuda" in results:
            gbase = ips("pytorch-eager-fp32-cuda", b)
            for name in ("tensorrt-fp32", "tensorrt-fp16", "pytorch-eager-fp16-autocast-cuda"):
                if name in results:
                    ratios[f"{name}_vs_torch_cuda_fp32_b{b}"] = ips(name, b) / gbase
    return ratios


def _print_table(results: dict[str, dict[str, Any]], ratios: dict[str, float], batches: list[int],
                 notes: list[str]) -> None:
    print(f"\n{'backend':<34}" + "".join(f"{'b=' + str(b) + ' img/s':>16}" for b in batches))
    for name, d in results.items():
        print(f"{name:<34}" + "".join(f"{d[str(b)]['images_per_s']:>16.1f}" for b in batches))
    print()
    for k, v in ratios.items():
        goal = f"   (goal >= {GOALS[k]}x: {'met' if v >= GOALS[k] else 'NOT met'})" if k in GOALS else ""
        print(f"  {k:<44} {v:6.2f}x{goal}")
    for n in notes:
        print("  note:", n)


def _document(args: argparse.Namespace, model: Any, images: Any, calib: Any, onnx_path: Path, int8_path: Path,
              checks: dict[str, Any], results: dict[str, dict[str, Any]], batches: list[int], cores: int,
              gpu_notes: list[str], load_before: list[float] | None, device: str) -> dict[str, Any]:
    """The result JSON: machine, model, threads, INT8 settings, agreement, images/s, ratios and goals."""
    spec = model.cfg.preprocess
    ratios = _ratios(results, batches)
    goals = {k: {"goal": g, "measured": ratios.get(k), "met": bool(ratios.get(k, 0) >= g)} for k, g in GOALS.items()}
    return {
        "benchmark": "infer_bench",
        "device": device,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {"arch": model.cfg.arch, "input_size": spec.input_size, "embedding_dim": model.cfg.embedding_dim,
                  "checkpoint": str(args.checkpoint) if args.checkpoint else "untrained (random init)"},
        "images": images.source,
        "threads": {"torch_intra_op": torch.get_num_threads(), "torch_inter_op": torch.get_num_interop_threads(),
                    "ort_intra_op": cores, "ort_inter_op": 1, "ort_graph_optimization": "ORT_ENABLE_ALL"},
        "int8": {"format": "QDQ per-channel, uint8 activations / int8 weights", "calibration_images": len(calib),
                 "sizes_mb": {"fp32": onnx_path.stat().st_size / 1e6, "int8": int8_path.stat().st_size / 1e6}},
        "libraries": library_versions(),
        "agreement_with_pytorch": checks,
        "images_per_s": {k: {b: round(v["images_per_s"], 1) for b, v in d.items()} for k, d in results.items()},
        "details": results,
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "goals": goals,
        "notes": gpu_notes,
        "load_average_1m": {
            "before": (load_before or [None])[0], "after": (load_average() or [None])[0],
            "note": "other processes' load on this machine during the run (> cores means contention)"},
    }


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    batches = [int(b) for b in args.batches.split(",")]
    cores = args.threads or os.cpu_count() or 1
    torch.set_num_threads(cores)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    load_before = load_average()
    work = Path(tempfile.mkdtemp(prefix="infer_bench."))
    try:
        ckpt = _checkpoint(args, work)
        model = load_encoder(ckpt)
        spec = model.cfg.preprocess
        need = max(batches) * 2
        images = load_parity_images(spec, data=args.data, split="test", max_images=max(need, 128))
        calib = load_parity_images(spec, data=args.data, split="train", max_images=args.calib, seed=1)
        x = images.x
        while len(x) < need:
            x = np.concatenate([x, images.x])
        print(f"model {model.cfg.arch} {spec.input_size}x{spec.input_size} -> {model.cfg.embedding_dim}-d; "
              f"images: {images.source}; {os.cpu_count()} cores; "
              f"intra-op threads: torch {torch.get_num_threads()}, onnxruntime {cores}")
        onnx_path = export_onnx(model, work / "model.onnx", metadata_for_encoder(model), max_batch=max(batches))
        int8_path = quantize_int8(onnx_path, work / "model-int8.onnx", calib.x, calib.source)

        def torch_cpu(b: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return model(torch.from_numpy(b)).numpy()

        backends: dict[str, Embedder] = {
            "pytorch-eager-fp32-cpu": torch_cpu,
            "onnxruntime-fp32-cpu": ort_embedder(onnx_path, threads=cores),
            "onnxruntime-int8-cpu": ort_embedder(int8_path, threads=cores),
        }
        gpu_notes: list[str] = []
        if torch.cuda.is_available():
            gpu, gpu_notes = _cuda_backends(ckpt, onnx_path, spec.input_size, max(batches))
            backends.update(gpu)
        checks = _agreement(model, backends, x[:64])  # every backend computes the same embeddings first
        results: dict[str, dict[str, Any]] = {}
        for b in batches:
            xb = np.ascontiguousarray(x[:b])
            print(f"batch {b}: timing {', '.join(backends)} ...")
            r = time_rounds({k: (lambda f=f: f(xb)) for k, f in backends.items()}, b, args.seconds)
            for name, v in r.items():
                results.setdefault(name, {})[str(b)] = v
        ratios = _ratios(results, batches)
        device = device_tag("cuda" if torch.cuda.is_available() else None)
        doc = _document(args, model, images, calib, onnx_path, int8_path, checks, results, batches, cores,
                        gpu_notes, load_before, device)
        suffix = f"-{cores}thread" if args.threads else ""
        out = write_result(args.out or RESULTS / f"infer_bench-{device}{suffix}.json", doc)
        _print_table(results, ratios, batches, gpu_notes)
        print(f"\nwrote {out}")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
