"""p99 latency of normal searches while hostile uploads are in flight, vs. idle, in one run.

    python benchmarks/hostile_bench.py [--model M.onnx --gallery G] [--clients 4] [--requests 300]
        [--hostile 2] [--rounds 3] [--before REF] [--out FILE]

Without --model/--gallery it builds the reference setup of serve_bench.py (a
random-init 32x32 ResNet18, 128-d, 96 generated images).  It starts
``python -m serving`` on 127.0.0.1 and, for --rounds rounds, alternates two
phases of --requests POST /v1/search requests from --clients keep-alive
clients:

* idle: only the normal searches;
* hostile: the same, while --hostile clients keep uploading a slow-to-decode
  image to /v1/embed back to back (a legal 7,000 x 7,000 RGB PNG of ~140 kB,
  49 MP, just under the default 50 MP limit, that takes ~0.4 s of CPU to
  decode -- the "large-but-legal" case no format check can refuse).

The medians over rounds of each phase's p50/p99 and the ratio hostile p99 /
idle p99 are reported (goal: <= 2).  With ``--before REF`` (e.g. ``HEAD`` before
a change is committed) the ``serving`` package of that git revision is
extracted to a temporary folder and measured the same way, side by side.
JSON goes to benchmarks/results/hostile_bench-<device>.json.  The machine may be
shared: compare the phases of one run, not runs of different days.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.common import cpu_model, write_result  # noqa: E402
from benchmarks.serve_bench import (  # noqa: E402
    HOST,
    build_reference,
    launch_server,
    multipart_request,
    parse_checked,
    read_response,
    run_load,
    stop_server,
)


def slow_png(side: int = 7000) -> bytes:
    """A legal side x side RGB PNG (one flat colour): ~140 kB at 7000 that decode to 147 MB of pixels."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (side, side), (10, 20, 30)).save(buf, "PNG")
    return buf.getvalue()


async def hostile_client(port: int, request: bytes, stop: asyncio.Event, log: list[tuple[int, float]]) -> None:
    """Upload the slow image back to back until ``stop`` is set; records (status, seconds) per upload."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        while not stop.is_set():
            t0 = time.perf_counter()
            writer.write(request)
            await writer.drain()
            status, _ = await read_response(reader)
            log.append((status, time.perf_counter() - t0))
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def phase(
    port: int, normal: list[bytes], hostile_req: bytes, clients: int, total: int, hostile: int
) -> dict[str, Any]:
    stop = asyncio.Event()
    log: list[tuple[int, float]] = []
    tasks = [asyncio.ensure_future(hostile_client(port, hostile_req, stop, log)) for _ in range(hostile)]
    if hostile:
        await asyncio.sleep(0.3)  # uploads sent and decoding before the measured searches start
    try:
        res = await run_load(port, normal, clients, total)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    if hostile:
        statuses: dict[str, int] = {}
        for s, _ in log:
            statuses[str(s)] = statuses.get(str(s), 0) + 1
        res["hostile_uploads"] = {"count": len(log), "statuses": statuses,
                                  "median_s": round(float(np.median([t for _, t in log])), 3) if log else None}
    return res


def extract_serving(ref: str, dest: Path) -> Path:
    """The ``serving`` package of git revision ``ref``, unpacked under ``dest`` (read-only git use)."""
    data = subprocess.run(
        ["git", "archive", "--format=tar", ref, "serving"], cwd=REPO, capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def summarise(samples: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "latency_ms": {
            q: round(float(np.median([r["latency_ms"][q] for r in samples])), 2) for q in ("p50", "p90", "p99", "max")
        },
        "requests_per_s": round(float(np.median([r["requests_per_s"] for r in samples])), 1),
        "errors": sum(sum(r["errors"].values()) for r in samples),
        "rounds": samples,
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="ONNX model (default: build a random-init 32x32 ResNet18)")
    p.add_argument("--gallery", help="gallery folder for --model")
    p.add_argument("--clients", type=int, default=4, help="concurrent normal clients (default 4)")
    p.add_argument("--requests", type=int, default=300, help="normal searches per phase (default 300)")
    p.add_argument("--hostile", type=int, default=2,
                   help="concurrent hostile uploaders in the hostile phase (default 2)")
    p.add_argument("--rounds", type=int, default=3,
                   help="alternating idle/hostile rounds; medians reported (default 3)")
    p.add_argument("--side", type=int, default=7000, help="side of the hostile PNG (default 7000: 49 MP)")
    p.add_argument("--before", metavar="REF", help="also measure the serving package of this git revision (e.g. HEAD)")
    p.add_argument("--server-args", default="", help="extra flags for the current server, e.g. '--decode-timeout 2'")
    p.add_argument("--shared-cores", action="store_true",
                   help="say in the JSON that the cores were shared with other work while measuring")
    p.add_argument("--out", default=None, help="output JSON (default benchmarks/results/hostile_bench-cpu<N>.json)")
    return p


def _measure(args: argparse.Namespace, servers: dict[str, tuple[subprocess.Popen, int]], queries: list[Path],
             hostile_png: bytes) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Alternate idle and hostile phases over the servers for --rounds rounds -> samples per (server, phase)."""
    samples: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for rnd in range(args.rounds):
        for label, (_, port) in servers.items():
            normal = [multipart_request("/v1/search", port, "file", q.name, q.read_bytes(), {"k": "5"})
                      for q in queries[:32]]
            hostile_req = multipart_request("/v1/embed", port, "file", "slow.png", hostile_png, {})
            if rnd == 0:
                asyncio.run(run_load(port, normal, args.clients, 64))  # warm-up
            for name, n_hostile in (("idle", 0), ("hostile", args.hostile)):
                res = asyncio.run(phase(port, normal, hostile_req, args.clients, args.requests, n_hostile))
                samples.setdefault((label, name), []).append(res)
                print(f"round {rnd + 1}/{args.rounds} {label:14s} {name:7s} "
                      f"p50 {res['latency_ms']['p50']:7.1f} ms  "
                      f"p99 {res['latency_ms']['p99']:7.1f} ms  {res['requests_per_s']:6.1f} req/s  "
                      f"errors {res['errors'] or 0}  {res.get('hostile_uploads', '')}", flush=True)
    return samples


def _result(args: argparse.Namespace, labels: list[str], samples: dict[tuple[str, str], list[dict[str, Any]]],
            hostile_bytes: int) -> dict[str, Any]:
    runs: dict[str, Any] = {}
    for label in labels:
        idle, hostile = summarise(samples[(label, "idle")]), summarise(samples[(label, "hostile")])
        runs[label] = {"idle": idle, "hostile": hostile,
                       "p99_ratio_hostile_vs_idle": round(hostile["latency_ms"]["p99"] / idle["latency_ms"]["p99"], 2),
                       "p50_ratio_hostile_vs_idle": round(hostile["latency_ms"]["p50"] / idle["latency_ms"]["p50"], 2)}
    return {
        "benchmark": "hostile_bench",
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "note": ("machine shared with other work while measured: compare the phases of this run (ratios), not "
                 "absolute numbers") if args.shared_cores else "compare the phases of this run (ratios)",
        "normal": f"POST /v1/search (multipart, k=5) from {args.clients} keep-alive clients, {args.requests} per phase",
        "hostile": f"{args.hostile} clients uploading a {args.side}x{args.side} RGB PNG "
                   f"({hostile_bytes:,} bytes) to /v1/embed back to back",
        "rounds": args.rounds,
        "load_average_at_end": os.getloadavg(),
        "runs": runs,
        "summary": {label: r["p99_ratio_hostile_vs_idle"] for label, r in runs.items()},
        "goal": {"p99_ratio_hostile_vs_idle_max": 2.0},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_checked(_parser(), argv, at_least_one=("clients", "requests", "rounds", "hostile"))
    with tempfile.TemporaryDirectory(prefix="isfe-hostile-bench-") as tmp:
        tmpdir = Path(tmp)
        if args.model:
            model, gallery = args.model, args.gallery
            from tests.helpers_models import make_images
            queries = make_images(tmpdir / "queries", per_class=8, size=48, seed=1)
        else:
            model, gallery, queries = build_reference(tmpdir)
        hostile_png = slow_png(args.side)
        variants: dict[str, tuple[Path, dict[str, str] | None, list[str]]] = {
            "current": (REPO, None, args.server_args.split())
        }
        if args.before:
            old = extract_serving(args.before, tmpdir / "before")
            variants[f"before ({args.before})"] = (old, {**os.environ, "PYTHONPATH": str(REPO)}, [])
        servers: dict[str, tuple[subprocess.Popen, int]] = {}
        try:
            for label, (cwd, env, extra) in variants.items():
                log = tmpdir / f"{len(servers)}.log"
                servers[label] = launch_server(model, gallery, extra, log, cwd=cwd, env=env, who=f"{label} server")
            samples = _measure(args, servers, queries, hostile_png)
        finally:
            for proc, _ in servers.values():
                stop_server(proc)
    result = _result(args, list(variants), samples, len(hostile_png))
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"hostile_bench-cpu{os.cpu_count()}.json"
    write_result(out, result)
    print(json.dumps(result["summary"], indent=2))
    print(f"wrote {out}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
