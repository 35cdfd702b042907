"""``python -m demo --model MODEL.onnx --gallery GALLERY_DIR [--images-root DIR] [--port 7860]
[--allow-indexing ROOT]``.

Exit codes: 0 after Ctrl-C / SIGTERM, 2 for a user error (one line on stderr:
missing files, a gallery whose ids leave its image folder, a folder that is too
broad to publish or index, a port in use).

Unless ``GRADIO_TEMP_DIR`` is set, Gradio's temporary files (uploads, result
images, example copies) go to a private folder that is removed at exit.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import argparse
import logging
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from isfe_model.argtypes import bind_problem, port, positive_float, positive_int

__all__ = ["build_parser", "main", "start"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m demo", description="Gradio demo: image search over an ISFE gallery.")
    p.add_argument("--model", required=True, help="ISFE ONNX model (from `python -m export`)")
    p.add_argument("--gallery", required=True,
                   help="gallery folder built with this model (isfe-index MODEL FOLDER -o GALLERY_DIR)")
    p.add_argument("--images-root", default=None,
                   help="folder the gallery ids are relative to (default: the manifest's 'source')")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=port, default=7860, help="port (default 7860)")
    p.add_argument("--max-k", type=positive_int, default=50, help="largest k on the slider (default 50)")
    p.add_argument("--default-k", type=positive_int, default=8, help="initial k (default 8)")
    p.add_argument("--concurrency", type=positive_int, default=4,
                   help="searches served at once (default 4, at least 2)")
    p.add_argument("--examples", type=int, default=6, help="how many gallery images to offer as examples (default 6)")
    p.add_argument("--threads", type=positive_int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--allow-indexing", metavar="ROOT", default=None,
                   help="let visitors index folders under ROOT (and save galleries below it) from the Gallery tab "
                        "(default: indexing off)")
    p.add_argument("--max-upload-mb", type=positive_float, default=20.0,
                   help="largest query upload in MiB (default 20); larger uploads get HTTP 413")
    p.add_argument("--temp-minutes", type=positive_float, default=30.0,
                   help="delete uploads and result images once older than this (default 30); all at exit")
    return p


def start(args: argparse.Namespace, prevent_thread_lock: bool = False, quiet: bool = False) -> tuple[object, str]:
    """Load, check, build and launch; returns (blocks, url). Raises ValueError/OSError for user errors.

    Refused before anything is served: an image folder or indexing ROOT that
    is too broad (``/``, system folders, the home folder), and a gallery with
    any id that leaves its image folder (``..``, absolute, symlinks).  Gradio's
    ``allowed_paths`` are exactly the example images; the model and gallery
    files are on ``blocked_paths``.
    """
    from isfe_model import Encoder, Gallery
    from isfe_model.preprocess import reuse_image_memory

    from .app import DemoState, build_ui, check_gallery, launch, pick_examples, resolve_image_root
    from .paths import DemoError, bind_warning, check_folder

    index_root = None
    if args.allow_indexing is not None:
        index_root = check_folder(
            args.allow_indexing, "--allow-indexing", "give the folder that holds the image folders"
        )
    warning = bind_warning(args.host, index_root)
    if warning:
        logging.getLogger("demo").warning(warning)
    problem = bind_problem(args.host, args.port)  # before the model loads; Gradio's own text names its launch()
    if problem is not None:
        raise DemoError(problem)
    reuse_image_memory()  # full-size decodes of uploaded photos reuse Pillow's freed blocks
    encoder = Encoder(args.model, threads=args.threads)
    gallery = Gallery.load(args.gallery, encoder=encoder)
    root = resolve_image_root(gallery, args.images_root, args.gallery)
    root = check_folder(root, "the gallery's image folder", "pass --images-root DIR, the folder the images are in")
    check_gallery(gallery, root, f"gallery {args.gallery}")
    state = DemoState(encoder, gallery, root, f"loaded from {args.gallery}", max_k=args.max_k, index_root=index_root,
                      max_upload_bytes=int(args.max_upload_mb * (1 << 20)))
    examples = pick_examples(gallery, root, max(0, args.examples))
    blocks = build_ui(state, examples, default_k=args.default_k, temp_seconds=args.temp_minutes * 60)
    gallery_dir = Path(args.gallery).resolve()
    # the ONNX file the encoder really runs (--model may be a package folder or an installed name)
    model_file = Path(encoder.model_path).resolve()
    blocked = [str(model_file)] + [str(gallery_dir / f) for f in ("embeddings.npy", "items.jsonl", "manifest.json")]
    url = launch(blocks, args.host, args.port, allowed_paths=examples, concurrency=args.concurrency,
                 prevent_thread_lock=prevent_thread_lock, quiet=quiet, blocked_paths=blocked,
                 max_upload_bytes=state.max_upload_bytes)
    return blocks, url


def _private_temp_dir() -> str | None:
    """Point Gradio at a new private (0700) temporary folder unless GRADIO_TEMP_DIR is set; returns it."""
    if os.environ.get("GRADIO_TEMP_DIR"):
        return None
    path = tempfile.mkdtemp(prefix="isfe-demo-")
    os.environ["GRADIO_TEMP_DIR"] = path
    return path


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    temp_dir = _private_temp_dir()
    try:  # SIGTERM: close the server and clean up as Ctrl-C does (only possible in the main thread)
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:
        previous = None
    try:
        start(args)
    except (ValueError, OSError) as e:  # ModelError, GalleryError, DemoError, port in use
        print(f"demo: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if temp_dir:
            os.environ.pop("GRADIO_TEMP_DIR", None)
            shutil.rmtree(temp_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
