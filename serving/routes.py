"""The endpoints, registered on a FastAPI app by :func:`add_routes` (see :mod:`serving.app` for the list)."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from isfe_model.jsonsafe import json_safe

from .auth import client_is_loopback
from .docs import docs_response
from .errors import ApiError
from .inputs import parse_k, parse_request
from .metrics import CONTENT_TYPE
from .schemas import ADMIN_RELOAD_BODY, EMBED_BODY, EMBEDDINGS_BODY, SEARCH_BODY
from .state import ServerState, query_vectors

__all__ = ["add_routes"]

#: Searches over at most this many gallery rows x queries run on the event loop (microseconds); larger ones in a thread.
INLINE_SEARCH_ROWS = 4096
#: Largest body of POST /v1/admin/reload (a path).
MAX_ADMIN_BODY = 64 * 1024


def _options() -> Response:
    """OPTIONS on a probe endpoint: 204 with the methods it answers."""
    return Response(status_code=204, headers={"Allow": "GET, HEAD, OPTIONS"})


def _json_media(request: Request, example: str) -> None:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        raise ApiError(415, "unsupported_content_type",
                       f"content type {media or '(none)'!r} is not accepted; send JSON {example}")


def add_probe_routes(app: FastAPI, state: ServerState) -> None:
    """/healthz, /readyz (GET, HEAD, OPTIONS), /metrics, /docs."""

    @app.get("/docs", include_in_schema=False)
    async def docs() -> Response:
        """The API reference as one self-contained HTML page (no CDN; see serving.docs)."""
        return docs_response(app.openapi())

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers (no API key needed)."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """Readiness: model and gallery loaded and the inference worker running (no API key needed)."""
        ok = state.batcher.alive and state.pool is not None and state.pool.alive
        body: dict[str, Any] = {"ready": ok, "model": state.encoder.fingerprint, "gallery_count": len(state.gallery)}
        if not ok:
            body["reason"] = "inference worker not running"
        return JSONResponse(body, status_code=200 if ok else 503)

    # Load balancers probe with HEAD (answered as GET; uvicorn sends no body) or OPTIONS.
    # Separate routes, outside the OpenAPI schema, so that each operation id stays unique.
    @app.api_route("/healthz", methods=["HEAD", "OPTIONS"], include_in_schema=False)
    async def healthz_probe(request: Request) -> Response:
        return _options() if request.method == "OPTIONS" else JSONResponse(await healthz())

    @app.api_route("/readyz", methods=["HEAD", "OPTIONS"], include_in_schema=False)
    async def readyz_probe(request: Request) -> Response:
        return _options() if request.method == "OPTIONS" else await readyz()

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text exposition (all workers' samples with --workers N; no API key needed)."""
        return Response(await asyncio.to_thread(state.metrics.render), media_type=CONTENT_TYPE)


def _search_body(state: ServerState, k: int, names: list[str], result: Any, batch: bool) -> dict[str, Any]:
    fp = state.encoder.fingerprint
    if not batch:
        return {"model": fp, "k": k, "count": int(result.indices.shape[1]), "query": names[0],
                "hits": json_safe(result.hits(0))}
    return {"model": fp, "k": k, "queries": len(names),
            "results": [{"query": n, "count": int(result.indices.shape[1]), "hits": json_safe(result.hits(i))}
                        for i, n in enumerate(names)]}


def add_api_routes(app: FastAPI, state: ServerState) -> None:
    """/v1/info, /v1/embed, /v1/search."""

    @app.get("/v1/info")
    async def info() -> dict[str, Any]:
        """Model metadata, gallery (path, count, fingerprint, content sha256, load time), providers, batching and
        limits."""
        return state.info()

    @app.post("/v1/embed", openapi_extra=EMBED_BODY)
    async def embed(request: Request) -> JSONResponse:
        """Images (multipart ``file``/``files`` or JSON base64 ``image``/``images``) -> unit vectors."""
        parsed = await parse_request(request, state.limits, json_parser=state.parse_json)
        emb = await state.embed_uploads(parsed.uploads)
        return JSONResponse({"model": state.encoder.fingerprint, "dim": int(emb.shape[1]), "count": int(emb.shape[0]),
                             "names": [u.name for u in parsed.uploads], "embeddings": emb.astype(np.float32).tolist()})

    @app.post("/v1/search", openapi_extra=SEARCH_BODY)
    async def search(request: Request) -> JSONResponse:
        """Query image(s) or vector(s) and ``k`` -> ranked gallery hits, one list per query.

        One query (multipart ``file``, JSON ``image``, or ``embedding`` as one vector): ``hits``.
        Several (JSON ``images`` or ``embedding`` as a list of vectors): ``results``, one
        ``{"query", "count", "hits"}`` per query, in order.  Vectors are L2-normalised first.
        """
        parsed = await parse_request(request, state.limits, max_images=1, json_parser=state.parse_search_json,
                                     json_max_images=state.limits.max_images)
        k = parse_k(parsed.fields, dict(request.query_params), state.cfg.default_k, state.limits.max_k)
        gallery = state.gallery  # read once: a reload during this request does not change its gallery
        vectors = parsed.fields.get("embedding")
        if vectors is not None:
            queries = query_vectors(vectors, int(state.encoder.dim))
            batch = vectors.ndim == 2
            names = [f"embedding[{i}]" for i in range(len(queries))] if batch else ["embedding"]
        else:
            queries = await state.embed_uploads(parsed.uploads)
            batch = bool(parsed.fields.get("batch"))
            names = [u.name for u in parsed.uploads]
        if len(gallery) * len(queries) <= INLINE_SEARCH_ROWS:  # well under a millisecond: a thread hop costs more
            result = gallery.search(queries, k)
        else:
            result = await asyncio.to_thread(gallery.search, queries, k)
        return JSONResponse(_search_body(state, k, names, result, batch))


def add_openai_routes(app: FastAPI, state: ServerState) -> None:
    """POST /v1/embeddings in the OpenAI embeddings API shape."""

    @app.post("/v1/embeddings", openapi_extra=EMBEDDINGS_BODY)
    async def embeddings(request: Request) -> JSONResponse:
        """OpenAI-compatible: ``{"input": <base64 image or data: URI> | [...], "encoding_format": "float"|"base64"}``.

        Response ``{"object": "list", "data": [{"object": "embedding", "index": i, "embedding": ...}],
        "model": <served model name>, "usage": {"prompt_tokens": n, "total_tokens": n}}`` with n = number of
        images.  ``base64`` = the vector's little-endian float32 bytes, base64-encoded.  URLs are refused (400).
        """
        _json_media(request, '{"input": "<base64 image>"}')
        uploads, f = await state._pool().parse_openai(await request.body(), state.limits.max_images)
        dim = int(state.encoder.dim)
        if f["dimensions"] is not None and f["dimensions"] != dim:
            raise ApiError(400, "invalid_dimensions",
                           f"dimensions={f['dimensions']}: this model's embeddings have {dim} "
                           f"dimensions and cannot be shortened; omit dimensions or send {dim}")
        emb = (await state.embed_uploads(uploads)).astype("<f4")
        if f["encoding_format"] == "base64":
            vecs: list[Any] = [base64.b64encode(row.tobytes()).decode("ascii") for row in emb]
        else:
            vecs = emb.tolist()
        n = len(uploads)
        return JSONResponse({"object": "list", "model": state.model_name,
                             "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vecs)],
                             "usage": {"prompt_tokens": n, "total_tokens": n}})


def add_admin_routes(app: FastAPI, state: ServerState) -> None:
    """POST /v1/admin/reload."""

    @app.post("/v1/admin/reload", openapi_extra=ADMIN_RELOAD_BODY)
    async def reload(request: Request) -> JSONResponse:
        """Load and validate a gallery (default: the current path again), then swap it in; every worker follows.

        Needs the API key when keys are configured, else a client on a loopback address.  A gallery
        that fails to load is 422 ``gallery_reload_failed`` and the old one keeps serving.
        """
        if not state.keys and not client_is_loopback(request.client):
            raise ApiError(403, "admin_forbidden",
                           "without --api-key, /v1/admin/reload answers only clients on this machine "
                           "(loopback); configure an API key to reload remotely")
        raw = await request.body()
        path = None
        if raw.strip():
            _json_media(request, '{"path": "<gallery folder>"}')
            if len(raw) > MAX_ADMIN_BODY:
                raise ApiError(413, "body_too_large", f"a reload request is at most {MAX_ADMIN_BODY:,} bytes")
            try:
                doc = json.loads(raw)
            except (ValueError, RecursionError):
                raise ApiError(400, "malformed_json", 'send {"path": "<gallery folder>"} or an empty body') from None
            path = doc.get("path") if isinstance(doc, dict) else None
            if not isinstance(doc, dict) or (
                    path is not None and not (isinstance(path, str) and 0 < len(path) <= 4096)):
                raise ApiError(400, "invalid_path",
                               'send {"path": "<gallery folder>"} (a non-empty string) or an empty body')
        info = await state.reloader.reload(path)
        return JSONResponse({"reloaded": True, "gallery": info})


def add_routes(app: FastAPI, state: ServerState) -> None:
    add_probe_routes(app, state)
    add_api_routes(app, state)
    add_openai_routes(app, state)
    add_admin_routes(app, state)
