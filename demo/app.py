"""Gradio demo: upload an image (or pick an example) and see its nearest gallery images.

``python -m demo --model MODEL.onnx --gallery GALLERY_DIR [--images-root DIR] [--port 7860] [--allow-indexing ROOT]``

UI:

* left: the query image (upload or example) and a slider for k;
* right: the top-k gallery images in a grid, captioned ``#rank label · score``,
  and the same hits as JSON;
* "Model" tab: model metadata, execution providers and gallery facts;
* "Gallery" tab: index a folder on the server into a new gallery (optionally
  saved to a directory); it replaces the gallery for every user of this demo
  server.  Off unless the demo runs with ``--allow-indexing ROOT``; then only
  folders under ROOT are indexed and galleries are saved only below ROOT.

What the demo publishes (see :mod:`demo.paths`): search results as thumbnails
that Gradio copies into its temporary folder, and the example images, which
are the only files of the image folder on Gradio's ``allowed_paths``.  Nothing
else under the image folder (or anywhere else) is on the file route.  Uploads
are limited in size (Gradio's ``max_file_size`` and a check before decoding)
and decoded only by :func:`isfe_model.preprocess.load_image` (its pixel and
byte limits); uploads and result images are deleted after ``temp_seconds``
(Gradio's ``delete_cache``) and at shutdown.

API (gradio_client)::

    from gradio_client import Client, handle_file
    gallery, result = Client("http://127.0.0.1:7860/").predict(handle_file("q.jpg"), 5, api_name="/search")
    result["hits"]  # [{"rank", "id", "score", "label", "metadata"}, ...]

Search uses :class:`isfe_model.Encoder` and :class:`isfe_model.Gallery`
directly, so its hits equal ``Gallery.search(Encoder.embed([image]), k)``.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry (and no network here)

import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from isfe_model.gallery import list_files
from isfe_model.preprocess import ImageError, load_image

from .paths import (
    PUBLISHABLE_SUFFIXES,
    DemoError,
    UnsafePathError,
    check_gallery_ids,
    contained,
    links_out,
    resolve_under,
)

__all__ = ["DemoError", "DemoState", "UnsafePathError", "build_ui", "check_gallery", "launch", "pick_examples",
           "resolve_image_root"]

log = logging.getLogger("demo")

THUMBNAIL = 192  # pixels, longest side of the grid images
MAX_UPLOAD_BYTES = 20 << 20  # default upload limit (--max-upload-mb 20)
TEMP_SECONDS = 1800  # default age after which uploads and result images are deleted (--temp-minutes 30)
INDEXING_OFF = ("indexing is off on this demo server; start it with --allow-indexing ROOT "
                "to let visitors index folders under ROOT")


def check_gallery(gallery: Any, image_root: Path, where: str) -> int:
    """Every gallery id must name a file inside ``image_root`` (see :func:`demo.paths.contained`); returns the count."""
    return check_gallery_ids(gallery.ids, Path(image_root), where)


def resolve_image_root(
    gallery: Any, override: str | os.PathLike | None, gallery_dir: str | os.PathLike | None = None
) -> Path:
    """The folder the gallery's item ids are relative to.

    ``override`` (``--images-root``) wins; otherwise the manifest's ``source``
    (a relative source is looked up from the working directory, then from
    the gallery directory and its parent).
    Raises :class:`DemoError` when neither names an existing folder.
    """
    if override:
        root = Path(override).expanduser()
        if not root.is_dir():
            raise DemoError(f"--images-root {root} is not a folder")
        return root.resolve()
    source = gallery.manifest.get("source") if isinstance(gallery.manifest, dict) else None
    if isinstance(source, str):
        m = re.match(r"^\d+ files under (.+)$", source)  # a gallery built from a list of files
        source = m.group(1) if m else source
    else:
        source = None
    if not source:
        raise DemoError(
            "the gallery manifest does not record the image folder it was built from; "
            "pass --images-root DIR (the folder given to isfe-index)"
        )
    src = Path(source).expanduser()
    candidates = [src] if src.is_absolute() else [src] + (
        [Path(gallery_dir) / src, Path(gallery_dir).parent / src] if gallery_dir else []
    )
    root = next((c for c in candidates if c.is_dir()), None)
    if root is None:
        raise DemoError(
            f"the gallery's image folder {source!r} (manifest 'source') is not a folder here; pass --images-root DIR"
        )
    return root.resolve()


@dataclass
class _Current:
    gallery: Any
    image_root: Path
    description: str


class DemoState:
    """The model and the current gallery (replaceable from the UI), shared by all sessions.

    ``index_root``: the resolved folder under which the Gallery tab may index
    and save (None: indexing off).  ``max_upload_bytes``: queries larger than
    this are refused before they are decoded.
    """

    def __init__(self, encoder: Any, gallery: Any, image_root: Path, description: str, max_k: int = 50,
                 index_root: Path | None = None, max_upload_bytes: int = MAX_UPLOAD_BYTES):
        self.encoder = encoder
        self.max_k = int(max_k)
        self.index_root = Path(index_root).resolve() if index_root is not None else None
        self.max_upload_bytes = int(max_upload_bytes)
        self._lock = threading.Lock()
        self._current = _Current(gallery, Path(image_root), description)

    @property
    def gallery(self) -> Any:
        return self._current.gallery

    @property
    def image_root(self) -> Path:
        return self._current.image_root

    # ------------------------------------------------------------------ search
    def search(self, image: str | None, k: float | int) -> tuple[list[tuple[Image.Image, str]], dict[str, Any]]:
        """Query image path and k -> (grid items (thumbnail, caption), JSON result)."""
        if image is None or (isinstance(image, str) and not image):
            raise DemoError("upload an image or pick an example first")
        try:
            kf = float(k)
        except (TypeError, ValueError):
            raise DemoError(f"k must be a whole number between 1 and {self.max_k}, got {k!r}") from None
        if not kf.is_integer() or not 1 <= kf <= self.max_k:
            raise DemoError(f"k must be a whole number between 1 and {self.max_k}, got {k!r}")
        self._check_size(image)
        current = self._current  # one consistent (gallery, root) pair even if replaced meanwhile
        t0 = time.perf_counter()
        try:
            q = self.encoder.embed([image])
        except ImageError as e:
            raise DemoError(f"cannot use this image: {e.reason}") from None
        result = current.gallery.search(q, int(kf))
        hits = [_plain(h) for h in result.hits(0)]
        grid = [(self._thumbnail(current.image_root, h["id"]), _caption(h)) for h in hits]
        payload = {
            "k": int(kf),
            "count": len(hits),
            "gallery": {
                "count": len(current.gallery),
                "fingerprint": current.gallery.fingerprint,
                "image_root": str(current.image_root),
            },
            "seconds": round(time.perf_counter() - t0, 4),
            "hits": hits,
        }
        return grid, payload

    def _check_size(self, image: Any) -> None:
        """Refuse a query file over ``max_upload_bytes`` before anything decodes it."""
        try:
            size = os.stat(image).st_size if isinstance(image, (str, os.PathLike)) else 0
        except OSError:
            return  # load_image reports a missing file in its own words
        if size > self.max_upload_bytes:
            raise DemoError(f"the image is {_mib(size)}; this demo takes images up to {_mib(self.max_upload_bytes)} "
                            "(--max-upload-mb); send a smaller file")

    @staticmethod
    def _thumbnail(root: Path, item_id: str) -> Image.Image:
        try:
            path = contained(root, item_id)  # ids are relative paths; never leave the root (checked again here)
            im = load_image(path)
        except (ValueError, ImageError) as e:
            log.warning("gallery image %s unavailable: %s", item_id, e)
            return Image.new("RGB", (64, 64), (200, 200, 200))
        im.thumbnail((THUMBNAIL, THUMBNAIL))
        return im

    # ------------------------------------------------------------------- build
    def build(self, folder: str, save_dir: str | None = None, overwrite: bool = False) -> tuple[str, dict[str, Any]]:
        """Index ``folder`` (on the server, under ``index_root``) with the model; replace the current gallery.

        Paths are absolute or relative to ``index_root`` and resolved (``..``,
        symlinks) before the check; a folder holding symlinks to files outside
        it is refused before anything is read.  With ``save_dir`` (strictly
        below ``index_root``) the new gallery is also written there (atomically)
        and replaces the current one only if saving worked; an existing gallery
        folder there is replaced only with ``overwrite`` (never a non-gallery folder).
        """
        from isfe_model import Gallery

        if self.index_root is None:
            raise DemoError(INDEXING_OFF)
        if not (folder or "").strip():
            raise DemoError(f"enter the path of an image folder under {self.index_root}")
        src = resolve_under(self.index_root, folder, "image folder", "index")
        if not src.is_dir():
            raise DemoError(f"{folder.strip()} is not a folder on the server")
        save_dir = (save_dir or "").strip()
        target = (
            resolve_under(self.index_root, save_dir, "gallery folder", "save galleries in", strict=True)
            if save_dir else None
        )
        t0 = time.perf_counter()
        try:
            outside = links_out(src, list_files(src))
            if outside:
                raise UnsafePathError(f"{len(outside)} file(s) in {folder.strip()} are symlinks to files outside it "
                                      f"(e.g. {outside[0]!r}); the demo indexes only files inside the folder")
            gallery = Gallery.build(self.encoder, str(src), skip_bad=True)
            check_gallery(gallery, src, f"the gallery of {folder.strip()}")  # a link swapped in meanwhile
        except DemoError:
            raise
        except (ValueError, OSError) as e:
            raise DemoError(f"cannot build a gallery from {folder.strip()}: {e}") from None
        saved = ""
        if target is not None:
            try:
                gallery.save(target, overwrite=bool(overwrite))
            except (ValueError, OSError) as e:
                raise DemoError(
                    f"gallery built but not saved to {save_dir}: {e}; the current gallery is unchanged"
                ) from None
            saved = f" and saved to `{save_dir}`"
        with self._lock:
            self._current = _Current(gallery, src, f"built from {src}")
        skipped = gallery.manifest.get("skipped") or []
        msg = f"New gallery: {len(gallery)} images from `{src}`{saved} in {time.perf_counter() - t0:.1f} s."
        if skipped:
            msg += (f" Skipped {len(skipped)} unreadable file(s), "
                    f"e.g. {skipped[0].get('path')}: {skipped[0].get('reason')}.")
        return msg, self.info()

    def info(self) -> dict[str, Any]:
        cur = self._current
        g = cur.gallery
        labels = [lab for lab in g.labels if lab is not None] if hasattr(g, "labels") else []
        return {
            "model": _plain(self.encoder.info()),
            "providers": list(self.encoder.providers),
            "gallery": {
                "count": len(g),
                "dim": int(g.dim),
                "fingerprint": g.fingerprint,
                "classes": len(set(labels)),
                "image_root": str(cur.image_root),
                "origin": cur.description,
                "created": g.manifest.get("created"),
            },
        }


def _plain(obj: Any) -> Any:
    """numpy scalars -> Python numbers, recursively (JSON component input)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _mib(n: int) -> str:
    return f"{n / 1024:.0f} KiB" if n < (1 << 20) else f"{n / (1 << 20):.1f} MiB"


def _caption(hit: dict[str, Any]) -> str:
    label = f" {hit['label']}" if hit.get("label") else ""
    return f"#{hit['rank']}{label} · {hit['score']:.3f}\n{hit['id']}"


def _model_markdown(info: dict[str, Any]) -> str:
    m = info["model"]
    meta = m.get("metadata", m) if isinstance(m, dict) else {}
    g = info["gallery"]
    name = meta.get("model_name") or m.get("model_name", "isfe")
    return (
        f"**Model** `{name}` · dim {m.get('dim', meta.get('embedding_dim'))} · "
        f"providers {', '.join(info['providers'])}  \n"
        f"**Gallery** {g['count']} images · {g['classes']} classes · `{g['image_root']}`"
    )


def _query_image_class(gr: Any) -> type:
    """gr.Image that hands the uploaded file, undecoded, to the search function.

    gr.Image opens the upload with Pillow before the event handler runs (no
    pixel or size limit, and a generic "could not preprocess" error for a
    non-image) and decodes ``data:`` URLs into its cache.  This subclass passes
    the path of the uploaded file on instead (Gradio has already checked that
    it is in its upload folder), so that only isfe_model decodes it, within its
    limits, and reports problems in its words ("not a recognised image format
    ...").  ``data:`` URLs are refused.  It renders with the standard Image frontend.
    """

    class QueryImage(gr.Image):
        def preprocess(self, payload: Any) -> Any:
            if payload is None:
                return None
            url = getattr(payload, "url", None)
            if isinstance(url, str) and url.startswith("data:"):
                raise gr.Error("send the query image as an uploaded file, not as a data: URL")
            return getattr(payload, "path", None) or ""

        def get_block_name(self) -> str:
            return "image"

    return QueryImage


def build_ui(
    state: DemoState, examples: list[str] | None = None, default_k: int = 8, temp_seconds: float = TEMP_SECONDS
) -> Any:
    """The Gradio Blocks app (not launched).

    Files this Blocks creates (uploads, result images) are deleted once older
    than ``temp_seconds`` (checked every ``min(temp_seconds, 300)`` s) and all at
    shutdown (Gradio's ``delete_cache``); the example copies stay while it runs.
    """
    import gradio as gr

    def _search(image: str | None, k: float) -> tuple[list, dict]:
        try:
            return state.search(image, k)
        except DemoError as e:
            raise gr.Error(str(e)) from None

    def _build(folder: str, save_dir: str, overwrite: bool) -> tuple[str, dict, str]:
        try:
            msg, info = state.build(folder, save_dir, overwrite)
        except DemoError as e:
            raise gr.Error(str(e)) from None
        return msg, info, _model_markdown(info)

    info = state.info()
    age = max(1, int(round(temp_seconds)))
    with gr.Blocks(title="ISFE image search", analytics_enabled=False, delete_cache=(min(age, 300), age)) as blocks:
        gr.Markdown(
            "# ISFE image search\nUpload an image or pick an example; the nearest gallery images appear on the right."
        )
        header = gr.Markdown(_model_markdown(info))
        with gr.Tab("Search"):
            with gr.Row():
                with gr.Column(scale=1):
                    query = _query_image_class(gr)(
                        label="Query image", type="filepath", image_mode=None, sources=["upload", "clipboard"]
                    )
                    k = gr.Slider(
                        1, state.max_k, value=min(default_k, state.max_k), step=1, label="k (number of neighbours)"
                    )
                    button = gr.Button("Search", variant="primary")
                    if examples:
                        gr.Examples(
                            examples=[[p] for p in examples], inputs=[query], label="Examples (from the gallery)"
                        )
                with gr.Column(scale=2):
                    grid = gr.Gallery(
                        label="Nearest gallery images", columns=4, height="auto", format="png", object_fit="contain"
                    )
                    hits = gr.JSON(label="Hits (JSON)")
            button.click(_search, inputs=[query, k], outputs=[grid, hits], api_name="search")
            query.upload(_search, inputs=[query, k], outputs=[grid, hits], api_name=False)
        with gr.Tab("Model"):
            model_json = gr.JSON(value=info, label="Model and gallery", open=True)
        with gr.Tab("Gallery"):
            on = state.index_root is not None
            gr.Markdown(
                f"Index an image folder **on the server, under `{state.index_root}`**, with this model. "
                "The new gallery replaces the current one for all users of this demo; "
                "give a directory (below that folder) to also save "
                "it (embeddings.npy, items.jsonl, manifest.json). Paths may be relative to that folder."
                if on else f"{INDEXING_OFF[0].upper()}{INDEXING_OFF[1:]}."
            )
            folder = gr.Textbox(label="Image folder (server path)", placeholder="images", interactive=on)
            save_dir = gr.Textbox(
                label="Save gallery to (optional, server path)", placeholder="gallery", interactive=on
            )
            overwrite = gr.Checkbox(label="Replace an existing gallery in that directory", value=False, interactive=on)
            build_button = gr.Button("Build gallery", interactive=on)
            status = gr.Markdown()
            build_button.click(
                _build,
                inputs=[folder, save_dir, overwrite],
                outputs=[status, model_json, header],
                api_name="build_gallery",
                concurrency_limit=1,
            )
    return blocks


def pick_examples(gallery: Any, image_root: Path, n: int = 6) -> list[str]:
    """Up to ``n`` gallery images spread over the labels, as resolved paths (for gr.Examples).

    Only files inside ``image_root`` (after resolving symlinks) whose real name
    ends in an image suffix (``isfe_model.preprocess.IMAGE_EXTENSIONS``) are
    picked: these paths become Gradio's ``allowed_paths``.
    """
    out: list[str] = []
    seen: set[Any] = set()
    root = Path(image_root).resolve()
    for pass_ in (0, 1):  # first one per label, then fill up
        for item in gallery.items:
            if len(out) >= n:
                return out
            if pass_ == 0 and item.get("label") in seen:
                continue
            try:
                p = contained(root, item["id"])
            except UnsafePathError:
                continue
            if str(p) in out or p.suffix.lower() not in PUBLISHABLE_SUFFIXES or not p.is_file():
                continue
            seen.add(item.get("label"))
            out.append(str(p))
    return out


def launch(
    blocks: Any,
    host: str = "127.0.0.1",
    port: int = 7860,
    allowed_paths: list[str] | None = None,
    concurrency: int = 4,
    prevent_thread_lock: bool = False,
    quiet: bool = False,
    blocked_paths: list[str] | None = None,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
) -> str:
    """Queue (``concurrency`` searches at once) and launch; returns the local URL.

    ``allowed_paths``: the only files outside Gradio's own temporary folders
    that its file route serves (files, not folders: the example images);
    ``blocked_paths`` are never served.  ``GRADIO_ALLOWED_PATHS`` /
    ``GRADIO_BLOCKED_PATHS`` in the environment do not widen them.  Uploads
    over ``max_upload_bytes`` get HTTP 413 (Gradio's ``max_file_size``).
    """
    allowed, blocked = list(allowed_paths or []), list(blocked_paths or [])
    blocks.queue(default_concurrency_limit=max(2, int(concurrency)), max_size=64)
    _, url, _ = blocks.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=True,
        show_error=True,
        allowed_paths=allowed,
        blocked_paths=blocked,
        max_file_size=int(max_upload_bytes),
        ssr_mode=False,
        mcp_server=False,
        quiet=quiet,
        inbrowser=False,
        share=False,
    )
    blocks.allowed_paths, blocks.blocked_paths = allowed, blocked  # an empty list would fall back to the environment
    if not prevent_thread_lock:
        blocks.block_thread()  # what launch() does itself without prevent_thread_lock; Ctrl-C closes the server
    return url
