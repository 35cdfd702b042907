"""Load test of the HTTP API on loopback: micro-batching on vs off, in one run.

    python benchmarks/serve_bench.py [--model M.onnx --gallery G] [--clients 32] [--moderate 4]
        [--requests 600] [--max-batch-size 32] [--max-wait-ms 2]

Without --model/--gallery it builds the reference setup first: a randomly
initialised 32x32 ResNet18 (128-d) exported to ONNX and a gallery of 96
generated images (weights do not matter for speed).

It starts two ``python -m serving`` processes on 127.0.0.1 -- batched
(``--max-batch-size N``) and batch-1 (``--max-batch-size 1``) -- warms them
up, then, for --rounds rounds, alternates between them: a fixed number of
POST /v1/search requests from C concurrent keep-alive clients (C = --clients,
then C = --moderate).  Per mode and load the medians over the rounds are
reported (robust against other work on a shared machine).  It then stops.
Reported per run: requests/s, latency p50/p90/p99/max (ms), errors, the
mean micro-batch size read from the server's /metrics, and (Linux) the CPU
milliseconds per request of the server's event-loop thread, its other threads
(inference, ONNX Runtime's pool), its decode processes and the load generator.  Before each round,
ONNX Runtime alone is timed in-process at batch 1 and at the max batch size,
with its default threads and, when they differ, with the servers' ``--threads``
and ``--inference-workers`` (that many threads calling one session side by
side); the better of the two is the round's ceiling.  Each configuration is
also timed with as many images in flight as the server can have at C clients
(one per client: with N workers, batch C/N per call), the like-for-like
comparison reported next to it.  Batch-size ratio: the
ceiling of what batching can gain for this model on this machine, and the
summary says which share of it the server captures; the batched server's
images/s over the in-process batched images/s at C clients is the server's
efficiency (goal >= 0.9), reported against both ceilings.  The servers run as in production: an
API key (every request carries ``Authorization: Bearer``), a client
``X-Request-ID`` on every request, metrics on.  The ratios
batched/batch-1 throughput at C clients and p99/p50 at moderate load are
computed in the same run.  JSON goes to
benchmarks/results/serve_bench-<device>.json.

The load generator is a minimal HTTP/1.1 client over asyncio streams (one
connection per client, prebuilt request bytes) so that it steals as little
CPU as possible from the server on small machines.  It only ever connects to
127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.common import result_header, write_result  # noqa: E402

HOST = "127.0.0.1"  # never anything else


# ----------------------------------------------------------------------------- HTTP


#: The API key the benchmark's servers require (auth is on, as in production).
API_KEY = "serve-bench-key-0123456789abcdef"


def multipart_request(path: str, port: int, field: str, filename: str, data: bytes, fields: dict[str, str],
                      request_id: str = "") -> bytes:
    boundary = uuid.uuid4().hex
    parts = []
    for k, v in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    body = b"".join(parts)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"X-Request-ID: {request_id or uuid.uuid4().hex}\r\n\r\n"
    ).encode()
    return head + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("server closed the connection")
    status = int(status_line.split()[1])
    length = 0
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    body = await reader.readexactly(length) if length else b""
    return status, body


async def raw_request(port: int, request: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(request)
    await writer.drain()
    out = await read_response(reader)
    writer.close()
    return out


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    """GET an open path (/readyz, /metrics: no API key needed)."""
    return await raw_request(port, f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n".encode())


async def run_load(port: int, requests: list[bytes], clients: int, total: int) -> dict[str, Any]:
    """``total`` requests from ``clients`` concurrent connections; returns latency stats."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    counter = {"next": 0}

    async def client(cid: int) -> None:
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            while True:
                i = counter["next"]
                if i >= total:
                    return
                counter["next"] = i + 1
                t0 = time.perf_counter()
                writer.write(requests[i % len(requests)])
                await writer.drain()
                status, body = await read_response(reader)
                latencies.append(time.perf_counter() - t0)
                if status != 200:
                    errors[str(status)] = errors.get(str(status), 0) + 1
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1000.0
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": errors,
        "seconds": round(wall, 3),
        "requests_per_s": round(len(latencies) / wall, 2),
        "latency_ms": {
            "p50": round(float(np.percentile(lat, 50)), 2),
            "p90": round(float(np.percentile(lat, 90)), 2),
            "p99": round(float(np.percentile(lat, 99)), 2),
            "max": round(float(lat.max()), 2),
            "mean": round(float(lat.mean()), 2),
        },
    }


def _cpu_seconds(stat_path: str) -> float:
    """utime + stime of a /proc stat file, in seconds (0.0 if it has gone)."""
    try:
        with open(stat_path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (the decode workers sit under a forkserver)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def server_cpu(pid: int) -> dict[str, float] | None:
    """CPU seconds so far of a server: its event-loop (main) thread, its other threads (inference, ONNX
    Runtime's pool, helpers) and its descendant processes (decode workers); None where /proc is missing."""
    if not os.path.isdir(f"/proc/{pid}/task"):
        return None
    main = _cpu_seconds(f"/proc/{pid}/task/{pid}/stat")
    return {"event_loop_thread": main, "other_threads": _cpu_seconds(f"/proc/{pid}/stat") - main,
            "decode_processes": sum(_cpu_seconds(f"/proc/{c}/stat") for c in _descendants(pid))}


def cpu_per_request(before: dict[str, float] | None, after: dict[str, float] | None, client_s: float,
                    requests: int) -> dict[str, float] | None:
    """CPU milliseconds per request by part (server threads, decode processes, this load generator)."""
    if before is None or after is None or requests < 1:
        return None
    out = {k: round(1000 * (after[k] - before[k]) / requests, 3) for k in after}
    out["load_generator"] = round(1000 * client_s / requests, 3)
    return out


def batch_stats(metrics_text: str) -> tuple[float, float]:
    """(sum, count) of the isfe_batch_size histogram."""
    s = re.search(r"^isfe_batch_size_sum (\S+)$", metrics_text, re.M)
    c = re.search(r"^isfe_batch_size_count (\S+)$", metrics_text, re.M)
    return (float(s.group(1)) if s else 0.0, float(c.group(1)) if c else 0.0)


# ----------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def launch_server(model: str, gallery: str, flags: list[str], log: Path, *, cwd: Path = REPO,
                  env: dict[str, str] | None = None, who: str = "server") -> tuple[subprocess.Popen, int]:
    """``python -m serving`` on a free loopback port with ``flags``, output to ``log``; returns once /readyz is 200.

    ``cwd``/``env`` pick which ``serving`` package runs (hostile_bench's ``--before``); ``who`` names it in errors.
    """
    port = free_port()
    cmd = [sys.executable, "-m", "serving", "--model", model, "--gallery", gallery, "--host", HOST, "--port", str(port),
           "--log-level", "warning", *flags]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{who} exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            status, _ = asyncio.run(http_get(port, "/readyz"))
            if status == 200:
                return proc, port
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{who} did not become ready in 120 s")


def start_server(model: str, gallery: str, max_batch_size: int, max_wait_ms: float, threads: int | None,
                 log: Path, inference_workers: int = 1) -> tuple[subprocess.Popen, int]:
    """The benchmark's server: API key on, the given batching, inference workers and ONNX Runtime threads."""
    flags = ["--max-batch-size", str(max_batch_size), "--max-wait-ms", str(max_wait_ms), "--api-key", API_KEY,
             "--inference-workers", str(inference_workers)]
    return launch_server(model, gallery, flags + (["--threads", str(threads)] if threads else []), log)


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ----------------------------------------------------------------------------- setup


def build_reference(workdir: Path) -> tuple[str, str, list[Path]]:
    """32x32 ResNet18 (random init) -> ONNX; 96 generated images -> gallery."""
    from isfe_model import Encoder, Gallery
    from tests.helpers_models import build_model, make_images

    model = build_model(workdir / "model.onnx", arch="resnet18", embedding_dim=128, input_size=32, max_batch=64)
    images = make_images(workdir / "images", per_class=32, size=48)
    enc = Encoder(str(model))
    Gallery.build(enc, str(workdir / "images")).save(workdir / "gallery")
    return str(model), str(workdir / "gallery"), images


class InProcess:
    """ONNX Runtime alone, in this process, at batch 1 and at ``batch`` (images/s), in each configuration.

    A configuration is (intra-op threads, workers): ``workers`` threads call
    ``embed_arrays`` side by side on one session, as the server's inference
    workers do.  :meth:`measure` runs one round of every configuration; the
    benchmark calls it right before each round of server runs, so that the
    in-process figure and the server's are taken under the same background load
    (the servers are idle meanwhile).  The ceiling of a round is its best
    configuration: ONNX Runtime's defaults (one caller, its own thread count)
    and the server's (``--threads``, ``--inference-workers``) when they differ.
    """

    def __init__(self, model: str, batch: int, threads: int | None, workers: int = 1, seconds: float = 2.0,
                 clients: int | None = None):
        from isfe_model import Encoder

        configs = [(None, 1)] + ([(threads, workers)] if (threads, workers) != (None, 1) else [])
        self.encoders = {c: Encoder(model, threads=c[0]) for c in configs}
        self.batch, self.seconds = batch, seconds
        s = next(iter(self.encoders.values())).spec.input_size
        self.x = np.random.default_rng(0).random((batch, 3, s, s), dtype=np.float32)
        self.sizes = (1, batch)
        self.by_config: dict[str, dict[int, list[float]]] = {self.label(c): {1: [], batch: []} for c in configs}
        # At most ``clients`` images can be in flight in the server: with W callers that is clients / W per call
        # (2 workers x batch 32 would keep 64 in flight).  Each configuration is also timed at that batch.
        self.clients = int(clients or batch)
        self.in_flight_batch = {c: min(batch, -(-self.clients // c[1])) for c in configs}
        self.by_config_in_flight: dict[str, list[float]] = {self.label(c): [] for c in configs}
        for c, enc in self.encoders.items():
            for b in {*self.sizes, self.in_flight_batch[c]}:
                enc.embed_arrays(self.x[:b])  # warm-up

    @staticmethod
    def label(config: tuple[int | None, int]) -> str:
        threads, workers = config
        return f"threads={threads or 'default'},workers={workers}"

    def _rate(self, config: tuple[int | None, int], b: int) -> float:
        enc, workers = self.encoders[config], config[1]
        counts = [0] * workers
        t0 = time.perf_counter()

        def loop(i: int) -> None:
            while time.perf_counter() - t0 < self.seconds:
                enc.embed_arrays(self.x[:b])
                counts[i] += b

        threads = [threading.Thread(target=loop, args=(i,)) for i in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(counts) / (time.perf_counter() - t0)

    def measure(self) -> dict[int, float]:
        """One round: every configuration at batch 1 and ``batch``; returns the best images/s per batch size."""
        out = {}
        for b in self.sizes:
            rates = {c: self._rate(c, b) for c in self.encoders}
            for c, r in rates.items():
                self.by_config[self.label(c)][b].append(r)
            out[b] = max(rates.values())
        for c in self.encoders:  # the same images in flight as the server at --clients
            b = self.in_flight_batch[c]
            rate = self.by_config[self.label(c)][b][-1] if b in self.sizes else self._rate(c, b)
            self.by_config_in_flight[self.label(c)].append(rate)
        return out

    def best_in_flight(self) -> list[float]:
        """Round by round, the best configuration's images/s with ``clients`` images in flight."""
        return [max(vs) for vs in zip(*self.by_config_in_flight.values())]

    def best(self, b: int) -> list[float]:
        """Round by round, the best configuration's images/s at batch ``b``."""
        return [max(vs) for vs in zip(*(d[b] for d in self.by_config.values()))]

    def summary(self) -> dict[str, Any]:
        r1, rb = float(np.median(self.best(1))), float(np.median(self.best(self.batch)))
        return {"batch": self.batch, "images_per_s_batch1": round(r1, 1),
                f"images_per_s_batch{self.batch}": round(rb, 1), "ratio": round(rb / r1, 2),
                "rounds": {str(b): [round(v, 1) for v in self.best(b)] for b in self.sizes},
                "configurations": {k: {str(b): [round(v, 1) for v in vs] for b, vs in d.items()}
                                   for k, d in self.by_config.items()},
                "ceiling": "per round, the best configuration",
                "in_flight": {"clients": self.clients,
                              "batch_per_call": {self.label(c): b for c, b in self.in_flight_batch.items()},
                              "rounds": [round(v, 1) for v in self.best_in_flight()],
                              "configurations": {k: [round(v, 1) for v in vs]
                                                 for k, vs in self.by_config_in_flight.items()}}}


def device_name(info: dict[str, Any]) -> str:
    providers = info.get("providers") or []
    if any(p in providers for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider")):
        try:
            name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                  text=True, timeout=10).stdout
            return re.sub(r"[^A-Za-z0-9]+", "-", name.strip().splitlines()[0]).strip("-").lower() or "gpu"
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "gpu"
    return f"cpu{os.cpu_count()}"


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="ONNX model (default: build a random-init 32x32 ResNet18)")
    p.add_argument("--gallery", help="gallery folder for --model")
    p.add_argument("--query-dir", help="images to query with (default: the generated images)")
    p.add_argument("--clients", type=int, default=32,
                   help="concurrent clients for the throughput comparison (default 32)")
    p.add_argument("--moderate", type=int, default=4,
                   help="concurrent clients for the 'moderate load' latency check (default 4)")
    p.add_argument("--requests", type=int, default=600, help="requests per load run (default 600)")
    p.add_argument("--warmup", type=int, default=64, help="warm-up requests per server (default 64)")
    p.add_argument("--max-batch-size", type=int, default=32, help="batched mode's --max-batch-size (default 32)")
    p.add_argument("--max-wait-ms", type=float, default=2.0, help="batched mode's --max-wait-ms (default 2)")
    p.add_argument("--threads", type=int, default=None, help="server --threads (ONNX Runtime intra-op threads)")
    p.add_argument("--inference-workers", type=int, default=1, help="server --inference-workers (default 1)")
    p.add_argument("--rounds", type=int, default=3,
                   help="alternating rounds per mode and load; medians are reported (default 3)")
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. 'cores shared with other jobs')")
    p.add_argument("--out", default=None, help="output JSON (default benchmarks/results/serve_bench-<device>.json)")
    return parse_checked(p, argv, at_least_one=("clients", "moderate", "requests", "rounds",
                                                              "inference_workers"))


def parse_checked(p: argparse.ArgumentParser, argv: list[str] | None,
                  at_least_one: tuple[str, ...]) -> argparse.Namespace:
    """``p.parse_args(argv)``, refusing --model without --gallery (or the reverse) and any of ``at_least_one`` < 1."""
    args = p.parse_args(argv)
    if (args.model is None) != (args.gallery is None):
        p.error("give both --model and --gallery, or neither")
    if min(getattr(args, name) for name in at_least_one) < 1:
        flags = [f"--{name}" for name in at_least_one]
        p.error(f"{', '.join(flags[:-1])} and {flags[-1]} must be >= 1")
    return args


def measure_servers(args: argparse.Namespace, model: str, gallery: str, payloads: list[tuple[str, bytes]], tmpdir: Path,
                    modes: list[tuple[str, int]], in_process: InProcess,
                    ) -> tuple[dict[tuple[str, int], list[dict[str, Any]]], dict[str, Any]]:
    """Start one server per mode, warm up, then alternate load runs (each round after an in-process
    round); returns (samples per (mode, clients), /v1/info)."""
    servers: dict[str, tuple[subprocess.Popen, int]] = {}
    samples: dict[tuple[str, int], list[dict[str, Any]]] = {}
    try:
        # Both servers run side by side (an idle one costs no CPU); the load runs
        # alternate between them round by round so that drifting background load
        # on a shared machine hits both modes alike.
        for mode, mbs in modes:
            servers[mode] = start_server(model, gallery, mbs, args.max_wait_ms, args.threads,
                                         tmpdir / f"server-{mode}.log", args.inference_workers)
        reqs = {mode: [multipart_request("/v1/search", port, "file", n, d, {"k": str(args.k)}, request_id=f"bench-{i}")
                       for i, (n, d) in enumerate(payloads)] for mode, (_, port) in servers.items()}
        info_req = (f"GET /v1/info HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {API_KEY}\r\n"
                    f"Connection: close\r\n\r\n").encode()
        info = json.loads(asyncio.run(raw_request(servers["batched"][1], info_req))[1])
        for mode, (_, port) in servers.items():
            asyncio.run(run_load(port, reqs[mode], args.clients, args.warmup))
        for rnd in range(args.rounds):
            ort = in_process.measure()
            print(f"round {rnd + 1}/{args.rounds} onnxruntime alone: batch 1 {ort[1]:.1f} images/s, "
                  f"batch {in_process.batch} {ort[in_process.batch]:.1f} images/s, "
                  f"{in_process.clients} in flight {in_process.best_in_flight()[-1]:.1f} images/s", flush=True)
            for clients in (args.clients, args.moderate):
                for mode, (proc, port) in servers.items():
                    s0, c0 = batch_stats(asyncio.run(http_get(port, "/metrics"))[1].decode())
                    cpu0, own0 = server_cpu(proc.pid), time.process_time()
                    res = asyncio.run(run_load(port, reqs[mode], clients, args.requests))
                    cpu1, own1 = server_cpu(proc.pid), time.process_time()
                    s1, c1 = batch_stats(asyncio.run(http_get(port, "/metrics"))[1].decode())
                    res["mean_batch_size"] = round((s1 - s0) / max(1.0, c1 - c0), 2)
                    res["cpu_ms_per_request"] = cpu_per_request(cpu0, cpu1, own1 - own0, res["requests"])
                    samples.setdefault((mode, clients), []).append(res)
                    print(f"round {rnd + 1}/{args.rounds} {mode:8s} clients={clients:3d}  "
                          f"{res['requests_per_s']:8.1f} req/s  "
                          f"p50 {res['latency_ms']['p50']:7.1f} ms  p99 {res['latency_ms']['p99']:7.1f} ms  "
                          f"mean batch {res['mean_batch_size']:5.1f}  errors {res['errors'] or 0}", flush=True)
    finally:
        for proc, _ in servers.values():
            stop_server(proc)
    return samples, info


def _median_parts(rows: list[dict[str, float] | None]) -> dict[str, float] | None:
    rows = [r for r in rows if r]
    return {k: round(float(np.median([r[k] for r in rows])), 3) for k in rows[0]} if rows else None


def summarise_runs(args: argparse.Namespace, modes: list[tuple[str, int]], samples: dict) -> dict[str, Any]:
    runs: dict[str, Any] = {}
    for mode, mbs in modes:
        runs[mode] = {"max_batch_size": mbs, "max_wait_ms": args.max_wait_ms if mbs > 1 else 0.0, "loads": {}}
        for clients in (args.clients, args.moderate):
            rs = samples[(mode, clients)]
            runs[mode]["loads"][str(clients)] = {
                "clients": clients,
                # medians over rounds (robust to background load on a shared machine)
                "requests_per_s": round(float(np.median([r["requests_per_s"] for r in rs])), 2),
                "latency_ms": {q: round(float(np.median([r["latency_ms"][q] for r in rs])), 2)
                               for q in ("p50", "p90", "p99", "max", "mean")},
                "mean_batch_size": round(float(np.median([r["mean_batch_size"] for r in rs])), 2),
                "cpu_ms_per_request": _median_parts([r["cpu_ms_per_request"] for r in rs]),
                "errors": sum(sum(r["errors"].values()) for r in rs),
                "rounds": rs,
            }
    return runs


def summary_of(args: argparse.Namespace, runs: dict[str, Any], ceiling: dict[str, Any]) -> dict[str, Any]:
    c, m = str(args.clients), str(args.moderate)
    b, u = runs["batched"]["loads"], runs["batch1"]["loads"]
    summary = {
        f"throughput_ratio_batched_vs_batch1_at_{c}_clients": round(b[c]["requests_per_s"] / u[c]["requests_per_s"], 2),
        f"p99_over_p50_batched_at_{m}_clients": round(b[m]["latency_ms"]["p99"] / b[m]["latency_ms"]["p50"], 2),
        f"p99_over_p50_batched_at_{c}_clients": round(b[c]["latency_ms"]["p99"] / b[c]["latency_ms"]["p50"], 2),
        f"throughput_ratio_batched_vs_batch1_at_{m}_clients": round(b[m]["requests_per_s"] / u[m]["requests_per_s"], 2),
    }
    summary["onnxruntime_batching_ceiling_ratio"] = ceiling["ratio"]
    # undefined when batching gains nothing in-process (e.g. all cores busy with other work)
    summary["share_of_ceiling_captured_at_%s_clients" % c] = round(
        (summary[f"throughput_ratio_batched_vs_batch1_at_{c}_clients"] - 1) / (ceiling["ratio"] - 1), 2
    ) if ceiling["ratio"] > 1.05 else None
    # one image per request: the server's images/s against ONNX Runtime alone at the same batch size,
    # round by round (each server round right after an in-process one), median over the rounds
    per_round = [r["requests_per_s"] / v for r, v in zip(b[c]["rounds"], ceiling["rounds"][str(ceiling["batch"])])]
    summary[f"server_vs_in_process_batched_at_{c}_clients"] = round(float(np.median(per_round)), 3)
    summary[f"server_vs_in_process_batched_at_{c}_clients_per_round"] = [round(x, 3) for x in per_round]
    # the same, against ONNX Runtime alone with as many images in flight as the server can have (one per client)
    fair = [r["requests_per_s"] / v for r, v in zip(b[c]["rounds"], ceiling["in_flight"]["rounds"])]
    summary[f"server_vs_in_process_same_images_in_flight_at_{c}_clients"] = round(float(np.median(fair)), 3)
    summary[f"server_vs_in_process_same_images_in_flight_at_{c}_clients_per_round"] = [round(x, 3) for x in fair]
    # where a request's CPU goes (the event loop's share is what the HTTP layer costs)
    summary[f"cpu_ms_per_request_batched_at_{c}_clients"] = b[c]["cpu_ms_per_request"]
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="isfe-serve-bench-") as tmp:
        tmpdir = Path(tmp)
        if args.model:
            model, gallery = args.model, args.gallery
            queries = sorted(Path(args.query_dir).rglob("*.*")) if args.query_dir else []
            setup = "given"
        else:
            t0 = time.perf_counter()
            model, gallery, queries = build_reference(tmpdir)
            setup = (f"random-init resnet18 32x32 128-d, 96 generated 48x48 images "
                     f"({time.perf_counter() - t0:.0f} s to build)")
        if not queries:
            from tests.helpers_models import make_images
            queries = make_images(tmpdir / "queries", per_class=8, size=48, seed=1)
        payloads = [(q.name, q.read_bytes()) for q in queries[:64]]
        in_process = InProcess(model, args.max_batch_size, args.threads, args.inference_workers,
                               clients=args.clients)
        modes = [("batched", args.max_batch_size), ("batch1", 1)]
        samples, info = measure_servers(args, model, gallery, payloads, tmpdir, modes, in_process)
        ceiling = in_process.summary()
        del in_process
    runs = summarise_runs(args, modes, samples)
    summary = summary_of(args, runs, ceiling)
    device = device_name(info)
    result = {
        **result_header("serve_bench", device),
        "providers": info.get("providers"),
        "model": {k: info.get("model", {}).get(k) for k in ("dim", "input_size")} | {"setup": setup},
        "gallery_count": info.get("gallery", {}).get("count"),
        "endpoint": "POST /v1/search (multipart file, k=%d; Authorization: Bearer, X-Request-ID, metrics on)" % args.k,
        "requests_per_run": args.requests,
        "rounds": args.rounds,
        "server_threads": args.threads,
        "server_inference_workers": args.inference_workers,
        "note": args.note,
        "load_average_at_end": os.getloadavg(),
        "onnxruntime_in_process": ceiling,
        "runs": runs,
        "summary": summary,
        "goals": {"throughput_ratio_min": 2.0, "p99_over_p50_max_at_moderate_load": 2.0,
                  "server_vs_in_process_batched_min": 0.9},
    }
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"serve_bench-{device}.json"
    write_result(out, result)
    print(json.dumps(summary, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
