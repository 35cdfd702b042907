"""Small helpers shared by the export steps: the error type and atomic file writes.

Every artifact is written under a temporary name in its final folder and only
renamed (``os.replace``, atomic on one file system) once it has been verified,
so a final name never holds a half-written or unverified file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from isfe_model.atomic import default_mode, output_target, unwritable_error
from isfe_model.jsonsafe import write_json

__all__ = ["ExportError", "default_dir_mode", "check_output_path", "publish", "remove_quietly", "temp_path_for",
           "write_json_atomic"]


class ExportError(RuntimeError):
    """A user-facing export failure: the message names the problem and the fix."""


def check_output_path(path: str | os.PathLike, flag: str) -> Path:
    """Validate an output file path given on the command line.

    Raises:
        ExportError: when its folder does not exist, or the path is a folder.
    """
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.exists():
        raise ExportError(f"{flag} {p}: output directory {parent} does not exist; create it (mkdir -p {parent}) or "
                          "pick another path")
    if not parent.is_dir():
        raise ExportError(f"{flag} {p}: {parent} is not a directory")
    if p.is_dir():
        raise ExportError(f"{flag} {p} is a directory; give a file name such as {p / 'model.onnx'}")
    try:
        return output_target(p)  # a symlink is written through; a device or FIFO (/dev/null) is refused
    except OSError as e:
        raise ExportError(f"{flag} {e}") from None


def temp_path_for(final: str | os.PathLike, suffix: str = "") -> Path:
    """A fresh, unused temporary path next to ``final`` (same folder => atomic rename)."""
    final = Path(final)
    folder = final.parent if str(final.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".tmp{suffix}", dir=folder)
    except OSError as e:  # e.g. a folder that takes no new files: name the artifact, not our temporary file
        raise unwritable_error(e, final) from None
    os.close(fd)
    return Path(tmp)


def publish(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Move a verified temporary file to its final name (atomic replace).

    Temporary files are created private (0600); the published file gets the
    usual permissions (0666 minus the umask).
    """
    os.chmod(tmp, default_mode())
    os.replace(tmp, final)
    return Path(final)


def default_dir_mode() -> int:
    """Permissions of a new folder under the current umask (0777 minus the umask)."""
    return default_mode(directory=True)


def remove_quietly(*paths: str | os.PathLike | None) -> None:
    """Delete temporary files, ignoring those already gone."""
    for p in paths:
        if p is not None:
            try:
                Path(p).unlink(missing_ok=True)
            except OSError:
                pass


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented strict JSON, atomically (:func:`isfe_model.jsonsafe.write_json`: NaN/Inf -> null)."""
    return write_json(path, obj, indent=2)
