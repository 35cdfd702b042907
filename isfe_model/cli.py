"""Command-line tools installed with the wheel: isfe-embed, isfe-index, isfe-search.

    isfe-embed  MODEL IMAGE... -o OUT.npy
    isfe-index  MODEL FOLDER -o GALLERY_DIR [--skip-bad] [--overwrite]
    isfe-search MODEL GALLERY_DIR IMAGE... [-k 10] [--json]
    python -m isfe_model {embed,index,search,info,models} ...

Exit codes: 0 success; 1 bad input (image, model, gallery, output path) with
one ``PROG: error: ...`` line on stderr naming the file and the fix; 2 bad
command line, including an output that is one of the inputs (``-o`` naming
the model or an image, through links too); 3 an internal error (run with
--debug for the traceback); 130 interrupted.  Which ONNX Runtime execution
providers run the model is printed on stderr (``--quiet`` hides it).  Every
name printed (paths, ids, labels, messages) has its control characters
escaped (:func:`isfe_model.gallery.printable`), so a file called
``$'\\e[2J\\r'`` cannot rewrite the terminal.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

from PIL import Image

from ._version import __version__
from .argtypes import positive_int
from .atomic import atomic_save_npy, output_target
from .encoder import Encoder, runtime_info
from .gallery import Gallery, GalleryError, _check_replaceable, printable
from .jsonsafe import dumps
from .packages import models_main
from .preprocess import DEFAULT_MAX_PIXELS, ImageError, lift_pillow_pixel_limit, reuse_image_memory
from .progress import stderr_is_tty

__all__ = ["embed_main", "index_main", "main", "search_main"]

EXIT_OK, EXIT_INPUT, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
#: Skipped paths listed on stderr by isfe-index (all of them are in the manifest).
SHOWN_SKIPS = 50


class CliError(Exception):
    """A user error the CLI reports in one line (exit 1)."""


class OutputIsInputError(CliError):
    """An output path that is one of the inputs (the model, an image, the image folder): exit 2, nothing written."""


def _lines(text: str) -> str:
    """``text`` with control characters escaped in each line (the line breaks kept)."""
    return "\n".join(printable(line) for line in text.split("\n"))


#: Characters json.dumps(ensure_ascii=False) leaves raw that a terminal must not get: DEL, C1 controls,
#: bidi overrides, line separators and lone surrogates (it escapes the C0 controls itself).
_JSON_UNSAFE = re.compile("[\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")


def _json_text(obj: Any) -> str:
    """Strict JSON (isfe_model.jsonsafe) with every character a terminal must not get as a \\uXXXX escape."""
    return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", dumps(obj, indent=2))


class _Parser(argparse.ArgumentParser):
    """argparse with control characters escaped in what it prints (usage errors quote the bad argument)."""

    def _print_message(self, message: str, file: Any = None) -> None:
        super()._print_message(_lines(message) if message else message, file)


class _SafeFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return _lines(super().format(record))


def _max_pixels(text: str) -> int | None:
    t = text.strip().lower().replace("_", "").replace(",", "")
    if t in ("none", "off", "unlimited"):
        return None
    try:
        v = float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a pixel count like 50000000 or 5e7, or 'none', "
                                         f"got {text!r}") from None
    if not v >= 1 or v != int(v):
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1 (or 'none'), got {text!r}")
    return int(v)


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--providers", default=None, metavar="LIST",
                   help="ONNX Runtime execution providers in order, e.g. 'cuda,cpu' or 'cpu' "
                        "(default: TensorRT, CUDA, CPU — those this onnxruntime build has)")
    g.add_argument("--threads", type=positive_int, default=None,
                   help="ONNX Runtime intra-op threads (default: all cores)")
    g.add_argument("--decode-threads", type=positive_int, default=None, metavar="N",
                   help="threads that decode images while the model runs (default: the cores available)")
    g.add_argument("--batch-size", type=positive_int, default=64, help="images per model call (default 64)")
    g.add_argument("--max-pixels", type=_max_pixels, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help=f"refuse images with more decoded pixels (decompression bombs; default {DEFAULT_MAX_PIXELS:,}; "
                        f"'none' = no limit)")
    prog = g.add_mutually_exclusive_group()
    prog.add_argument("--progress", dest="progress", action="store_true", default=None,
                      help="show a progress line on stderr (default: only when stderr is a terminal)")
    prog.add_argument("--no-progress", dest="progress", action="store_false", help="never show progress")
    g.add_argument("-q", "--quiet", action="store_true", help="print only results and errors")
    g.add_argument("-v", "--verbose", action="store_true", help="log details (providers, timings) on stderr")
    g.add_argument("--debug", action="store_true", help="show Python tracebacks for internal errors")


def _setup_logging(args: argparse.Namespace) -> Callable[[], None]:
    """Log isfe_model's messages to stderr; returns a function that undoes it (for in-process callers)."""
    level = logging.INFO if args.verbose else (logging.ERROR if args.quiet else logging.WARNING)
    logger = logging.getLogger("isfe_model")
    saved = (logger.level, logger.propagate)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_SafeFormatter("isfe: %(levelname)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False

    def restore() -> None:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]

    return restore


def _progress(args: argparse.Namespace) -> bool:
    return stderr_is_tty() if args.progress is None else bool(args.progress)


def _open_encoder(args: argparse.Namespace, prog: str) -> Encoder:
    lift_pillow_pixel_limit(args.max_pixels)  # ours is the limit that counts (_run restores Pillow's)
    reuse_image_memory()  # full-size decodes reuse Pillow's freed blocks (_run restores the setting)
    try:
        # spinning=False: ONNX Runtime's idle threads sleep instead of taking the cores from the decode threads
        # (photo_bench --spinning-ab, 200 x 12 MP photos on 2 cores: 1-9% faster per round with draft decoding, full
        # decoding within the host's noise; README, "ONNX Runtime's idle threads")
        enc = Encoder(args.model, providers=args.providers, threads=args.threads, max_pixels=args.max_pixels,
                      decode_threads=args.decode_threads, spinning=False)
    except ValueError as e:  # ModelError, MetadataError, bad --providers
        raise CliError(str(e)) from None
    if not args.quiet:
        print(f"{prog}: model {printable(enc.model_path)} (dim {enc.dim}, input "
              f"{enc.spec.input_size}x{enc.spec.input_size}, "
              f"fingerprint {enc.fingerprint[:12]}) on {', '.join(enc.providers)}", file=sys.stderr)
    return enc


def _run(prog: str, build: Callable[[], argparse.ArgumentParser], body: Callable[[argparse.Namespace], int],
         argv: Sequence[str] | None) -> int:
    parser = build()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as e:  # --help (0) or a usage error (2, message already printed)
        return int(e.code) if isinstance(e.code, int) else EXIT_USAGE
    restore_logging = _setup_logging(args)
    pillow_limit = Image.MAX_IMAGE_PIXELS  # _open_encoder may lift it for this run
    pillow_blocks = Image.core.get_blocks_max()  # and let Pillow keep freed blocks
    try:
        return body(args)
    except OutputIsInputError as e:
        print(f"{prog}: error: {printable(e)}", file=sys.stderr)
        return EXIT_USAGE
    except (CliError, ImageError, GalleryError, ValueError) as e:
        print(f"{prog}: error: {printable(e)}", file=sys.stderr)
        return EXIT_INPUT
    except ImportError as e:  # e.g. the faiss backend without faiss installed
        print(f"{prog}: error: {printable(e)}", file=sys.stderr)
        return EXIT_INPUT
    except MemoryError:
        print(f"{prog}: error: out of memory; use a smaller --batch-size or --max-pixels", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # stdout closed early (e.g. piped into head)
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return EXIT_OK
    except OSError as e:
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        print(f"{prog}: error:{printable(where)} {printable(e.strerror or e)}", file=sys.stderr)
        return EXIT_INPUT
    except Exception as e:  # noqa: BLE001 - last resort: one line, not a traceback
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"{prog}: internal error: {type(e).__name__}: {printable(e)} "
              f"(run again with --debug for the traceback and please report it)",
              file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        restore_logging()
        Image.MAX_IMAGE_PIXELS = pillow_limit
        Image.core.set_blocks_max(pillow_blocks)


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when ``a`` and ``b`` are one file (through symlinks and hard links: the same st_dev and st_ino)."""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):  # one of them does not exist (yet)
        return False


def _refuse_output_over_inputs(out: Path, inputs: Sequence[tuple[str, str]], flag: str = "-o") -> None:
    """OutputIsInputError when the output file ``out`` is one of ``inputs`` [(what, path)]: writing would destroy it."""
    if not (out.exists() and out.is_file()):
        return  # nothing there yet (or a dangling link): no input can be that file
    for what, path in inputs:
        if _same_file(out, path):
            same = "" if os.path.abspath(out) == os.path.abspath(path) else " (the same file, through a link)"
            raise OutputIsInputError(f"the output {out} is the {what} {path}{same}; writing it would destroy the "
                                     f"{what} — choose another {flag}")


def _refuse_output_folder_over_inputs(out: Path, model: str, folder: Path) -> None:
    """OutputIsInputError when the gallery folder ``out`` is the model or the image folder, or holds the model."""
    _refuse_output_over_inputs(out, [("model", model)])
    if _same_file(out, folder):
        raise OutputIsInputError(f"the output folder {out} is the image folder {folder}; choose another -o")
    if not out.is_dir():
        return
    for parent in Path(os.path.realpath(model)).parents:
        if _same_file(parent, out):
            raise OutputIsInputError(f"the output folder {out} holds the model {model}; replacing the gallery would "
                                     f"delete it — choose another -o, or move the model out of {out}")


def _check_output_file(path: Path, what: str) -> None:
    if path.is_dir():
        raise CliError(f"{what} {path} is a folder; give a file name such as {path / 'embeddings.npy'}")
    try:
        path = output_target(path)  # a symlink is written through; a device or FIFO is refused
    except OSError as e:
        raise CliError(f"{what} {e}") from None
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise CliError(f"{what} {path}: folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise CliError(f"{what} {path}: folder {parent} is not writable")


# --------------------------------------------------------------------------- isfe-embed


def _embed_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="isfe-embed", description="Embed images with an ISFE ONNX model; "
                                               "writes float32 [N, D] unit rows (.npy, input order).")
    p.add_argument("model", help="the .onnx model file (written by python -m export)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, GIF, BMP, TIFF, WebP, ...)")
    p.add_argument("-o", "--output", required=True, help="output .npy file (written atomically; replaced if it exists)")
    _common(p)
    return p


def _embed(args: argparse.Namespace) -> int:
    out = Path(args.output)
    _refuse_output_over_inputs(out, [("model", args.model)] + [("input image", img) for img in args.images])
    _check_output_file(out, "output")
    enc = _open_encoder(args, "isfe-embed")
    emb = enc.embed(args.images, batch_size=args.batch_size, progress=_progress(args))
    atomic_save_npy(out, emb)
    print(f"wrote {printable(out)}: {emb.shape[0]} x {emb.shape[1]} float32 embeddings")
    return EXIT_OK


def embed_main(argv: Sequence[str] | None = None) -> int:
    """``isfe-embed MODEL IMAGE... -o OUT.npy``."""
    return _run("isfe-embed", _embed_parser, _embed, argv)


# --------------------------------------------------------------------------- isfe-index


def _index_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="isfe-index",
        description="Embed every file under FOLDER (recursively; hidden files ignored) into a gallery folder "
                    "(embeddings.npy, items.jsonl, manifest.json). ids are relative paths; labels are the class "
                    "folder names when images sit in subfolders. Links to files are followed; links to folders, "
                    "unreadable folders and paths over the system's length limit are left out, listed on stderr "
                    "and in the manifest's 'skipped'.")
    p.add_argument("model", help="the .onnx model file")
    p.add_argument("folder", help="folder of images (optionally in class subfolders)")
    p.add_argument("-o", "--output", required=True, metavar="GALLERY_DIR",
                   help="gallery folder to create (written atomically)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip files that are not usable images (listed in the manifest) instead of stopping")
    p.add_argument("--overwrite", action="store_true",
                   help="replace GALLERY_DIR if it already holds a gallery (never any other folder)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="stored embedding type (float16 halves the size)")
    _common(p)
    return p


def _index(args: argparse.Namespace) -> int:
    folder, out = Path(args.folder), Path(args.output)
    if not folder.exists():
        raise CliError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise CliError(f"{folder} is a file; isfe-index takes a folder of images (use isfe-embed for single files)")
    _refuse_output_folder_over_inputs(out, args.model, folder)
    if out.resolve() in folder.resolve().parents:
        raise CliError(f"the image folder {folder} is inside the output folder {out}; replacing the output would "
                       f"delete the images — choose an -o outside {folder}")
    if out.exists() or out.is_symlink():
        _check_replaceable(out, args.overwrite)  # refuse before the (long) embedding, not after
    enc = _open_encoder(args, "isfe-index")
    try:
        gal = Gallery.build(enc, folder, skip_bad=args.skip_bad, progress=_progress(args), dtype=args.dtype,
                            batch_size=args.batch_size, exclude=[out])
    except ImageError as e:
        raise CliError(f"{e}. Fix or remove the file, or pass --skip-bad to skip bad files") from None
    skipped = gal.manifest["skipped"]
    if skipped and not args.quiet:
        _print_skipped(skipped, out)
    gal.save(out, overwrite=args.overwrite)
    n_labels = len({lab for lab in gal.labels if lab is not None})
    print(f"indexed {len(gal)} images ({len(skipped)} skipped) from {printable(folder)} into {printable(out)}: "
          f"dim {gal.dim}, {gal.dtype}, {n_labels} labels")
    return EXIT_OK


def _print_skipped(skipped: Sequence[dict[str, Any]], out: Path) -> None:
    """One stderr line per skipped path (the first SHOWN_SKIPS), then how many more the manifest lists."""
    print(f"isfe-index: skipped {len(skipped)} file(s) or folder(s):", file=sys.stderr)
    for s in skipped[:SHOWN_SKIPS]:
        print(f"  {printable(s['path'])}: {printable(s['reason'])}", file=sys.stderr)
    if len(skipped) > SHOWN_SKIPS:
        print(f"  ... and {len(skipped) - SHOWN_SKIPS} more (all listed in {printable(out / 'manifest.json')})",
              file=sys.stderr)


def index_main(argv: Sequence[str] | None = None) -> int:
    """``isfe-index MODEL FOLDER -o GALLERY_DIR [--skip-bad] [--overwrite]``."""
    return _run("isfe-index", _index_parser, _index, argv)


# --------------------------------------------------------------------------- isfe-search


def _search_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="isfe-search", description="Find the gallery images most similar (cosine) to each query image.")
    p.add_argument("model", help="the .onnx model file the gallery was built with")
    p.add_argument("gallery", metavar="GALLERY_DIR", help="gallery folder written by isfe-index")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="query image(s)")
    p.add_argument("-k", type=positive_int, default=10, help="neighbours per query (default 10)")
    p.add_argument("--json", action="store_true", help="print JSON on stdout")
    p.add_argument("--backend", choices=("numpy", "faiss"), default="numpy",
                   help="exact search engine: numpy (default) or faiss (pip install \"isfe-model[faiss]\")")
    _common(p)
    return p


def _search(args: argparse.Namespace) -> int:
    enc = _open_encoder(args, "isfe-search")
    gal = Gallery.load(args.gallery, encoder=enc, backend=args.backend, mmap=True)
    q = enc.embed(args.images, batch_size=args.batch_size, progress=_progress(args) and len(args.images) > 100)
    res = gal.search(q, k=args.k)
    if args.json:
        doc: dict[str, Any] = {
            "model": str(enc.model_path),
            "fingerprint": enc.fingerprint,
            "providers": enc.providers,
            "gallery": str(args.gallery),
            "gallery_size": len(gal),
            "k": int(res.indices.shape[1]),
            "results": [{"query": str(img), "hits": res.hits(i)} for i, img in enumerate(args.images)],
        }
        print(_json_text(doc))
    else:
        for i, img in enumerate(args.images):
            print(f"query {printable(img)}")
            for h in res.hits(i):
                label = f"  [{printable(h['label'])}]" if h["label"] is not None else ""
                print(f"  {h['rank']:>3}  {h['score']:.4f}  {printable(h['id'])}{label}")
    return EXIT_OK


def search_main(argv: Sequence[str] | None = None) -> int:
    """``isfe-search MODEL GALLERY_DIR IMAGE... [-k 10] [--json]``."""
    return _run("isfe-search", _search_parser, _search, argv)


# --------------------------------------------------------------------------- python -m isfe_model


def _info_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="isfe-info",
                description="Print what a model says about itself and what ONNX Runtime runs it on (JSON).")
    p.add_argument("model", nargs="?", help="the .onnx model file (omit to show only the onnxruntime build)")
    _common(p)
    return p


def _info(args: argparse.Namespace) -> int:
    if args.model is None:
        print(json.dumps(runtime_info(), indent=2))
        return EXIT_OK
    args.quiet = True
    enc = _open_encoder(args, "isfe-info")
    print(json.dumps(enc.info(), indent=2, default=str))
    return EXIT_OK


def info_main(argv: Sequence[str] | None = None) -> int:
    """``python -m isfe_model info [MODEL]``."""
    return _run("isfe-info", _info_parser, _info, argv)


COMMANDS: dict[str, Callable[[Sequence[str] | None], int]] = {
    "embed": embed_main,
    "index": index_main,
    "search": search_main,
    "info": info_main,
    "models": models_main,
}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m isfe_model {embed,index,search,info,models} ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m isfe_model {embed,index,search,info,models} ...\n\n"
              "  embed   MODEL IMAGE... -o OUT.npy\n"
              "  index   MODEL FOLDER -o GALLERY_DIR [--skip-bad] [--overwrite]\n"
              "  search  MODEL GALLERY_DIR IMAGE... [-k 10] [--json]\n"
              "  info    [MODEL]\n"
              "  models  [--json]   list the installed model packages (name, version, dim, precisions)\n",
              file=sys.stderr if not argv else sys.stdout)
        return EXIT_USAGE if not argv else EXIT_OK
    if argv[0] == "--version":
        print(f"isfe-model {__version__}")
        return EXIT_OK
    cmd = COMMANDS.get(argv[0])
    if cmd is None:
        print(f"isfe_model: error: unknown command {printable(repr(argv[0]))}; choose one of {', '.join(COMMANDS)}",
              file=sys.stderr)
        return EXIT_USAGE
    return cmd(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
