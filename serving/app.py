"""The HTTP API (FastAPI): embed images and search a gallery, micro-batched.

Endpoints::

    GET  /healthz     process is alive                       {"status": "ok"}
    GET  /readyz      model + gallery loaded, worker running {"ready": true, ...} (503 otherwise)
                      (both also answer HEAD, as GET without a body, and OPTIONS)
    GET  /v1/info     model metadata, gallery size, execution providers, limits
    POST /v1/embed    images -> unit vectors                 {"embeddings": [[...], ...], ...}
    POST /v1/search   one image (+ k) -> ranked gallery hits {"hits": [{"rank","id","score","label","metadata"}], ...}
    GET  /metrics     Prometheus text format
    GET  /docs        the API reference, one self-contained page (no CDN); /openapi.json the schema

Request flow: :class:`serving.guard.GuardedApp` checks the Host header, reads
the body within its size limit and deadline, and replays it to FastAPI; a JSON
body is parsed, and every image decoded and preprocessed, in the decode worker
processes of :class:`serving.decodepool.DecodePool` (time-limited, killable);
the preprocessed images go to :class:`serving.batcher.MicroBatcher` whose
worker thread runs ``Encoder.embed_arrays`` on stacked batches; the gallery
search runs in a thread too.  The event loop never does CPU-heavy work.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, AsyncIterator

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from isfe_model.jsonsafe import json_safe

from .batcher import BatcherClosed, BatcherFull, MicroBatcher
from .decodepool import DecodePool
from .docs import docs_response
from .errors import ApiError
from .guard import GuardedApp
from .inputs import Limits, lift_pillow_pixel_limit, parse_k, parse_request
from .metrics import CONTENT_TYPE, ServingMetrics

__all__ = ["ENDPOINTS", "ServeConfig", "ServerState", "create_app", "create_app_from_env", "load_artifacts"]

log = logging.getLogger("serving")

#: Paths that get their own metrics label; anything else is counted as "other".
ENDPOINTS = ("/healthz", "/readyz", "/v1/info", "/v1/embed", "/v1/search", "/metrics", "/docs", "/openapi.json")
#: Environment variable that carries the configuration to uvicorn worker processes.
CONFIG_ENV = "ISFE_SERVE_CONFIG"


@dataclass
class ServeConfig:
    """Everything ``python -m serving`` can be told (see ``serving.__main__``)."""

    model: str
    gallery: str
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 32
    max_wait_ms: float = 2.0
    max_queue: int = 1024
    max_body_bytes: int = 20 * 1024 * 1024
    max_images: int = 32
    max_pixels: int = 50_000_000
    max_k: int = 100
    default_k: int = 10
    decode_workers: int = 2
    decode_timeout_s: float = 10.0
    decode_memory_mb: int = 2048
    timeout_keep_alive: float = 5.0
    timeout_headers: float = 10.0
    timeout_body: float = 60.0
    #: Host names answered (None: any; ``python -m serving`` defaults to the loopback names on a loopback address).
    allowed_hosts: list[str] | None = None
    #: Origins allowed to call the API from a browser (CORS); none by default.
    cors_origins: list[str] | None = None
    threads: int | None = None
    providers: list[str] | None = None
    backend: str = "numpy"
    workers: int = 1
    limit_concurrency: int | None = None
    log_level: str = "info"

    @property
    def limits(self) -> Limits:
        return Limits(self.max_body_bytes, self.max_images, self.max_pixels, self.max_k)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ServeConfig":
        return cls(**json.loads(text))


def load_artifacts(cfg: ServeConfig) -> tuple[Any, Any]:
    """Load the encoder and the gallery (checks that the gallery belongs to the model).

    Raises the isfe_model errors (ModelError, MetadataError, GalleryError,
    ValueError) with their messages; ``__main__`` turns them into one line.
    """
    from isfe_model import Encoder, Gallery

    encoder = Encoder(cfg.model, providers=cfg.providers, threads=cfg.threads, max_pixels=cfg.max_pixels)
    gallery = Gallery.load(cfg.gallery, encoder=encoder, backend=cfg.backend)
    return encoder, gallery


class ServerState:
    """What the endpoints share: model, gallery, batcher, thread pool, metrics."""

    def __init__(self, encoder: Any, gallery: Any, cfg: ServeConfig):
        self.encoder = encoder
        self.gallery = gallery
        self.cfg = cfg
        self.limits = cfg.limits
        self.spec = encoder.spec
        self.started = time.time()
        self.batcher = MicroBatcher(
            encoder.embed_arrays,
            max_batch_size=cfg.max_batch_size,
            max_wait_ms=cfg.max_wait_ms,
            max_queue=cfg.max_queue,
        )
        self.metrics = ServingMetrics(queue_depth=lambda: self.batcher.queue_depth)
        self.batcher.on_batch = self.metrics.record_batch
        self.pool: DecodePool | None = None

    def start(self) -> None:
        self.pool = DecodePool(
            self.spec, self.limits.max_pixels, workers=max(1, self.cfg.decode_workers), time_limit_s=self.cfg.decode_timeout_s,
            memory_mb=self.cfg.decode_memory_mb, on_restart=lambda reason: self.metrics.decode_restarts.inc((reason,)),
        ).start()
        self.batcher.start()

    def stop(self) -> None:
        self.batcher.stop()
        if self.pool is not None:
            self.pool.stop()
            self.pool = None

    async def parse_json(self, raw: bytes, max_images: int) -> tuple[list[Any], dict[str, Any]]:
        """A JSON body parsed in a decode worker (time-limited, off the event loop)."""
        if self.pool is None:
            raise ApiError(503, "not_ready", "server is starting or shutting down; retry")
        return await self.pool.parse_json(raw, max_images)

    # ------------------------------------------------------------------ work
    async def embed_uploads(self, uploads: list[Any]) -> np.ndarray:
        """Decode (worker processes) and embed (micro-batcher) uploads -> float32 [n, D]."""
        pool = self.pool
        if pool is None:
            raise ApiError(503, "not_ready", "server is starting or shutting down; retry")
        results = await asyncio.gather(*(pool.decode(u) for u in uploads), return_exceptions=True)
        for r in results:  # report the first bad upload, in request order
            if isinstance(r, ApiError):
                self.metrics.image_errors.inc((r.code,))
                raise r
            if isinstance(r, BaseException):
                raise r
        try:
            return await self.batcher.run(results)  # type: ignore[arg-type]
        except BatcherFull as e:
            raise ApiError(503, "overloaded", f"server overloaded: {e}") from None
        except BatcherClosed as e:
            raise ApiError(503, "not_ready", f"server not accepting work: {e}") from None

    def info(self) -> dict[str, Any]:
        enc = self.encoder.info()
        g = self.gallery
        return {
            "model": enc,
            "providers": list(self.encoder.providers),
            "gallery": {
                "path": self.cfg.gallery,
                "count": len(g),
                "dim": int(g.dim),
                "fingerprint": g.fingerprint,
                "dtype": str(np.asarray(g.embeddings).dtype),
                "backend": self.cfg.backend,
                "created": g.manifest.get("created"),
            },
            "batching": {
                "max_batch_size": self.cfg.max_batch_size,
                "max_wait_ms": self.cfg.max_wait_ms,
                "max_queue": self.cfg.max_queue,
            },
            "limits": {**asdict(self.limits), "decode_timeout_s": self.cfg.decode_timeout_s,
                       "decode_memory_mb": self.cfg.decode_memory_mb, "timeout_headers_s": self.cfg.timeout_headers,
                       "timeout_body_s": self.cfg.timeout_body, "timeout_keep_alive_s": self.cfg.timeout_keep_alive},
            "decode_workers": self.cfg.decode_workers,
            "uptime_s": round(time.time() - self.started, 3),
            "pid": os.getpid(),
        }


def _error(status: int, code: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status)


def _options() -> Response:
    """OPTIONS on a probe endpoint: 204 with the methods it answers."""
    return Response(status_code=204, headers={"Allow": "GET, HEAD, OPTIONS"})


def _install_error_handlers(app: FastAPI) -> None:
    """Every error response is ``{"error": code, "detail": message}``; unexpected exceptions are 500 and logged."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.detail)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, "invalid_request", "; ".join(str(e.get("msg", e)) for e in exc.errors()) or "invalid request")

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return _error(500, "internal_error", f"internal server error ({type(exc).__name__}); see the server log")


def create_app(encoder: Any, gallery: Any, cfg: ServeConfig) -> GuardedApp:
    """The ASGI application for an already-loaded encoder and gallery."""
    # --max-pixels above Pillow's own limit (~89.5 M pixels): ours is the one that counts.
    lift_pillow_pixel_limit(cfg.max_pixels)
    state = ServerState(encoder, gallery, cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.start()
        log.info(
            "ready: model %s (%s), gallery %s (%d items), providers %s, max batch %d, max wait %.1f ms",
            cfg.model, encoder.fingerprint[:12], cfg.gallery, len(gallery), ",".join(encoder.providers),
            cfg.max_batch_size, cfg.max_wait_ms,
        )
        try:
            yield
        finally:
            state.stop()

    app = FastAPI(
        title="ISFE embedding service",
        version="1",
        description="Image embeddings (ISFE) and gallery search.",
        lifespan=lifespan,
        docs_url=None,  # FastAPI's Swagger UI loads from a CDN; /docs below is self-contained
        redoc_url=None,
    )
    app.state.isfe = state
    if cfg.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.cors_origins), allow_methods=["GET", "HEAD", "POST", "OPTIONS"],
                           allow_headers=["content-type"], max_age=600)

    _install_error_handlers(app)

    @app.get("/docs", include_in_schema=False)
    async def docs() -> Response:
        """The API reference as one self-contained HTML page (no CDN; see serving.docs)."""
        return docs_response(app.openapi())

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """Readiness: model and gallery loaded and the inference worker running."""
        ok = state.batcher.alive and state.pool is not None and state.pool.alive
        body = {
            "ready": ok,
            "model": encoder.fingerprint,
            "gallery_count": len(gallery),
        }
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

    @app.get("/v1/info")
    async def info() -> dict[str, Any]:
        """Model metadata, gallery size, execution providers, batching and limits."""
        return state.info()

    @app.post("/v1/embed")
    async def embed(request: Request) -> JSONResponse:
        """Images (multipart ``file``/``files`` or JSON base64 ``image``/``images``) -> unit vectors."""
        parsed = await parse_request(request, state.limits, json_parser=state.parse_json)
        emb = await state.embed_uploads(parsed.uploads)
        return JSONResponse(
            {
                "model": encoder.fingerprint,
                "dim": int(emb.shape[1]),
                "count": int(emb.shape[0]),
                "names": [u.name for u in parsed.uploads],
                "embeddings": emb.astype(np.float32).tolist(),
            }
        )

    @app.post("/v1/search")
    async def search(request: Request) -> JSONResponse:
        """One image (multipart ``file`` or JSON ``image``) and ``k`` -> ranked gallery hits."""
        parsed = await parse_request(request, state.limits, max_images=1, json_parser=state.parse_json)
        k = parse_k(parsed.fields, dict(request.query_params), cfg.default_k, state.limits.max_k)
        emb = await state.embed_uploads(parsed.uploads)
        result = await asyncio.to_thread(gallery.search, emb[0], k)
        return JSONResponse(
            {
                "model": encoder.fingerprint,
                "k": k,
                "count": int(result.indices.shape[1]),
                "query": parsed.uploads[0].name,
                "hits": json_safe(result.hits(0)),
            }
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text exposition."""
        return PlainTextResponse(state.metrics.render(), media_type=CONTENT_TYPE)

    return GuardedApp(app, state.metrics, ENDPOINTS, cfg.max_body_bytes, timeout_body=cfg.timeout_body,
                      allowed_hosts=cfg.allowed_hosts)


def create_app_from_env() -> GuardedApp:
    """App factory for uvicorn worker processes (``--workers N``): config from ``$ISFE_SERVE_CONFIG``."""
    text = os.environ.get(CONFIG_ENV)
    if not text:
        raise RuntimeError(f"${CONFIG_ENV} is not set; start the server with `python -m serving --model ... --gallery ...`")
    cfg = ServeConfig.from_json(text)
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    encoder, gallery = load_artifacts(cfg)
    return create_app(encoder, gallery, cfg)
