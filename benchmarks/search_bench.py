"""Exact gallery search: queries/s and memory of isfe_model's chunked NumPy search vs FAISS flat.

    python benchmarks/search_bench.py            # 10k, 100k, 1M x 128 (a few minutes on 2 cores)
    python benchmarks/search_bench.py --quick    # 2k, 10k, 50k x 128 (seconds)

For each gallery size it times, through ``isfe_model.Gallery.search`` (k=10):

* single queries, one call each (latency-bound use: an HTTP request),
* a batch of queries in one call (throughput: evaluation, deduplication),

for the NumPy backend (float32 and float16 galleries) and, when faiss is
installed, FAISS ``IndexFlatIP`` (the baseline, same run).  Memory: the
peak resident memory a search adds on top of the gallery (Linux VmHWM after
resetting it through /proc/self/clear_refs; tracemalloc peak otherwise), and
the resident size of each index.  Results agree with FAISS is checked too.

Each size runs with the libraries' default threads and with one thread
(threadpoolctl; FAISS's OpenMP suffers most when other processes share the
cores, one thread compares the algorithms without that).

Writes benchmarks/results/search_bench-<device>.json ("device": cpu<N cores>).
Goal (issue 6): NumPy within 2x of FAISS flat (``ratio_numpy_over_faiss`` <= 2).
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import RESULTS, cpu_model, device_tag, load_average, result_header, write_result  # noqa: E402
from isfe_model import Gallery  # noqa: E402
from isfe_model.search import default_chunk_rows, faiss_available  # noqa: E402

GOAL_RATIO = 2.0


def _status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def peak_extra_mb(fn: Callable[[], Any]) -> dict[str, float | None]:
    """Peak memory ``fn()`` adds, in MB: resident set (Linux VmHWM, all allocations incl. FAISS's C++)
    and tracemalloc (Python/NumPy allocations only; NumPy reports its buffers to tracemalloc)."""
    gc.collect()
    rss = None
    if _reset_peak() and _status_kb("VmHWM") is not None:
        before = _status_kb("VmRSS") or 0
        fn()
        rss = round(max(0.0, ((_status_kb("VmHWM") or 0) - before) / 1024.0), 1)
    tracemalloc.start()
    fn()
    traced = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
    tracemalloc.stop()
    return {"rss": rss, "tracemalloc": traced}


def rss_mb() -> float:
    return (_status_kb("VmRSS") or 0) / 1024.0


def unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), np.float32)
    for s in range(0, n, 100_000):
        x = rng.standard_normal((min(100_000, n - s), d), dtype=np.float32)
        out[s : s + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def time_calls(fn: Callable[[], Any], reps: int) -> tuple[float, float]:
    """(median, best) seconds of ``reps`` calls after one warm-up call.

    The median says what a caller sees on this (possibly shared) machine; the
    best is the cost without interference from other processes.
    """
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times)


def bench_backend(gal: Gallery, queries: np.ndarray, n_single: int, batch: int, k: int, reps: int) -> dict[str, Any]:
    singles = queries[:n_single]

    def run_singles() -> None:
        for q in singles:
            gal.search(q, k)

    t_single, b_single = time_calls(run_singles, reps)
    qb = queries[:batch]
    t_batch, b_batch = time_calls(lambda: gal.search(qb, k), reps)
    mem = peak_extra_mb(lambda: gal.search(qb, k))
    mem1 = peak_extra_mb(lambda: gal.search(singles[0], k))
    return {
        "single_query_qps": n_single / t_single,
        "single_query_ms": 1000.0 * t_single / n_single,
        "single_query_ms_best": 1000.0 * b_single / n_single,
        "batch_qps": batch / t_batch,
        "batch_seconds": t_batch,
        "batch_seconds_best": b_batch,
        "peak_extra_mb_batch": mem,
        "peak_extra_mb_single": mem1,
    }


def _thread_limit(threads: int | None):
    """Context limiting BLAS and OpenMP (FAISS) threads; ``None``: leave the libraries' defaults."""
    import contextlib

    if threads is None:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    if faiss_available():
        import faiss

        faiss.omp_set_num_threads(threads)
    return threadpool_limits(limits=threads)


def run(sizes: Sequence[int], dim: int, k: int, batch: int, reps: int, seed: int,
        thread_settings: Sequence[int | None]) -> dict[str, Any]:
    has_faiss = faiss_available()
    queries = unit_rows(max(batch, 256), dim, seed + 1)
    rows = []
    ratios = []
    for n in sizes:
        emb = unit_rows(n, dim, seed)
        items = [{"id": str(i)} for i in range(n)]
        n_single = int(min(200, max(20, 2_000_000 // n)))
        entry: dict[str, Any] = {"gallery_size": n, "dim": dim, "k": k, "batch": batch, "single_queries": n_single,
                                 "gallery_mb_float32": round(emb.nbytes / 2**20, 1),
                                 "numpy_chunk_rows_single": default_chunk_rows(1, dim),
                                 "numpy_chunk_rows_batch": default_chunk_rows(batch, dim), "by_threads": {}}
        gal = Gallery(emb, items, {"dim": dim, "fingerprint": "bench"})
        gal16 = Gallery(emb.astype(np.float16), items, {"dim": dim, "fingerprint": "bench"})
        galf = None
        if has_faiss:
            before = rss_mb()
            galf = Gallery(emb, items, {"dim": dim, "fingerprint": "bench"}, backend="faiss")
            entry["faiss_index_extra_mb"] = round(rss_mb() - before, 1)
        ref = gal.search(queries[:batch], k).indices
        top1_16 = gal16.search(queries[:batch], k).indices[:, 0]
        entry["float16_top1_agreement_with_float32"] = float(np.mean(top1_16 == ref[:, 0]))
        if galf is not None:
            got = galf.search(queries[:batch], k).indices
            entry["faiss_topk_rows_identical_to_numpy"] = float(np.mean(np.all(got == ref, axis=1)))
        for threads in thread_settings:
            key = "default" if threads is None else str(threads)
            print(f"[{n:,} x {dim}, threads {key}]", file=sys.stderr, flush=True)
            res: dict[str, Any] = {}
            with _thread_limit(threads):
                res["numpy"] = bench_backend(gal, queries, n_single, batch, k, reps)
                print(f"  numpy      {res['numpy']}", file=sys.stderr, flush=True)
                res["numpy_float16"] = bench_backend(gal16, queries, n_single, batch, k, reps)
                print(f"  numpy fp16 {res['numpy_float16']}", file=sys.stderr, flush=True)
                if galf is not None:
                    res["faiss_flat"] = bench_backend(galf, queries, n_single, batch, k, reps)
                    print(f"  faiss flat {res['faiss_flat']}", file=sys.stderr, flush=True)
            if galf is not None:
                npy, fai = res["numpy"], res["faiss_flat"]
                res["ratio_numpy_over_faiss"] = {  # time ratios (< 1: numpy faster); medians
                    "single_query_time": round(npy["single_query_ms"] / fai["single_query_ms"], 3),
                    "batch_time": round(npy["batch_seconds"] / fai["batch_seconds"], 3),
                }
                res["ratio_numpy_over_faiss_best"] = {  # the same from the best repetitions
                    "single_query_time": round(npy["single_query_ms_best"] / fai["single_query_ms_best"], 3),
                    "batch_time": round(npy["batch_seconds_best"] / fai["batch_seconds_best"], 3),
                }
                ratios.extend(res["ratio_numpy_over_faiss"].values())
                print(f"  ratio      {res['ratio_numpy_over_faiss']}", file=sys.stderr, flush=True)
            entry["by_threads"][key] = res
        rows.append(entry)
        del emb, items, gal, gal16, galf
        gc.collect()
    return {
        "results": rows,
        "faiss_installed": has_faiss,
        "goal": {
            "target": f"numpy exact search within {GOAL_RATIO:g}x of FAISS flat (median time ratio "
                      f"numpy/faiss <= {GOAL_RATIO:g}, every size, thread setting and query mode)",
            "worst_ratio": max(ratios) if ratios else None,
            "met": (max(ratios) <= GOAL_RATIO) if ratios else None,
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small galleries (2k, 10k, 50k): seconds instead of minutes")
    p.add_argument("--sizes", type=str, default=None, help="comma-separated gallery sizes (overrides the defaults)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--batch", type=int, default=256, help="queries per batched call")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (median and best are reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=str, default=None,
                   help="comma-separated thread settings to run, e.g. 'default,1' (default: 'default,1' when "
                        "threadpoolctl is installed, else 'default'); 'default' leaves BLAS/OpenMP alone")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default benchmarks/results/search_bench-<device>.json)")
    args = p.parse_args(argv)
    if args.sizes:
        try:
            sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
        except ValueError:
            p.error(f"--sizes must be comma-separated integers, got {args.sizes!r}")
    else:
        sizes = [2_000, 10_000, 50_000] if args.quick else [10_000, 100_000, 1_000_000]
    try:
        import threadpoolctl  # noqa: F401

        have_tpc = True
    except ImportError:
        have_tpc = False
    spec = args.threads or ("default,1" if have_tpc else "default")
    try:
        thread_settings = [None if t.strip() == "default" else int(t) for t in spec.split(",") if t.strip()]
    except ValueError:
        p.error(f"--threads must be 'default' or integers, got {spec!r}")
    if any(t is not None for t in thread_settings) and not have_tpc:
        p.error("--threads N needs threadpoolctl (pip install threadpoolctl)")
    if not sizes or min(sizes) < 1 or args.dim < 1 or args.k < 1 or args.batch < 1 or args.reps < 1:
        p.error("sizes, --dim, -k, --batch and --reps must be >= 1")
    import numpy

    try:
        import faiss

        faiss_version = getattr(faiss, "__version__", "?")
    except ImportError:
        faiss_version = None
    t0 = time.time()
    load_before = load_average()
    body = run(sizes, args.dim, args.k, args.batch, args.reps, args.seed, thread_settings)
    load_after = load_average()
    device = device_tag()
    doc = {
        **result_header("search_bench", device),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "faiss": faiss_version,
        "quick": bool(args.quick),
        "sizes": sizes,
        "seconds": round(time.time() - t0, 1),
        # other processes on the machine skew absolute numbers; ratios come from the same run
        "load_average_1m_before_after": [load_before[0], load_after[0]] if load_before and load_after else None,
        **body,
    }
    out = write_result(args.out or RESULTS / f"search_bench-{device}{'-quick' if args.quick else ''}.json", doc)
    print(f"wrote {out}")
    g = body["goal"]
    if g["worst_ratio"] is not None:
        verdict = "met" if g["met"] else "NOT met"
        print(f"numpy / faiss-flat time ratio, worst case: {g['worst_ratio']:.2f} (goal <= {GOAL_RATIO:g}: {verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
