"""Serving in production: exact metrics across workers, gallery reload under load, the OpenAI
embeddings shape, search by vector and in batches, API keys, ISFE_* variables, request IDs,
JSON logs and graceful shutdown -- against real server processes on loopback."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.test_serving import (  # noqa: F401 (artifacts is a fixture)
    PY,
    REPO,
    _files,
    _run_main,
    _sample,
    artifacts,
    free_port,
    parse_exposition,
    start_server,
    stop_server,
)

KEY = "k" * 8 + "-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


@pytest.fixture(scope="module")
def galleries(artifacts):  # noqa: F811 (pytest fixture)
    """Gallery B (other ids: "b_<class>/...", 12 items) and a corrupt copy of it (embeddings changed after save)."""
    from isfe_model import Gallery

    root = artifacts["root"]
    src = root / "images_b"
    if not src.exists():
        for p in _sample(artifacts, 24)[::2]:
            dest = src / f"b_{p.parent.name}" / p.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, dest)
        Gallery.build(artifacts["encoder"], str(src)).save(root / "gallery_b")
        shutil.copytree(root / "gallery_b", root / "gallery_corrupt")
        emb = root / "gallery_corrupt" / "embeddings.npy"
        data = bytearray(emb.read_bytes())
        data[-1] ^= 0xFF
        emb.write_bytes(bytes(data))
    return {"b": str(root / "gallery_b"), "corrupt": str(root / "gallery_corrupt")}


# --------------------------------------------------------------------------- several workers


@pytest.fixture(scope="module")
def workers_server(artifacts, tmp_path_factory):  # noqa: F811 (pytest fixture)
    tmp = tmp_path_factory.mktemp("workers-tmp")
    old = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(tmp)  # the server's run folder goes here: checked for clean-up below
    try:
        srv = start_server(artifacts["model"], artifacts["gallery"], artifacts["root"] / "workers2.log",
                           "--workers", "2", "--decode-workers", "1", "--max-batch-size", "8", timeout=120)
    finally:
        os.environ.pop("TMPDIR") if old is None else os.environ.__setitem__("TMPDIR", old)
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            pids: set[int] = set()
            deadline = time.monotonic() + 90
            while len(pids) < 2 and time.monotonic() < deadline:
                with httpx.Client(base_url=srv.url, timeout=10) as fresh:  # new connection: any worker may answer
                    r = fresh.get("/v1/info")
                if r.status_code == 200:
                    pids.add(r.json()["pid"])
                else:
                    time.sleep(0.1)
            assert len(pids) == 2, srv.log_tail()
            c.get("/readyz")
        yield srv
    finally:
        stop_server(srv)
    assert srv.proc.returncode == 0, srv.log_tail()
    assert "Traceback" not in srv.log.read_text(errors="replace"), srv.log_tail()
    assert not list(tmp.glob("isfe-serve-*")), "the run folder (metrics, generation file) was not removed"


def _fresh_get(url: str, path: str) -> httpx.Response:
    with httpx.Client(base_url=url, timeout=30) as c:
        return c.get(path)


def test_workers_metrics_sum_exactly(workers_server, artifacts):  # noqa: F811 (pytest fixture)
    """--workers 2: 100 requests over several connections -> isfe_requests_total says exactly 100 on every scrape."""
    path = _sample(artifacts, 1)[0]
    files = _files([path], "file")

    async def load():
        async with httpx.AsyncClient(base_url=workers_server.url, timeout=60,
                                     limits=httpx.Limits(max_connections=8)) as ac:
            rs = await asyncio.gather(*(ac.post("/v1/embed", files=files) for _ in range(100)))
        return [r.status_code for r in rs]

    assert asyncio.run(load()) == [200] * 100
    key = ("isfe_requests_total", frozenset({("endpoint", "/v1/embed"), ("method", "POST"), ("status", "200")}))
    pids = set()
    for _ in range(5):
        m = parse_exposition(_fresh_get(workers_server.url, "/metrics").text)
        assert m[key] == 100
        assert m[("isfe_images_embedded_total", frozenset())] >= 100
        pids |= {dict(lab)["pid"] for (name, lab) in m if name == "process_resident_memory_bytes"}
    assert len(pids) == 2, pids  # the standard process metrics, one set per live worker


def test_reload_under_load_every_worker(workers_server, artifacts, galleries):  # noqa: F811 (pytest fixture)
    """16 clients search while the gallery is reloaded (new path, corrupt gallery, SIGHUP): no errors, results
    switch."""
    url = workers_server.url
    query = _sample(artifacts, 1)[0]
    body = {"image": _b64(query), "k": 3}
    seen: list[tuple[int, str]] = []
    stop = threading.Event()

    async def client():
        async with httpx.AsyncClient(base_url=url, timeout=60) as ac:
            while not stop.is_set():
                r = await ac.post("/v1/search", json=body)
                seen.append((r.status_code, r.json()["hits"][0]["id"] if r.status_code == 200 else r.text))

    def run_clients():
        async def main():
            await asyncio.gather(*(client() for _ in range(16)))
        asyncio.run(main())

    def galleries_served() -> dict[int, str]:
        out: dict[int, str] = {}
        for _ in range(40):
            info = _fresh_get(url, "/v1/info").json()
            out[info["pid"]] = info["gallery"]["path"]
            if len(out) == 2:
                break
        return out

    def metric(result: str) -> float:
        m = parse_exposition(_fresh_get(url, "/metrics").text)
        return m.get(("isfe_gallery_reload_total", frozenset({("result", result)})), 0.0)

    t = threading.Thread(target=run_clients)
    t.start()
    try:
        time.sleep(1.0)
        r = httpx.post(f"{url}/v1/admin/reload", json={"path": galleries["b"]}, timeout=60)
        assert r.status_code == 200 and r.json()["gallery"]["count"] == 12, r.text
        deadline = time.monotonic() + 20
        while set(galleries_served().values()) != {galleries["b"]} and time.monotonic() < deadline:
            time.sleep(0.1)
        assert set(galleries_served().values()) == {galleries["b"]}
        assert metric("ok") == 2  # each worker reloaded once
        time.sleep(0.5)  # requests that started on the old gallery finish on it
        n_switched = len(seen)
        bad = httpx.post(f"{url}/v1/admin/reload", json={"path": galleries["corrupt"]}, timeout=60)
        assert bad.status_code == 422 and bad.json()["error"] == "gallery_reload_failed", bad.text
        assert "still serving" in bad.json()["detail"] and galleries["b"] in bad.json()["detail"]
        assert metric("error") == 1
        workers_server.proc.send_signal(signal.SIGHUP)  # the supervisor: every worker reloads its current path
        deadline = time.monotonic() + 20
        while metric("ok") < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert metric("ok") == 4
        time.sleep(0.5)
    finally:
        stop.set()
        t.join(60)
    assert [s for s, _ in seen if s != 200] == [], [x for x in seen if x[0] != 200][:3]
    ids = [i for _, i in seen]
    assert ids[0] == "circle/000.png" and ids[-1] == "b_circle/000.png"
    assert all(i == "b_circle/000.png" for i in ids[n_switched:])  # never back to the old gallery
    assert set(galleries_served().values()) == {galleries["b"]}
    assert "reload from" in workers_server.log.read_text(errors="replace")  # the failure's log line


# --------------------------------------------------------------------------- one process, API key, JSON logs


@pytest.fixture(scope="module")
def keyed_server(artifacts, tmp_path_factory):  # noqa: F811 (pytest fixture)
    gallery = tmp_path_factory.mktemp("keyed") / "gallery"
    shutil.copytree(artifacts["gallery"], gallery)
    env_key = "e" * 20
    os.environ["ISFE_API_KEY"] = env_key + "," + "f" * 20  # overridden by --api-key below: the flag wins
    try:
        srv = start_server(artifacts["model"], str(gallery), artifacts["root"] / "keyed.log", "--api-key", KEY,
                           "--log-level", "info", "--log-format", "json", "--max-batch-size", "8",
                           "--decode-workers", "2")
    finally:
        del os.environ["ISFE_API_KEY"]
    srv.gallery = gallery  # type: ignore[attr-defined]
    try:
        yield srv
    finally:
        stop_server(srv)
    assert srv.proc.returncode == 0, srv.log_tail()
    assert "Traceback" not in srv.log.read_text(errors="replace"), srv.log_tail()


def test_api_key_required_on_v1_only(keyed_server):
    with httpx.Client(base_url=keyed_server.url, timeout=30) as c:
        for headers in ({}, {"Authorization": "Bearer wrong-key-0123456789"}, {"Authorization": KEY},
                        {"Authorization": "Bearer " + "e" * 20}):
            for method, path in (("GET", "/v1/info"), ("POST", "/v1/embed"), ("POST", "/v1/embeddings"),
                                 ("POST", "/v1/search"), ("POST", "/v1/admin/reload")):
                r = c.request(method, path, headers=headers, json={"image": "aGVsbG8="})
                assert r.status_code == 401, (headers, path, r.text)
                assert r.headers["www-authenticate"].startswith("Bearer")
                assert r.json()["error"] == "unauthorized" and "Bearer" in r.json()["detail"]
        for path in ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"):
            assert c.get(path).status_code == 200, path
        assert c.get("/v1/info", headers=AUTH).status_code == 200
        schema = c.get("/openapi.json").json()
    assert schema["paths"]["/v1/search"]["post"]["security"] == [{"bearerAuth": []}]
    assert "security" not in schema["paths"]["/healthz"]["get"]


def test_openai_client_round_trip_equals_embed(keyed_server, artifacts):  # noqa: F811 (pytest fixture)
    openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install openai)")
    paths = _sample(artifacts, 3)
    with httpx.Client(base_url=keyed_server.url, timeout=30, headers=AUTH) as c:
        ref = np.array(c.post("/v1/embed", files=_files(paths)).json()["embeddings"], dtype=np.float32)
        model_name = c.get("/v1/info").json()["model"]["model_name"]
    client = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key=KEY, max_retries=0, timeout=30)
    inputs = [_b64(p) for p in paths]
    default = client.embeddings.create(model="isfe", input=inputs)  # the client asks for base64 and decodes it
    floats = client.embeddings.create(model="isfe", input=inputs, encoding_format="float")
    one = client.embeddings.create(model="isfe", input="data:image/png;base64," + inputs[0])
    for resp in (default, floats):
        assert [d.index for d in resp.data] == [0, 1, 2]
        np.testing.assert_array_equal(np.array([d.embedding for d in resp.data], dtype=np.float32), ref)
        assert resp.usage.prompt_tokens == resp.usage.total_tokens == 3
        assert resp.model == model_name
    np.testing.assert_array_equal(np.array(one.data[0].embedding, dtype=np.float32), ref[0])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed_server.url + "/v1", api_key="x" * 20,
                      max_retries=0).embeddings.create(model="m", input=inputs)


def test_embeddings_raw_shape_and_refusals(keyed_server, artifacts):  # noqa: F811 (pytest fixture)
    paths = _sample(artifacts, 2)
    with httpx.Client(base_url=keyed_server.url, timeout=30, headers=AUTH) as c:
        ref = np.array(c.post("/v1/embed", files=_files(paths)).json()["embeddings"], dtype=np.float32)
        body = c.post("/v1/embeddings", json={"input": [_b64(p) for p in paths], "model": "x",
                                              "encoding_format": "base64"}).json()
        assert body["object"] == "list" and set(body) == {"object", "data", "model", "usage"}
        assert body["usage"] == {"prompt_tokens": 2, "total_tokens": 2}
        assert [set(d) for d in body["data"]] == [{"object", "index", "embedding"}] * 2
        vecs = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in body["data"]])
        np.testing.assert_array_equal(vecs, ref)
        floats = c.post("/v1/embeddings", json={"input": _b64(paths[0])}).json()
        np.testing.assert_array_equal(np.array(floats["data"][0]["embedding"], dtype=np.float32), ref[0])
        cases = [({"input": "https://example.com/cat.png"}, 400, "url_not_supported", "fetches nothing"),
                 ({"input": ["HTTP://x/y.png"]}, 400, "url_not_supported", "input[0] is a URL"),
                 ({"input": [[1, 2, 3]]}, 400, "bad_input", "token arrays"),
                 ({"input": _b64(paths[0]), "encoding_format": "int8"}, 400, "invalid_encoding_format", "int8"),
                 ({"input": _b64(paths[0]), "dimensions": 8}, 400, "invalid_dimensions", "32"),
                 ({"model": "x"}, 400, "missing_input", "input"),
                 ({"input": []}, 400, "missing_image", 'no image in the request: "input" is an empty list'),
                 ({"input": [_b64(paths[0])] * 33}, 413, "too_many_images", "limit")]
        for req, status, code, needle in cases:
            r = c.post("/v1/embeddings", json=req)
            assert (r.status_code, r.json()["error"]) == (status, code), (req, r.text)
            assert needle in r.json()["detail"], r.text
        assert c.post("/v1/embeddings", files=_files(paths[:1], "file")).status_code == 415


def test_vector_search_equals_image_search(keyed_server, artifacts):  # noqa: F811 (pytest fixture)
    paths = _sample(artifacts, 24)[::6]
    with httpx.Client(base_url=keyed_server.url, timeout=30, headers=AUTH) as c:
        emb = c.post("/v1/embed", json={"images": [_b64(p) for p in paths]}).json()["embeddings"]
        for p, v in zip(paths, emb):
            by_image = c.post("/v1/search", files=_files([p], "file"), data={"k": "5"}).json()
            by_vector = c.post("/v1/search", json={"embedding": v, "k": 5}).json()
            scaled = c.post("/v1/search", json={"embedding": [3.7 * x for x in v], "k": 5}).json()  # normalised first
            for got in (by_vector, scaled):
                assert got["query"] == "embedding" and got["count"] == 5
                assert [h["id"] for h in got["hits"]] == [h["id"] for h in by_image["hits"]]
                np.testing.assert_allclose([h["score"] for h in got["hits"]],
                                           [h["score"] for h in by_image["hits"]], atol=1e-5)


def test_batch_search_equals_single_searches(keyed_server, artifacts):  # noqa: F811 (pytest fixture)
    paths = _sample(artifacts, 24)[1::5]
    with httpx.Client(base_url=keyed_server.url, timeout=30, headers=AUTH) as c:
        singles = [c.post("/v1/search", json={"image": _b64(p), "k": 4}).json()["hits"] for p in paths[:4]]
        batch = c.post("/v1/search", json={"images": [_b64(p) for p in paths[:4]], "k": 4}).json()
        emb = c.post("/v1/embed", json={"images": [_b64(p) for p in paths[:4]]}).json()["embeddings"]
        vec_batch = c.post("/v1/search", json={"embedding": emb, "k": 4}).json()
        one_in_list = c.post("/v1/search", json={"images": [_b64(paths[0])], "k": 4}).json()
    assert batch["queries"] == 4 and [r["query"] for r in batch["results"]] == [f"images[{i}]" for i in range(4)]
    assert [r["query"] for r in vec_batch["results"]] == [f"embedding[{i}]" for i in range(4)]
    for res in (batch, vec_batch):
        for r, s in zip(res["results"], singles):
            assert r["count"] == 4 and [h["id"] for h in r["hits"]] == [h["id"] for h in s]
            np.testing.assert_allclose([h["score"] for h in r["hits"]], [h["score"] for h in s], atol=1e-5)
    assert one_in_list["queries"] == 1 and one_in_list["results"][0]["hits"] == singles[0]


def test_bad_vectors_are_422_naming_the_problem(keyed_server):
    good = [0.1] * 32
    cases = [
        (b'{"embedding": [1, 2, 3]}', "wrong_dimension", "3 numbers"),
        (b'{"embedding": [[' + b",".join([b"0.1"] * 32) + b"], [1, 2]]}", "invalid_embedding",
         "embedding[1] has 2 numbers"),
        (json.dumps({"embedding": [0.0] * 32}).encode(), "zero_embedding", "zero vector"),
        (json.dumps({"embedding": good[:-1] + [float("nan")]}).encode(), "non_finite_embedding", "NaN"),
        (("{\"embedding\": [[%s], [%s, Infinity]]}" % (",".join(["1"] * 32), ",".join(["1"] * 31))).encode(),
         "non_finite_embedding", "embedding[1] contains"),
        (b'{"embedding": "abc"}', "invalid_embedding", "list of numbers"),
        (b'{"embedding": [true, 1]}', "invalid_embedding", "list of numbers"),
        (b'{"embedding": []}', "invalid_embedding", "list of numbers"),
    ]
    with httpx.Client(base_url=keyed_server.url, timeout=30, headers=AUTH) as c:
        for raw, code, needle in cases:
            r = c.post("/v1/search", content=raw, headers={"content-type": "application/json"})
            assert r.status_code == 422 and r.json()["error"] == code, (raw[:60], r.text)
            assert needle in r.json()["detail"], r.text
        r = c.post("/v1/search", json={"embedding": good, "image": "aGVsbG8="})
        assert r.status_code == 400 and r.json()["error"] == "ambiguous_query"
        # no overflow: normalised by the largest component
        huge = c.post("/v1/search", json={"embedding": [1e300] * 32, "k": 2})
        tiny = c.post("/v1/search", json={"embedding": [1e-300] * 32, "k": 2})
        assert huge.status_code == tiny.status_code == 200 and huge.json()["hits"] == tiny.json()["hits"]
        r = c.post("/v1/search", json={"embedding": [good] * 33})
        assert r.status_code == 413 and r.json()["error"] == "too_many_queries"


def test_openapi_shows_every_request_body(keyed_server):
    with httpx.Client(base_url=keyed_server.url, timeout=30) as c:
        schema = c.get("/openapi.json").json()
        page = c.get("/docs").text
    posts = {p: item["post"] for p, item in schema["paths"].items() if "post" in item}
    assert set(posts) == {"/v1/embed", "/v1/embeddings", "/v1/search", "/v1/admin/reload"}
    for path, op in posts.items():
        content = op["requestBody"]["content"]
        assert "application/json" in content and content["application/json"]["schema"]["properties"], path
    assert "multipart/form-data" in posts["/v1/search"]["requestBody"]["content"]
    for field in ("embedding", "encoding_format", "input", "images", "path"):
        assert f"<code>{field}</code>" in page, field


def test_request_ids_and_json_access_log(keyed_server):
    with httpx.Client(base_url=keyed_server.url, timeout=30) as c:
        kept = c.get("/healthz", headers={"X-Request-ID": "client-id-42"})
        long = c.get("/healthz", headers={"X-Request-ID": "x" * 200})
        spaced = c.get("/healthz", headers={"X-Request-ID": "a b"})
        refused = c.get("/v1/info", headers={"X-Request-ID": "denied-1"})
        plain = c.get("/readyz")
    assert kept.headers["x-request-id"] == "client-id-42"
    for r in (long, spaced, plain):
        assert len(r.headers["x-request-id"]) == 32 and r.headers["x-request-id"] != "x" * 200
    assert refused.status_code == 401 and refused.headers["x-request-id"] == "denied-1"
    time.sleep(0.3)
    records = [json.loads(line) for line in keyed_server.log.read_text().splitlines() if line.startswith("{")]
    access = {r.get("request_id"): r for r in records if r["logger"] == "serving.access"}
    assert access["client-id-42"]["path"] == "/healthz" and access["client-id-42"]["status"] == 200
    assert access["denied-1"]["status"] == 401 and access[plain.headers["x-request-id"]]["method"] == "GET"
    assert any(r["logger"].startswith("uvicorn") for r in records)  # uvicorn's own lines are JSON too
    assert all({"ts", "level", "logger", "msg", "pid"} <= set(r) for r in records)


def test_sighup_reloads_a_replaced_gallery(keyed_server, artifacts, galleries):  # noqa: F811 (pytest fixture)
    """One process: the gallery folder is replaced in place (isfe-index --overwrite), then SIGHUP."""
    from isfe_model import Gallery

    with httpx.Client(base_url=keyed_server.url, timeout=30, headers=AUTH) as c:
        before = c.get("/v1/info").json()["gallery"]
        assert before["count"] == 24 and before["loaded_at"] and len(before["content_sha256"]) == 64
        Gallery.load(galleries["b"]).save(keyed_server.gallery, overwrite=True)
        keyed_server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while c.get("/v1/info").json()["gallery"]["count"] != 12 and time.monotonic() < deadline:
            time.sleep(0.1)
        after = c.get("/v1/info").json()["gallery"]
        assert after["count"] == 12 and after["content_sha256"] != before["content_sha256"]
        assert after["loaded_at"] > before["loaded_at"] and after["fingerprint"] == before["fingerprint"]
        # the admin endpoint: a corrupt gallery is refused, the current one keeps serving
        r = c.post("/v1/admin/reload", json={"path": galleries["corrupt"]})
        assert r.status_code == 422 and r.json()["error"] == "gallery_reload_failed", r.text
        assert "damaged" in r.json()["detail"] and "still serving" in r.json()["detail"], r.text
        assert c.get("/v1/info").json()["gallery"]["content_sha256"] == after["content_sha256"]
        r = c.post("/v1/admin/reload", json={"path": str(artifacts["root"] / "foreign")})
        assert r.status_code == 422 and "another model" in r.json()["detail"]
        r = c.post("/v1/admin/reload", json={"path": artifacts["gallery"]})
        assert r.status_code == 200 and r.json()["gallery"]["count"] == 24
        for bad in (b"[1]", b'{"path": 3}', b"{nope"):
            r = c.post("/v1/admin/reload", content=bad, headers={"content-type": "application/json"})
            assert r.status_code == 400, r.text


def test_admin_reload_is_loopback_only_without_keys(artifacts):  # noqa: F811 (pytest fixture)
    from serving.app import ServeConfig, create_app

    app = create_app(artifacts["encoder"], artifacts["gallery_obj"],
                     ServeConfig(model=artifacts["model"], gallery=artifacts["gallery"]))

    async def go():
        transport = httpx.ASGITransport(app=app, client=("203.0.113.9", 5000))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await c.post("/v1/admin/reload")

    r = asyncio.run(go())
    assert r.status_code == 403 and r.json()["error"] == "admin_forbidden"


# --------------------------------------------------------------------------- flags, environment, shutdown


def test_env_vars_configure_every_flag(artifacts, tmp_path, monkeypatch):  # noqa: F811 (pytest fixture)
    from serving.__main__ import _parse, config_from_args

    keyfile = tmp_path / "keys"
    keyfile.write_text("# keys\n" + "a" * 16 + "\n\n" + "b" * 24 + "\n")
    monkeypatch.setenv("ISFE_MODEL", "m.onnx")
    monkeypatch.setenv("ISFE_GALLERY", "g")
    monkeypatch.setenv("ISFE_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("ISFE_API_KEY", "c" * 16 + ", " + "d" * 16)
    monkeypatch.setenv("ISFE_API_KEY_FILE", str(keyfile))
    monkeypatch.setenv("ISFE_LOG_FORMAT", "json")
    monkeypatch.setenv("ISFE_CORS_ORIGIN", "https://a.example,https://b.example")
    cfg = config_from_args(_parse([]))
    assert (cfg.model, cfg.gallery, cfg.max_batch_size, cfg.log_format) == ("m.onnx", "g", 16, "json")
    assert cfg.api_keys == ["c" * 16, "d" * 16, "a" * 16, "b" * 24]
    assert cfg.cors_origins == ["https://a.example", "https://b.example"]
    cfg = config_from_args(_parse(["--max-batch-size", "4", "--api-key", "e" * 16,
                                   "--cors-origin", "https://c.example"]))
    assert cfg.max_batch_size == 4 and cfg.api_keys[0] == "e" * 16 and "c" * 16 not in cfg.api_keys  # the flag wins
    assert cfg.cors_origins == ["https://c.example"]
    for var, value, needle in (("ISFE_PORT", "80a", "ISFE_PORT='80a'"),
                               ("ISFE_MAX_BATCH_SIZE", "0", "ISFE_MAX_BATCH_SIZE"),
                               ("ISFE_LOG_LEVEL", "loud", "must be one of"), ("ISFE_API_KEY", "short", "16-512"),
                               ("ISFE_API_KEY_FILE", str(tmp_path / "none"), "cannot read API key file"),
                               ("ISFE_SHUTDOWN_TIMEOUT", "", "empty")):
        monkeypatch.setenv(var, value)
        code, err = _run_main([])
        monkeypatch.delenv(var)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("serving: error: ") and needle in lines[0], (
            var, err)


def test_sigterm_finishes_the_request_in_flight(artifacts):  # noqa: F811 (pytest fixture)
    """SIGTERM while a request waits in the batcher (--max-wait-ms 1500): it gets its 200, then the server exits 0."""
    srv = start_server(artifacts["model"], artifacts["gallery"], artifacts["root"] / "sigterm.log",
                       "--max-batch-size", "8", "--max-wait-ms", "1500", "--decode-workers", "1",
                       "--shutdown-timeout", "20")
    path = _sample(artifacts, 1)[0]
    out: dict = {}

    def request():
        out["r"] = httpx.post(f"{srv.url}/v1/embed", files=_files([path], "file"), timeout=30)

    try:
        t = threading.Thread(target=request)
        t.start()
        time.sleep(0.6)
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.TransportError):  # no longer accepting
            httpx.get(f"{srv.url}/healthz", timeout=2)
        t.join(30)
        code = srv.proc.wait(30)
    finally:
        stop_server(srv)
    assert out["r"].status_code == 200 and out["r"].json()["count"] == 1, out["r"].text
    assert code == 0, srv.log_tail()
    assert time.monotonic() - t0 < 15
    assert "Traceback" not in srv.log.read_text(errors="replace"), srv.log_tail()


def test_real_process_bad_env_is_one_line(artifacts):  # noqa: F811 (pytest fixture)
    env = {**os.environ, "ISFE_WORKERS": "two"}
    p = subprocess.run([PY, "-m", "serving", "--model", artifacts["model"], "--gallery", artifacts["gallery"],
                        "--port", str(free_port())], cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "ISFE_WORKERS" in p.stderr, p.stderr
