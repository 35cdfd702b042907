"""The HTTP API (FastAPI): embed images and search a gallery, micro-batched.

Endpoints::

    GET  /healthz          process is alive                       {"status": "ok"}
    GET  /readyz           model + gallery loaded, worker running {"ready": true, ...} (503 otherwise)
                           (both also answer HEAD, as GET without a body, and OPTIONS)
    GET  /v1/info          model metadata, gallery (fingerprint, count, load time), providers, limits
    POST /v1/embed         images -> unit vectors                 {"embeddings": [[...], ...], ...}
    POST /v1/embeddings    the same in the OpenAI embeddings shape {"object": "list", "data": [...], "usage": ...}
    POST /v1/search        image(s) or vector(s) (+ k) -> ranked gallery hits, one list per query
    POST /v1/admin/reload  load, validate and swap in a gallery (optional new "path"); every worker follows
    GET  /metrics          Prometheus text format (all workers)
    GET  /docs             the API reference, one self-contained page (no CDN); /openapi.json the schema

With API keys configured every ``/v1/*`` path needs ``Authorization: Bearer
<key>`` (:mod:`serving.auth`); the probes, ``/metrics`` and the docs stay open.

Request flow: :class:`serving.guard.GuardedApp` checks the Host header and the
API key, assigns the request ID, reads the body within its size limit and
deadline, and replays it to FastAPI; a JSON body is parsed, and every image
decoded and preprocessed, in the decode worker processes of
:class:`serving.decodepool.DecodePool` (time-limited, killable); the
preprocessed images go to :class:`serving.batcher.MicroBatcher` whose worker
thread runs ``Encoder.embed_arrays`` on stacked batches; the gallery search
runs in a thread too.  The event loop never does CPU-heavy work.  The
endpoints themselves are in :mod:`serving.routes`, the shared state in
:mod:`serving.state`, gallery reload in :mod:`serving.reload`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from isfe_model.preprocess import reuse_image_memory

from .errors import ApiError
from .guard import GuardedApp
from .inputs import lift_pillow_pixel_limit
from .logs import configure_logging
from .metrics import mark_worker_dead
from .reload import read_generation
from .routes import add_routes
from .schemas import BEARER_SCHEME
from .state import CONFIG_ENV, ServeConfig, ServerState, load_artifacts

__all__ = ["CONFIG_ENV", "ENDPOINTS", "ServeConfig", "ServerState", "create_app", "create_app_from_env",
           "load_artifacts"]

log = logging.getLogger("serving")

#: Paths that get their own metrics label; anything else is counted as "other".
ENDPOINTS = ("/healthz", "/readyz", "/v1/info", "/v1/embed", "/v1/embeddings", "/v1/search", "/v1/admin/reload",
             "/metrics", "/docs", "/openapi.json")


def _error(status: int, code: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status)


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
        return _error(422, "invalid_request",
                      "; ".join(str(e.get("msg", e)) for e in exc.errors()) or "invalid request")

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return _error(500, "internal_error", f"internal server error ({type(exc).__name__}); see the server log")


def _on_sighup(state: ServerState) -> None:
    """SIGHUP: reload the gallery from its path (and, with several workers, make every worker follow)."""

    async def go() -> None:
        with contextlib.suppress(ApiError):  # logged and counted by the reloader
            await state.reloader.reload()

    asyncio.get_running_loop().create_task(go())


def freeze_long_lived() -> None:
    """Move every object alive now out of the garbage collector's view (``gc.freeze``).

    Called once the server has started (modules, model, gallery, routes loaded)
    and again after a gallery reload: Python's full collections then scan only
    what requests allocate, instead of pausing the event loop for every
    long-lived object (measured on a 2-core EPYC: a full collection of a started
    server took 43 ms with a 96-item gallery, 75-80 ms with 100,000 items, and
    under load one came every 1,000-2,000 requests; after the freeze, under
    0.1 ms).  Garbage is collected first, so none is frozen; :func:`gc.unfreeze`
    first lets the collector see what an earlier freeze kept.  (Frozen objects
    are still freed by reference counting: the old gallery goes when the last
    request using it is done; only reference cycles among frozen objects wait
    for the next reload.)
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def _lifespan(state: ServerState) -> Any:
    cfg = state.cfg

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.start()
        state.reloader.on_swap = freeze_long_lived
        state.reloader.start_watching()
        loop = asyncio.get_running_loop()
        hup = False
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread, not Unix
            loop.add_signal_handler(signal.SIGHUP, _on_sighup, state)
            hup = True
        freeze_long_lived()
        log.info("ready: model %s (%s), gallery %s (%d items), providers %s, max batch %d, max wait %.1f ms, %s",
                 cfg.model, state.encoder.fingerprint[:12], state.reloader.current.path, len(state.gallery),
                 ",".join(state.encoder.providers), cfg.max_batch_size, cfg.max_wait_ms,
                 f"{len(state.keys)} API key(s)" if state.keys else "no API key")
        try:
            yield
        finally:
            if hup:
                loop.remove_signal_handler(signal.SIGHUP)
            await state.reloader.stop_watching()
            state.stop()
            state.reloader.on_swap = None
            gc.unfreeze()
            mark_worker_dead()

    return lifespan


def _openapi_with_auth(app: FastAPI) -> None:
    """Declare the bearer scheme on every /v1 operation of the schema (when keys are configured)."""
    base = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = base()
            schema.setdefault("components", {})["securitySchemes"] = BEARER_SCHEME
            for path, item in schema.get("paths", {}).items():
                if path.startswith("/v1/"):
                    for op in item.values():
                        op["security"] = [{"bearerAuth": []}]
        return app.openapi_schema or base()

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(encoder: Any, gallery: Any, cfg: ServeConfig) -> GuardedApp:
    """The ASGI application for an already-loaded encoder and gallery."""
    # --max-pixels above Pillow's own limit (~89.5 M pixels): ours is the one that counts.
    lift_pillow_pixel_limit(cfg.max_pixels)
    reuse_image_memory()  # full-size decodes of large uploads reuse Pillow's freed blocks
    state = ServerState(encoder, gallery, cfg)
    app = FastAPI(
        title="ISFE embedding service",
        version="1",
        description="Image embeddings (ISFE) and gallery search." + (
            " /v1/* needs Authorization: Bearer <API key>; /healthz, /readyz, /metrics and "
            "/docs are open." if state.keys else ""),
        lifespan=_lifespan(state),
        docs_url=None,  # FastAPI's Swagger UI loads from a CDN; /docs is self-contained (serving.docs)
        redoc_url=None,
    )
    app.state.isfe = state
    if cfg.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.cors_origins),
                           allow_methods=["GET", "HEAD", "POST", "OPTIONS"],
                           allow_headers=["content-type", "authorization", "x-request-id"],
                           expose_headers=["x-request-id"],
                           max_age=600)
    _install_error_handlers(app)
    add_routes(app, state)
    if state.keys:
        _openapi_with_auth(app)
    return GuardedApp(app, state.metrics, ENDPOINTS, cfg.max_body_bytes, timeout_body=cfg.timeout_body,
                      allowed_hosts=cfg.allowed_hosts, api_keys=state.keys)


def create_app_from_env() -> GuardedApp:
    """App factory for uvicorn worker processes (``--workers N``): config from ``$ISFE_SERVE_CONFIG``.

    A worker starts from the gallery path last published in the run folder
    (a reload may have moved it away from ``--gallery``).
    """
    text = os.environ.get(CONFIG_ENV)
    if not text:
        raise RuntimeError(f"${CONFIG_ENV} is not set; start the server with `python -m serving --model ... "
                           f"--gallery ...`")
    cfg = ServeConfig.from_json(text)
    configure_logging(cfg.log_level, cfg.log_format)
    if cfg.run_dir:
        _gen, path = read_generation(cfg.run_dir)
        cfg.gallery = path or cfg.gallery
    encoder, gallery = load_artifacts(cfg)
    return create_app(encoder, gallery, cfg)
