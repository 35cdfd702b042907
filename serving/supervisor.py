"""Running the server: one process, or a supervisor with N uvicorn workers sharing the port.

**One process** (:func:`run_single`): uvicorn's ``Server``.  SIGTERM/SIGINT:
stop accepting, let the requests in flight finish (at most
``--shutdown-timeout`` seconds), stop the batcher and the decode workers, exit
0.  SIGHUP: reload the gallery (:mod:`serving.reload`).

**Several workers** (:func:`run_workers`): a fresh run folder
(``isfe-serve-*`` in the temp dir) holds the prometheus_client multiprocess
files (``PROMETHEUS_MULTIPROC_DIR``, so ``/metrics`` on any worker reports all
of them) and the gallery generation file; it is removed when the server
stops.  uvicorn's supervisor restarts dead workers and forwards SIGTERM to
them (each shuts down gracefully as above); :class:`ReloadingMultiprocess`
turns SIGHUP -- which stock uvicorn answers by restarting every worker -- into
a gallery reload that every worker performs in place.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
from typing import Any

from .metrics import MULTIPROC_ENV
from .reload import bump_generation, read_generation
from .state import CONFIG_ENV, ServeConfig

__all__ = ["ReloadingMultiprocess", "run_single", "run_workers"]

log = logging.getLogger("serving")


def _uvicorn_multiprocess() -> type:
    from uvicorn.supervisors.multiprocess import Multiprocess

    return Multiprocess


class ReloadingMultiprocess(_uvicorn_multiprocess()):  # type: ignore[misc]
    """uvicorn's worker supervisor, with SIGHUP = "every worker reloads its gallery" instead of "restart every
    worker"."""

    def __init__(self, config: Any, sockets: list, run_dir: str, gallery: str):
        super().__init__(config, sockets)
        self.run_dir, self.gallery = run_dir, gallery

    def handle_hup(self) -> None:
        path = read_generation(self.run_dir)[1] or self.gallery
        gen = bump_generation(self.run_dir, path)
        log.info("SIGHUP: every worker reloads the gallery from %s (generation %d)", path, gen)


def run_single(app: Any, cfg: ServeConfig, **kwargs: Any) -> int:
    """Serve ``app`` in this process until SIGTERM/SIGINT; 0 after a clean shutdown, 1 if the port could not be
    bound."""
    import uvicorn

    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, lifespan="on", **kwargs)
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal that stopped it once it is done; a no-op handler turns that into exit 0.
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    # uvicorn sets started=False and returns when the socket could not be bound
    return 0 if server.started else 1


def run_workers(cfg: ServeConfig, **kwargs: Any) -> int:
    """Serve with ``cfg.workers`` uvicorn worker processes (see the module docstring); returns the exit code."""
    import uvicorn

    run_dir = tempfile.mkdtemp(prefix="isfe-serve-")
    prom = os.path.join(run_dir, "prometheus")
    os.mkdir(prom)
    cfg.run_dir = run_dir
    os.environ[MULTIPROC_ENV] = prom  # before any worker imports prometheus_client
    os.environ[CONFIG_ENV] = cfg.to_json()
    try:
        config = uvicorn.Config("serving.app:create_app_from_env", factory=True, host=cfg.host, port=cfg.port,
                                workers=cfg.workers, **kwargs)
        sock = config.bind_socket()  # logs and exits 1 when the port is taken
        ReloadingMultiprocess(config, [sock], run_dir, cfg.gallery).run()
        return 0
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
        os.environ.pop(MULTIPROC_ENV, None)
