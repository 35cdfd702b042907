"""Gallery reload without downtime: validate a new gallery, then swap it in atomically.

A reload (``SIGHUP``, or ``POST /v1/admin/reload`` with an optional new
``path``) loads the gallery in a thread with :meth:`isfe_model.Gallery.load`
-- which checks the files against their recorded sha256 (and retries while a
``isfe-index --overwrite`` is replacing the folder) and that ``dim`` and the
model fingerprint are this model's -- and only then replaces the reference
that requests read.  A request reads that reference once, so requests in
flight finish on the gallery they started with; the old gallery is freed
when the last of them is done.  A gallery that fails to load leaves the old
one serving: the failure is logged, counted
(``isfe_gallery_reload_total{result="error"}``) and, for the endpoint,
answered with 422 naming the problem.

**Several workers.**  Each uvicorn worker holds its own gallery.  The workers
of one server share a small *generation file* in the server's run folder
(``gallery.json``: generation number, path): a worker that reloaded on
request (or the supervisor, on SIGHUP) bumps the generation under a file lock,
and every worker polls the file (:data:`WATCH_INTERVAL_S`) and reloads when
the generation moves past its own.  A worker started later (e.g. a
replacement for one that died) starts from the published path.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from isfe_model.jsonsafe import write_json

from .errors import ApiError

__all__ = ["GENERATION_FILE", "GalleryReloader", "LoadedGallery", "bump_generation", "read_generation"]

log = logging.getLogger("serving.reload")

#: Name of the generation file in the run folder.
GENERATION_FILE = "gallery.json"
#: How often a worker looks at the generation file (seconds).
WATCH_INTERVAL_S = 0.25


@dataclass(frozen=True)
class LoadedGallery:
    """A gallery and where/when it came from (replaced as a whole on reload)."""

    gallery: Any
    path: str
    loaded_at: float
    content_sha256: str
    generation: int


def content_sha256(gallery: Any) -> str:
    """sha256 over the embeddings' bytes and the item ids: which gallery content is being served."""
    h = hashlib.sha256()
    emb = gallery.embeddings
    h.update(str(emb.dtype).encode() + str(tuple(emb.shape)).encode())
    h.update(memoryview(emb).cast("B") if emb.flags.c_contiguous else emb.tobytes())
    for it in gallery.items:
        h.update(str(it["id"]).encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    with open(run_dir / (GENERATION_FILE + ".lock"), "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_generation(run_dir: str | Path) -> tuple[int, str | None]:
    """(generation, gallery path) from the run folder's generation file; (0, None) when there is none yet."""
    try:
        doc = json.loads((Path(run_dir) / GENERATION_FILE).read_text())
        return int(doc["generation"]), str(doc["path"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0, None


def bump_generation(run_dir: str | Path, path: str) -> int:
    """Publish a reload of ``path`` to every worker; returns the new generation."""
    d = Path(run_dir)
    with _locked(d):
        gen = read_generation(d)[0] + 1
        write_json(d / GENERATION_FILE, {"generation": gen, "path": str(path), "requested_at": time.time()})
    return gen


class GalleryReloader:
    """Holds the gallery being served and replaces it on reload (see the module docstring).

    Args:
        encoder: the model (the new gallery must match its dim and fingerprint).
        gallery: the gallery loaded at startup, from ``path``.
        backend: the search backend ("numpy" or "faiss").
        metrics: :class:`serving.metrics.ServingMetrics` (reload counter, gallery size).
        run_dir: the server's run folder (several workers), or None (one process).
    """

    def __init__(self, encoder: Any, gallery: Any, path: str, backend: str, metrics: Any, run_dir: str | None = None):
        self.encoder, self.backend, self.metrics = encoder, backend, metrics
        self.run_dir = Path(run_dir) if run_dir else None
        gen = read_generation(self.run_dir)[0] if self.run_dir else 0
        self.current = LoadedGallery(gallery, str(path), time.time(), content_sha256(gallery), gen)
        self.metrics.gallery_items.set(len(gallery))
        self._lock = asyncio.Lock()
        self._watcher: asyncio.Task | None = None
        #: Called (no arguments) after each successful swap, e.g. :func:`serving.app.freeze_long_lived`.
        self.on_swap: Callable[[], None] | None = None

    @property
    def gallery(self) -> Any:
        return self.current.gallery

    def _load(self, path: str) -> tuple[Any, str]:
        from isfe_model import Gallery

        g = Gallery.load(path, encoder=self.encoder, backend=self.backend)
        return g, content_sha256(g)

    async def reload(self, path: str | None = None, publish: bool = True,
                     generation: int | None = None) -> dict[str, Any]:
        """Load ``path`` (default: the current gallery's path again), validate, swap; returns :meth:`info`.

        Raises :class:`ApiError` 422 ``gallery_reload_failed`` (the old gallery keeps serving).
        """
        from isfe_model import GalleryError, MetadataError

        async with self._lock:
            old = self.current
            target = str(path or old.path)
            t0 = time.perf_counter()
            try:
                g, sha = await asyncio.to_thread(self._load, target)
            except (GalleryError, MetadataError, ValueError, OSError, MemoryError, RecursionError) as e:
                self.metrics.reloads.labels("error").inc()
                msg = " ".join(str(e).split())[:1000] or type(e).__name__
                log.error("gallery reload from %s failed, still serving %s (%d items): %s", target, old.path,
                          len(old.gallery), msg)
                raise ApiError(422, "gallery_reload_failed", f"cannot load gallery {target}: {msg}; "
                                                             f"still serving {old.path} "
                                                             f"({len(old.gallery)} items)") from None
            gen = generation if generation is not None else old.generation
            if publish and self.run_dir is not None:
                gen = await asyncio.to_thread(bump_generation, self.run_dir, target)
            self.current = LoadedGallery(g, target, time.time(), sha, gen)  # the swap: one reference assignment
            self.metrics.reloads.labels("ok").inc()
            self.metrics.gallery_items.set(len(g))
            log.info("gallery reloaded from %s: %d items (was %d), content %s, %.0f ms", target, len(g),
                     len(old.gallery), sha[:12], (time.perf_counter() - t0) * 1000)
            del old  # only requests still in flight keep the old gallery now
            if self.on_swap is not None:
                self.on_swap()
            return self.info()

    def info(self) -> dict[str, Any]:
        c = self.current
        g = c.gallery
        return {"path": c.path, "count": len(g), "dim": int(g.dim), "fingerprint": g.fingerprint,
                "content_sha256": c.content_sha256, "generation": c.generation,
                "loaded_at": _dt.datetime.fromtimestamp(c.loaded_at, _dt.timezone.utc).isoformat(
                    timespec="milliseconds"),
                "created": g.manifest.get("created")}

    # ------------------------------------------------------------ workers
    def start_watching(self) -> None:
        if self.run_dir is not None and self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="isfe-gallery-watch")

    async def stop_watching(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None

    async def _watch(self) -> None:
        assert self.run_dir is not None
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            gen, path = read_generation(self.run_dir)
            if gen > self.current.generation and path and not self._lock.locked():
                try:
                    await self.reload(path, publish=False, generation=gen)
                except ApiError:
                    # counted and logged; do not retry this generation
                    self.current = replace(self.current, generation=gen)
                except Exception:  # noqa: BLE001 - the watcher must survive
                    log.exception("gallery watch failed")
