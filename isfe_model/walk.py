"""Walking a folder and naming what was found: files, ids, labels, and text safe to print.

:func:`walk` is the project's one folder walk (the gallery, training, dataset preparation
and export all list folders with it).  Its policy:

* an explicit stack of folders, no recursion: any depth (10,000 nested folders are fine);
* a deterministic order: files sorted by their path relative to the root, written with
  "/" (the string, so a folder's files follow the order of an archive's member names);
* links to files are followed (the file is the link's path, its bytes the target's);
  links to folders are **not** (a link can loop, or lead out of the folder): they are
  left out and reported, like broken links, FIFOs, devices and sockets, folders that
  cannot be listed, paths over the system's length limit (PATH_MAX: nothing could open
  them) and, when the caller passes ``extensions``, files without one of them;
* names that start with "." (hidden files and folders) are not entered; they are listed
  apart (:attr:`Walk.hidden`), for callers that count them.

Every path left out is a :class:`LeftOut` (path, reason code, the OS's words): callers
decide what is fatal and word the message for their users.  :func:`walk_files` is the
gallery's view of it; :func:`ids_and_labels` turns paths into ids (relative paths with
"/") and labels (the first folder below the root).  File names need not be UTF-8:
:func:`_printable` makes one writable as UTF-8 (for the manifest) and :func:`printable`
makes any text safe to print on a terminal as one line.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection, Sequence

from .gallery_errors import GalleryError
from .metadata import short_repr

__all__ = ["BROKEN_LINK", "EXTENSION", "FOLDER_LINK", "HIDDEN", "LeftOut", "SPECIAL", "TOO_LONG", "UNEXAMINABLE",
           "UNREADABLE_FOLDER", "Walk", "ids_and_labels", "list_files", "printable", "suffix", "walk", "walk_files"]

#: Why :func:`walk` left a path out (:attr:`LeftOut.reason`).
FOLDER_LINK = "folder-link"              # a link to a folder: never followed
BROKEN_LINK = "broken-link"              # a link whose target is missing (or a loop of links)
SPECIAL = "special"                      # a FIFO, device or socket (or a link to one): reading could block
UNREADABLE_FOLDER = "unreadable-folder"  # os.scandir failed (permissions, vanished); detail: the OS's words
UNEXAMINABLE = "unexaminable"            # its type could not be read; detail: the OS's words
TOO_LONG = "too-long"                    # the path is over PATH_MAX; detail: its length and the limit
EXTENSION = "extension"                  # a file without one of the caller's extensions
HIDDEN = "hidden"                        # the name starts with "." (in Walk.hidden, not Walk.left_out)

#: A plain sentence for each reason (``{detail}`` filled in), for callers without words of their own.
MESSAGES = {
    FOLDER_LINK: "link to a folder; links to folders are not followed (loops, files outside the folder)",
    BROKEN_LINK: "broken link (its target does not exist, or the links loop)",
    SPECIAL: "not a regular file (a FIFO, device or socket): reading it could block",
    UNREADABLE_FOLDER: "folder cannot be read ({detail})",
    UNEXAMINABLE: "cannot be examined ({detail})",
    TOO_LONG: "path is {detail}; nothing can open it",
    EXTENSION: "not an image (its name has no image extension)",
    HIDDEN: "hidden (name starts with '.')",
}


@dataclass(frozen=True)
class LeftOut:
    """A path :func:`walk` did not return: ``path`` as walked (root joined), ``rel`` relative to the root
    with "/" ("." for the root itself), ``reason`` one of the codes above, ``detail`` the OS's words."""

    path: Path
    rel: str
    reason: str
    detail: str = ""

    @property
    def message(self) -> str:
        return MESSAGES[self.reason].format(detail=self.detail)


@dataclass
class Walk:
    """What :func:`walk` found under ``root``: ``files`` and ``names`` (the same files relative to ``root``,
    with "/"), in that order; ``left_out`` and ``hidden`` sorted by relative path."""

    root: Path
    files: list[Path] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    left_out: list[LeftOut] = field(default_factory=list)
    hidden: list[LeftOut] = field(default_factory=list)


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


def suffix(name: str) -> str:
    """The extension of a file name, lower-cased, as :attr:`pathlib.PurePath.suffix` has it ("" for none)."""
    i = name.rfind(".")
    return name[i:].lower() if 0 < i < len(name) - 1 else ""


def _kind(entry: os.DirEntry) -> str | None:
    """None for a file (or a link to one), "dir" for a folder to enter, else the reason to leave it out."""
    if entry.is_dir(follow_symlinks=False):
        return "dir"
    if entry.is_symlink():
        try:
            mode = os.stat(entry.path).st_mode  # the target
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                return BROKEN_LINK  # a missing target, or links that loop
            raise  # e.g. no permission to look: UNEXAMINABLE
        return FOLDER_LINK if stat.S_ISDIR(mode) else None if stat.S_ISREG(mode) else SPECIAL
    return None if entry.is_file(follow_symlinks=False) else SPECIAL


def walk(folder: str | os.PathLike, extensions: Collection[str] | None = None,
         exclude: Sequence[str | os.PathLike] = ()) -> Walk:
    """Every file under ``folder`` (any depth), sorted by relative "/" path, and every path left out, with why.

    ``extensions`` (lower-case, with the dot, e.g. ``IMAGE_EXTENSIONS``): files whose name has
    none of them are left out (reason ``EXTENSION``); a file's type is checked first, so a FIFO
    named ``x.txt`` is ``SPECIAL``.  ``exclude``: folders under ``folder`` (matched by inode, so
    any spelling) left out silently with what is under them (e.g. the gallery being written).
    ``folder`` itself is entered even when it is a link; when it cannot be listed the walk is
    empty and it is left out as ``UNREADABLE_FOLDER`` with ``rel`` ".".  See the module
    docstring for the policy.  Cost: one ``scandir`` per folder, one ``stat`` per link.
    """
    root = Path(folder)
    limit = _path_max(root)
    excluded = {key for key in map(_inode, exclude) if key is not None}
    excluded_inodes = {ino for _dev, ino in excluded}
    out = Walk(root)
    found: list[tuple[str, str]] = []  # (relative "/" path, path as walked)

    def leave_out(path: str, rel: str, reason: str, detail: str = "") -> None:
        (out.hidden if reason == HIDDEN else out.left_out).append(LeftOut(Path(path), rel, reason, detail))

    stack = [(os.fspath(root), "")]
    while stack:
        here, here_rel = stack.pop()
        try:
            with os.scandir(here) as it:
                entries = list(it)
        except OSError as e:
            leave_out(here, here_rel or ".", UNREADABLE_FOLDER, str(e.strerror or e))
            continue
        for entry in entries:
            path, rel = entry.path, f"{here_rel}/{entry.name}" if here_rel else entry.name
            if entry.name.startswith("."):
                leave_out(path, rel, HIDDEN)
                continue
            size = len(os.fsencode(path))
            if size >= limit:
                leave_out(path, rel, TOO_LONG, f"{size:,} bytes long, over the system limit of {limit - 1:,}")
                continue
            try:
                kind = _kind(entry)
                if kind == "dir":
                    # entry.inode() costs no system call; stat (for st_dev) only on a match
                    if entry.inode() not in excluded_inodes or _inode(path) not in excluded:
                        stack.append((path, rel))
                elif kind is not None:
                    leave_out(path, rel, kind)
                elif extensions is not None and suffix(entry.name) not in extensions:
                    leave_out(path, rel, EXTENSION)
                else:
                    found.append((rel, path))
            except OSError as e:
                leave_out(path, rel, UNEXAMINABLE, str(e.strerror or e))
    found.sort()
    out.names = [rel for rel, _ in found]
    out.files = [Path(path) for _, path in found]
    out.left_out.sort(key=lambda lo: lo.rel)
    out.hidden.sort(key=lambda lo: lo.rel)
    return out


#: The gallery's words for what the walk left out (links to files, FIFOs and broken links go to the embedder).
_GALLERY_WORDS = {
    FOLDER_LINK: "link to a folder; links to folders are not followed (loops, files outside the folder) — index the "
                 "folder it points to, or copy it in",
    UNREADABLE_FOLDER: "folder cannot be read ({detail}); its files are not indexed — fix its permissions",
    UNEXAMINABLE: "cannot be examined ({detail})",
    TOO_LONG: "path is {detail}; nothing can open it — move it to a shallower folder or index a folder closer to it",
}


def walk_files(folder: str | os.PathLike,
               exclude: Sequence[str | os.PathLike] = ()) -> tuple[list[Path], list[dict[str, str]]]:
    """(files, left_out): the gallery's view of :func:`walk` — files sorted by relative path, ``{"path", "reason"}``.

    Hidden names and the ``exclude`` folders are left out silently; links to folders, folders
    that cannot be read and paths over the system limit are returned in ``left_out`` (the
    manifest's ``skipped``).  Files are *not* filtered by extension, and FIFOs, devices and
    broken links are returned as files: the embedder reports each as a bad file (the index
    stops, or with ``skip_bad`` skips and lists it), so nothing is dropped silently.
    """
    root = Path(folder)
    if not root.is_dir():
        raise GalleryError(f"{root} is not a folder" if root.exists() else f"{root}: no such folder")
    walked = walk(root, exclude=exclude)
    files, names = walked.files, walked.names
    left_out: list[dict[str, str]] = []
    handed_on = [lo for lo in walked.left_out if lo.reason in (SPECIAL, BROKEN_LINK)]
    if handed_on:
        pairs = sorted([*zip(names, files), *((lo.rel, lo.path) for lo in handed_on)])
        files = [p for _, p in pairs]
    for lo in walked.left_out:
        if lo.reason not in (SPECIAL, BROKEN_LINK):
            reason = _GALLERY_WORDS[lo.reason].format(detail=lo.detail)
            left_out.append({"path": _printable(str(lo.path)), "reason": reason})
    left_out.sort(key=lambda s: s["path"])
    return files, left_out


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
