"""Tests for the HTTP API (serving/): metrics, micro-batcher, upload decoding, and
the real server process (``python -m serving``) spoken to over HTTP."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import io
import math
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from isfe_model.preprocess import SUPPORTED_FORMATS, PreprocessSpec, preprocess
from serving.batcher import BatcherClosed, BatcherFull, MicroBatcher
from serving.errors import ApiError
from serving.inputs import Upload, decode_image, parse_k
from serving.metrics import ServingMetrics
from tests.helpers_models import free_port, main_stderr

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

# --------------------------------------------------------------------------- metrics


def _le(value: str) -> str:
    """A bucket bound in one spelling: "8.0" and "8" (both legal) -> "8"; "+Inf" stays."""
    if value in ("+Inf", "-Inf", "NaN"):
        return value
    f = float(value)
    return str(int(f)) if f.is_integer() else repr(f)


def parse_exposition(text: str) -> dict[tuple[str, frozenset], float]:
    """A minimal Prometheus text-format parser: {(name, labels): value}; checks TYPE lines.

    Bucket bounds (``le``) are compared as numbers (``le="8.0"`` is ``le="8"``), as Prometheus does.
    """
    out: dict[tuple[str, frozenset], float] = {}
    typed: set[str] = set()
    line_re = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$')
    label_re = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
    for line in text.splitlines():
        if not line:
            continue
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
            continue
        if line.startswith("#"):
            continue
        m = line_re.match(line)
        assert m, f"bad exposition line: {line!r}"
        name, _, labels, value = m.groups()
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in typed or base in typed, f"sample {name} has no TYPE line"
        lab = frozenset((k, _le(v) if k == "le" else v) for k, v in label_re.findall(labels or ""))
        v = {"+Inf": math.inf, "-Inf": -math.inf, "NaN": math.nan}.get(value)
        assert (name, lab) not in out, f"duplicate sample {name}{labels}"
        out[(name, lab)] = float(value) if v is None else v
    return out


def test_histogram_matches_naive_count():
    """The request-latency histogram's cumulative buckets equal a naive count of the observations."""
    from serving.metrics import LATENCY_BUCKETS

    rng = np.random.default_rng(0)
    values = rng.exponential(0.05, size=500).tolist() + [0.01, 0.0, 100.0]
    m = ServingMetrics()
    for v in values:
        m.latency.labels("/a").observe(v)
    m.latency.labels("/b").observe(1.0)
    parsed = parse_exposition(m.render().decode())
    for b in LATENCY_BUCKETS:
        naive = sum(1 for v in values if v <= b)
        assert parsed[("isfe_request_duration_seconds_bucket",
                       frozenset({("endpoint", "/a"), ("le", _le(str(b)))}))] == naive
    assert parsed[("isfe_request_duration_seconds_bucket",
                   frozenset({("endpoint", "/a"), ("le", "+Inf")}))] == len(values)
    assert parsed[("isfe_request_duration_seconds_count", frozenset({("endpoint", "/a")}))] == len(values)
    assert parsed[("isfe_request_duration_seconds_sum", frozenset({("endpoint", "/a")}))] == pytest.approx(sum(values))
    assert parsed[("isfe_request_duration_seconds_count", frozenset({("endpoint", "/b")}))] == 1


def test_counter_is_thread_safe_and_checks_labels():
    m = ServingMetrics()

    def work():
        for _ in range(1000):
            m.requests.labels("/v1/embed", "POST", "200").inc()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    parsed = parse_exposition(m.render().decode())
    assert parsed[("isfe_requests_total",
                   frozenset({("endpoint", "/v1/embed"), ("method", "POST"), ("status", "200")}))] == 4000
    with pytest.raises(ValueError):
        m.requests.labels("x", "y")
    with pytest.raises(ValueError):
        m.requests.labels("x", "y", "z").inc(-1)


def test_serving_metrics_render_parses():
    m = ServingMetrics(queue_depth=lambda: 7)
    m.requests.labels("/v1/embed", "POST", "200").inc()
    m.record_batch(5, 0.004)
    parsed = parse_exposition(m.render().decode())
    assert parsed[("isfe_queue_depth", frozenset())] == 7
    assert parsed[("isfe_images_embedded_total", frozenset())] == 5
    assert parsed[("isfe_batch_size_bucket", frozenset({("le", "4")}))] == 0
    assert parsed[("isfe_batch_size_bucket", frozenset({("le", "8")}))] == 1
    # the standard process metrics of prometheus_client
    assert parsed[("process_resident_memory_bytes", frozenset())] > 0
    assert ("process_cpu_seconds_total", frozenset()) in parsed


# --------------------------------------------------------------------------- batcher


def _rowfn(x: np.ndarray) -> np.ndarray:
    """A per-row function: batched output row i depends on input i only."""
    flat = x.reshape(len(x), -1)
    return np.stack([flat.sum(1), flat.max(1)], axis=1)


@pytest.mark.parametrize("workers", [1, 2])
def test_batcher_results_equal_unbatched_under_concurrency(workers):
    sizes: list[int] = []
    rng = np.random.default_rng(1)
    xs = rng.random((200, 3, 4, 4), dtype=np.float32)

    def fn(x):
        time.sleep(0.002)  # inference takes time, so requests pile up
        return _rowfn(x)

    with MicroBatcher(fn, max_batch_size=16, max_wait_ms=5, on_batch=lambda n, s: sizes.append(n),
                      workers=workers) as b:
        with concurrent.futures.ThreadPoolExecutor(32) as ex:
            futs = list(ex.map(lambda i: b.submit(xs[i]), range(len(xs))))
            got = np.stack([f.result(timeout=10) for f in futs])
    np.testing.assert_array_equal(got, _rowfn(xs))
    assert sum(sizes) == len(xs)
    assert max(sizes) <= 16
    assert max(sizes) > 1, "concurrent submissions were never batched"
    assert len(sizes) < len(xs)


def test_batcher_batch_size_one_and_async_run():
    sizes: list[int] = []
    xs = np.arange(24, dtype=np.float32).reshape(6, 4)

    async def go(b):
        return await asyncio.gather(b.run(xs[:3]), b.run(xs[3:]))

    with MicroBatcher(_rowfn, max_batch_size=1, max_wait_ms=50, on_batch=lambda n, s: sizes.append(n)) as b:
        r1, r2 = asyncio.run(go(b))
    np.testing.assert_array_equal(np.concatenate([r1, r2]), _rowfn(xs))
    assert sizes == [1] * 6


def test_batcher_waits_for_company_up_to_max_wait():
    sizes: list[int] = []
    with MicroBatcher(_rowfn, max_batch_size=4, max_wait_ms=300, on_batch=lambda n, s: sizes.append(n)) as b:
        f1 = b.submit(np.ones(3, np.float32))
        time.sleep(0.05)
        f2 = b.submit(np.zeros(3, np.float32))
        f1.result(5), f2.result(5)
        t0 = time.monotonic()
        b.submit(np.ones(3, np.float32)).result(5)  # alone: leaves after max_wait
        waited = time.monotonic() - t0
    assert sizes == [2, 1]
    assert 0.25 <= waited < 3


def test_batcher_max_wait_counts_from_submit_so_a_busy_worker_does_not_idle():
    """Inputs that queued behind a long batch for longer than max_wait go at once when it ends (no extra wait)."""
    sizes: list[int] = []
    gate = threading.Event()

    def fn(x):
        gate.wait(5)
        return _rowfn(x)

    with MicroBatcher(fn, max_batch_size=8, max_wait_ms=400, on_batch=lambda n, s: sizes.append(n)) as b:
        first = b.submit(np.ones(3, np.float32))  # alone: runs after 400 ms and blocks on the gate
        time.sleep(0.5)
        later = b.submit_many([np.zeros(3, np.float32)] * 2)  # queued behind the blocked batch
        time.sleep(0.5)  # they have now waited longer than max_wait
        t0 = time.monotonic()
        gate.set()
        first.result(5)
        for f in later:
            f.result(5)
        after_release = time.monotonic() - t0
    assert sizes == [1, 2]
    assert after_release < 0.3, f"the second batch waited {after_release:.3f} s after the first one ended"


def test_batcher_error_reaches_every_waiter_and_worker_survives():
    calls = {"n": 0}

    def fn(x):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return _rowfn(x)

    with MicroBatcher(fn, max_batch_size=8, max_wait_ms=100) as b:
        futs = b.submit_many([np.ones(2, np.float32)] * 3)
        for f in futs:
            with pytest.raises(RuntimeError, match="boom"):
                f.result(5)
        assert b.alive
        np.testing.assert_array_equal(b.submit(np.ones(2, np.float32)).result(5), [2.0, 1.0])


def test_batcher_backpressure_stop_and_cancel():
    gate = threading.Event()

    def fn(x):
        gate.wait(5)
        return _rowfn(x)

    b = MicroBatcher(fn, max_batch_size=1, max_wait_ms=0, max_queue=2).start()
    first = b.submit(np.ones(2, np.float32))
    time.sleep(0.1)  # the worker holds `first`; the queue is empty again
    q1 = b.submit(np.ones(2, np.float32))
    q2 = b.submit(np.zeros(2, np.float32))
    with pytest.raises(BatcherFull):
        b.submit(np.ones(2, np.float32))
    with pytest.raises(BatcherFull):
        b.submit_many([np.ones(2, np.float32)])
    assert q1.cancel()  # a cancelled request is skipped, not computed
    gate.set()
    assert first.result(5).tolist() == [2.0, 1.0]
    assert q2.result(5).tolist() == [0.0, 0.0]
    b.stop()
    assert not b.alive
    with pytest.raises(BatcherClosed):
        b.submit(np.ones(2, np.float32))
    assert b.batches == 2


def test_batcher_workers_run_batches_side_by_side_and_stop_finishes_the_queue():
    """Two workers: two batches in flight at once (each whole), and stop() runs what was queued, then joins both."""
    running, most, names = [0], [0], set()
    lock, gate = threading.Lock(), threading.Event()

    def fn(x):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            names.add(threading.current_thread().name)
        gate.wait(5)
        with lock:
            running[0] -= 1
        return _rowfn(x)

    b = MicroBatcher(fn, max_batch_size=2, max_wait_ms=0, workers=2).start()
    xs = np.arange(24, dtype=np.float32).reshape(8, 3)
    futs = [b.submit(x) for x in xs]
    deadline = time.monotonic() + 5
    while most[0] < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert most[0] == 2 and names == {"isfe-inference-0", "isfe-inference-1"}
    gate.set()
    b.stop()
    assert not b.alive
    np.testing.assert_array_equal(np.stack([f.result(0) for f in futs]), _rowfn(xs))
    with pytest.raises(BatcherClosed):
        b.submit(xs[0])


def test_batcher_stop_timeout_fails_what_is_left_and_the_late_worker_still_exits():
    gate = threading.Event()

    def fn(x):
        gate.wait(5)
        return _rowfn(x)

    b = MicroBatcher(fn, max_batch_size=1, max_wait_ms=0).start()
    worker = b._threads[0]
    running = b.submit(np.ones(2, np.float32))
    time.sleep(0.1)  # the worker holds it, blocked
    queued = b.submit(np.zeros(2, np.float32))
    b.stop(timeout=0.2)
    with pytest.raises(BatcherClosed):
        queued.result(1)
    gate.set()
    assert running.result(5).tolist() == [2.0, 1.0]  # the batch in flight still finishes
    worker.join(5)
    assert not worker.is_alive()


def test_batcher_with_several_workers_never_waits_for_company():
    """With workers > 1 an input goes as soon as a worker is free: max_wait does not hold it back."""
    with MicroBatcher(_rowfn, max_batch_size=8, max_wait_ms=5000, workers=2) as b:
        t0 = time.monotonic()
        assert b.submit(np.ones(3, np.float32)).result(5).tolist() == [3.0, 1.0]
        assert time.monotonic() - t0 < 2.0


def test_batcher_rejects_bad_settings():
    for kw in ({"max_batch_size": 0}, {"max_wait_ms": -1}, {"max_queue": 0}, {"workers": 0}):
        with pytest.raises(ValueError):
            MicroBatcher(_rowfn, **kw)


# --------------------------------------------------------------------------- upload decoding

SPEC = PreprocessSpec(input_size=16, resize_size=16)


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG whose IHDR claims w x h pixels, with no pixel data (a would-be bomb)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def unusual_images() -> dict[str, bytes]:
    """Valid but unusual images the server must embed."""
    rng = np.random.default_rng(3)
    rgb = Image.fromarray(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8), "RGB")
    out = {
        "cmyk.jpg": _encode(rgb.convert("CMYK"), "JPEG"),
        "gray16.png": _encode(Image.fromarray(rng.integers(0, 65535, (18, 18), dtype=np.uint16)), "PNG"),
        "palette.png": _encode(rgb.convert("P"), "PNG"),
        "rgba.png": _encode(rgb.convert("RGBA"), "PNG"),
        "tiny.png": _encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"),
        "image.webp": _encode(rgb, "WEBP"),
        "image.bmp": _encode(rgb, "BMP"),
        "image.tiff": _encode(rgb, "TIFF"),
        "gray.jpg": _encode(rgb.convert("L"), "JPEG"),
    }
    frames = [Image.new("P", (12, 12), i * 40) for i in range(3)]
    out["animated.gif"] = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90
    out["exif_rotated.jpg"] = _encode(rgb, "JPEG", exif=exif.tobytes())
    la = Image.fromarray(rng.integers(0, 256, (10, 14, 2), dtype=np.uint8), "LA")
    out["gray_alpha.png"] = _encode(la, "PNG")
    return out


def bad_uploads() -> dict[str, tuple[bytes, int]]:
    """name -> (bytes, expected status)."""
    good = _encode(Image.new("RGB", (32, 32), (1, 2, 3)), "PNG")
    jpg = _encode(Image.new("RGB", (64, 64), (9, 99, 199)), "JPEG")
    return {
        "empty.png": (b"", 400),
        "notes.txt": (b"this is not an image at all\n" * 10, 415),
        "random.bin": (bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)), 415),
        "truncated.png": (good[: len(good) // 2], 422),
        "truncated.jpg": (jpg[:40], 422),
        "bomb.png": (_png_header_only(30000, 30000), 413),
        # formats Pillow knows but the project refuses are "not an image", like any other non-image
        "image.tga": (_encode(Image.new("RGB", (8, 8), (1, 2, 3)), "TGA"), 415),
        "image.pcx": (_encode(Image.new("RGB", (8, 8), (1, 2, 3)), "PCX"), 415),
        "image.sgi": (_encode(Image.new("RGB", (8, 8), (1, 2, 3)), "SGI"), 415),
        "image.xbm": (_encode(Image.new("1", (8, 8), 1), "XBM"), 415),
    }


def test_decode_unusual_images_match_reference_preprocess():
    for name, data in unusual_images().items():
        x = decode_image(Upload(name, data), SPEC, max_pixels=10**8)
        assert x.shape == (3, 16, 16) and x.dtype == np.float32, name
        np.testing.assert_array_equal(x, preprocess(data, SPEC), err_msg=name)


def test_decode_bad_uploads_get_the_right_status():
    for name, (data, status) in bad_uploads().items():
        with pytest.raises(ApiError) as ei:
            decode_image(Upload(name, data), SPEC, max_pixels=10**8)
        assert ei.value.status == status, (name, ei.value.detail)
        assert name in ei.value.detail
    big = _encode(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(ApiError) as ei:
        decode_image(Upload("big.png", big), SPEC, max_pixels=9999)
    assert ei.value.status == 413 and "10,000 pixels" in ei.value.detail


def test_decode_opens_only_supported_formats(monkeypatch):
    """No Pillow plugin outside SUPPORTED_FORMATS ever parses an upload's header."""
    calls: list[dict] = []
    real_open = Image.open

    def spy(fp, mode="r", formats=None):
        calls.append({"formats": formats})
        return real_open(fp, mode, formats)

    monkeypatch.setattr(Image, "open", spy)
    decode_image(Upload("a.png", _encode(Image.new("RGB", (8, 8)), "PNG")), SPEC, max_pixels=10**6)
    with pytest.raises(ApiError) as ei:
        decode_image(Upload("a.tga", _encode(Image.new("RGB", (8, 8)), "TGA")), SPEC, max_pixels=10**6)
    assert ei.value.status == 415 and ei.value.code == "not_an_image"
    assert calls and all(c["formats"] is not None and set(c["formats"]) <= set(SUPPORTED_FORMATS) for c in calls), calls


def test_a_truncated_header_is_422_not_415():
    """An upload cut inside its header is a damaged image (422), not an unsupported format (415)."""
    from tests.test_preprocess import TRUNCATED_HEADERS

    for fmt, data in TRUNCATED_HEADERS.items():
        with pytest.raises(ApiError) as ei:
            decode_image(Upload("cut", data), SPEC, max_pixels=10**6)
        assert (ei.value.status, ei.value.code) == (422, "corrupt_image"), (fmt, ei.value.detail)
        assert ei.value.detail == f"cut: a {fmt} file whose header is truncated or corrupt ({len(data)} bytes); " \
                                  f"send the whole file"
    # bytes without an image signature: 415 with the same reason isfe_model gives (SVG, HTML, ...)
    for data, reason in ((b'<svg xmlns="http://www.w3.org/2000/svg"/>', "an SVG (vector) file, not a raster image"),
                         (b"<!DOCTYPE html><html></html>", "an HTML page, not an image"),
                         (b"hello world", "not a recognised image format")):
        with pytest.raises(ApiError) as ei:
            decode_image(Upload("x", data), SPEC, max_pixels=10**6)
        assert (ei.value.status, ei.value.code) == (415, "not_an_image") and ei.value.detail.startswith(
            f"x: {reason}"), ei.value.detail


def test_parse_k():
    assert parse_k({}, {}, 10, 100) == 10
    assert parse_k({"k": "5"}, {}, 10, 100) == 5
    assert parse_k({"k": " 5 "}, {}, 10, 100) == 5
    assert parse_k({}, {"k": "7"}, 10, 100) == 7
    assert parse_k({"k": 3}, {}, 10, 100) == 3
    assert parse_k({"k": 2.0}, {}, 10, 100) == 2
    for bad in ("0", "101", "-1", "abc", "2.5", 1.5, True, None, [1],
                "1_0", "\u0663", "\uff13", "+3", "1e1", "", " ", "9" * 5000, 10**200, float("inf"),
                [[[[[[[[1]]]]]]]] * 1000):
        with pytest.raises(ApiError) as ei:
            parse_k({"k": bad}, {}, 10, 100)
        assert ei.value.status == 422 and ei.value.code == "invalid_k", bad
        assert len(ei.value.detail) < 200  # a huge value is not echoed back whole
        with pytest.raises(ApiError):
            parse_k({}, {"k": bad}, 10, 100) if isinstance(bad, str) else parse_k({"k": bad}, {}, 10, 100)


# --------------------------------------------------------------------------- the real server

import json  # noqa: E402
import shutil  # noqa: E402

import httpx  # noqa: E402

SERVER_LIMITS = {"max_body_mb": 0.25, "max_images": 4, "max_pixels": 1_000_000, "max_k": 20}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """A tiny exported model (ResNet18, 16x16 input, 32-d), 24 images, their gallery."""
    from isfe_model import Encoder, Gallery
    from tests.helpers_models import build_model, make_images

    root = tmp_path_factory.mktemp("serving")
    model = build_model(root / "model.onnx", arch="resnet18", embedding_dim=32, input_size=16)
    make_images(root / "images", per_class=8, size=24)
    enc = Encoder(str(model))
    gallery = Gallery.build(enc, str(root / "images"))
    gallery.save(root / "gallery")
    # the same gallery, marked as built by another model (as Gallery.load sees a foreign gallery)
    shutil.copytree(root / "gallery", root / "foreign")
    manifest = json.loads((root / "foreign" / "manifest.json").read_text())
    manifest["fingerprint"] = "0" * 64
    (root / "foreign" / "manifest.json").write_text(json.dumps(manifest))
    return {"root": root, "model": str(model), "gallery": str(root / "gallery"), "images": root / "images",
            "encoder": enc, "gallery_obj": Gallery.load(root / "gallery", encoder=enc)}


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path):
        self.proc, self.port, self.log = proc, port, log
        self.url = f"http://127.0.0.1:{port}"

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def start_server(model: str, gallery: str, log: Path, *extra: str, timeout: float = 60.0) -> Server:
    port = free_port()
    cmd = [PY, "-m", "serving", "--model", model, "--gallery", gallery, "--port", str(port),
           "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    server = Server(proc, port, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.url}/healthz", timeout=1.0).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    stop_server(server)
    raise AssertionError(f"server not healthy after {timeout} s:\n{server.log_tail()}")


def stop_server(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(15)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(5)


@contextlib.contextmanager
def running_server(model: str, gallery: str, log: Path, *extra: str) -> Iterator[Server]:
    """:func:`start_server` for a with-block; on leaving it the server is stopped, has exited
    cleanly on SIGTERM and has logged no traceback."""
    srv = start_server(model, gallery, log, *extra)
    try:
        yield srv
    finally:
        stop_server(srv)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal
    assert srv.proc.returncode in (0, -signal.SIGTERM), srv.log_tail()
    assert "Traceback" not in srv.log.read_text(errors="replace"), srv.log_tail()


@pytest.fixture(scope="module")
def server(artifacts):
    extra = []
    for k, v in SERVER_LIMITS.items():
        extra += [f"--{k.replace('_', '-')}", str(v)]
    with running_server(artifacts["model"], artifacts["gallery"], artifacts["root"] / "server.log",
                        "--max-batch-size", "8", "--max-wait-ms", "20", *extra) as srv:
        yield srv


def _files(paths: list[Path], field: str = "files") -> list[tuple[str, tuple[str, bytes, str]]]:
    return [(field, (p.name, p.read_bytes(), "application/octet-stream")) for p in paths]


def _sample(artifacts, n: int) -> list[Path]:
    return sorted(artifacts["images"].rglob("*.*"))[:n]


def test_health_ready_info_metrics(server, artifacts):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        r = c.get("/readyz")
        assert r.status_code == 200 and r.json()["ready"] is True and r.json()["gallery_count"] == 24
        info = c.get("/v1/info").json()
        enc = artifacts["encoder"]
        assert info["model"]["fingerprint"] == enc.fingerprint
        assert info["model"]["dim"] == 32 and info["model"]["input_size"] == 16
        assert info["providers"] == ["CPUExecutionProvider"]
        assert info["gallery"]["count"] == 24 and info["gallery"]["fingerprint"] == enc.fingerprint
        assert info["batching"]["max_batch_size"] == 8
        assert info["limits"]["max_images"] == 4 and info["limits"]["max_body_bytes"] == 262144
        before = parse_exposition(c.get("/metrics").text)
        c.get("/healthz")
        m = c.get("/metrics")
        assert m.headers["content-type"].startswith("text/plain; version=0.0.4")
        after = parse_exposition(m.text)
    key = ("isfe_requests_total", frozenset({("endpoint", "/healthz"), ("method", "GET"), ("status", "200")}))
    assert after[key] == before[key] + 1
    lat = ("isfe_request_duration_seconds_count", frozenset({("endpoint", "/healthz")}))
    assert after[lat] == before[lat] + 1


def test_embed_multipart_and_json_equal_local_encoder(server, artifacts):
    paths = _sample(artifacts, 4)
    ref = artifacts["encoder"].embed([str(p) for p in paths])
    with httpx.Client(base_url=server.url, timeout=30) as c:
        one = c.post("/v1/embed", files=_files(paths[:1], "file"))
        many = c.post("/v1/embed", files=_files(paths))
        b64 = c.post("/v1/embed", json={"images": [base64.b64encode(p.read_bytes()).decode() for p in paths]})
        data_url = c.post("/v1/embed",
                          json={"image": "data:image/png;base64," + base64.b64encode(paths[0].read_bytes()).decode()})
    for r in (one, many, b64, data_url):
        assert r.status_code == 200, r.text
    assert one.json()["count"] == 1 and one.json()["dim"] == 32
    assert many.json()["names"] == [p.name for p in paths]
    np.testing.assert_allclose(np.array(one.json()["embeddings"]), ref[:1], atol=1e-5)
    np.testing.assert_allclose(np.array(many.json()["embeddings"]), ref, atol=1e-5)
    np.testing.assert_allclose(np.array(b64.json()["embeddings"]), ref, atol=1e-5)
    np.testing.assert_allclose(np.array(data_url.json()["embeddings"]), ref[:1], atol=1e-5)
    norms = np.linalg.norm(np.array(many.json()["embeddings"]), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)


def test_search_equals_gallery_search(server, artifacts):
    enc, gal = artifacts["encoder"], artifacts["gallery_obj"]
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for path, k in zip(_sample(artifacts, 24)[::5], (1, 3, 5, 20, 7)):
            ref = gal.search(enc.embed([str(path)]), k).hits(0)
            r = c.post("/v1/search", files=_files([path], "file"), data={"k": str(k)})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["k"] == k and body["count"] == len(ref)
            assert [h["id"] for h in body["hits"]] == [h["id"] for h in ref]
            assert [h["label"] for h in body["hits"]] == [h["label"] for h in ref]
            np.testing.assert_allclose([h["score"] for h in body["hits"]], [h["score"] for h in ref], atol=1e-5)
        # k in the query string, JSON body, default k (10)
        path = _sample(artifacts, 1)[0]
        r1 = c.post("/v1/search?k=2", files=_files([path], "file"))
        r2 = c.post("/v1/search", json={"image": base64.b64encode(path.read_bytes()).decode(), "k": 2})
        r3 = c.post("/v1/search", files=_files([path], "file"))
    assert [h["id"] for h in r1.json()["hits"]] == [h["id"] for h in r2.json()["hits"]]
    assert r1.json()["hits"][0]["id"] == "circle/000.png"  # the query is in the gallery
    assert r3.json()["count"] == 10


def test_bad_requests_get_4xx_json_and_server_keeps_serving(server, artifacts):
    good = _sample(artifacts, 1)[0]
    big = _encode(Image.new("RGB", (1100, 1000), (5, 5, 5)), "PNG")  # 1.1 MP > --max-pixels 1M, small file
    cases: list[tuple[str, dict, int, str]] = []
    for name, (data, status) in bad_uploads().items():
        cases.append(("/v1/embed", {"files": [("file", (name, data, "image/png"))]}, status, name))
        cases.append(("/v1/search", {"files": [("file", (name, data, "image/png"))]}, status, name))
    cases += [
        ("/v1/embed", {"files": [("file", ("big.png", big, "image/png"))]}, 413, "over the server limit"),
        ("/v1/embed", {"files": [("picture", ("a.png", good.read_bytes(), "image/png"))]}, 400, "'picture'"),
        ("/v1/embed", {"data": {"file": "not a file"}}, 415, "content type"),
        ("/v1/embed", {"files": [("file", ("a.png", good.read_bytes(), "image/png"))], "data": {"file": "x"}}, 400,
         "must be a file"),
        ("/v1/embed", {"files": [("other", ("a.png", b"", "image/png"))], "data": {"k": "3"}}, 400,
         "unexpected file field"),
        ("/v1/embed", {"files": _files([good] * 5)}, 413, "limit of 4"),
        ("/v1/embed", {"files": _files([good] * 9)}, 413, "more than 4"),
        ("/v1/search", {"files": _files([good] * 2)}, 413, "limit of 1"),
        ("/v1/search", {"files": _files([good], "file"), "data": {"k": "0"}}, 422, "k=0"),
        ("/v1/search", {"files": _files([good], "file"), "data": {"k": "21"}}, 422, "k=21"),
        ("/v1/search", {"files": _files([good], "file"), "data": {"k": "three"}}, 422, "three"),
        ("/v1/search", {"json": {"image": base64.b64encode(good.read_bytes()).decode(), "k": 2.5}}, 422, "2.5"),
        ("/v1/embed", {"json": {"image": "@@not base64@@"}}, 400, "base64"),
        ("/v1/embed", {"json": {"images": "abc"}}, 400, "list"),
        ("/v1/embed", {"json": {}}, 400, "no image"),
        ("/v1/embed", {"json": [1, 2]}, 400, "object"),
        ("/v1/embed", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400,
         "not valid JSON"),
        ("/v1/embed", {"content": b"--x\r\nbroken", "headers": {"content-type": "multipart/form-data; boundary=x"}},
         400, ""),
        ("/v1/embed", {"content": good.read_bytes(), "headers": {"content-type": "image/png"}}, 415, "multipart"),
        ("/v1/embed", {"json": {"image": base64.b64encode(b"hello").decode()}}, 415, "not a recognised image"),
        ("/v1/embed", {"files": [("file", ("huge.png", b"\0" * 300_000, "image/png"))]}, 413, "over the limit"),
    ]
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for path, kwargs, status, needle in cases:
            r = c.post(path, **kwargs)
            assert r.status_code == status, (path, needle, r.status_code, r.text)
            body = r.json()
            assert set(body) == {"error", "detail"}, body
            assert needle in body["detail"], (needle, body)
        # a body over the limit sent chunked (no Content-Length) is cut off while streaming
        def chunks():
            for _ in range(40):
                yield b"x" * 10_000
        r = c.post("/v1/embed", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"] == "body_too_large"
        assert c.get("/v1/embed").status_code == 405
        assert c.get("/v2/nothing").json()["error"] == "not_found"
        # still serving
        assert c.get("/healthz").status_code == 200
        assert c.post("/v1/search", files=_files([good], "file")).status_code == 200
        metrics = c.get("/metrics").text
    assert 'status="500"' not in metrics


def test_hostile_json_and_k_get_4xx_and_server_keeps_serving(server, artifacts):
    """Deeply nested JSON, integers over Python's 4,300-digit limit and non-ASCII digits in k: 4xx, never 500."""
    good = _sample(artifacts, 1)[0]
    b64 = base64.b64encode(good.read_bytes()).decode()
    deep = 5000
    huge_int = "1" + "0" * 5000
    bodies = [
        (b'{"image": ' + b"[" * deep + b"]" * deep + b"}", "nested too deeply"),
        (b"[" * deep + b"]" * deep, "nested too deeply"),
        (b'{"images": [' + b'{"a": ' * deep + b"1" + b"}" * deep + b"]}", "nested too deeply"),
        (('{"image": "%s", "k": %s}' % (b64, huge_int)).encode(), "5,001 digits"),
        (('{"image": %s}' % huge_int).encode(), "5,001 digits"),
        (('{"image": "%s", "other": [-%s]}' % (b64, huge_int)).encode(), "digits"),
    ]
    k_cases = [
        ({"files": _files([good], "file"), "data": {"k": "1_0"}}, "1_0"),
        ({"files": _files([good], "file"), "data": {"k": "\u0663"}}, "k must be an integer"),  # Arabic-Indic 3
        ({"files": _files([good], "file"), "data": {"k": "\uff13"}}, "k must be an integer"),  # fullwidth 3
        ({"files": _files([good], "file"), "params": {"k": "1_0"}}, "1_0"),
        ({"json": {"image": b64, "k": "\u0663"}}, "k must be an integer"),
        ({"json": {"image": b64, "k": "9" * 5000}}, "out of range"),
    ]
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for path in ("/v1/embed", "/v1/search"):
            for body, needle in bodies:
                r = c.post(path, content=body, headers={"content-type": "application/json"})
                assert r.status_code == 400, (path, needle, r.status_code, r.text[:300])
                assert r.json()["error"] == "malformed_json" and needle in r.json()["detail"], r.text[:300]
        for kwargs, needle in k_cases:
            r = c.post("/v1/search", **kwargs)
            assert r.status_code == 422, (kwargs.get("data"), kwargs.get("params"), r.text[:300])
            assert r.json()["error"] == "invalid_k" and needle in r.json()["detail"], r.text[:300]
        r = c.post("/v1/search", files=_files([good], "file"), data={"k": "3"})
        assert r.status_code == 200 and r.json()["k"] == 3
        assert c.post("/v1/search", json={"image": b64, "k": 2.0}).json()["k"] == 2
        assert c.get("/healthz").status_code == 200
        metrics = c.get("/metrics").text
    assert 'status="500"' not in metrics


def test_probes_answer_head_and_options(server):
    """Load balancers probe with HEAD (and sometimes OPTIONS): answered like GET, without a body."""
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for path in ("/healthz", "/readyz"):
            get = c.get(path)
            head = c.head(path)
            assert head.status_code == get.status_code == 200, (path, head.status_code, head.text)
            assert head.content == b""
            assert head.headers["content-type"] == get.headers["content-type"] == "application/json"
            opt = c.options(path)
            assert opt.status_code == 204, (path, opt.status_code, opt.text)
            assert {m.strip() for m in opt.headers["allow"].split(",")} == {"GET", "HEAD", "OPTIONS"}
        post = c.post("/healthz")
        assert post.status_code == 405 and post.json()["error"] == "method_not_allowed"
        metrics = parse_exposition(c.get("/metrics").text)
    assert metrics[("isfe_requests_total",
                    frozenset({("endpoint", "/readyz"), ("method", "HEAD"), ("status", "200")}))] >= 1


def test_max_pixels_above_pillow_limit_is_honoured(artifacts):
    """--max-pixels over Pillow's own limit (89,478,485 pixels; 2x that is a hard error) is the limit that counts."""
    srv = start_server(artifacts["model"], artifacts["gallery"], artifacts["root"] / "bigpixels.log",
                       "--max-pixels", "200000000")
    side = 9460  # 89,491,600 pixels: the smallest square over Pillow's limit; all zeros, mode "1": ~11 kB of PNG
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, "PNG")
    big = buf.getvalue()
    assert len(big) < 50_000
    try:
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            r = c.post("/v1/embed", files=[("file", ("big.png", big, "image/png"))])
            assert r.status_code == 200, r.text
            assert r.json()["count"] == 1
            # over 2 x Pillow's limit (Pillow's hard error) but under ours: the header passes, the missing data is 422
            r = c.post("/v1/embed", files=[("file", ("header.png", _png_header_only(14000, 14000), "image/png"))])
            assert r.status_code == 422 and r.json()["error"] == "corrupt_image", r.text
            # over ours: 413 naming our limit
            r = c.post("/v1/embed", files=[("file", ("huge.png", _png_header_only(15000, 15000), "image/png"))])
            assert r.status_code == 413 and "over the server limit of 200,000,000" in r.json()["detail"], r.text
            # over 2 x the raised limit: Pillow refuses while opening; the 413 still counts in the server's terms
            r = c.post("/v1/embed", files=[("file", ("bomb.png", _png_header_only(100_000, 100_000), "image/png"))])
            assert r.status_code == 413 and r.json()["detail"] == (
                "bomb.png: image is 10,000,000,000 pixels, over the server limit of 200,000,000; downscale it"), r.text
            assert c.get("/v1/info").json()["limits"]["max_pixels"] == 200_000_000
    finally:
        stop_server(srv)
    assert "Traceback" not in srv.log.read_text(errors="replace"), srv.log_tail()


def test_unusual_images_are_embedded(server, artifacts):
    enc = artifacts["encoder"]
    images = unusual_images()
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for name, data in images.items():
            r = c.post("/v1/embed", files=[("file", (name, data, "application/octet-stream"))])
            assert r.status_code == 200, (name, r.text)
            np.testing.assert_allclose(np.array(r.json()["embeddings"]), enc.embed([data]), atol=1e-5, err_msg=name)


def test_concurrent_requests_equal_single_requests(server, artifacts):
    paths = _sample(artifacts, 24)
    with httpx.Client(base_url=server.url, timeout=60) as c:
        single_emb = [c.post("/v1/embed", files=_files([p], "file")).json()["embeddings"][0] for p in paths]
        single_hits = [c.post("/v1/search", files=_files([p], "file"), data={"k": "5"}).json()["hits"] for p in paths]
        m0 = parse_exposition(c.get("/metrics").text)

    async def burst():
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=httpx.Limits(max_connections=64)) as ac:
            embeds = [ac.post("/v1/embed", files=_files([p], "file")) for p in paths]
            searches = [ac.post("/v1/search", files=_files([p], "file"), data={"k": "5"}) for p in paths]
            pair = [ac.post("/v1/embed", files=_files(paths[i : i + 2])) for i in range(0, 8, 2)]
            return await asyncio.gather(*embeds, *searches, *pair)

    results = asyncio.run(burst())
    assert all(r.status_code == 200 for r in results), [r.text for r in results if r.status_code != 200]
    emb = [r.json()["embeddings"][0] for r in results[:24]]
    hits = [r.json()["hits"] for r in results[24:48]]
    np.testing.assert_allclose(np.array(emb), np.array(single_emb), atol=1e-5)
    for h, s in zip(hits, single_hits):
        assert [x["id"] for x in h] == [x["id"] for x in s]
        np.testing.assert_allclose([x["score"] for x in h], [x["score"] for x in s], atol=1e-5)
    for i, r in enumerate(results[48:]):
        np.testing.assert_allclose(np.array(r.json()["embeddings"]), np.array(single_emb[2 * i : 2 * i + 2]), atol=1e-5)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        m1 = parse_exposition(c.get("/metrics").text)
    images = m1[("isfe_images_embedded_total", frozenset())] - m0[("isfe_images_embedded_total", frozenset())]
    calls = m1[("isfe_batch_size_count", frozenset())] - m0[("isfe_batch_size_count", frozenset())]
    assert images == 24 + 24 + 8
    assert calls < images, "concurrent requests were not micro-batched"
    # <= --max-batch-size
    assert m1[("isfe_batch_size_bucket", frozenset({("le", "8")}))] == m1[("isfe_batch_size_count", frozenset())]


def test_the_server_lets_pillow_reuse_image_blocks(artifacts, monkeypatch):
    """create_app (every server process) keeps freed image blocks for the next full-size decode."""
    from PIL import Image

    from serving.app import ServeConfig, create_app

    monkeypatch.delenv("PILLOW_BLOCKS_MAX", raising=False)
    before = Image.core.get_blocks_max()
    Image.core.set_blocks_max(0)
    try:
        create_app(artifacts["encoder"], artifacts["gallery_obj"],
                   ServeConfig(model=artifacts["model"], gallery=artifacts["gallery"]))
        assert Image.core.get_blocks_max() == 8
    finally:
        Image.core.set_blocks_max(before)


def test_freeze_long_lived_collects_garbage_then_freezes():
    """freeze_long_lived: cyclic garbage is collected first (never frozen); what lives leaves the collector's view."""
    import gc
    import weakref

    from serving.app import freeze_long_lived

    class Node:
        pass

    garbage, alive = Node(), Node()
    garbage.me = garbage  # a reference cycle: only the cyclic collector can free it
    gone = weakref.ref(garbage)
    del garbage
    try:
        freeze_long_lived()
        assert gone() is None
        assert gc.get_freeze_count() > 0 and not any(o is alive for o in gc.get_objects())
    finally:
        gc.unfreeze()


def test_lifespan_freezes_long_lived_objects_and_again_after_a_reload(artifacts):
    """The server freezes what startup loaded; a reload refreezes, and the old gallery is still freed."""
    import gc
    import weakref

    from starlette.testclient import TestClient

    from isfe_model import Gallery
    from serving.app import ServeConfig, create_app

    gc.unfreeze()
    first = Gallery.load(artifacts["gallery"], encoder=artifacts["encoder"])
    app = create_app(artifacts["encoder"], first,
                     ServeConfig(model=artifacts["model"], gallery=artifacts["gallery"], decode_workers=1))
    old = weakref.ref(first)
    del first
    try:
        with TestClient(app) as client:
            assert gc.get_freeze_count() > 0
            assert client.get("/readyz").status_code == 200
            client.portal.call(app.state.isfe.reloader.reload)
            assert gc.get_freeze_count() > 0
            assert old() is None  # frozen, yet freed by reference counting once nothing uses it
            assert client.get("/readyz").status_code == 200
        assert gc.get_freeze_count() == 0  # shutdown unfreezes
    finally:
        gc.unfreeze()


def test_not_ready_before_startup(artifacts):
    """Without the lifespan startup (no inference worker) /readyz says 503 and work is refused with 503."""
    from serving.app import ServeConfig, create_app

    app = create_app(artifacts["encoder"], artifacts["gallery_obj"],
                     ServeConfig(model=artifacts["model"], gallery=artifacts["gallery"]))
    path = _sample(artifacts, 1)[0]

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            return (await c.get("/healthz"), await c.get("/readyz"),
                    await c.post("/v1/embed", files=_files([path], "file")))

    health, ready, embed = asyncio.run(go())
    assert health.status_code == 200
    assert ready.status_code == 503 and ready.json()["ready"] is False
    assert embed.status_code == 503 and embed.json()["error"] == "not_ready"


def _run_main(argv: list[str]) -> tuple[int, str]:
    """``python -m serving`` in this process: (exit code, stderr)."""
    from serving.__main__ import main

    return main_stderr(main, argv)


def test_startup_errors_are_one_line(artifacts, tmp_path):
    model, gallery = artifacts["model"], artifacts["gallery"]
    not_onnx = tmp_path / "model.onnx"
    not_onnx.write_bytes(b"not an onnx model")
    cases = [
        (["--model", str(tmp_path / "missing.onnx"), "--gallery", gallery], "no such file"),
        (["--model", str(not_onnx), "--gallery", gallery], "not a valid ONNX model"),
        (["--model", model, "--gallery", str(tmp_path / "nogallery")], "no such folder"),
        (["--model", model, "--gallery", str(artifacts["images"])], "lacks"),
        (["--model", model, "--gallery", str(artifacts["root"] / "foreign")], "built with another model"),
    ]
    for argv, needle in cases:
        code, err = _run_main(argv + ["--port", str(free_port())])
        assert code == 2, (argv, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("serving: error: ") and needle in lines[0], err
    # the real process: exit code and one line on stderr, no traceback
    p = subprocess.run([PY, "-m", "serving", "--model", model, "--gallery", str(artifacts["root"] / "foreign")],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr and "built with another model" in p.stderr
    p = subprocess.run([PY, "-m", "serving", "--model", model, "--gallery", gallery, "--max-batch-size", "0"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--max-batch-size" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("exc", [MemoryError, RecursionError])
def test_startup_out_of_memory_or_recursion_is_one_line(artifacts, monkeypatch, exc):
    """A damaged gallery that makes loading run out of memory or recurse too deeply: one line, exit 2."""
    from isfe_model import Gallery

    def load(cls, *args, **kwargs):
        raise exc()

    monkeypatch.setattr(Gallery, "load", classmethod(load))
    code, err = _run_main(["--model", artifacts["model"], "--gallery", artifacts["gallery"],
                           "--port", str(free_port())])
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("serving: error: ") and artifacts["gallery"] in lines[0], err


def test_startup_deeply_nested_manifest_is_one_line(artifacts, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(artifacts["gallery"], damaged)
    (damaged / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    code, err = _run_main(["--model", artifacts["model"], "--gallery", str(damaged), "--port", str(free_port())])
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("serving: error: ") and "Traceback" not in err, err


def test_port_in_use_exits_nonzero(artifacts, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        p = subprocess.run([PY, "-m", "serving", "--model", artifacts["model"], "--gallery", artifacts["gallery"],
                            "--port", str(port)],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr == f"serving: error: 127.0.0.1:{port} is already in use (another server?); stop it or choose " \
                       f"another --port\n", p.stderr


def test_several_workers_serve_the_same_port(artifacts):
    srv = start_server(artifacts["model"], artifacts["gallery"], artifacts["root"] / "workers.log", "--workers", "2")
    try:
        path = _sample(artifacts, 1)[0]
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            deadline = time.monotonic() + 60
            while c.get("/readyz").status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.2)
            hits = [c.post("/v1/search", files=_files([path], "file"), data={"k": "3"}).json()["hits"]
                    for _ in range(4)]
        assert all([h["id"] for h in x] == [h["id"] for h in hits[0]] for x in hits)
        assert hits[0][0]["id"] == "circle/000.png"
    finally:
        stop_server(srv)
    assert "Traceback" not in srv.log.read_text(errors="replace"), srv.log_tail()


def test_a_busy_port_is_one_line_before_anything_loads(tmp_path, capsys):
    """Port in use, an address of another machine, a name that does not resolve: exit 2 with the fix, and the
    model is never loaded (the paths here do not even exist)."""
    from isfe_model.argtypes import bind_problem
    from serving.__main__ import main
    from tests.helpers_models import busy_port_argv

    code, port = busy_port_argv(main, tmp_path)
    assert code == 2
    assert capsys.readouterr().err == (f"serving: error: 127.0.0.1:{port} is already in use (another server?); "
                                       f"stop it or choose another --port\n")
    assert bind_problem("127.0.0.1", port) is None  # free again once the other listener is gone
    assert bind_problem("127.0.0.1", 0) is None
    assert "not an address of this machine" in bind_problem("192.0.2.1", port)  # TEST-NET-1: never local
    assert "cannot resolve it" in bind_problem("no-such-host.invalid", port)
