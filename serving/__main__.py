"""``python -m serving --model MODEL.onnx --gallery GALLERY_DIR [--host 127.0.0.1] [--port 8000]``.

Loads the model and the gallery first (a bad path, a non-ISFE model or a
gallery built with another model ends here with one line on stderr and exit
code 2), then serves with uvicorn.  ``--workers N`` starts N processes that
share the port, each with its own model copy, batcher and metrics.

Against slow and abusive clients: idle, header and body deadlines
(``--timeout-keep-alive``, ``--timeout-headers``, ``--timeout-body``; see
:mod:`serving.protocol` and :mod:`serving.guard`), decoding in killable worker
processes with a per-image time and memory limit (``--decode-timeout``,
``--decode-memory-mb``; :mod:`serving.decodepool`), a Host allow-list
(``--allowed-hosts``; the loopback names when bound to a loopback address) and
no CORS unless ``--cors-origin`` is given.

For production: API keys (``--api-key``, ``--api-key-file``; :mod:`serving.auth`),
request IDs and ``--log-format json`` (:mod:`serving.logs`), graceful shutdown
bounded by ``--shutdown-timeout`` and gallery reload on SIGHUP
(:mod:`serving.supervisor`, :mod:`serving.reload`).  Every flag can also come
from an ``ISFE_<FLAG>`` environment variable (:mod:`serving.envargs`).
"""

from __future__ import annotations

import argparse
import functools
import ipaddress
import logging
import os
import sys

from isfe_model.argtypes import bind_problem, nonneg_float, nonneg_int, port_or_zero, positive_int, positive_seconds

from .app import ServeConfig, create_app, load_artifacts
from .auth import KeyFileError, check_key, read_key_file
from .envargs import EnvError, ReplaceAction, apply_env
from .guard import LOOPBACK_HOSTS, MAX_HEADER_BYTES, host_of
from .logs import configure_logging
from .protocol import GuardedH11Protocol
from .supervisor import run_single, run_workers


def host_list(text: str) -> list[str]:
    """``--allowed-hosts``: comma-separated host names / IP literals, ``*.domain``, or ``*``."""
    items = [t.strip().lower() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected at least one host name (or * for any)")
    for item in items:
        name = item[2:] if item.startswith("*.") else item
        if item != "*" and host_of(name) is None:
            raise argparse.ArgumentTypeError(f"not a host name: {item!r} (use names like localhost, api.example.com, "
                                             f"*.example.com, or *)")
    return items


def origin_list(text: str) -> list[str]:
    """``--cors-origin``: comma-separated origins like ``https://app.example.com`` (scheme://host[:port]), or ``*``."""
    items = [t.strip().rstrip("/") for t in text.split(",") if t.strip()]
    for item in items:
        scheme, sep, rest = item.partition("://")
        if item != "*" and (not sep or scheme not in ("http", "https") or not rest or "/" in rest):
            raise argparse.ArgumentTypeError(f"not an origin: {item!r} (use scheme://host[:port], e.g. "
                                             f"https://app.example.com)")
    if not items:
        raise argparse.ArgumentTypeError("expected an origin like https://app.example.com")
    return items


def api_key(text: str) -> str:
    """``--api-key``: one key (16..512 printable ASCII characters, no spaces)."""
    try:
        return check_key(text.strip(), "--api-key")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m serving",
        description="HTTP API for ISFE embeddings and gallery search (FastAPI + uvicorn, micro-batched).",
        epilog="Every flag can also come from an environment variable ISFE_<FLAG> (--max-batch-size: "
               "ISFE_MAX_BATCH_SIZE; repeatable flags comma-separated, e.g. ISFE_API_KEY=key1,key2); "
               "a flag on the command line wins. "
               "SIGHUP reloads the gallery; SIGTERM shuts down gracefully (--shutdown-timeout).",
    )
    p.add_argument("--model", required=True, help="ISFE ONNX model (from `python -m export`)")
    p.add_argument("--gallery", required=True,
                   help="gallery folder built with this model (isfe-index MODEL FOLDER -o GALLERY_DIR)")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=port_or_zero, default=8000, help="TCP port (default 8000)")
    b = p.add_argument_group("batching")
    b.add_argument("--max-batch-size", type=positive_int, default=32,
                   help="most images per inference call; 1 disables micro-batching (default 32)")
    b.add_argument("--max-wait-ms", type=nonneg_float, default=2.0,
                   help="how long a batch waits to fill, counted from when its first image was queued; one inference "
                        "worker only (default 2 ms)")
    b.add_argument("--inference-workers", type=positive_int, default=1, metavar="N",
                   help="inference threads, each running whole batches and never waiting for company; on a small CPU "
                        "machine try --threads 1 with N = the cores (default 1)")
    b.add_argument("--max-queue", type=positive_int, default=1024,
                   help="images waiting for inference before requests get 503 (default 1024)")
    lim = p.add_argument_group("limits")
    lim.add_argument("--max-body-mb", type=nonneg_float, default=20.0, help="largest request body in MiB (default 20)")
    lim.add_argument("--max-images", type=positive_int, default=32,
                     help="most images in one /v1/embed request (default 32)")
    lim.add_argument("--max-pixels", type=positive_int, default=50_000_000,
                     help="most decoded pixels (width x height) per image (default 50M)")
    lim.add_argument("--max-k", type=positive_int, default=100, help="largest k for /v1/search (default 100)")
    lim.add_argument("--default-k", type=positive_int, default=10, help="k when the request gives none (default 10)")
    r = p.add_argument_group("runtime")
    r.add_argument("--decode-workers", "--decode-threads", dest="decode_workers", type=positive_int, metavar="N",
                   default=max(4, min(8, os.cpu_count() or 2)),
                   help="worker processes that parse JSON bodies and decode uploads (default max(4, min(8, CPUs)); "
                        "--decode-threads is the old name)")
    r.add_argument("--decode-timeout", type=positive_seconds, default=10.0, metavar="SECONDS",
                   help="most seconds one image (or JSON body) may take to decode; its worker is then killed and "
                        "replaced and the request gets 422 decode_timeout (default 10)")
    r.add_argument("--decode-memory-mb", type=nonneg_int, default=2048, metavar="MIB",
                   help="memory one decode may use in MiB, beyond the decode worker's own footprint; a decode that "
                        "needs more gets 413 (default 2048; 0: no limit)")
    r.add_argument("--threads", type=positive_int, default=None,
                   help="ONNX Runtime intra-op threads (default: ONNX Runtime's choice)")
    r.add_argument("--providers", default=None,
                   help="comma-separated ONNX Runtime execution providers (default: TensorRT, CUDA, CPU as available)")
    r.add_argument("--backend", choices=("numpy", "faiss"), default="numpy",
                   help="gallery search backend (default numpy, exact)")
    r.add_argument("--workers", type=positive_int, default=1,
                   help="uvicorn worker processes sharing the port (default 1)")
    r.add_argument("--limit-concurrency", type=positive_int, default=None,
                   help="most connections+requests at once per worker; beyond it uvicorn answers 503 "
                        "(default: no limit)")
    r.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"), default="info")
    c = p.add_argument_group("clients")
    c.add_argument("--timeout-keep-alive", type=positive_seconds, default=5.0, metavar="SECONDS",
                   help="close a connection idle this many seconds, also before its first request (default 5)")
    c.add_argument("--timeout-headers", type=positive_seconds, default=10.0, metavar="SECONDS",
                   help="request line and headers must arrive within this many seconds of their first byte, "
                        "else 408 and close (default 10)")
    c.add_argument("--timeout-body", type=positive_seconds, default=60.0, metavar="SECONDS",
                   help="the whole request body must arrive within this many seconds of the headers, else 408 and "
                        "close (default 60)")
    c.add_argument("--allowed-hosts", type=host_list, default=None, metavar="HOSTS",
                   help="comma-separated Host names the server answers to (others: 421), *.domain for "
                        "subdomains, * for any (default: localhost,127.0.0.1,::1 when --host is a loopback address, "
                        "else *)")
    c.add_argument("--cors-origin", type=origin_list, action=ReplaceAction, extend=True, default=None, metavar="ORIGIN",
                   help="allow browser pages from this origin (scheme://host[:port]; repeat or comma-separate; "
                        "* for any) to call the API; default: no CORS headers at all")
    a = p.add_argument_group("production")
    a.add_argument("--api-key", type=api_key, action=ReplaceAction, default=None, metavar="KEY",
                   help="require Authorization: Bearer KEY on /v1/* (repeat for several keys; env ISFE_API_KEY: "
                        "comma-separated); /healthz, /readyz, /metrics and /docs stay open")
    a.add_argument("--api-key-file", default=None, metavar="FILE",
                   help="file with one API key per line (# comments allowed)")
    a.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="log lines as text (default) or JSON objects")
    a.add_argument("--shutdown-timeout", type=positive_seconds, default=10.0, metavar="SECONDS",
                   help="on SIGTERM, wait at most this long for requests in flight before closing them (default 10)")
    return p


#: ServeConfig fields that take their flag's value as it is (same name, no conversion).
AS_GIVEN = ("model", "gallery", "host", "port", "max_batch_size", "max_wait_ms", "max_queue", "inference_workers",
            "max_images", "max_pixels", "max_k", "decode_workers", "decode_memory_mb", "timeout_keep_alive",
            "timeout_headers", "timeout_body", "threads", "backend", "workers", "limit_concurrency", "log_level",
            "log_format", "shutdown_timeout")


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """The flags as a :class:`ServeConfig`: the :data:`AS_GIVEN` ones copied, the rest converted here."""
    return ServeConfig(
        **{name: getattr(args, name) for name in AS_GIVEN},
        max_body_bytes=max(1, int(args.max_body_mb * 1024 * 1024)),
        default_k=min(args.default_k, args.max_k),
        decode_timeout_s=args.decode_timeout,
        allowed_hosts=args.allowed_hosts if args.allowed_hosts is not None
        else (list(LOOPBACK_HOSTS) if is_loopback(args.host) else ["*"]),
        cors_origins=args.cors_origin or None,
        providers=[s.strip() for s in args.providers.split(",") if s.strip()] if args.providers else None,
        api_keys=list(dict.fromkeys(
            (args.api_key or []) + (read_key_file(args.api_key_file) if args.api_key_file else []))),
    )


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Flags, with ``ISFE_*`` variables as defaults (raises EnvError)."""
    parser = build_parser()
    apply_env(parser)
    args = parser.parse_args(argv)
    if args.max_queue < args.max_images:
        parser.error(f"--max-queue ({args.max_queue}) must be at least --max-images ({args.max_images}), "
                     f"or requests with many images could never be queued")
    return args


def _load(cfg: ServeConfig) -> tuple | None:
    """Model and gallery, or None after printing one line on stderr."""
    from isfe_model import GalleryError, MetadataError, ModelError

    try:
        return load_artifacts(cfg)
    except ImportError as e:
        print(f"serving: error: {e}", file=sys.stderr)
    except MemoryError:  # e.g. a damaged gallery that claims a gigantic array
        print(f"serving: error: out of memory loading model {cfg.model} and gallery {cfg.gallery}; "
              f"the gallery may be damaged (rebuild it with isfe-index) or too large for this machine", file=sys.stderr)
    except RecursionError:  # e.g. a damaged manifest nested thousands of levels deep
        print(f"serving: error: cannot load model {cfg.model} and gallery {cfg.gallery}: a file is nested too deeply "
              f"(damaged); rebuild the gallery with isfe-index", file=sys.stderr)
    except (ModelError, MetadataError, GalleryError, ValueError, OSError, RuntimeError) as e:
        msg = " ".join(str(e).split())
        print(f"serving: error: {msg}", file=sys.stderr)
    return None


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parse(argv)
        cfg = config_from_args(args)
    except (EnvError, KeyFileError) as e:
        print(f"serving: error: {e}", file=sys.stderr)
        return 2
    problem = bind_problem(cfg.host, cfg.port)
    if problem is not None:
        print(f"serving: error: {problem}", file=sys.stderr)
        return 2
    log_config = configure_logging(cfg.log_level, cfg.log_format)
    loaded = _load(cfg)
    if loaded is None:
        return 2
    encoder, gallery = loaded
    if not is_loopback(cfg.host) and not cfg.api_keys:
        logging.getLogger("serving").warning("binding to %s: the API is reachable from other machines and has "
                                             "no API key (--api-key)", cfg.host)
    opts = dict(http=functools.partial(GuardedH11Protocol, timeout_headers=cfg.timeout_headers),
                timeout_keep_alive=cfg.timeout_keep_alive, h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                limit_concurrency=cfg.limit_concurrency, log_level=cfg.log_level, log_config=log_config,
                access_log=False, timeout_graceful_shutdown=cfg.shutdown_timeout)
    if cfg.workers > 1:
        del encoder, gallery  # each worker process loads its own copy; the parent only validated the files
        return run_workers(cfg, **opts)
    return run_single(create_app(encoder, gallery, cfg), cfg, **opts)


if __name__ == "__main__":
    sys.exit(main())
