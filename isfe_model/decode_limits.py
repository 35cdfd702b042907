"""Decoding work limits: refuse encoded images whose decoding would take unbounded time or memory.

:func:`check_image_bytes` walks a file's structure (JPEG marker segments and scans, PNG chunks,
GIF extension blocks, ICO directory entries, TIFF directories) before Pillow parses it and
decodes no pixel; :func:`check_dims` is the pixel limit (width x height <= max_pixels).
:class:`ImageError` (with its ``kind``) is the one error of every image input; it lives here,
below :mod:`isfe_model.preprocess`, which re-exports all of these names unchanged.
"""

from __future__ import annotations

import re
import struct

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ERROR_KINDS",
    "JPEG_SCAN_PASSES",
    "MAX_GIF_BLOCKS",
    "MAX_JPEG_SCANS",
    "MAX_JPEG_SEGMENTS",
    "MAX_PNG_CHUNKS",
    "MAX_SLOW_FORMAT_BYTES",
    "MAX_TIFF_ENTRIES",
    "MAX_TIFF_STRIPS",
    "PNG_BYTES_PER_CHUNK",
    "ImageError",
    "check_image_bytes",
    "pillow_bomb_pixels",
    "signature_format",
    "truncated_header_reason",
]

#: Default limit on decoded pixels (width x height) of one image: 50 megapixels.
DEFAULT_MAX_PIXELS = 50_000_000

#: Decoding work bounds (issue 15 class 2), checked from the encoded bytes or the header,
#: before any pixel is decoded.  JPEG: scans (progressive passes) in one image; libjpeg's own default
#: cap; a normal progressive JPEG has about 10.  Every scan is a pass over the whole image, so in
#: addition the scans x pixels may not exceed JPEG_SCAN_PASSES x max_pixels (20 passes of the
#: largest allowed image: about half a second of decoding here).
MAX_JPEG_SCANS = 1000
JPEG_SCAN_PASSES = 20
#: JPEG marker segments (tables, APPn, COM, SOS) in one image; a camera JPEG has fewer than 50.
MAX_JPEG_SEGMENTS = 4000
#: PNG chunks: at most this many plus one per PNG_BYTES_PER_CHUNK bytes of file (image data comes
#: in chunks of 8-64 KiB; ancillary chunks are few): Pillow parses each chunk in Python.
MAX_PNG_CHUNKS = 1024
PNG_BYTES_PER_CHUNK = 1024
#: GIF: data sub-blocks of the extensions before the first image (Pillow joins comment
#: sub-blocks in quadratic time: 40,000 of them take 15 s).
MAX_GIF_BLOCKS = 4096
#: TIFF: strips or tiles of the first image (Pillow makes one Python tile per strip: a 9 MB file of
#: a million one-row strips took 11 s and 420 MiB), and directory entries (at most 65,535 in
#: classic TIFF; BigTIFF allows more).
MAX_TIFF_STRIPS = 65_536
MAX_TIFF_ENTRIES = 65_535
#: Run-length BMPs and plain-text (P1-P3) PNM files are decoded by Pillow in Python, at about
#: 0.5-1 s per MB here (8 MB of 1-pixel runs: 1-4 s); larger ones are refused.
MAX_SLOW_FORMAT_BYTES = 4 << 20

#: The kinds of :class:`ImageError` (``error.kind``), for callers that map them to statuses.
ERROR_KINDS = ("empty", "not_an_image", "too_large", "too_complex", "corrupt", "unreadable")


class ImageError(ValueError):
    """An input that is not a usable image. ``str()`` names the source and the reason.

    ``kind`` is one of ERROR_KINDS: ``empty`` (0 bytes), ``not_an_image`` (not a supported format),
    ``too_large`` (pixels, bytes or decode memory over a limit), ``too_complex`` (decode work over a
    limit: JPEG scans, PNG chunks, ...), ``corrupt`` (damaged data) and ``unreadable`` (the file
    itself: missing, a folder, a FIFO, no permission).  Picklable (process pools).
    """

    def __init__(self, source: str, reason: str, kind: str = "corrupt"):
        self.source = source
        self.reason = reason
        self.kind = kind
        super().__init__(f"{source}: {reason}")

    def __reduce__(self):
        return (type(self), (self.source, self.reason, self.kind))


def _check_dims(w: int, h: int, max_pixels: int | None, name: str, what: str = "image") -> None:
    """The pixel limit: ImageError unless 1 <= w, h and w x h <= max_pixels (None: no limit)."""
    if w < 1 or h < 1:
        raise ImageError(name, f"{what} has no pixels ({w}x{h})", "corrupt")
    if max_pixels is not None and w * h > max_pixels:
        raise ImageError(
            name,
            f"{what} is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,} "
            f"(a decompression bomb, or raise max_pixels if the image is genuine)",
            "too_large",
        )


def signature_format(data: bytes) -> str | None:
    """The supported format whose signature ``data`` starts with (JPEG, PNG, GIF, WebP, TIFF), else None.

    Only unambiguous signatures count (not BMP's "BM", ICO's or PNM's short ones), so that bytes
    Pillow cannot open but which start like one of these can be called truncated or corrupt
    rather than "not an image".
    """
    head = bytes(data[:12])
    if head[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if head[:8] == _PNG_MAGIC:
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    return None


def truncated_header_reason(data: bytes) -> str | None:
    """For bytes Pillow could not open: "a PNG file whose header is truncated or corrupt (N bytes)" when they
    start with a supported format's signature (:func:`signature_format`), else None (not an image)."""
    fmt = signature_format(data)
    return None if fmt is None else f"a {fmt} file whose header is truncated or corrupt ({len(data):,} bytes)"


#: Pillow's DecompressionBombError text: "Image size (N pixels) exceeds limit of M pixels, could be ...".
_PILLOW_BOMB_SIZE = re.compile(r"\((\d+) pixels\)")


def pillow_bomb_pixels(error: BaseException) -> int | None:
    """The pixel count that Pillow's ``DecompressionBombError`` names (width x height from the header), or None.

    Pillow refuses an image over 2 x ``PIL.Image.MAX_IMAGE_PIXELS`` while it opens the file,
    before :func:`check_dims` could run; this lets the error say how large it is in our terms.
    """
    m = _PILLOW_BOMB_SIZE.search(str(error))
    return int(m.group(1)) if m else None


_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: The end of a JPEG scan's entropy-coded data: 0xFF followed by anything but a stuffed 0x00, a
#: restart marker (RST0-7) or a fill byte.
_JPEG_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
#: Sequential Huffman frames (baseline, extended): one scan with every component is the whole image.
_JPEG_ONE_SCAN_SOF = frozenset({0xC0, 0xC1})


def check_image_bytes(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS, name: str = "input") -> None:
    """Refuse encoded bytes whose decoding would take unbounded time or memory; decodes no pixel.

    One walk over the file's structure, before Pillow parses it (cost: at most about one step
    per PNG_BYTES_PER_CHUNK bytes):

    * JPEG: marker segments <= MAX_JPEG_SEGMENTS; scans <= MAX_JPEG_SCANS and
      scans x width x height <= JPEG_SCAN_PASSES x max_pixels (each scan is a pass over the image);
    * PNG: chunks <= MAX_PNG_CHUNKS + bytes / PNG_BYTES_PER_CHUNK;
    * GIF: extension sub-blocks before the first frame <= MAX_GIF_BLOCKS;
    * ICO: every embedded image's width x height <= max_pixels and its PNG chunks as above
      (Pillow decodes an icon's image while it opens the file, before any other check could run);
    * TIFF: strips or tiles of the first image <= MAX_TIFF_STRIPS, directory entries <= MAX_TIFF_ENTRIES;
    * run-length BMP and plain-text PNM (decoded in Python): bytes <= MAX_SLOW_FORMAT_BYTES.

    Raises:
        ImageError: kind ``too_complex`` (decode work) or ``too_large`` (an icon's image).
    """
    data = data if isinstance(data, bytes) else bytes(data)
    head = data[:8]
    if head[:3] == b"\xff\xd8\xff":
        _check_jpeg(data, max_pixels, name)
    elif head == _PNG_MAGIC:
        _check_png(data, name, 8, MAX_PNG_CHUNKS + len(data) // PNG_BYTES_PER_CHUNK)
    elif head[:6] in (b"GIF87a", b"GIF89a"):
        _check_gif(data, name)
    elif head[:4] == b"\x00\x00\x01\x00":
        _check_ico(data, max_pixels, name)
    elif head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        _check_tiff(data, name)
    elif head[:2] == b"BM" and len(data) >= 34 and int.from_bytes(data[14:18], "little") >= 40:
        _check_slow_format(data, name, "a run-length compressed BMP", int.from_bytes(data[30:34], "little") in (1, 2))
    elif head[:1] == b"P" and head[1:2] in (b"1", b"2", b"3") and head[2:3].isspace():
        _check_slow_format(data, name, "a plain-text (ASCII) PNM", True)


def _too_complex(name: str, what: str, fix: str) -> ImageError:
    return ImageError(name, f"{what}: decoding it would take too long (a decoding-time attack?); {fix}", "too_complex")


def _check_jpeg(data: bytes, max_pixels: int | None, name: str) -> None:
    """Walk the marker segments of the first image (up to EOI); count segments and scans.

    The walk stops at the first scan of a sequential Huffman JPEG (SOF0/SOF1, nearly every camera
    photo) that holds all the frame's components: libjpeg then knows the file has one scan and stops
    with an error at any further SOS ("broken data stream"), so what follows costs no decoding and
    the scan's entropy-coded data (most of the file) is not searched.
    """
    n, i, segments, scans, allowed, sof, components = len(data), 2, 0, 0, MAX_JPEG_SCANS, 0, 0
    while i + 4 <= n and data[i] == 0xFF:
        m = data[i + 1]
        if m == 0xFF:  # fill byte
            i += 1
            continue
        if m in (0x01, 0xD8) or 0xD0 <= m <= 0xD7:  # markers without a length
            i += 2
            continue
        if m == 0xD9:  # EOI: the end of the first image (an MPO's others are not decoded)
            return
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:
            raise _too_complex(name, f"JPEG of more than {MAX_JPEG_SEGMENTS:,} marker segments (a photo has fewer "
                                     f"than 50)", "re-save the image")
        if m in _JPEG_SOF:
            sof, components = m, data[i + 9] if i + 10 <= n else -1
            if i + 9 <= n and max_pixels is not None:
                pixels = int.from_bytes(data[i + 5 : i + 7], "big") * int.from_bytes(data[i + 7 : i + 9], "big")
                allowed = min(MAX_JPEG_SCANS, JPEG_SCAN_PASSES * max_pixels // max(pixels, 1))
        if m == 0xDA and scans == 0 and sof in _JPEG_ONE_SCAN_SOF and i + 4 < n and data[i + 4] == components:
            return  # libjpeg's has_multiple_scans is false: a second SOS is a fatal error, not a second pass
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
        if m == 0xDA:
            scans += 1
            if scans > allowed:
                raise _too_complex(name, f"JPEG of more than {allowed:,} scans (progressive passes over the image; "
                                         f"a normal progressive JPEG has about 10)",
                                   "re-save it as a baseline JPEG or PNG")
            end = _JPEG_SCAN_END.search(data, i)
            if end is None:
                return
            i = end.start()


def _check_png(data: bytes, name: str, start: int, limit: int) -> int:
    """Walk the chunks from ``start`` (just after the signature) to IEND; returns how many there were."""
    n, pos, count = len(data), start, 0
    while pos + 8 <= n:
        count += 1
        if count > limit:
            raise _too_complex(name, f"PNG of more than {limit:,} chunks in {n:,} bytes (Pillow parses each one)",
                               "re-save the image")
        if data[pos + 4 : pos + 8] == b"IEND":
            break
        pos += 12 + int.from_bytes(data[pos : pos + 4], "big")
    return count


def _check_gif(data: bytes, name: str) -> None:
    """Count the extension sub-blocks before the first image descriptor."""
    n = len(data)
    if n < 13:
        return
    pos = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)  # header, screen, global colour table
    blocks = 0
    while pos < n and data[pos] == 0x21:  # '!' extension: label, then sub-blocks until a 0 length
        pos += 2
        while pos < n and data[pos]:
            blocks += 1
            if blocks > MAX_GIF_BLOCKS:
                raise _too_complex(name, f"GIF with more than {MAX_GIF_BLOCKS:,} extension blocks before its first "
                                         f"image", "re-save the image")
            pos += 1 + data[pos]
        pos += 1


def _check_ico(data: bytes, max_pixels: int | None, name: str) -> None:
    """Every directory entry's embedded image: PNG (IHDR size, chunks) or DIB (header size)."""
    n = len(data)
    budget = MAX_PNG_CHUNKS + n // PNG_BYTES_PER_CHUNK  # chunk steps for all embedded PNGs together
    seen: set[int] = set()
    for k in range(int.from_bytes(data[4:6], "little")):
        entry = 6 + 16 * k
        if entry + 16 > n:
            return  # truncated directory: Pillow reports it
        offset = int.from_bytes(data[entry + 12 : entry + 16], "little")
        if offset in seen:
            continue
        seen.add(offset)
        what = f"icon image #{k + 1}"
        if data[offset : offset + 8] == _PNG_MAGIC and offset + 24 <= n:
            w = int.from_bytes(data[offset + 16 : offset + 20], "big")
            h = int.from_bytes(data[offset + 20 : offset + 24], "big")
            _check_dims(w, h, max_pixels, name, what)
            budget -= _check_png(data, name, offset + 8, budget)
        elif offset + 20 <= n:
            w = abs(int.from_bytes(data[offset + 4 : offset + 8], "little", signed=True))
            h = abs(int.from_bytes(data[offset + 8 : offset + 12], "little", signed=True))  # image + mask rows
            _check_dims(w, h, max_pixels, name, what)
            rle = int.from_bytes(data[offset + 16 : offset + 20], "little") in (1, 2)
            _check_slow_format(data, name, f"an icon with a run-length compressed image (#{k + 1})", rle)


def _check_tiff(data: bytes, name: str) -> None:
    """The first directory (IFD): its entry count and the value counts of StripOffsets/TileOffsets."""
    order = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\x00", b"\x00+")  # BigTIFF: 8-byte offsets and counts
    head, entry, count_fmt = (16, 20, "Q") if big else (8, 12, "I")
    if len(data) < head:
        return
    ifd = struct.unpack_from(order + ("Q" if big else "I"), data, 8 if big else 4)[0]
    if ifd + (8 if big else 2) > len(data):
        return  # Pillow reports the damage
    entries = struct.unpack_from(order + ("Q" if big else "H"), data, ifd)[0]
    if entries > MAX_TIFF_ENTRIES:
        raise _too_complex(name, f"TIFF directory of {entries:,} entries", "re-save the image")
    pos = ifd + (8 if big else 2)
    for _ in range(entries):
        if pos + entry > len(data):
            return
        tag = struct.unpack_from(order + "H", data, pos)[0]
        if tag in (273, 279, 324, 325):  # StripOffsets, StripByteCounts, TileOffsets, TileByteCounts
            count = struct.unpack_from(order + count_fmt, data, pos + 4)[0]
            if count > MAX_TIFF_STRIPS:
                raise _too_complex(name, f"TIFF of {count:,} strips or tiles (Pillow handles each in Python)",
                                   "re-save it with fewer, larger strips (e.g. as PNG)")
        pos += entry


def _check_slow_format(data: bytes, name: str, what: str, slow: bool) -> None:
    if slow and len(data) > MAX_SLOW_FORMAT_BYTES:
        raise _too_complex(name, f"{what} of {len(data) / 2**20:,.1f} MiB (Pillow decodes it in Python, seconds for "
                                 f"a few MB; the limit is {MAX_SLOW_FORMAT_BYTES >> 20} MiB)", "convert it to PNG")
