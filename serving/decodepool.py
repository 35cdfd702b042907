"""Decode worker processes: every untrusted JSON body and every image but the smallest is parsed here, with a time
limit (PNG and sequential JPEG uploads of at most 64 KiB and 256 x 256 pixels decode in the server process: see
:meth:`DecodePool.decode`).

A decode running in a thread cannot be stopped; a decode running in a child
process can.  :class:`DecodePool` keeps ``workers`` child processes (started
from a ``forkserver``, so a replacement costs one ``fork`` of a process that
has numpy and Pillow loaded) and one thread per worker in the server that
hands a job over a pipe and waits for the answer:

    t = 0                 job sent to an idle worker
    t = DEMOTE_AFTER_S    no answer yet: the worker is re-niced to 19 (it keeps
                          running, but normal work on the machine goes first)
    t = time_limit_s      no answer yet: SIGKILL, a fresh worker takes its
                          place, and the request gets 422 ``decode_timeout``

A worker that was demoted is retired after its job and replaced (a process
cannot lower its own niceness again), so the pool always offers full-priority
workers to ordinary requests.  Each worker also runs under an address-space
limit: its own footprint once numpy and Pillow are loaded (measured after the
warm-up, so it does not depend on the machine's libraries or CPU count) plus
``memory_mb``.  A decode that needs more memory fails with ``MemoryError``
(413) instead of taking the machine's memory.

Jobs queue in the thread pool (first come, first served) when every worker is
busy; the pool therefore protects other clients from as many simultaneous
hostile uploads as it has workers minus one.
"""

from __future__ import annotations

import asyncio
import io
import logging
import multiprocessing
import os
import queue
import resource
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np

from isfe_model.preprocess import PreprocessSpec, lift_pillow_pixel_limit, reuse_image_memory

from .decoding import (
    INLINE_MAX_BYTES,
    Upload,
    decode_image,
    decodes_inline,
    parse_json_body,
    parse_openai_body,
    read_header,
)
from .errors import ApiError

__all__ = ["DEMOTE_AFTER_S", "DecodePool", "DecodePoolError"]

log = logging.getLogger("serving.decode")

#: After this long on one job a worker is re-niced to 19 (ordinary uploads decode in milliseconds).
DEMOTE_AFTER_S = 0.05
#: Niceness of a demoted worker.
DEMOTED_NICE = 19
#: How long start() waits for the workers to answer their first ping.
START_TIMEOUT_S = 60.0


class DecodePoolError(RuntimeError):
    """The pool could not start its workers (names the cause)."""


def _warm_up(spec: PreprocessSpec, max_pixels: int) -> None:
    """Load Pillow's plugins and run one tiny decode, so that a fresh worker's first real job pays no imports."""
    from PIL import Image

    for fmt in ("PNG", "JPEG"):
        buf = io.BytesIO()
        Image.new("RGB", (4, 4), (1, 2, 3)).save(buf, fmt)
        try:
            decode_image(Upload(f"warm-up.{fmt.lower()}", buf.getvalue()), spec, max_pixels)
        except ApiError:
            pass


def _address_space_bytes() -> int:
    """This process's mapped address space (VmSize), from ``/proc/self/statm``; 0 where there is no /proc."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _limit_address_space(extra_bytes: int) -> None:
    """``RLIMIT_AS`` = current footprint + ``extra_bytes`` (never above an inherited hard limit)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _address_space_bytes() + extra_bytes
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _worker_main(conn: Any, spec: PreprocessSpec, max_pixels: int, memory_bytes: int) -> None:
    """Child process: answer ``(kind, name, payload, args)`` jobs until the pipe closes or ``None`` arrives."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the server, which stops the pool
    lift_pillow_pixel_limit(max_pixels)
    reuse_image_memory()
    _warm_up(spec, max_pixels)
    if memory_bytes > 0:
        _limit_address_space(memory_bytes)
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        kind, name, payload, args = job
        try:
            if kind == "image":
                answer: tuple = ("ok", decode_image(Upload(name, payload), spec, max_pixels))
            elif kind == "json":
                answer = ("ok", parse_json_body(payload, *args))
            elif kind == "openai":
                answer = ("ok", parse_openai_body(payload, *args))
            elif kind == "ping":
                answer = ("ok", os.getpid())
            else:
                answer = ("error", f"unknown job kind {kind!r}")
        except ApiError as e:
            answer = ("api_error", e.status, e.code, e.detail)
        except MemoryError:
            answer = ("api_error", 413, "too_costly", f"{name}: parsing it needs more memory than the server allows "
                                                      f"per request (--decode-memory-mb); send a smaller request")
        except Exception as e:  # noqa: BLE001 - reported to the parent, which answers 422
            answer = ("error", f"{type(e).__name__}: {e}")
        del job, payload
        try:
            conn.send(answer)
        except (OSError, ValueError):
            return


class _Worker:
    def __init__(self, ctx: Any, spec: PreprocessSpec, max_pixels: int, memory_bytes: int):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child, spec, max_pixels, memory_bytes),
                                   name="isfe-decode-worker", daemon=True)
        self.process.start()
        child.close()
        self.demoted = False

    def demote(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, self.process.pid, DEMOTED_NICE)
            self.demoted = True
        except OSError as e:  # e.g. the process just ended
            log.debug("cannot renice decode worker %s: %s", self.process.pid, e)

    def signal_kill(self) -> None:
        """SIGKILL without waiting (a demoted process might wait long for the CPU to exit by itself)."""
        if self.process.is_alive():
            self.process.kill()

    def reaped(self) -> bool:
        """Join the process if it has ended (non-blocking); True once it has."""
        self.process.join(0)
        if self.process.exitcode is None:
            return False
        self.conn.close()
        return True

    def kill(self) -> None:
        self.signal_kill()
        self.process.join(5)
        self.conn.close()


class DecodePool:
    """``workers`` decode processes; :meth:`decode` / :meth:`parse_json` are awaitable and time-limited.

    Args:
        spec: the model's preprocessing (output float32 [3, S, S]).
        max_pixels: decoded-pixel limit per image.
        workers: processes (= simultaneous decodes).
        time_limit_s: longest a single job may take before its worker is killed (422 ``decode_timeout``).
        memory_mb: memory one decode may use, in MiB, beyond the worker's own footprint (0: no limit).
        on_restart: called with a reason ("timeout", "crash", "demoted") whenever a worker is replaced.
        inline: decode small PNG/JPEG uploads in the calling thread (see :meth:`decode`); False sends every
            upload to a worker.
    """

    def __init__(self, spec: PreprocessSpec, max_pixels: int, workers: int = 4, time_limit_s: float = 10.0,
                 memory_mb: int = 2048, on_restart: Callable[[str], None] | None = None, inline: bool = True):
        if workers < 1 or not time_limit_s > 0:
            raise ValueError(f"need workers >= 1 and time_limit_s > 0, got {workers}, {time_limit_s}")
        self.spec, self.max_pixels, self.workers = spec, int(max_pixels), int(workers)
        self.time_limit_s = float(time_limit_s)
        self.memory_bytes = int(memory_mb) * 1024 * 1024
        self.on_restart = on_restart
        self.inline, self.inline_decodes = bool(inline), 0
        self._ctx = multiprocessing.get_context("forkserver")
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._all: set[_Worker] = set()
        self._dying: list[_Worker] = []  # killed, not yet reaped (reaped off the request path)
        self._dying_lock = threading.Lock()
        self._threads: ThreadPoolExecutor | None = None
        self.restarts = 0

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> "DecodePool":
        """Start the workers and wait until each answers (raises :class:`DecodePoolError`)."""
        self._ctx.set_forkserver_preload(["serving.decodepool"])
        workers = [self._new_worker(ping=True) for _ in range(self.workers)]
        deadline = time.monotonic() + START_TIMEOUT_S
        for w in workers:
            if not w.conn.poll(max(0.0, deadline - time.monotonic())):
                self.stop()
                raise DecodePoolError(f"decode worker {w.process.pid} did not start within {START_TIMEOUT_S:.0f} s")
            try:
                w.conn.recv()
            except (EOFError, OSError):
                self.stop()
                raise DecodePoolError(f"decode worker exited at start (exit code {w.process.exitcode}); see "
                                      f"the log above") from None
            self._idle.put(w)
        self._threads = ThreadPoolExecutor(self.workers, thread_name_prefix="isfe-decode")
        return self

    def _new_worker(self, ping: bool = False) -> _Worker:
        w = _Worker(self._ctx, self.spec, self.max_pixels, self.memory_bytes)
        if ping:
            w.conn.send(("ping", "", b"", ()))
        self._all.add(w)
        return w

    @property
    def alive(self) -> bool:
        return self._threads is not None

    def stop(self) -> None:
        threads, self._threads = self._threads, None
        if threads is not None:
            threads.shutdown(wait=False, cancel_futures=True)
            for _ in range(self.workers):  # wake threads waiting for an idle worker
                self._idle.put(None)  # type: ignore[arg-type]
        for w in list(self._all) + self._dying:
            w.kill()
        self._all.clear()
        self._dying.clear()

    # ------------------------------------------------------------------- jobs
    async def decode(self, upload: Upload) -> np.ndarray:
        """Upload bytes -> float32 [3, S, S]; raises :class:`ApiError` (4xx) for bad or too costly images.

        Small uploads (:func:`serving.decoding.decodes_inline`: PNG or sequential JPEG of at most 64 KiB and
        256 x 256 pixels) are decoded right here, on the caller's thread: bounded work (about 1-2 ms), which
        skips the pipe round trip to a worker (its cost on serve_bench is not yet measured).  Everything else
        goes to a worker process (time and memory limits).
        """
        if self.inline and len(upload.data) <= INLINE_MAX_BYTES:
            header = read_header(upload, self.max_pixels)  # cheap on <= 64 KiB; raises the same 4xx
            if decodes_inline(upload, header):
                self.inline_decodes += 1
                return decode_image(upload, self.spec, self.max_pixels, header)
        return await self._submit("image", upload.name, upload.data, ())

    async def parse_json(self, raw: bytes, max_images: int,
                         vectors: bool = False) -> tuple[list[Upload], dict[str, Any]]:
        """JSON body -> (uploads, fields), parsed in a worker (see :func:`serving.decoding.parse_json_body`)."""
        return await self._submit("json", "JSON body", raw, (max_images, vectors))

    async def parse_openai(self, raw: bytes, max_images: int) -> tuple[list[Upload], dict[str, Any]]:
        """OpenAI-shaped embeddings body -> (uploads, fields) (see :func:`serving.decoding.parse_openai_body`)."""
        return await self._submit("openai", "JSON body", raw, (max_images,))

    async def _submit(self, kind: str, name: str, payload: bytes, args: tuple) -> Any:
        threads = self._threads
        if threads is None:
            raise ApiError(503, "not_ready", "server is starting or shutting down; retry")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(threads, self.run, kind, name, payload, args)
        except RuntimeError as e:  # the executor was shut down under us
            if self._threads is None:
                raise ApiError(503, "not_ready", "server is shutting down; retry") from None
            raise e

    def run(self, kind: str, name: str, payload: bytes, args: tuple = ()) -> Any:
        """Blocking: one job on one worker, with demotion and the time limit (runs on a pool thread)."""
        w = self._idle.get()
        if w is None:  # stopping
            self._idle.put(None)  # type: ignore[arg-type]
            raise ApiError(503, "not_ready", "server is shutting down; retry")
        replace: str | None = None
        try:
            w.conn.send((kind, name, payload, args))
            if not w.conn.poll(DEMOTE_AFTER_S):
                w.demote()
                if not w.conn.poll(max(0.0, self.time_limit_s - DEMOTE_AFTER_S)):
                    replace = "timeout"
                    raise ApiError(422, "decode_timeout", self._timeout_detail(kind, name))
            answer = w.conn.recv()
        except (EOFError, OSError) as e:
            if self._threads is None:
                raise ApiError(503, "not_ready", "server is shutting down; retry") from None
            replace = "crash"
            w.process.join(1)  # reap it, for the exit code
            code = w.process.exitcode
            how = (f"signal {-code}" if code is not None and code < 0
                   else f"exit code {code}" if code is not None else type(e).__name__)
            raise ApiError(422, "decode_failed", f"{name}: the decoder process ended abnormally ({how}); "
                                                 f"this file cannot be decoded by this server") from None
        finally:
            self._give_back(w, replace or ("demoted" if w.demoted else None))
        status = answer[0]
        if status == "ok":
            return answer[1]
        if status == "api_error":
            raise ApiError(answer[1], answer[2], answer[3])
        raise ApiError(422, "corrupt_image", f"{name}: cannot decode ({answer[1]})")

    def _timeout_detail(self, kind: str, name: str) -> str:
        limit = f"the server's limit of {self.time_limit_s:g} s (--decode-timeout)"
        if kind in ("json", "openai"):
            return (f"parsing the JSON body took longer than {limit}; send fewer or smaller images, "
                    f"or use multipart/form-data")
        return (f"{name}: decoding the image took longer than {limit}; it is too costly to decode: "
                f"downscale it or re-save it as a plain PNG or baseline JPEG")

    def _give_back(self, w: _Worker, replace: str | None) -> None:
        if replace is None:
            self._idle.put(w)
            return
        self._all.discard(w)
        if self._threads is None:  # stopping: no replacement
            w.kill()
            return
        fresh = self._new_worker()  # its first job waits in the pipe until it is up (a fork: milliseconds)
        self._idle.put(fresh)
        self.restarts += 1
        if self.on_restart is not None:
            try:
                self.on_restart(replace)
            except Exception:  # metrics must never break serving
                log.exception("on_restart callback failed")
        if replace == "timeout":
            log.warning("decode worker %s killed after %.3g s; replaced by %s", w.process.pid, self.time_limit_s,
                        fresh.process.pid)
        w.signal_kill()  # idle (demoted) or runaway (timeout): nothing to finish
        with self._dying_lock:
            self._dying = [d for d in self._dying if not d.reaped()]
            if not w.reaped():
                self._dying.append(w)
