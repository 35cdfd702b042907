"""Slow and abusive clients against the real server (``python -m serving`` on a free loopback port),
plus the pieces that defend against them (decode pool, Host policy, metric labels, offline docs).

Every server here runs with short deadlines set by flags, so each case takes a
second or two: slow headers and bodies, idle sockets, over-limit bodies
(chunked and not) -> 413 + closed, a costly JSON body while /healthz answers,
random method names vs. /metrics, Host checks, CORS, /docs offline, and decode
time limits (the worker is killed and replaced, the server keeps serving).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import signal
import socket
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from isfe_model.preprocess import PreprocessSpec
from serving.decodepool import DecodePool
from serving.decoding import Upload, decode_image
from serving.docs import render_docs
from serving.errors import ApiError
from serving.guard import REPLAY_CHUNK, HostPolicy, _replay, host_of
from serving.metrics import method_label
from tests.test_serving import (  # noqa: F401 (fixture)
    _files,
    _sample,
    artifacts,
    parse_exposition,
    running_server,
    start_server,
    stop_server,
)

SPEC = PreprocessSpec(input_size=16, resize_size=16)
#: Deadlines of the hostile-client server (seconds).
T_IDLE, T_HEADERS, T_BODY, T_DECODE = 1.0, 1.0, 1.0, 0.15
MAX_BODY_MB = 16


def slow_png() -> bytes:
    """A legal 7000 x 7000 RGB PNG (49 MP, under the default 50 MP limit): ~140 kB that take ~0.4 s to decode."""
    buf = io.BytesIO()
    Image.new("RGB", (7000, 7000), (10, 20, 30)).save(buf, "PNG")
    return buf.getvalue()


def costly_json() -> bytes:
    """~16 MB of JSON (millions of empty objects) that takes json.loads ~0.5 s: parsed in a worker, not on the event
    loop."""
    n = (MAX_BODY_MB * 1024 * 1024 - 64) // 3
    return b'{"images": [' + b"{}," * (n - 1) + b"{}]}"


@pytest.fixture(scope="module")
def hostile_server(artifacts):  # noqa: F811 (pytest fixture)
    with running_server(
        artifacts["model"], artifacts["gallery"], artifacts["root"] / "hostile.log",
        "--timeout-keep-alive", str(T_IDLE), "--timeout-headers", str(T_HEADERS), "--timeout-body", str(T_BODY),
        "--decode-timeout", str(T_DECODE), "--decode-workers", "3", "--max-body-mb", str(MAX_BODY_MB),
        "--max-images", "4", "--max-wait-ms", "1",
    ) as srv:
        yield srv


# --------------------------------------------------------------------------- raw sockets


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def read_until_closed(s: socket.socket, limit_s: float) -> tuple[bytes, bool, float]:
    """Everything the server sends until it closes (or ``limit_s`` passes): (data, closed, seconds)."""
    t0 = time.monotonic()
    data = b""
    while time.monotonic() - t0 < limit_s:
        s.settimeout(max(0.01, limit_s - (time.monotonic() - t0)))
        try:
            piece = s.recv(65536)
        except socket.timeout:
            break
        except ConnectionResetError:
            return data, True, time.monotonic() - t0
        if not piece:
            return data, True, time.monotonic() - t0
        data += piece
    return data, False, time.monotonic() - t0


def status_and_json(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body) if body else {}


# --------------------------------------------------------------------------- slow clients


def test_idle_connection_is_closed(hostile_server):
    """A connection that never sends a byte is closed after --timeout-keep-alive (stock uvicorn keeps it forever)."""
    with connect(hostile_server.port) as s:
        data, closed, took = read_until_closed(s, 10 * T_IDLE)
    assert closed and data == b"", (data, took)
    assert T_IDLE * 0.8 <= took < T_IDLE + 3, took


def test_slow_headers_get_408_and_close(hostile_server):
    """Slowloris: headers trickled one line at a time (each byte resets uvicorn's keep-alive timer) -> 408 + close."""
    with connect(hostile_server.port) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        t0 = time.monotonic()
        closed = False
        data = b""
        while time.monotonic() - t0 < T_HEADERS + 4:
            try:
                s.sendall(b"X-Slow: a\r\n")
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            got, closed, _ = read_until_closed(s, 0.2)
            data += got
            if closed:
                break
        took = time.monotonic() - t0
    assert closed, f"connection still open after {took:.1f} s"
    assert took < T_HEADERS + 3, took
    if data:  # the 408 may be lost if the client's next write raced the close
        status, body = status_and_json(data)
        assert status == 408 and body["error"] == "header_timeout", data


def test_slow_body_gets_408_and_close(hostile_server):
    """A body trickled in slowly: 408 body_timeout after --timeout-body, then the connection is closed."""
    with connect(hostile_server.port) as s:
        s.sendall(b"POST /v1/embed HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n")
        t0 = time.monotonic()
        data, closed = b"", False
        while time.monotonic() - t0 < T_BODY + 5 and not closed:
            try:
                s.sendall(b"[")
            except (BrokenPipeError, ConnectionResetError):
                break
            got, closed, _ = read_until_closed(s, 0.2)
            data += got
        took = time.monotonic() - t0
    status, body = status_and_json(data)
    assert status == 408 and body["error"] == "body_timeout" and f"{T_BODY:g} s" in body["detail"], data
    assert b"connection: close" in data.lower()
    assert took < T_BODY + 4, took


def test_over_limit_bodies_get_413_and_close(hostile_server):
    """Over --max-body-mb with Content-Length (refused before reading) and chunked (refused while streaming): 413 +
    closed."""
    limit = MAX_BODY_MB * 1024 * 1024
    chunk = b"x" * 65536
    # chunked: the server refuses at the limit and closes, although the client is still sending
    with connect(hostile_server.port) as s:
        s.sendall(b"POST /v1/embed HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        sent = 0
        try:
            while sent <= limit + len(chunk):
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        data, closed, took = read_until_closed(s, 8)
    status, body = status_and_json(data)
    assert status == 413 and body["error"] == "body_too_large", data[:300]
    assert closed and b"connection: close" in data.lower(), data[:300]
    # Content-Length over the limit: 413 before the body, and closed without waiting for it
    with connect(hostile_server.port) as s:
        s.sendall(b"POST /v1/embed HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % (limit + 1))
        s.sendall(b"x" * 1000)
        data, closed, took = read_until_closed(s, 8)
    status, body = status_and_json(data)
    assert status == 413 and f"{limit + 1:,} bytes" in body["detail"] and closed, data[:300]
    # an ordinary client (httpx) streaming chunks sees the 413, not a connection error
    def chunks():
        for _ in range(limit // len(chunk) + 8):
            yield chunk
    with httpx.Client(base_url=hostile_server.url, timeout=30) as c:
        r = c.post("/v1/embed", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"] == "body_too_large"
        assert r.headers["connection"] == "close"
        assert c.get("/healthz").status_code == 200


def test_oversized_headers_are_refused(hostile_server):
    """Headers still incomplete past h11's 16 KiB limit: 400 and closed (no waiting for more)."""
    with connect(hostile_server.port) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 40_000)
        data, closed, _ = read_until_closed(s, 5)
    assert data.startswith(b"HTTP/1.1 400") and closed, data[:200]


def test_complete_oversized_headers_are_refused_too(hostile_server):
    """A complete head over 16 KiB that arrives in one read, which h11 parses whole: 400 headers_too_large, closed;
    one just under the limit is served."""
    for size, refused in ((40_000, True), (200_000, True), (15_000, False)):
        with connect(hostile_server.port) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * size + b"\r\n\r\n")
            data, closed, _ = read_until_closed(s, 5)
        if not refused:
            assert data.startswith(b"HTTP/1.1 200"), (size, data[:200])
            continue
        assert data.startswith(b"HTTP/1.1 400") and closed, (size, data[:200])
        if b"application/json" in data.partition(b"\r\n\r\n")[0]:  # not h11's own text refusal of a partial head
            status, body = status_and_json(data)
            assert body["error"] == "headers_too_large" and "over the limit of 16,384" in body["detail"], body


def test_costly_json_is_parsed_off_the_event_loop(hostile_server):
    """A JSON body that takes json.loads longer than --decode-timeout: 422 decode_timeout; /healthz answers
    meanwhile."""
    body = costly_json()
    latencies: list[float] = []
    done = threading.Event()

    def probe():
        with httpx.Client(base_url=hostile_server.url, timeout=10) as c:
            while not done.is_set():
                t0 = time.perf_counter()
                assert c.get("/healthz").status_code == 200
                latencies.append(time.perf_counter() - t0)
                time.sleep(0.01)

    th = threading.Thread(target=probe)
    th.start()
    try:
        with httpx.Client(base_url=hostile_server.url, timeout=60) as c:
            r = c.post("/v1/embed", content=body, headers={"content-type": "application/json"})
    finally:
        done.set()
        th.join(15)
    assert r.status_code == 422 and r.json()["error"] == "decode_timeout", r.text[:300]
    assert "JSON body" in r.json()["detail"] and f"{T_DECODE:g} s" in r.json()["detail"]
    assert len(latencies) >= 3, latencies
    assert max(latencies) < 1.0, max(latencies)


# --------------------------------------------------------------------------- decoding


def test_decode_timeout_kills_worker_and_server_keeps_serving(hostile_server, artifacts):  # noqa: F811 (pytest fixture)
    """Two slow-decoding uploads at once: each 422 decode_timeout naming the limit, workers replaced; normal searches
    answer."""
    hostile = slow_png()
    good = _sample(artifacts, 1)[0]

    async def go():
        async with httpx.AsyncClient(base_url=hostile_server.url, timeout=60) as c:
            bad = [c.post("/v1/embed", files=[("file", (f"slow{i}.png", hostile, "image/png"))]) for i in range(2)]
            normal = [c.post("/v1/search", files=_files([good], "file"), data={"k": "3"}) for _ in range(6)]
            return await asyncio.gather(*bad, *normal)

    with httpx.Client(base_url=hostile_server.url, timeout=30) as c:
        before = parse_exposition(c.get("/metrics").text)
    results = asyncio.run(go())
    for r in results[:2]:
        assert r.status_code == 422 and r.json()["error"] == "decode_timeout", r.text
        assert f"limit of {T_DECODE:g} s" in r.json()["detail"] and "slow" in r.json()["detail"]
    for r in results[2:]:
        assert r.status_code == 200 and r.json()["hits"][0]["id"] == "circle/000.png", r.text
    with httpx.Client(base_url=hostile_server.url, timeout=30) as c:
        assert c.post("/v1/search", files=_files([good], "file")).status_code == 200
        assert c.get("/readyz").status_code == 200
        after = parse_exposition(c.get("/metrics").text)
    key = ("isfe_decode_worker_restarts_total", frozenset({("reason", "timeout")}))
    assert after.get(key, 0) - before.get(key, 0) == 2
    err = ("isfe_image_errors_total", frozenset({("reason", "decode_timeout")}))
    assert after[err] - before.get(err, 0) == 2


def test_decode_pool_timeout_crash_and_results_equal_in_process():
    """The pool's answers equal decode_image in-process; a timeout or a killed worker is a 4xx and the pool recovers."""
    rng = np.random.default_rng(0)
    images = []
    for i in range(5):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)).save(buf, "PNG")
        images.append(buf.getvalue())
    hostile = slow_png()
    restarts: list[str] = []

    async def go(pool: DecodePool):
        got = await asyncio.gather(*(pool.decode(Upload(f"{i}.png", b)) for i, b in enumerate(images)))
        for i, (b, x) in enumerate(zip(images, got)):
            np.testing.assert_array_equal(x, decode_image(Upload(f"{i}.png", b), SPEC, 50_000_000))
        with pytest.raises(ApiError) as ei:
            await pool.decode(Upload("slow.png", hostile))
        assert ei.value.status == 422 and ei.value.code == "decode_timeout"
        with pytest.raises(ApiError) as ei:
            await pool.decode(Upload("notes.txt", b"not an image"))
        assert ei.value.status == 415  # the worker's ApiError travels back unchanged
        # a worker that dies mid-job (as if the OS killed it): 422 decode_failed, then the pool carries on
        task = asyncio.ensure_future(pool.decode(Upload("victim.png", hostile)))
        busy: list = []
        for _ in range(200):  # until a worker has taken the job
            await asyncio.sleep(0.01)
            busy = [w for w in pool._all if w not in list(pool._idle.queue)]
            if busy:
                break
        assert len(busy) == 1
        os.kill(busy[0].process.pid, signal.SIGKILL)
        with pytest.raises(ApiError) as ei:
            await task
        assert ei.value.status == 422 and ei.value.code == "decode_failed" and "signal 9" in ei.value.detail
        again = await pool.decode(Upload("0.png", images[0]))
        np.testing.assert_array_equal(again, got[0])
        js = await pool.parse_json(
            json.dumps({"image": base64.b64encode(images[1]).decode(), "k": [[1]] * 50}).encode(), 4)
        return js

    pool = DecodePool(SPEC, 50_000_000, workers=2, time_limit_s=0.2, on_restart=restarts.append).start()
    try:
        uploads, fields = asyncio.run(go(pool))
    finally:
        pool.stop()
    assert uploads[0].data == images[1] and uploads[0].name == "image"
    assert len(repr(fields["k"])) < 100  # a large field comes back as its bounded repr, not the whole value
    # ("demoted": an ordinary decode that took over DEMOTE_AFTER_S on a busy machine was retired afterwards)
    assert [r for r in restarts if r != "demoted"] == ["timeout", "crash"]
    assert all(not w.process.is_alive() for w in pool._all) and not pool.alive


# --------------------------------------------------------------------------- labels, hosts, CORS, docs


def test_random_methods_do_not_grow_metrics(hostile_server):
    rng = np.random.default_rng(7)
    letters = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))

    def blast(n: int) -> None:
        with connect(hostile_server.port) as s:
            for _ in range(n):
                method = "".join(rng.choice(letters, 12))
                s.sendall(f"{method} /x{rng.integers(1e9)} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
                data = b""
                while b"\r\n\r\n" not in data or not data.endswith(b"}"):
                    data += s.recv(65536)
                assert data.startswith(b"HTTP/1.1 4"), data[:100]

    with httpx.Client(base_url=hostile_server.url, timeout=30) as c:
        blast(50)
        size1 = len(c.get("/metrics").text)
        blast(150)
        text = c.get("/metrics").text
    assert abs(len(text) - size1) < 200, (size1, len(text))  # only counter digits changed
    assert 'method="other"' in text and 'endpoint="other"' in text
    assert not re.search(r'method="[A-Z]{12}"', text)
    assert method_label("GET") == "GET" and method_label("BREW") == "other"


def test_host_header_checks_on_loopback(hostile_server):
    """Bound to 127.0.0.1 without --allowed-hosts: only loopback names are answered (against DNS rebinding)."""
    port = hostile_server.port
    with httpx.Client(base_url=hostile_server.url, timeout=10) as c:
        for host in ("localhost", f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST."):
            assert c.get("/healthz", headers={"host": host}).status_code == 200, host
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.nip.io", "localhost.evil.example"):
            r = c.get("/healthz", headers={"host": host})
            assert r.status_code == 421 and r.json()["error"] == "host_not_allowed", (host, r.text)
            assert "--allowed-hosts" in r.json()["detail"]
        r = c.post("/v1/search", headers={"host": "evil.example"}, json={"image": "aGVsbG8="})
        assert r.status_code == 421
        for host in ("a:b", "[::1", "x y"):
            r = c.get("/healthz", headers={"host": host})
            assert r.status_code == 400 and r.json()["error"] == "bad_host", (host, r.text)
    with connect(port) as s:  # two Host headers
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\n\r\n")
        data, _, _ = read_until_closed(s, 3)
    assert data.startswith(b"HTTP/1.1 400"), data[:100]


def test_cors_is_off_by_default(hostile_server):
    origin = {"origin": "http://evil.example"}
    with httpx.Client(base_url=hostile_server.url, timeout=10) as c:
        pre = c.options("/v1/search", headers={**origin, "access-control-request-method": "POST"})
        get = c.get("/healthz", headers=origin)
    assert "access-control-allow-origin" not in pre.headers and pre.status_code >= 400, (pre.status_code, pre.headers)
    assert get.status_code == 200 and "access-control-allow-origin" not in get.headers


def test_allowed_hosts_and_cors_origin_flags(artifacts):  # noqa: F811 (pytest fixture)
    srv = start_server(artifacts["model"], artifacts["gallery"], artifacts["root"] / "hosts.log",
                       "--allowed-hosts", "api.example.com,*.corp.example,127.0.0.1", "--cors-origin",
                       "http://app.example")
    try:
        with httpx.Client(base_url=srv.url, timeout=10) as c:
            for host, status in (("api.example.com", 200), ("API.example.com:443", 200), ("x.corp.example", 200),
                                 ("corp.example", 200), ("localhost", 421), ("example.com", 421)):
                assert c.get("/healthz", headers={"host": host}).status_code == status, host
            h = {"host": "api.example.com"}
            pre = c.options("/v1/search", headers={**h, "origin": "http://app.example",
                                                   "access-control-request-method": "POST"})
            assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://app.example"
            get = c.get("/healthz", headers={**h, "origin": "http://app.example"})
            assert get.headers["access-control-allow-origin"] == "http://app.example"
            other = c.get("/healthz", headers={**h, "origin": "http://evil.example"})
            assert "access-control-allow-origin" not in other.headers
    finally:
        stop_server(srv)
    assert "Traceback" not in srv.log.read_text(errors="replace"), srv.log_tail()


def test_docs_page_is_self_contained(hostile_server):
    with httpx.Client(base_url=hostile_server.url, timeout=10) as c:
        r = c.get("/docs")
        schema = c.get("/openapi.json").json()
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in r.headers["content-security-policy"]
    page = r.text
    assert "<script" not in page.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page, re.I), "the page references another host"
    for path in schema["paths"]:
        assert path in page
    assert {"/v1/search", "/v1/embed", "/healthz"} <= set(schema["paths"])
    hostile = render_docs({"info": {"title": "<script>x</script>"},
                           "paths": {"/a": {"get": {"description": '"><img src=//evil>'}}}})
    assert "<script>" not in hostile and "<img" not in hostile


# --------------------------------------------------------------------------- pure helpers


def test_host_of_and_policy():
    assert host_of("Example.COM:8000") == "example.com"
    assert host_of("[::1]:8000") == "::1" and host_of("[::1]") == "::1"
    assert host_of("localhost.") == "localhost"
    for bad in ("", ":80", "a:b", "[::1", "[::1]x", "a b", "a/b", "u@h"):
        assert host_of(bad) is None, bad
    p = HostPolicy(["localhost", "127.0.0.1", "[::1]", "*.example.com"])
    for ok in ("localhost:1", "127.0.0.1", "[::1]:9", "a.example.com", "example.com"):
        p.check([(b"host", ok.encode())])
    for bad, status in (("evil.com", 421), ("badexample.com", 421), ("a:b", 400)):
        with pytest.raises(ApiError) as ei:
            p.check([(b"host", bad.encode())])
        assert ei.value.status == status, bad
    with pytest.raises(ApiError):
        p.check([])
    HostPolicy(None).check([])  # any host, even none
    HostPolicy(["*"]).check([(b"host", b"whatever")])


def test_replay_hands_out_the_body_in_pieces():
    body = bytes(np.random.default_rng(1).integers(0, 256, 3 * REPLAY_CHUNK + 17, dtype=np.uint8))

    async def go():
        async def receive():
            return {"type": "http.disconnect"}

        replay = _replay(body, receive)
        pieces = []
        while True:
            m = await replay()
            pieces.append(m["body"])
            if not m["more_body"]:
                break
        return pieces, await replay()

    pieces, after = asyncio.run(go())
    assert b"".join(pieces) == body and max(map(len, pieces)) == REPLAY_CHUNK and len(pieces) == 4
    assert after == {"type": "http.disconnect"}
    empty, _ = asyncio.run(_collect_empty())
    assert empty == [b""]


async def _collect_empty():
    async def receive():
        return {"type": "http.disconnect"}

    replay = _replay(b"", receive)
    m = await replay()
    return [m["body"]], m["more_body"]


def test_client_flags_are_validated(capsys):
    from serving.__main__ import build_parser, config_from_args

    parser = build_parser()
    base = ["--model", "m.onnx", "--gallery", "g"]
    cfg = config_from_args(parser.parse_args(base))
    assert cfg.allowed_hosts == ["localhost", "127.0.0.1", "::1"] and cfg.cors_origins is None
    assert config_from_args(parser.parse_args(base + ["--host", "0.0.0.0"])).allowed_hosts == ["*"]
    assert (config_from_args(parser.parse_args(base + ["--host", "::1"])).allowed_hosts
            == ["localhost", "127.0.0.1", "::1"])
    cfg = config_from_args(parser.parse_args(base + ["--decode-threads", "3", "--cors-origin", "https://a.example",
                                                     "--cors-origin", "http://b.example:8080,https://c.example/"]))
    assert cfg.decode_workers == 3 and cfg.cors_origins == [
        "https://a.example", "http://b.example:8080", "https://c.example"]
    for bad, needle in ((["--timeout-headers", "0"], "seconds > 0"), (["--timeout-body", "inf"], "finite"),
                        (["--decode-timeout", "x"], "seconds"), (["--decode-memory-mb", "-1"], ">= 0"),
                        (["--allowed-hosts", "a b"], "not a host name"), (["--allowed-hosts", ","], "at least one"),
                        (["--cors-origin", "app.example"], "not an origin"),
                        (["--cors-origin", "ftp://x"], "not an origin")):
        with pytest.raises(SystemExit) as ei:
            parser.parse_args(base + bad)
        assert ei.value.code == 2
        err = capsys.readouterr().err
        assert needle in err and bad[0] in err, (bad, err)


def test_decode_pool_memory_limit_is_a_413_and_the_worker_survives():
    """With 64 MiB per decode a 49 MP decode (147 MB of pixels alone) fails with MemoryError -> 413, on any machine:
    the limit counts from the worker's own footprint, not from zero."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, "PNG")
    small = buf.getvalue()
    restarts: list[str] = []
    pool = DecodePool(SPEC, 50_000_000, workers=1, time_limit_s=30, memory_mb=64, on_restart=restarts.append).start()
    try:
        async def go():
            with pytest.raises(ApiError) as ei:
                await pool.decode(Upload("big.png", slow_png()))
            assert ei.value.status == 413 and "memory" in ei.value.detail and "big.png" in ei.value.detail
            return await pool.decode(Upload("small.png", small))

        x = asyncio.run(go())
        assert set(restarts) <= {"demoted"}, restarts  # refused inside the worker: no timeout, no crash
    finally:
        pool.stop()
    np.testing.assert_array_equal(x, decode_image(Upload("small.png", small), SPEC, 50_000_000))


def test_upload_structure_is_checked_before_the_header_probe():
    """The server's header probe (Image.open) would decode an icon's embedded image and walk every
    PNG/JPEG block: the shared structure check runs first and maps its kinds to 4xx statuses."""
    from tests import test_hostile_decode as hostile  # the generated hostile files of the decoder tests

    spec = SPEC
    big_png = hostile._encode(Image.new("RGB", (1200, 1000)), "PNG")
    scans, _ = hostile._many_scans(2000, 1000)
    cases = [(hostile._ico([big_png], [16]), 1_000_000, 413, "image_too_large"),
             (scans, 50_000_000, 422, "image_too_complex")]
    for data, max_pixels, status, code in cases:
        t0 = time.monotonic()
        with pytest.raises(ApiError) as e:
            decode_image(Upload("upload", data), spec, max_pixels)
        assert (e.value.status, e.value.code) == (status, code), e.value
        assert time.monotonic() - t0 < 1.0  # refused from the structure, nothing decoded
    ok = decode_image(Upload("ok.png", hostile._encode(Image.new("RGB", (20, 20), (1, 2, 3)), "PNG")), spec, 1_000_000)
    assert ok.shape == (3, 16, 16)


def _encoded(size: tuple[int, int], fmt: str, **kw) -> bytes:
    rng = np.random.default_rng(size[0] * 7 + size[1])
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, fmt, **kw)
    return buf.getvalue()


def test_small_uploads_decode_inline_and_equal_the_worker_decode():
    """Small PNG / sequential JPEG uploads skip the worker (bounded work); everything else still goes to a worker;
    both paths give identical arrays and identical errors (the worker path is the slow twin)."""
    inline_cases = {"png": _encoded((40, 30), "PNG"), "jpeg": _encoded((256, 256), "JPEG", quality=90),
                    "png-interlaced": _encoded((64, 64), "PNG", optimize=False)}
    worker_cases = {"progressive": _encoded((64, 64), "JPEG", progressive=True),
                    "too-many-pixels": _encoded((300, 300), "PNG", compress_level=9),
                    "too-many-bytes": _encoded((250, 250), "PNG", compress_level=0),
                    "gif": _encoded((32, 32), "GIF"), "bmp": _encoded((32, 32), "BMP")}
    assert len(worker_cases["too-many-bytes"]) > 64 * 1024
    bad = {"truncated": inline_cases["png"][:200], "empty": b"", "text": b"hello, not an image"}
    fast = DecodePool(SPEC, 50_000_000, workers=1).start()
    slow = DecodePool(SPEC, 50_000_000, workers=1, inline=False).start()
    try:
        async def go(pool, cases):
            out = {}
            for k, v in cases.items():
                try:
                    out[k] = await pool.decode(Upload(f"{k}.img", v))
                except ApiError as e:
                    out[k] = (e.status, e.code, e.detail)
            return out

        # a bad upload fails on whichever path its header sends it to (the truncated PNG: inline)
        for cases, inlined in ((inline_cases, len(inline_cases)), (worker_cases, 0), (bad, None)):
            before = fast.inline_decodes
            a, b = asyncio.run(go(fast, cases)), asyncio.run(go(slow, cases))
            assert inlined is None or fast.inline_decodes - before == inlined, cases.keys()
            for k in cases:
                if isinstance(a[k], tuple):
                    assert a[k] == b[k] and 400 <= a[k][0] < 500, (k, a[k], b[k])
                else:
                    np.testing.assert_array_equal(a[k], b[k])
                    np.testing.assert_array_equal(a[k], decode_image(Upload("x", cases[k]), SPEC, 50_000_000))
        assert slow.inline_decodes == 0
    finally:
        fast.stop()
        slow.stop()


def test_a_jpeg_of_many_sequential_scans_is_not_decoded_inline():
    """FF DA counts every scan (entropy-coded data never holds FF DA): more than 4 -> the worker, time-limited."""
    from serving.decoding import decodes_inline, read_header

    jpeg = _encoded((32, 32), "JPEG")
    sos = jpeg.index(b"\xff\xda")
    many = jpeg[:sos] + jpeg[sos:-2] * 6 + b"\xff\xd9"  # the one scan repeated: 6 SOS markers
    for data, want in ((jpeg, True), (many, False)):
        up = Upload("x.jpg", data)
        assert decodes_inline(up, read_header(up, 50_000_000)) is want


class _RecordingTransport:
    """An asyncio transport that records every write and, in order, every call (for driving an HTTP protocol
    without sockets)."""

    def __init__(self):
        self.writes: list[bytes] = []
        self.events: list[str] = []  # "write", "eof", "close", "abort", in call order
        self.closing = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        self.events.append("write")

    def write_eof(self) -> None:
        self.events.append("eof")

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        self.events.append("close")
        self.closing = True

    def abort(self) -> None:
        self.events.append("abort")
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default=None):
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def set_write_buffer_limits(self, *args, **kwargs) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _asgi_app(scope, receive, send):
    """Answers /stream in three body pieces, /fail by failing after the head, anything else with one body."""
    if scope["type"] != "http":
        return
    await receive()
    length = [] if scope["path"] == "/stream" else [(b"content-length", b"1000")]
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain"), *length]})
    if scope["path"] == "/fail":
        raise RuntimeError("the app failed after sending its head")
    if scope["path"] == "/stream":
        for piece in (b"one,", b"two,", b"three"):
            await send({"type": "http.response.body", "body": piece, "more_body": piece != b"three"})
        return
    await send({"type": "http.response.body", "body": b"x" * 1000})


def _drive(protocol_cls, request: bytes, **kwargs) -> _RecordingTransport:
    """Feed ``request`` to a fresh connection of ``protocol_cls`` and run the loop until it has answered."""
    import uvicorn
    from uvicorn.server import ServerState

    async def go() -> _RecordingTransport:
        config = uvicorn.Config(_asgi_app, lifespan="off", log_level="critical", date_header=False,
                                server_header=False)
        config.load()
        proto = protocol_cls(config=config, server_state=ServerState(), app_state={}, **kwargs)
        transport = _RecordingTransport()
        proto.connection_made(transport)
        proto.data_received(request)
        for _ in range(50):
            await asyncio.sleep(0)
        proto.connection_lost(None)
        return transport

    return asyncio.run(go())


@pytest.mark.parametrize("path,method", [("/one", "GET"), ("/one", "HEAD"), ("/stream", "GET"),
                                         ("/one?close", "GET"), ("/fail", "GET")])
def test_a_response_head_goes_out_with_its_body_and_the_bytes_are_unchanged(path, method):
    """GuardedH11Protocol sends a response's head and first body piece in one write; the bytes on the wire
    equal stock uvicorn's (its separate writes joined), for one body, HEAD, a streamed body, Connection: close
    and an app that fails after its head."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    from serving.protocol import GuardedH11Protocol

    close = "Connection: close\r\n" if "close" in path else ""
    request = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{close}\r\n".encode()
    stock = _drive(H11Protocol, request)
    ours = _drive(GuardedH11Protocol, request, timeout_headers=10.0)
    assert b"".join(ours.writes) == b"".join(stock.writes) and stock.writes[0].startswith(b"HTTP/1.1 ")
    if path == "/fail":  # uvicorn closes the connection after the app's head: the held head still goes out first
        assert ours.events == ["write", "close"] and ours.writes[0].startswith(b"HTTP/1.1 200 ")
        return
    assert len(stock.writes) >= 2  # head, then body: the writes that are joined here
    first = ours.writes[0]
    assert first.startswith(b"HTTP/1.1 200 ") and b"\r\n\r\n" in first
    if method == "GET":
        assert first.endswith(b"x" * 1000 if path != "/stream" else b"one,\r\n")  # chunked: the first chunk
    if path == "/stream":
        assert len(ours.writes) == len(stock.writes) - 1  # only the head was held; later pieces go out as sent
    if close:
        assert ours.events[-1] == "close" and "close" in stock.events


def test_a_held_response_head_is_flushed_before_close_and_eof_and_dropped_on_abort():
    """The transport proxy never loses or reorders a held head: close() and write_eof() send it first."""
    from types import SimpleNamespace

    from serving.protocol import _LingeringTransport

    for action, expected in (("close", ["write", "close"]), ("write_eof", ["write", "eof"]), ("abort", ["abort"])):
        raw = _RecordingTransport()
        cycle = SimpleNamespace(response_started=True, response_complete=False)
        proto = SimpleNamespace(cycle=cycle, close_lingering=raw.close)
        proxy = _LingeringTransport(raw, proto)  # type: ignore[arg-type]
        proxy.write(b"HEAD")
        assert raw.events == []  # held
        getattr(proxy, action)()
        assert raw.events == expected, action
        assert raw.writes == ([] if action == "abort" else [b"HEAD"]), action
