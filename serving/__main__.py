"""``python -m serving --model MODEL.onnx --gallery GALLERY_DIR [--host 127.0.0.1] [--port 8000]``.

Loads the model and the gallery first (a bad path, a non-ISFE model or a
gallery built with another model ends here with one line on stderr and exit
code 2), then serves with uvicorn.  ``--workers N`` starts N processes that
share the port, each with its own model copy, batcher and metrics.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from isfe_model.argtypes import nonneg_float, port_or_zero, positive_int

from .app import CONFIG_ENV, ServeConfig, create_app, load_artifacts

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m serving",
        description="HTTP API for ISFE embeddings and gallery search (FastAPI + uvicorn, micro-batched).",
    )
    p.add_argument("--model", required=True, help="ISFE ONNX model (from `python -m export`)")
    p.add_argument("--gallery", required=True, help="gallery folder built with this model (isfe-index MODEL FOLDER -o GALLERY_DIR)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=port_or_zero, default=8000, help="TCP port (default 8000)")
    b = p.add_argument_group("batching")
    b.add_argument("--max-batch-size", type=positive_int, default=32, help="most images per inference call; 1 disables micro-batching (default 32)")
    b.add_argument("--max-wait-ms", type=nonneg_float, default=2.0, help="how long a batch waits to fill after its first image (default 2 ms)")
    b.add_argument("--max-queue", type=positive_int, default=1024, help="images waiting for inference before requests get 503 (default 1024)")
    lim = p.add_argument_group("limits")
    lim.add_argument("--max-body-mb", type=nonneg_float, default=20.0, help="largest request body in MiB (default 20)")
    lim.add_argument("--max-images", type=positive_int, default=32, help="most images in one /v1/embed request (default 32)")
    lim.add_argument("--max-pixels", type=positive_int, default=50_000_000, help="most decoded pixels (width x height) per image (default 50M)")
    lim.add_argument("--max-k", type=positive_int, default=100, help="largest k for /v1/search (default 100)")
    lim.add_argument("--default-k", type=positive_int, default=10, help="k when the request gives none (default 10)")
    r = p.add_argument_group("runtime")
    r.add_argument("--decode-threads", type=positive_int, default=max(2, min(8, os.cpu_count() or 2)), help="threads decoding and preprocessing uploads")
    r.add_argument("--threads", type=positive_int, default=None, help="ONNX Runtime intra-op threads (default: ONNX Runtime's choice)")
    r.add_argument("--providers", default=None, help="comma-separated ONNX Runtime execution providers (default: TensorRT, CUDA, CPU as available)")
    r.add_argument("--backend", choices=("numpy", "faiss"), default="numpy", help="gallery search backend (default numpy, exact)")
    r.add_argument("--workers", type=positive_int, default=1, help="uvicorn worker processes sharing the port (default 1)")
    r.add_argument("--limit-concurrency", type=positive_int, default=None,
                   help="most connections+requests at once per worker; beyond it uvicorn answers 503 (default: no limit)")
    r.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"), default="info")
    return p


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    return ServeConfig(
        model=args.model,
        gallery=args.gallery,
        host=args.host,
        port=args.port,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        max_body_bytes=max(1, int(args.max_body_mb * 1024 * 1024)),
        max_images=args.max_images,
        max_pixels=args.max_pixels,
        max_k=args.max_k,
        default_k=min(args.default_k, args.max_k),
        decode_threads=args.decode_threads,
        threads=args.threads,
        providers=[s.strip() for s in args.providers.split(",") if s.strip()] if args.providers else None,
        backend=args.backend,
        workers=args.workers,
        limit_concurrency=args.limit_concurrency,
        log_level=args.log_level,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_queue < args.max_images:
        parser.error(f"--max-queue ({args.max_queue}) must be at least --max-images ({args.max_images}), "
                     f"or requests with many images could never be queued")
    cfg = config_from_args(args)
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from isfe_model import GalleryError, MetadataError, ModelError

    try:
        encoder, gallery = load_artifacts(cfg)
    except ImportError as e:
        print(f"serving: error: {e}", file=sys.stderr)
        return 2
    except MemoryError:  # e.g. a damaged gallery that claims a gigantic array
        print(f"serving: error: out of memory loading model {cfg.model} and gallery {cfg.gallery}; "
              f"the gallery may be damaged (rebuild it with isfe-index) or too large for this machine", file=sys.stderr)
        return 2
    except RecursionError:  # e.g. a damaged manifest nested thousands of levels deep
        print(f"serving: error: cannot load model {cfg.model} and gallery {cfg.gallery}: a file is nested too deeply "
              f"(damaged); rebuild the gallery with isfe-index", file=sys.stderr)
        return 2
    except (ModelError, MetadataError, GalleryError, ValueError, OSError, RuntimeError) as e:
        msg = " ".join(str(e).split())
        print(f"serving: error: {msg}", file=sys.stderr)
        return 2

    import uvicorn

    if cfg.host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger("serving").warning("binding to %s: the API is reachable from other machines and has no authentication", cfg.host)
    if cfg.workers > 1:
        # Each worker process loads its own copy; the parent only validated the files.
        del encoder, gallery
        os.environ[CONFIG_ENV] = cfg.to_json()
        uvicorn.run(
            "serving.app:create_app_from_env",
            factory=True,
            host=cfg.host,
            port=cfg.port,
            workers=cfg.workers,
            limit_concurrency=cfg.limit_concurrency,
            log_level=cfg.log_level,
            timeout_graceful_shutdown=10,
        )
        return 0
    app = create_app(encoder, gallery, cfg)
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, timeout_graceful_shutdown=10,
                            limit_concurrency=cfg.limit_concurrency, lifespan="on")
    server = uvicorn.Server(config)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    # uvicorn sets started=False and returns when the socket could not be bound
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
