"""Writing files and folders so that readers never see half of them.

Every output goes to a temporary name in the destination folder first and is
renamed into place (``os.replace``, atomic on POSIX and Windows for files).
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_save_npy", "default_mode", "output_target", "replace_directory"]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The permissions ``open``/``mkdir`` would give a new file or folder under the current umask.

    ``tempfile`` creates 0600 files and 0700 folders; an output renamed into
    place keeps those, so that, say, a gallery built by one user could not be
    served by another.  Outputs get the usual permissions instead.
    """
    return (0o777 if directory else 0o666) & ~_umask()


def output_target(path: str | os.PathLike) -> Path:
    """Where writing ``path`` lands: a symlink's target (the link stays a link); refuses what is not a file.

    Raises:
        IsADirectoryError: ``path`` is a folder.
        FileExistsError: ``path`` is a device, FIFO or socket (``-o /dev/null``): renaming a new file
            over it would replace it.
    """
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file name inside it")
    if path.exists() and not stat.S_ISREG(path.stat().st_mode):
        raise FileExistsError(f"{path} exists and is not a regular file (a device, FIFO or socket); "
                              f"give the path of a file to create or replace")
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it to ``path``.

    Readers see the old file or the complete new one, never a part; on any error the
    temporary file is removed and ``path`` is untouched.  A symlink is written
    through (its target is replaced, the link kept); a device, FIFO or socket is
    refused (``FileExistsError``), never replaced.  A replaced file keeps its
    permissions; a new one gets the umask's.
    """
    path = output_target(path)
    parent = path.parent if str(path.parent) else Path(".")
    mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else default_mode()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file and a rename."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_save_npy(path: str | os.PathLike, arr: np.ndarray) -> Path:
    """``np.save`` without pickle, atomically."""
    return atomic_write(path, lambda f: np.save(f, np.ascontiguousarray(arr), allow_pickle=False))


def replace_directory(target: str | os.PathLike, fill: Callable[[Path], None], may_replace: Callable[[Path], bool]) -> Path:
    """Create folder ``target`` atomically: ``fill(tmpdir)`` writes its files, then it is renamed into place.

    If ``target`` exists, ``may_replace(target)`` must return True (the caller
    checks that it is safe to delete); the old folder is moved aside, the new
    one renamed in, and the old one deleted.  On any error the temporary
    folder is removed and ``target`` is left as it was.
    """
    target = Path(target)
    parent = target.parent if str(target.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent))
    try:
        fill(tmp)
        os.chmod(tmp, default_mode(directory=True))
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if target.exists() or target.is_symlink():
            if not may_replace(target):
                raise FileExistsError(str(target))
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=parent))
            old.rmdir()
            os.replace(target, old)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old, target)  # put the old one back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(parent)
    return target
