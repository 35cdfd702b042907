"""The server's configuration and shared state: model, gallery (reloadable), batcher, decode pool, metrics."""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .auth import ApiKeys
from .batcher import BatcherClosed, BatcherFull, MicroBatcher
from .decodepool import DecodePool
from .errors import ApiError
from .inputs import Limits
from .metrics import ServingMetrics
from .reload import GalleryReloader

__all__ = ["CONFIG_ENV", "ServeConfig", "ServerState", "load_artifacts", "query_vectors"]

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
    #: Inference threads, each running whole batches (see serving.batcher).
    inference_workers: int = 1
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
    log_format: str = "text"
    #: Bearer keys required on /v1/* (none: open).
    api_keys: list[str] = field(default_factory=list)
    #: Longest wait for requests in flight on SIGTERM (seconds).
    shutdown_timeout: float = 10.0
    #: Folder shared by the workers of one server (generation file, metrics); None with one process.
    run_dir: str | None = None

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


def query_vectors(arr: np.ndarray, dim: int) -> np.ndarray:
    """Query vectors float64 [D] or [Q, D] -> unit float32 [Q, D]; 422 naming the bad vector.

    q_i / ||q_i|| (computed as (q_i / max|q_i|) / ||q_i / max|q_i||| so that neither
    huge nor tiny components overflow or underflow).  Refused: a length other
    than ``dim``, NaN or Infinity, and the zero vector (no direction).
    """
    q = arr[None, :] if arr.ndim == 1 else arr
    name = (lambda i: "embedding") if arr.ndim == 1 else (lambda i: f"embedding[{i}]")
    if q.shape[1] != dim:
        raise ApiError(422, "wrong_dimension",
                       f"{name(0)} has {q.shape[1]} numbers but the model's embeddings have {dim}; "
                       f"send vectors from this model (/v1/embed)")
    finite = np.isfinite(q).all(axis=1)
    if not finite.all():
        i = int(np.argmin(finite))
        raise ApiError(422, "non_finite_embedding", f"{name(i)} contains NaN or Infinity; send finite numbers")
    scale = np.abs(q).max(axis=1)
    if not (scale > 0).all():
        i = int(np.argmin(scale > 0))
        raise ApiError(422, "zero_embedding", f"{name(i)} is the zero vector, which has no direction to search by")
    q = q / scale[:, None]
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


class ServerState:
    """What the endpoints share: model, gallery (via the reloader), batcher, decode pool, metrics, keys."""

    def __init__(self, encoder: Any, gallery: Any, cfg: ServeConfig):
        self.encoder = encoder
        self.cfg = cfg
        self.limits = cfg.limits
        self.spec = encoder.spec
        self.started = time.time()
        self.keys = ApiKeys(cfg.api_keys)
        self.batcher = MicroBatcher(encoder.embed_arrays, max_batch_size=cfg.max_batch_size,
                                    max_wait_ms=cfg.max_wait_ms, max_queue=cfg.max_queue,
                                    workers=cfg.inference_workers)
        self.metrics = ServingMetrics(queue_depth=lambda: self.batcher.queue_depth)
        self.batcher.on_batch = self.metrics.record_batch
        self.reloader = GalleryReloader(encoder, gallery, cfg.gallery, cfg.backend, self.metrics, cfg.run_dir)
        self.model_name = str(encoder.info().get("model_name") or "isfe")
        self.pool: DecodePool | None = None

    @property
    def gallery(self) -> Any:
        return self.reloader.gallery

    def start(self) -> None:
        self.pool = DecodePool(
            self.spec, self.limits.max_pixels, workers=max(1, self.cfg.decode_workers),
            time_limit_s=self.cfg.decode_timeout_s,
            memory_mb=self.cfg.decode_memory_mb,
            on_restart=lambda reason: self.metrics.decode_restarts.labels(reason).inc(),
        ).start()
        self.batcher.start()

    def stop(self) -> None:
        self.batcher.stop()
        if self.pool is not None:
            self.pool.stop()
            self.pool = None

    def _pool(self) -> DecodePool:
        if self.pool is None:
            raise ApiError(503, "not_ready", "server is starting or shutting down; retry")
        return self.pool

    async def parse_json(self, raw: bytes, max_images: int) -> tuple[list[Any], dict[str, Any]]:
        """A JSON body parsed in a decode worker (time-limited, off the event loop)."""
        return await self._pool().parse_json(raw, max_images)

    async def parse_search_json(self, raw: bytes, max_images: int) -> tuple[list[Any], dict[str, Any]]:
        """A /v1/search JSON body (images or ``embedding`` vectors), parsed in a decode worker."""
        return await self._pool().parse_json(raw, max_images, True)

    async def embed_uploads(self, uploads: list[Any]) -> np.ndarray:
        """Decode (worker processes) and embed (micro-batcher) uploads -> float32 [n, D]."""
        pool = self._pool()
        results = await asyncio.gather(*(pool.decode(u) for u in uploads), return_exceptions=True)
        for r in results:  # report the first bad upload, in request order
            if isinstance(r, ApiError):
                self.metrics.image_errors.labels(r.code).inc()
                raise r
            if isinstance(r, BaseException):
                raise r
        try:
            futs = self.batcher.submit_many(results)  # type: ignore[arg-type]
        except BatcherFull as e:
            raise ApiError(503, "overloaded", f"server overloaded: {e}") from None
        except BatcherClosed as e:
            raise ApiError(503, "not_ready", f"server not accepting work: {e}") from None
        self.metrics.note_queue()
        try:
            return np.stack(await asyncio.gather(*(asyncio.wrap_future(f) for f in futs)))
        except BatcherClosed as e:
            raise ApiError(503, "not_ready", f"server not accepting work: {e}") from None

    def info(self) -> dict[str, Any]:
        g = self.gallery
        return {
            "model": self.encoder.info(),
            "providers": list(self.encoder.providers),
            "gallery": {**self.reloader.info(), "dtype": str(np.asarray(g.embeddings).dtype),
                        "backend": self.cfg.backend},
            "batching": {"max_batch_size": self.cfg.max_batch_size, "max_wait_ms": self.cfg.max_wait_ms,
                         "inference_workers": self.cfg.inference_workers,
                         "max_queue": self.cfg.max_queue},
            "limits": {**asdict(self.limits), "decode_timeout_s": self.cfg.decode_timeout_s,
                       "decode_memory_mb": self.cfg.decode_memory_mb, "timeout_headers_s": self.cfg.timeout_headers,
                       "timeout_body_s": self.cfg.timeout_body, "timeout_keep_alive_s": self.cfg.timeout_keep_alive},
            "auth": {"api_keys": len(self.keys),
                     "open_paths": ["/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"]},
            "decode_workers": self.cfg.decode_workers,
            "workers": self.cfg.workers,
            "uptime_s": round(time.time() - self.started, 3),
            "pid": os.getpid(),
        }
