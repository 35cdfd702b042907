"""Reference vs fused InvaSpread loss: forward + backward time and peak memory.

Usage (CUDA)::

    python benchmarks/loss_bench.py                 # 2N in 256 .. 65536, D = 128
    python benchmarks/loss_bench.py --tune          # pick tiles on this GPU first

writes ``benchmarks/results/loss_bench-<device>.json``.  For every batch size,
dtype (float32, bfloat16) and gradient mode (detach = the authors' keys
detached, full = gradient also through the keys) it times one
``loss = fn(features); loss.backward()`` step: warm-up, then the median of
CUDA-event timings, and records the peak memory allocated above the inputs
(``torch.cuda.max_memory_allocated``).  Out-of-memory is caught and recorded.
Ratios are reference / fused (speed-up and memory saving), with the goals of
issue 4 checked at the end.

Without CUDA it prints "needs CUDA" and exits with status 2 (nothing was
measured); ``--quick`` instead runs a tiny smoke configuration of the real
kernels in Triton's interpreter (timings meaningless, no JSON unless --out).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

SIZES = (256, 1024, 4096, 16384, 65536)
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/loss_bench.py` from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, package_version, slug, write_result  # noqa: E402

# Tile candidates (block_m, block_n, num_warps, num_stages) for --tune, D <= 128: the
# ones that compile without register spills for sm_90 (ptxas -v), per kernel and dtype.
TUNE = {
    "float32": {
        "forward": [(64, 32, 4, 1), (64, 32, 8, 2), (128, 32, 8, 2), (128, 64, 8, 1), (32, 64, 8, 1),
                    (64, 64, 4, 1)],
        "backward_rows": [(32, 64, 8, 2), (32, 32, 4, 2), (32, 32, 8, 2), (64, 32, 8, 1), (128, 32, 8, 1)],
        "backward_keys": [(32, 64, 8, 2), (32, 32, 8, 2), (32, 32, 8, 1), (64, 32, 8, 2)],
    },
    "half": {  # bfloat16 and float16
        "forward": [(64, 64, 4, 2), (64, 64, 8, 2), (128, 64, 8, 2), (128, 32, 8, 2), (64, 128, 8, 2),
                    (32, 64, 4, 2)],
        "backward_rows": [(64, 64, 4, 2), (64, 64, 8, 2), (128, 64, 8, 2), (128, 32, 8, 2),
                          (64, 128, 8, 2), (32, 64, 4, 2)],
        "backward_keys": [(64, 32, 8, 2), (64, 64, 8, 2), (32, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2)],
    },
}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="loss_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default=",".join(map(str, SIZES)), help="comma-separated 2N values")
    p.add_argument("--dim", type=int, default=128, help="feature dimension D")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32,bfloat16,float16")
    p.add_argument("--modes", default="detach,full", help="comma-separated: detach,full")
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--reps", type=int, default=20, help="timed repetitions (at most; ~1 s per case)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--tune", action="store_true", help="time tile candidates first and use the best")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (CPU: Triton interpreter)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default results/loss_bench-<device>.json)")
    args = p.parse_args(argv)
    try:
        args.sizes = [int(s) for s in args.sizes.split(",") if s]
    except ValueError:
        p.error(f"--sizes must be comma-separated integers, got {args.sizes!r}")
    if not args.sizes or any(s < 2 or s % 2 for s in args.sizes):
        p.error("--sizes must be even numbers >= 2")
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    if not args.dtypes or any(d not in ("float32", "bfloat16", "float16") for d in args.dtypes):
        p.error("--dtypes must be a comma-separated subset of float32,bfloat16,float16")
    args.modes = [m for m in args.modes.split(",") if m]
    if not args.modes or any(m not in ("detach", "full") for m in args.modes):
        p.error("--modes must be a comma-separated subset of detach,full")
    if not 1 <= args.dim <= 512:
        p.error("--dim must be in 1..512")
    if not args.temperature > 0:
        p.error("--temperature must be > 0")
    if args.reps < 1 or args.warmup < 0:
        p.error("--reps must be >= 1 and --warmup >= 0")
    return args


def _features(torch, two_n: int, dim: int, dtype, device, seed: int = 0):
    """[2N, D] unit rows; view 2 a noisy copy of view 1 (positives more similar than negatives)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    v1 = torch.nn.functional.normalize(torch.randn(two_n // 2, dim, generator=g), dim=1)
    v2 = torch.nn.functional.normalize(v1 + 0.6 * torch.randn(two_n // 2, dim, generator=g), dim=1)
    return torch.cat([v1, v2]).to(device=device, dtype=dtype)


def _measure(torch, fn, features, tau: float, detach: bool, reps: int, warmup: int) -> dict:
    """One case: peak extra memory of the first step, then median step time."""
    cuda = features.is_cuda
    x = features.detach().clone().requires_grad_()

    def step() -> float:
        loss = fn(x, tau, detach, 1.0)
        loss.backward()
        x.grad = None
        return loss

    oom = torch.cuda.OutOfMemoryError if cuda else MemoryError
    try:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        value = float(step().detach())
        if cuda:
            torch.cuda.synchronize()
        first_ms = (time.perf_counter() - t0) * 1e3
        peak = torch.cuda.max_memory_allocated() - base if cuda else None
        for _ in range(warmup):
            step()
        times = []
        budget_s = 1.0
        start_all = time.perf_counter()
        for _ in range(reps):
            if cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                step()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t = time.perf_counter()
                step()
                times.append((time.perf_counter() - t) * 1e3)
            if len(times) >= 3 and time.perf_counter() - start_all > budget_s:
                break
        return {
            "status": "ok",
            "loss": value,
            "ms_median": statistics.median(times),
            "ms_min": min(times),
            "reps": len(times),
            "first_call_ms": first_ms,
            "peak_extra_bytes": peak,
        }
    except oom as e:
        msg = str(e).splitlines()[0][:300]
    x.grad = None
    if cuda:
        torch.cuda.empty_cache()
    return {"status": "oom", "error": msg}


def _tune(torch, fl, dim: int, dtype, two_n: int = 16384) -> tuple[object, list[dict]]:
    """Time each kernel alone over the tile candidates; return the best config and the table."""
    from triton.testing import do_bench

    base = fl.default_config(dim, dtype)
    f = _features(torch, two_n, dim, dtype, "cuda")
    idx = torch.arange(two_n, device="cuda", dtype=torch.int32)
    go = torch.ones((), device="cuda")
    _, lse, tsum = fl._launch_forward(f, f, idx, 10.0, 1.0, base)
    rows = []
    best = {}
    for kernel, cands in TUNE["float32" if dtype == torch.float32 else "half"].items():
        for bm, bn, nw, ns in cands:
            tile = fl.TileConfig(bm, bn, nw, ns)
            cfg = fl.FusedLossConfig(**{**base.__dict__, kernel: tile})
            if kernel == "forward":
                call = lambda: fl._launch_forward(f, f, idx, 10.0, 1.0, cfg)  # noqa: E731
            else:
                rows_only = kernel == "backward_rows"
                call = lambda: fl._launch_backward(  # noqa: E731
                    f, f, idx, lse, tsum, go, 10.0, 1.0, 1.0 / two_n, cfg,
                    need_da=rows_only, need_dk=not rows_only, shared=False)
            try:
                ms = do_bench(call, warmup=25, rep=100, return_mode="median")
                rows.append({"kernel": kernel, "tile": [bm, bn, nw, ns], "ms": ms})
                print(f"  tune {dtype} {kernel:13s} {(bm, bn, nw, ns)}: {ms:.3f} ms", flush=True)
                if kernel not in best or ms < best[kernel][0]:
                    best[kernel] = (ms, tile)
            except Exception as e:  # a tile that does not compile or fit in shared memory
                rows.append({"kernel": kernel, "tile": [bm, bn, nw, ns], "error": f"{type(e).__name__}: {e}"[:300]})
    fields = {k: v[1] for k, v in best.items()}
    return fl.FusedLossConfig(**{**base.__dict__, **fields}), rows


def _config_dict(cfg) -> dict:
    return {k: (v.__dict__ if hasattr(v, "__dict__") else v) for k, v in cfg.__dict__.items()}


def _run_cases(torch, fl, reference, args: argparse.Namespace, dtypes: dict, configs: dict, device) -> list[dict]:
    """Time reference vs fused for every 2N x dtype x gradient mode; print a table row each; return the rows.

    A row: two_n, dim, dtype, mode, reference / fused measurements (:func:`_measure`) and, when both ran,
    speedup (reference ms / fused ms), memory_ratio (CUDA) and loss_rel_diff.
    """
    results = []
    cuda = device.type == "cuda"
    print(f"{'2N':>6} {'dtype':>8} {'mode':>6} | {'ref ms':>9} {'fused ms':>9} {'speedup':>7} | "
          f"{'ref MB':>9} {'fused MB':>9} {'mem x':>7}", flush=True)
    for two_n in args.sizes:
        for name, dtype in dtypes.items():
            f = _features(torch, two_n, args.dim, dtype, device)
            cfg = configs[name]
            fused = lambda x, t, d, w, cfg=cfg: fl.fused_invaspread_loss(x, t, d, w, config=cfg)  # noqa: E731
            for mode in args.modes:
                detach = mode == "detach"
                ref = _measure(torch, reference, f, args.temperature, detach, args.reps, args.warmup)
                fus = _measure(torch, fused, f, args.temperature, detach, args.reps, args.warmup)
                row = {"two_n": two_n, "dim": args.dim, "dtype": name, "mode": mode,
                       "reference": ref, "fused": fus}
                if ref["status"] == fus["status"] == "ok":
                    row["speedup"] = ref["ms_median"] / fus["ms_median"]
                    if cuda:
                        row["memory_ratio"] = ref["peak_extra_bytes"] / max(fus["peak_extra_bytes"], 1)
                    row["loss_rel_diff"] = abs(ref["loss"] - fus["loss"]) / max(abs(ref["loss"]), 1e-30)
                results.append(row)
                print(f"{two_n:>6} {name:>8} {mode:>6} | {_cell(ref, 'ms_median')} {_cell(fus, 'ms_median')} "
                      f"{row.get('speedup', float('nan')):7.2f} | {_cell(ref, 'peak_extra_bytes', 2**20)} "
                      f"{_cell(fus, 'peak_extra_bytes', 2**20)} {row.get('memory_ratio', float('nan')):7.1f}",
                      flush=True)
            del f
            if cuda:
                torch.cuda.empty_cache()
    return results


def _cell(r: dict, key: str, scale: float = 1.0) -> str:
    """One table cell: the measurement ``r[key] / scale``, or the status (e.g. "oom") when it did not run."""
    return f"{r[key] / scale:9.2f}" if r["status"] == "ok" and r[key] is not None else f"{r['status']:>9}"


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.quick:
        print("loss_bench needs CUDA: it times GPU kernels and there is no CUDA device here. "
              "Run it on a GPU machine, or add --quick for a tiny smoke run of the kernels in "
              "Triton's interpreter.", file=sys.stderr)
        return 2
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
    from training import fused_loss as fl
    from training.loss import invaspread_loss

    device = torch.device("cuda" if cuda else "cpu")
    ok, why = fl.fused_loss_available(device)
    if not ok:
        print(f"loss_bench: {why}", file=sys.stderr)
        return 2
    if args.quick:
        args.sizes = [64, 130]
        args.dim = min(args.dim, 32)
        args.reps, args.warmup = 1, 0
        if not cuda:
            args.dtypes = args.dtypes[:1]
    device_name = torch.cuda.get_device_name() if cuda else "cpu (triton interpreter)"
    dtypes = {name: getattr(torch, name) for name in args.dtypes}

    configs, tuning = {}, {}
    for name, dtype in dtypes.items():
        if args.tune and cuda:
            cfg, table = _tune(torch, fl, args.dim, dtype)
            tuning[name] = table
        else:
            cfg = fl.default_config(args.dim, dtype, fl._is_interpreted())
        configs[name] = cfg
        print(f"[{name}] config: {_config_dict(cfg)}", flush=True)

    results = _run_cases(torch, fl, invaspread_loss, args, dtypes, configs, device)
    goals = _goals(results) if cuda else {}
    report = {
        "benchmark": "loss_bench",
        "device": device_name,
        "quick": bool(args.quick),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "python": platform.python_version(),
        "dim": args.dim,
        "temperature": args.temperature,
        "timing": "median of CUDA-event timed forward+backward steps after warm-up; "
                  "peak_extra_bytes = max_memory_allocated during the first step minus memory before it",
        "configs": {k: _config_dict(v) for k, v in configs.items()},
        "tuning": tuning,
        "results": results,
        "goals": goals,
    }
    for k, v in goals.items():
        print(f"goal {k}: {v}")
    out = args.out
    if out is None and not args.quick:
        out = RESULTS / f"loss_bench-{slug(device_name)}.json"
    if out is not None:
        out = write_result(out, report)
        print(f"wrote {out}")
    failed = [r for r in results if r["fused"]["status"] != "ok"]
    return 1 if failed else 0


def _goals(results: list[dict]) -> dict:
    """Issue 4's targets, evaluated per dtype and mode."""
    goals = {}
    for r in results:
        key = f"{r['dtype']}/{r['mode']}"
        if r["two_n"] == 16384 and "memory_ratio" in r:
            goals[f"memory_ratio_16384_ge_20[{key}]"] = round(r["memory_ratio"], 1) >= 20
        if r["two_n"] >= 1024 and "speedup" in r:
            name = f"not_slower_2N_ge_1024[{key}]"
            goals[name] = goals.get(name, True) and r["speedup"] >= 1.0
        if r["two_n"] == 65536:
            goals[f"65536_fused_runs_reference_oom[{key}]"] = (
                r["fused"]["status"] == "ok" and r["reference"]["status"] == "oom")
    return goals


if __name__ == "__main__":
    sys.exit(main())
