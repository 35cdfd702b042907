"""``python -m demo --model MODEL.onnx --gallery GALLERY_DIR [--images-root DIR] [--port 7860]``."""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import argparse
import logging
import sys

from isfe_model.argtypes import port, positive_int

__all__ = ["build_parser", "main", "start"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m demo", description="Gradio demo: image search over an ISFE gallery.")
    p.add_argument("--model", required=True, help="ISFE ONNX model (from `python -m export`)")
    p.add_argument("--gallery", required=True, help="gallery folder built with this model (isfe-index MODEL FOLDER -o GALLERY_DIR)")
    p.add_argument("--images-root", default=None, help="folder the gallery ids are relative to (default: the manifest's 'source')")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=port, default=7860, help="port (default 7860)")
    p.add_argument("--max-k", type=positive_int, default=50, help="largest k on the slider (default 50)")
    p.add_argument("--default-k", type=positive_int, default=8, help="initial k (default 8)")
    p.add_argument("--concurrency", type=positive_int, default=4, help="searches served at once (default 4, at least 2)")
    p.add_argument("--examples", type=int, default=6, help="how many gallery images to offer as examples (default 6)")
    p.add_argument("--threads", type=positive_int, default=None, help="ONNX Runtime intra-op threads")
    return p


def start(args: argparse.Namespace, prevent_thread_lock: bool = False, quiet: bool = False) -> tuple[object, str]:
    """Load, build and launch; returns (blocks, url). Raises ValueError/OSError for user errors."""
    from isfe_model import Encoder, Gallery

    from .app import DemoState, build_ui, launch, pick_examples, resolve_image_root

    encoder = Encoder(args.model, threads=args.threads)
    gallery = Gallery.load(args.gallery, encoder=encoder)
    root = resolve_image_root(gallery, args.images_root, args.gallery)
    state = DemoState(encoder, gallery, root, f"loaded from {args.gallery}", max_k=args.max_k)
    examples = pick_examples(gallery, root, max(0, args.examples))
    blocks = build_ui(state, examples, default_k=args.default_k)
    url = launch(blocks, args.host, args.port, allowed_paths=[str(root)], concurrency=args.concurrency,
                 prevent_thread_lock=prevent_thread_lock, quiet=quiet)
    return blocks, url


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        start(args)
    except (ValueError, OSError) as e:  # ModelError, GalleryError, DemoError, port in use
        print(f"demo: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
