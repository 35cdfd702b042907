"""Walking an image folder and naming what was found: files, ids, labels, and text safe to print.

:func:`walk_files` lists every file under a folder (an explicit stack: any depth, no
recursion) and reports each path it had to leave out; :func:`ids_and_labels` turns the
paths into ids (relative paths with "/") and labels (the first folder below the root).
File names need not be UTF-8: :func:`_printable` makes one writable as UTF-8 (for the
manifest) and :func:`printable` makes any text safe to print on a terminal as one line.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

from .gallery_errors import GalleryError
from .metadata import short_repr

__all__ = ["ids_and_labels", "list_files", "printable", "walk_files"]


def _path_max(folder: Path) -> int:
    """Bytes a path may have, including the terminating NUL (PATH_MAX: 4096 on Linux)."""
    try:
        return int(os.pathconf(folder, "PC_PATH_MAX"))
    except (AttributeError, OSError, ValueError):  # Windows has no pathconf
        return 4096 if os.name == "posix" else 32767


def _inode(path: str | os.PathLike) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def walk_files(folder: str | os.PathLike,
               exclude: Sequence[str | os.PathLike] = ()) -> tuple[list[Path], list[dict[str, str]]]:
    """(files, left_out): every file under ``folder``, sorted by relative path, and what the walk could not take.

    An explicit stack of folders (no recursion, so any depth).  Hidden names (".") and the
    ``exclude`` folders (e.g. the gallery being written) are left out silently.  Left out and
    returned as ``{"path", "reason"}``: links to folders (never followed: loops, and files
    outside ``folder``), folders that cannot be read, and paths over the system's length limit
    (PATH_MAX; nothing could open them).  Links to files are followed like files (the id is
    the link's path).  Files are *not* filtered by extension: a non-image is reported as bad
    (or skipped and listed with ``skip_bad``) when it is embedded, never dropped silently.
    """
    root = Path(folder)
    if not root.is_dir():
        raise GalleryError(f"{root} is not a folder" if root.exists() else f"{root}: no such folder")
    limit = _path_max(root)
    excluded = {key for key in map(_inode, exclude) if key is not None}
    excluded_inodes = {ino for _dev, ino in excluded}
    files: list[str] = []
    left_out: list[dict[str, str]] = []

    def leave_out(path: str, reason: str) -> None:
        left_out.append({"path": _printable(path), "reason": reason})

    stack = [str(root)]
    while stack:
        here = stack.pop()
        try:
            with os.scandir(here) as it:
                entries = list(it)
        except OSError as e:
            leave_out(here, f"folder cannot be read ({e.strerror or e}); its files are not indexed "
                            f"— fix its permissions")
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = entry.path
            size = len(os.fsencode(path))
            if size >= limit:
                leave_out(path, f"path is {size:,} bytes long, over the system limit of {limit - 1:,}; "
                                f"nothing can open it — move it to a shallower folder or index a folder closer to it")
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    # entry.inode() costs no system call; stat (for st_dev) only on a match
                    if entry.inode() not in excluded_inodes or _inode(path) not in excluded:
                        stack.append(path)
                elif entry.is_symlink() and entry.is_dir():
                    leave_out(path, "link to a folder; links to folders are not followed (loops, files outside the "
                                    "folder) — index the folder it points to, or copy it in")
                else:
                    files.append(path)
            except OSError as e:
                leave_out(path, f"cannot be examined ({e.strerror or e})")
    left_out.sort(key=lambda s: s["path"])
    return sorted((Path(f) for f in files), key=lambda p: p.relative_to(root).as_posix()), left_out


def list_files(folder: str | os.PathLike, exclude: Sequence[str | os.PathLike] = ()) -> list[Path]:
    """The files of :func:`walk_files` (what it leaves out is not returned)."""
    return walk_files(folder, exclude)[0]


def ids_and_labels(paths: Sequence[Path], root: Path) -> tuple[list[str], list[str | None]]:
    """(ids, labels): ids = paths relative to ``root`` with "/"; label = first folder below ``root``.

    The label is None for files directly in ``root``.
    """
    ids, labels = [], []
    for p in paths:
        rel = Path(os.path.relpath(p, root)).as_posix()
        ids.append(rel)
        parts = rel.split("/")
        labels.append(parts[0] if len(parts) > 1 else None)
    return ids, labels


def _utf8_ok(text: str) -> bool:
    """False for text that cannot be written as UTF-8 (lone surrogates, e.g. from a non-UTF-8 file name)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _bad_text(where: str, text: str) -> str:
    return (f"{where} is text that is not valid Unicode ({short_repr(text)}; "
            f"a file name that is not UTF-8? rename the file)")


def _printable(text: str) -> str:
    """``text`` made writable as UTF-8 (for the manifest): undecodable bytes of a file name become \\xNN escapes."""
    if _utf8_ok(text):
        return text
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


#: What a terminal must not be sent raw: C0 controls (ESC, CR, BEL, newline, ...), DEL and C1 controls
#: (0x9b is a one-byte CSI), bidirectional overrides and marks that reorder what is shown, line and
#: paragraph separators, and lone surrogates (undecodable bytes of a file name; unprintable as UTF-8).
_TERMINAL_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")


def _escape_char(m: re.Match[str]) -> str:
    c = ord(m.group())
    if 0xDC80 <= c <= 0xDCFF:  # surrogateescape: the byte c - 0xDC00 of a file name that is not UTF-8
        return f"\\x{c - 0xDC00:02x}"
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def printable(text: object) -> str:
    """``str(text)`` safe to print on a terminal as one line: each control character becomes an escape.

    C0/C1 control characters and DEL become ``\\xNN`` (ESC -> ``\\x1b``, CR -> ``\\x0d``), bidi overrides and
    line separators ``\\uNNNN``, undecodable bytes of a file name (surrogateescape) ``\\xNN`` of the byte.
    Text without such characters is returned unchanged (a backslash is left as it is).
    """
    text = str(text)
    if _TERMINAL_UNSAFE.search(text) is None:
        return text
    return _TERMINAL_UNSAFE.sub(_escape_char, text)
