"""Which server paths the demo may read, write and publish.

The demo touches the server's file system in three ways, each confined to one
folder ``R`` (always fully resolved: ``..`` and symlinks followed):

* **publishing**: a gallery item ``id`` names the file ``resolve(image_root / id)``;
  it must lie inside ``image_root``.  Ids that are absolute, contain a ``..``
  component or lead out through a symlink make the whole gallery unusable
  (:func:`check_gallery_ids`), and an image root that is too broad (``/``,
  system folders, the home folder or one of its parents; :func:`broad_reason`)
  is refused outright;
* **indexing**: a folder typed into the Gallery tab is
  ``resolve(R / text)`` and must lie in ``R = --allow-indexing ROOT``
  (:func:`resolve_under`); without the flag there is no ``R`` and nothing is indexed;
* **saving**: the same, strictly below ``R``.

A path check and the later use of the path are two steps, so a folder that is
swapped for a symlink in between is not caught here; the thumbnail code
re-checks every file it opens (``DemoState._thumbnail``).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

from isfe_model.preprocess import IMAGE_EXTENSIONS

__all__ = [
    "DemoError", "UnsafePathError", "bind_warning", "broad_reason", "check_folder", "check_gallery_ids",
    "contained", "links_out", "resolve_under",
]

#: top-level folders that hold the system rather than anyone's images
_SYSTEM_NAMES = ("bin", "boot", "dev", "etc", "home", "lib", "lib32", "lib64", "libx32", "media", "mnt", "opt",
                 "proc", "root", "run", "sbin", "snap", "srv", "sys", "tmp", "usr", "var", "Users", "Volumes",
                 "System", "Library", "Applications", "private")
#: the image files the demo may hand to Gradio as examples (what Pillow decodes; no HTML, SVG or text)
PUBLISHABLE_SUFFIXES = frozenset(IMAGE_EXTENSIONS)


class DemoError(ValueError):
    """A user error shown in the UI (and as the API error message)."""


class UnsafePathError(DemoError):
    """A path the demo may not read, write or publish (outside its folder, or a folder that is too broad)."""


def _system_folders() -> set[Path]:
    out = {Path("/") / n for n in _SYSTEM_NAMES} | {Path(tempfile.gettempdir()), Path("/var/tmp"), Path("/private/tmp")}
    return out | {p.resolve() for p in out}


def broad_reason(folder: Path) -> str | None:
    """Why a resolved folder is too broad to serve or index from (None: it is not).

    Too broad: the file-system root, a system folder (``/etc``, ``/home``,
    ``/tmp``, ...), the home folder or any folder that holds it.
    """
    folder = Path(folder)
    if folder == Path(folder.anchor):
        return "is the root of the file system"
    try:
        home: Path | None = Path.home().resolve()
    except (RuntimeError, KeyError, OSError):
        home = None
    if home is not None and (folder == home or folder in home.parents):
        return "is the home folder" if folder == home else "holds the home folder"
    if folder in _system_folders():
        return "is a system folder"
    return None


def check_folder(folder: str | os.PathLike, what: str, fix: str) -> Path:
    """``folder`` resolved; refused (:class:`UnsafePathError`) when missing, not a folder or too broad.

    ``what`` names the folder in the message (e.g. "--allow-indexing ROOT"),
    ``fix`` says what to do instead.
    """
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise UnsafePathError(
            f"{what} {str(path)!r} is not a folder" if path.exists() else f"{what} {str(path)!r}: no such folder"
        )
    resolved = path.resolve()
    reason = broad_reason(resolved)
    if reason:
        shown = f"{str(path)!r}" + (f" (= {resolved})" if str(resolved) != str(path) else "")
        raise UnsafePathError(f"{what} {shown} {reason}, too broad for a demo that anyone can reach; {fix}")
    return resolved


def contained(root: Path, item_id: Any) -> Path:
    """The file a gallery id names: ``resolve(root / id)``, which must lie inside the resolved ``root``.

    Raises :class:`UnsafePathError` (with the reason) for an id that is not a
    non-empty relative path, has a ``..`` component, or leads out of ``root``
    through a symlink.
    """
    if not isinstance(item_id, str) or not item_id or "\x00" in item_id:
        raise UnsafePathError(f"id {item_id!r} is not a relative file path")
    rel = PurePosixPath(item_id)
    if rel.is_absolute() or item_id.startswith("~"):
        raise UnsafePathError(f"id {item_id!r} is an absolute path")
    if ".." in rel.parts:
        raise UnsafePathError(f"id {item_id!r} has a '..' component")
    path = (root / item_id).resolve()
    if not path.is_relative_to(root):
        raise UnsafePathError(f"id {item_id!r} leads out of the image folder (a symlink)")
    return path


def check_gallery_ids(ids: Iterable[Any], root: Path, where: str) -> int:
    """Check every id with :func:`contained`; returns the count, or raises one message naming up to 3 bad ids.

    O(n) path resolutions (about 10 µs each on a local disk).
    """
    bad: list[str] = []
    count = n_bad = 0
    for item_id in ids:
        count += 1
        try:
            contained(root, item_id)
        except UnsafePathError as e:
            n_bad += 1
            if len(bad) < 3:
                bad.append(str(e))
    if n_bad:
        raise UnsafePathError(
            f"{where}: {n_bad} of {count} item ids point outside the image folder {root} ({'; '.join(bad)}); "
            "the demo publishes only files inside it: rebuild the gallery with isfe-index from that folder, "
            "or pass --images-root DIR"
        )
    return count


def links_out(folder: Path, files: Iterable[Path]) -> list[str]:
    """The files (relative names) under the resolved ``folder`` whose real path lies outside it (symlinks)."""
    return [p.relative_to(folder).as_posix() for p in files if not p.resolve().is_relative_to(folder)]


def resolve_under(root: Path, text: str, what: str, verb: str, strict: bool = False) -> Path:
    """A path typed by a user: absolute, or relative to ``root``; resolved; must lie in ``root``.

    ``strict``: strictly below ``root`` (``root`` itself refused).  The same
    message for a path outside ``root`` whether it exists or not (the demo
    does not tell visitors what exists elsewhere on the server).
    """
    text = (text or "").strip()
    if "\x00" in text:
        raise UnsafePathError(f"the {what} contains a NUL character")
    path = Path(text).expanduser()
    path = (path if path.is_absolute() else root / path).resolve()
    inside = path.is_relative_to(root) and not (strict and path == root)
    if not inside:
        where = "below" if strict else "under"
        raise UnsafePathError(
            f"the {what} {text!r} is not {where} {root}, the only folder this demo may {verb} "
            f"(after following '..' and symlinks); give a path {where} it"
        )
    return path


def bind_warning(host: str, indexing_root: Path | None = None) -> str | None:
    """A warning when ``host`` is not a loopback address (None for 127.0.0.0/8, ::1, localhost)."""
    try:
        addresses = {ipaddress.ip_address(host)}
    except ValueError:
        try:
            addresses = {ipaddress.ip_address(a[4][0].split("%")[0]) for a in socket.getaddrinfo(host, None)}
        except (OSError, ValueError):
            addresses = set()
    if addresses and all(a.is_loopback for a in addresses):
        return None
    scope = "all network interfaces" if host in ("0.0.0.0", "::", "") else f"{host}, not a loopback address"
    extra = f", and index and save galleries under {indexing_root}" if indexing_root else ""
    return (f"the demo listens on {scope}: anyone who can reach this machine can search it{extra}; "
            "use --host 127.0.0.1 (the default) unless that is what you want")
