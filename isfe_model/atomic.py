"""Writing files and folders so that readers never see half of them.

Every output goes to a temporary name in the destination folder first and is
renamed into place (``os.replace``, atomic on POSIX and Windows for files).
A folder is swapped in whole: on Linux with one ``renameat2(RENAME_EXCHANGE)``
(the path always names a complete folder, old or new), elsewhere with two
renames.  :func:`open_together` is the reader's half: files opened through one
directory handle all come from the same folder, whatever is swapped in meanwhile.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import shutil
import stat
import sys
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Callable, Sequence

import numpy as np

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_save_npy", "default_mode", "exchange_paths", "open_together",
           "output_target", "replace_directory", "about_temporary", "unwritable_error"]

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
#: errno values of renameat2 that mean "this system or file system cannot exchange": fall back to two renames.
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP), errno.EXDEV}


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
    permissions; a new one gets the umask's.  A failed write is an OSError naming ``path``
    (``cannot be written (<reason>)``, errno kept), never the temporary file.
    """
    path = output_target(path)
    parent = path.parent if str(path.parent) else Path(".")
    mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else default_mode()
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    except OSError as e:
        raise unwritable_error(e, path) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if about_temporary(e, tmp):
            raise unwritable_error(e, path) from e  # the file asked for, not our temporary one
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(parent)
    return path


def about_temporary(e: OSError, tmp: str | os.PathLike) -> bool:
    """Whether ``e`` is a system error about the temporary file or folder ``tmp`` (or a file in it), or names no
    file at all: then :func:`unwritable_error` should name the target instead."""
    return e.errno is not None and (e.filename is None or str(e.filename).startswith(str(tmp)))


def unwritable_error(e: OSError, path: str | os.PathLike) -> OSError:
    """``e`` (errno kept) as an error about ``path``: ``cannot be written (<reason>)``.

    For a write that failed on a temporary file next to ``path``: the message names the file
    the user asked for, not ours.
    """
    reason = e.strerror or str(e)
    if not reason.startswith("cannot be written ("):  # a file inside a folder being written: said once
        reason = f"cannot be written ({reason})"
    return OSError(e.errno, reason, str(path))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file and a rename."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_save_npy(path: str | os.PathLike, arr: np.ndarray) -> Path:
    """``np.save`` without pickle, atomically."""
    return atomic_write(path, lambda f: np.save(f, np.ascontiguousarray(arr), allow_pickle=False))


@functools.lru_cache(maxsize=1)
def _renameat2() -> Callable[..., int] | None:
    """glibc's ``renameat2`` (Linux >= 3.15, glibc >= 2.28), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # musl or an old glibc
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def exchange_paths(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two existing paths in one atomic step (``renameat2(RENAME_EXCHANGE)``).

    Returns False, changing nothing, where the system or file system cannot do it
    (not Linux, old kernel or libc, a file system without exchange).

    Raises:
        OSError: the exchange itself failed (e.g. a path does not exist).
    """
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _NO_EXCHANGE:
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


#: Tries of the two-rename fallback when other writers keep replacing the same folder.
SWAP_ATTEMPTS = 20


def _identity(path: Path) -> tuple[int, int, int] | None:
    """(device, inode, ctime) of ``path`` itself (links not followed), None if nothing is there.

    A folder swapped in by another writer is a different inode; one whose files change in place gets a new ctime.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_ctime_ns


def _swap_in(tmp: Path, target: Path, may_replace: Callable[[Path], bool]) -> Path | None:
    """Put folder ``tmp`` at ``target``; returns the path now holding the replaced folder (to delete), or None.

    An existing ``target`` is exchanged with ``tmp`` in one step where the system can (a reader
    never finds ``target`` missing), else moved aside and replaced (two renames).  ``may_replace``
    refusing counts only if ``target`` stayed the same folder while it was checked: one that
    another writer swapped meanwhile can look incomplete, and is looked at again.
    """
    for attempt in range(SWAP_ATTEMPTS):  # target may appear or go away between the check and the rename
        if attempt:  # another writer is between its two renames: let it finish
            time.sleep(min(0.05, 0.001 * 2**attempt))
        seen = _identity(target)
        if seen is not None:
            if not may_replace(target):
                if _identity(target) != seen:  # another writer swapped it while it was checked: look again
                    continue
                raise FileExistsError(str(target))
            try:
                swapped = exchange_paths(tmp, target)
            except FileNotFoundError:  # target went away after the check: start over
                continue
            if swapped:
                return tmp  # tmp now names the old folder
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=tmp.parent))
            old.rmdir()
            try:
                os.replace(target, old)
            except FileNotFoundError:  # another writer moved it aside first
                continue
            try:
                os.replace(tmp, target)
            except OSError as e:
                if e.errno in (errno.EEXIST, errno.ENOTEMPTY):  # another writer's folder came first: replace that
                    shutil.rmtree(old, ignore_errors=True)
                    continue
                os.replace(old, target)  # put the old one back
                raise
            except BaseException:
                os.replace(old, target)
                raise
            return old
        try:
            os.replace(tmp, target)
            return None
        except OSError as e:  # another writer created target meanwhile: replace that one
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    raise FileExistsError(str(target))


def replace_directory(
    target: str | os.PathLike, fill: Callable[[Path], None], may_replace: Callable[[Path], bool]
) -> Path:
    """Create folder ``target`` atomically: ``fill(tmpdir)`` writes its files, then it is renamed into place.

    If ``target`` exists, ``may_replace(target)`` must return True (the caller
    checks that it is safe to delete); the new folder is exchanged with the old
    one in one step (Linux; elsewhere the old one is moved aside first) and the
    old one deleted.  On any error the temporary folder is removed and
    ``target`` is left as it was; an OSError about the temporary folder or a file
    in it is raised as one naming ``target`` (as :func:`atomic_write` does).
    """
    target = Path(target)
    parent = target.parent if str(target.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent))
    except OSError as e:
        raise unwritable_error(e, target) from None
    try:
        fill(tmp)
        os.chmod(tmp, default_mode(directory=True))
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = _swap_in(tmp, target, may_replace)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if about_temporary(e, tmp):
            raise unwritable_error(e, target) from e  # the folder asked for, not our temporary one
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(parent)
    return target


def open_together(folder: str | os.PathLike, names: Sequence[str]) -> list[BinaryIO]:
    """Open ``folder/name`` for each name, read-only, all from the same folder.

    The files are opened through one handle on the folder (``dir_fd``), so a
    folder swapped in by :func:`replace_directory` meanwhile cannot mix in: all
    come from the old folder, or opening fails (``FileNotFoundError``, the old
    folder was deleted) and the caller may try again.  Without ``dir_fd``
    support (Windows) the files are opened by path, one right after the other.

    Raises:
        OSError: a file is missing, unreadable or not a regular file (``errno.EINVAL``).
    """
    fds: list[int] = []
    try:
        if os.open in os.supports_dir_fd:
            dfd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            try:
                for name in names:  # O_NONBLOCK: a FIFO put in a file's place must not block the open
                    fds.append(os.open(name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0), dir_fd=dfd))
            finally:
                os.close(dfd)
        else:
            for name in names:
                fds.append(os.open(os.path.join(folder, name), os.O_RDONLY | getattr(os, "O_BINARY", 0)))
        for fd, name in zip(fds, names, strict=True):
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, "not a regular file", os.path.join(folder, name))
        return [os.fdopen(fd, "rb") for fd in fds]
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
