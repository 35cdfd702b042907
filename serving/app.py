"""The HTTP API (FastAPI): embed images and search a gallery, micro-batched.

Endpoints::

    GET  /healthz     process is alive                       {"status": "ok"}
    GET  /readyz      model + gallery loaded, worker running {"ready": true, ...} (503 otherwise)
                      (both also answer HEAD, as GET without a body, and OPTIONS)
    GET  /v1/info     model metadata, gallery size, execution providers, limits
    POST /v1/embed    images -> unit vectors                 {"embeddings": [[...], ...], ...}
    POST /v1/search   one image (+ k) -> ranked gallery hits {"hits": [{"rank","id","score","label","metadata"}], ...}
    GET  /metrics     Prometheus text format

Request flow: the event loop parses the body; decoding/preprocessing runs in a
thread pool; the preprocessed images go to :class:`serving.batcher.MicroBatcher`
whose worker thread runs ``Encoder.embed_arrays`` on stacked batches; the
gallery search runs in a thread too.  The event loop never does CPU-heavy work.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, AsyncIterator

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .batcher import BatcherClosed, BatcherFull, MicroBatcher
from .errors import ApiError
from .inputs import Limits, decode_image, lift_pillow_pixel_limit, parse_k, parse_request
from .metrics import CONTENT_TYPE, ServingMetrics

__all__ = ["ENDPOINTS", "ServeConfig", "ServerState", "create_app", "create_app_from_env", "load_artifacts"]

log = logging.getLogger("serving")

#: Paths that get their own metrics label; anything else is counted as "other".
ENDPOINTS = ("/healthz", "/readyz", "/v1/info", "/v1/embed", "/v1/search", "/metrics")
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
    decode_threads: int = 2
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
        self.pool: ThreadPoolExecutor | None = None

    def start(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=max(1, self.cfg.decode_threads), thread_name_prefix="isfe-decode")
        self.batcher.start()

    def stop(self) -> None:
        self.batcher.stop()
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    # ------------------------------------------------------------------ work
    async def embed_uploads(self, uploads: list[Any]) -> np.ndarray:
        """Decode (thread pool) and embed (micro-batcher) uploads -> float32 [n, D]."""
        if self.pool is None:
            raise ApiError(503, "not_ready", "server is starting or shutting down; retry")
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(
            *(loop.run_in_executor(self.pool, decode_image, u, self.spec, self.limits.max_pixels) for u in uploads),
            return_exceptions=True,
        )
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
            "limits": asdict(self.limits),
            "uptime_s": round(time.time() - self.started, 3),
            "pid": os.getpid(),
        }


def _error(status: int, code: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status)


class _ObservedApp:
    """Outermost ASGI layer: request metrics and the request-body size limit.

    A body whose Content-Length is over the limit is refused with 413 before
    it is read; a chunked body is counted while it streams and refused the
    moment it passes the limit.
    """

    def __init__(self, app: FastAPI, state: ServerState):
        self.app = app
        self.state = state

    def __getattr__(self, name: str) -> Any:  # .state, .router, ... of the FastAPI app
        return getattr(self.app, name)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        metrics = self.state.metrics
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"
        method = scope.get("method", "GET")
        status_holder = {"status": 500, "started": False}
        t0 = time.perf_counter()
        metrics.in_flight.inc()

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                status_holder["started"] = True
            await send(message)

        limit = self.state.limits.max_body_bytes
        received = 0

        async def receive_wrapper() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise ApiError(413, "body_too_large", f"request body is over the limit of {limit:,} bytes")
            return message

        try:
            length = _content_length(scope)
            if length is not None and length > limit:
                resp = _error(413, "body_too_large", f"request body is {length:,} bytes, over the limit of {limit:,}; send smaller or fewer images")
                resp.headers["Connection"] = "close"
                await resp(scope, receive, send_wrapper)
            else:
                await self.app(scope, receive_wrapper, send_wrapper)
        except ApiError as e:
            if not status_holder["started"]:
                await _error(e.status, e.code, e.detail)(scope, receive, send_wrapper)
        finally:
            metrics.in_flight.dec()
            status = str(status_holder["status"])
            metrics.requests.inc((endpoint, method, status))
            metrics.latency.observe(time.perf_counter() - t0, (endpoint,))


def _options() -> Response:
    """OPTIONS on a probe endpoint: 204 with the methods it answers."""
    return Response(status_code=204, headers={"Allow": "GET, HEAD, OPTIONS"})


def _content_length(scope: dict) -> int | None:
    for k, v in scope.get("headers", []):
        if k == b"content-length":
            try:
                return int(v)
            except ValueError:
                return None
    return None


def create_app(encoder: Any, gallery: Any, cfg: ServeConfig) -> _ObservedApp:
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
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.isfe = state

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

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """Readiness: model and gallery loaded and the inference worker running."""
        ok = state.batcher.alive and state.pool is not None
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
        parsed = await parse_request(request, state.limits)
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
        parsed = await parse_request(request, state.limits, max_images=1)
        k = parse_k(parsed.fields, dict(request.query_params), cfg.default_k, state.limits.max_k)
        emb = await state.embed_uploads(parsed.uploads)
        result = await asyncio.to_thread(gallery.search, emb[0], k)
        return JSONResponse(
            {
                "model": encoder.fingerprint,
                "k": k,
                "count": int(result.indices.shape[1]),
                "query": parsed.uploads[0].name,
                "hits": _jsonable(result.hits(0)),
            }
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text exposition."""
        return PlainTextResponse(state.metrics.render(), media_type=CONTENT_TYPE)

    return _ObservedApp(app, state)


def _jsonable(obj: Any) -> Any:
    """numpy scalars -> Python numbers, recursively."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def create_app_from_env() -> _ObservedApp:
    """App factory for uvicorn worker processes (``--workers N``): config from ``$ISFE_SERVE_CONFIG``."""
    text = os.environ.get(CONFIG_ENV)
    if not text:
        raise RuntimeError(f"${CONFIG_ENV} is not set; start the server with `python -m serving --model ... --gallery ...`")
    cfg = ServeConfig.from_json(text)
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    encoder, gallery = load_artifacts(cfg)
    return create_app(encoder, gallery, cfg)
