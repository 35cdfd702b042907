"""Image decoding and preprocessing: the one definition shared by training and inference.

The training evaluation transform (``training.data``) and the ONNX inference
path (:class:`isfe_model.Encoder`) both call these functions, so an image is
turned into exactly the same array in both places.

Pipeline for one image (``PreprocessSpec`` holds the numbers)::

    bytes/path/PIL/array --load_image--> RGB PIL image
        (file size cap; check_image_bytes: decode work bounded from the bytes -- JPEG scans,
        PNG chunks, GIF blocks, every ICO frame's size; pixel limit and mode-aware memory
        budget from the header; then first frame, EXIF orientation, any mode -> RGB in bands,
        alpha on white)
    --to_uint8_square--> uint8 [R, R, 3]
        (resize the shorter side to R = resize_size, bilinear; center-crop R x R)
    --center_crop_array--> uint8 [S, S, 3]  (S = input_size)
    --to_chw_float--> float32 [3, S, S] in [0, 1]

The model itself applies mean/std normalisation, so clients never do arithmetic.
Every function here is top level and every argument and error (ImageError) pickles, so a
process pool can run :func:`preprocess` with a time limit per image.
"""

from __future__ import annotations

import functools
import io
import os
import re
import stat
import struct
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from struct import error as struct_error
from typing import Any, Callable, Iterator, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ERROR_KINDS",
    "IMAGE_EXTENSIONS",
    "SUPPORTED_FORMATS",
    "ImageError",
    "ImageInput",
    "PreprocessSpec",
    "center_crop_array",
    "check_image_bytes",
    "decode_bytes",
    "describe_source",
    "load_image",
    "preprocess",
    "read_image_file",
    "to_chw_float",
    "to_uint8_square",
]

#: Default limit on decoded pixels (width x height) of one image: 50 megapixels.
DEFAULT_MAX_PIXELS = 50_000_000
#: Background that transparent pixels are composited on (white).
BACKGROUND = (255, 255, 255)
#: Pillow decoders that load_image uses (by Pillow format id).  Others that
#: Pillow knows (EPS runs Ghostscript, PSD, FITS, ...) are refused: a hostile
#: file cannot reach them.  MPO (multi-picture JPEG from phones) opens through
#: the JPEG decoder.
SUPPORTED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "DIB", "TIFF", "WEBP", "PPM", "ICO", "AVIF")
#: File name suffixes (lower case, with the dot) that folder readers (training data, dataset
#: preparation, export's parity images) take for images; compare with ``path.suffix.lower()``.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
#: Above this many pixels the resized (not yet cropped) image would occupy,
#: to_uint8_square resamples only the crop window (Image.resize(box=...)), so a
#: 1 x 10^7 strip needs kilobytes instead of gigabytes (values then may differ
#: by 1/255 from the full resize: float rounding of the window coordinates).
#: Below it (every image whose aspect ratio is under (limit / R^2) : 1, e.g.
#: 15,000:1 at R=32, 240:1 at R=256) the full image is resized and then
#: cropped, exactly as torchvision's Resize + CenterCrop.
MAX_RESIZED_PIXELS = 16_000_000
#: Image files larger than this are refused before they are read (an uncompressed 50-megapixel
#: RGB TIFF is 150 MB; anything far beyond that is not a photo).
MAX_FILE_BYTES = 512 << 20


#: Decoding work and memory bounds (issue 15 class 2), checked from the encoded bytes or the header,
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
#: Memory budget of one decode: max_pixels x this many bytes.  The estimate is mode-aware (the
#: decoded image in Pillow's storage: 1 byte per pixel for L/P/1, 2 for I;16, 4 for RGB, RGBA,
#: CMYK, I, F, ... plus the 4-byte RGB result for modes that are converted), so every mode fits
#: at the pixel limit and a wider one would be refused before it is decoded.
DECODE_BYTES_PER_PIXEL = 8
#: Conversions to RGB work on bands of about this many pixels (bounded temporaries).
CONVERT_CHUNK_PIXELS = 1 << 20

ImageInput = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]

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


@dataclass(frozen=True)
class PreprocessSpec:
    """How an image becomes model input; stored in checkpoints and ONNX metadata.

    Attributes:
        input_size: side S of the square model input.
        resize_size: side R the shorter image side is resized to before the
            center crop (R >= S).
        mean, std: per-channel RGB normalisation that the *model* applies to
            its [0, 1] input (informational for clients).
        resize_policy: always ``"shorter_side_center_crop"`` for now.
        interpolation: always ``"bilinear"`` (Pillow, antialiased on downscale).
    """

    input_size: int = 32
    resize_size: int = 32
    mean: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
    std: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
    resize_policy: str = "shorter_side_center_crop"
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if int(self.input_size) < 1 or int(self.resize_size) < int(self.input_size):
            raise ValueError(
                f"need 1 <= input_size <= resize_size, got input_size={self.input_size}, "
                f"resize_size={self.resize_size}"
            )
        if self.resize_policy != "shorter_side_center_crop":
            raise ValueError(f"unknown resize_policy {self.resize_policy!r}")
        if self.interpolation != "bilinear":
            raise ValueError(f"unknown interpolation {self.interpolation!r}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        object.__setattr__(self, "input_size", int(self.input_size))
        object.__setattr__(self, "resize_size", int(self.resize_size))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PreprocessSpec":
        names = ("input_size", "resize_size", "mean", "std", "resize_policy", "interpolation")
        known = {k: d[k] for k in names if k in d}
        return cls(**known)


def describe_source(src: Any, index: int | None = None) -> str:
    """A short human name for an input, used in error messages."""
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    where = f"input #{index}" if index is not None else "input"
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"{where} ({len(src)} bytes)"
    if isinstance(src, Image.Image):
        return f"{where} (PIL image {src.mode} {src.size[0]}x{src.size[1]})"
    if isinstance(src, np.ndarray):
        return f"{where} (array {src.dtype} {tuple(src.shape)})"
    return f"{where} ({type(src).__name__})"


def _from_array(arr: np.ndarray, name: str) -> Image.Image:
    if arr.dtype != np.uint8:
        raise ImageError(name, f"arrays must be uint8 (got {arr.dtype}); scale to 0..255 and cast with "
                               f".astype(np.uint8)", "not_an_image")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(arr), "L")
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        return Image.fromarray(np.ascontiguousarray(arr), "RGB" if arr.shape[2] == 3 else "RGBA")
    raise ImageError(name, f"arrays must be HxW, HxWx1, HxWx3 or HxWx4 uint8, got shape {tuple(arr.shape)}",
                     "not_an_image")


# --------------------------------------------------------------------------- conversion to RGB


def _bands(im: Image.Image) -> Iterator[tuple[int, Image.Image]]:
    """(top row, band) of ``im`` in horizontal bands of about CONVERT_CHUNK_PIXELS pixels."""
    w, h = im.size
    step = max(1, CONVERT_CHUNK_PIXELS // w)
    for y in range(0, h, step):
        yield y, im.crop((0, y, w, min(h, y + step)))


def _banded_rgb(im: Image.Image, convert: Callable[[Image.Image], Image.Image]) -> Image.Image:
    """``convert`` (a per-pixel mode -> RGB conversion) applied band by band into one RGB image.

    Peak memory: the decoded image + the RGB result (4 bytes per pixel in Pillow) + one band of
    temporaries, instead of several full-size copies; the values equal converting at once.
    """
    w, h = im.size
    if w * h <= CONVERT_CHUNK_PIXELS:
        return convert(im)
    out = Image.new("RGB", (w, h))
    for y, band in _bands(im):
        out.paste(convert(band), (0, y))
    return out


def _composite_on_white(im: Image.Image) -> Image.Image:
    """RGBA (or a mode Pillow converts to RGBA: P, LA, a tRNS colour key, ...) over white -> RGB."""
    rgba = im.convert("RGBA")
    background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _gray_to_rgb(im: Image.Image, op: str) -> Image.Image:
    """Numeric band (I;16, I, F) -> RGB: round(v) (op "none"), round(v * 255) ("x255") or round(v / 257)
    ("/257"), NaN -> 0, +-inf -> 255/0, clipped to 0..255.

    Integers take exact integer arithmetic: v / 257 is never a half (257 is odd), so
    round(v / 257) = (v + 128) // 257 (:func:`_gray_to_rgb_float` is the float twin).
    """
    arr = np.asarray(im)
    if arr.dtype.kind not in "iu":
        return _gray_to_rgb_float(arr, op)
    v = arr.astype(np.int64)
    if op == "/257":
        v = (v + 128) // 257
    return Image.fromarray(np.clip(v, 0, 255).astype(np.uint8), "L").convert("RGB")


def _gray_to_rgb_float(arr: np.ndarray, op: str) -> Image.Image:
    arr = arr.astype(np.float64)
    if op == "x255":
        arr = arr * 255.0
    elif op == "/257":
        arr = arr / 257.0
    arr = np.nan_to_num(arr, nan=0.0, posinf=255.0, neginf=0.0)
    gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, "L").convert("RGB")


def _numeric_op(im: Image.Image) -> str:
    """"x255" for float images that look normalised (max <= 1), "/257" for 16-bit ones (or ints over 255),
    else "none"."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN band
        if im.mode == "F":
            top = np.nanmax([np.nanmax(np.asarray(band)) for _, band in _bands(im)])
            return "x255" if top <= 1.0 else "none"
        if im.mode.startswith("I;16"):
            return "/257"
        return "/257" if max(int(np.asarray(band).max()) for _, band in _bands(im)) > 255 else "none"


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; transparency is composited on white (band by band: bounded memory)."""
    mode = im.mode
    if mode in ("L", "RGB", "1") and "transparency" in im.info:
        return _banded_rgb(im, _composite_on_white)  # a tRNS colour key: transparent like an alpha channel
    if mode == "RGB":
        return im
    if mode.startswith("I") or mode.startswith("F"):
        return _banded_rgb(im, functools.partial(_gray_to_rgb, op=_numeric_op(im)))
    if mode in ("P", "PA", "RGBA", "LA", "La", "RGBa"):
        return _banded_rgb(im, _composite_on_white)
    if mode == "1":
        return _banded_rgb(im, lambda band: band.convert("L").convert("RGB"))
    return im.convert("RGB")  # L, CMYK, YCbCr, LAB, HSV, RGBX, ...: one per-pixel conversion


def lift_pillow_pixel_limit(max_pixels: int | None) -> None:
    """Make ``max_pixels`` the pixel limit that counts in this process (``None``: no limit).

    Pillow refuses images over 2 x ``Image.MAX_IMAGE_PIXELS`` (about 179 M pixels) on
    its own; a larger ``max_pixels`` raises Pillow's limit to it (never lowers it).
    """
    if max_pixels is None:
        Image.MAX_IMAGE_PIXELS = None
    elif Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = int(max_pixels)


# --------------------------------------------------------------------------- reading and decoding


def read_image_file(path: str | os.PathLike, name: str | None = None) -> bytes:
    """The bytes of an image file, at most MAX_FILE_BYTES; refuses before opening what is not a regular file.

    Symlinks are followed (a link to a photo is a photo).  Raises ImageError (kind ``unreadable``
    or ``too_large``) naming ``name`` (default: the path).
    """
    path = Path(path)
    name = name or str(path)
    try:
        st = path.stat()  # follows symlinks: a link to a photo is a photo
    except FileNotFoundError:
        raise ImageError(name, "no such file" if not path.is_symlink() else "a symlink to a missing file",
                         "unreadable") from None
    except OSError as e:
        raise ImageError(name, f"cannot read file ({e.strerror or e})", "unreadable") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(name, "is a directory, not an image file", "unreadable")
    if not stat.S_ISREG(st.st_mode):  # a FIFO would block forever, /dev/zero never ends
        kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode)
                or stat.S_ISBLK(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "a special file")
        raise ImageError(name, f"is {kind}, not a regular image file", "unreadable")
    if st.st_size > MAX_FILE_BYTES:
        raise ImageError(name, f"file of {st.st_size / 2**20:,.0f} MiB is larger than any image this reads "
                               f"({MAX_FILE_BYTES >> 20} MiB)", "too_large")
    try:
        with open(path, "rb") as f:  # no file handle stays open
            data = f.read(MAX_FILE_BYTES + 1)  # a file that grows while it is read stops here too
    except OSError as e:
        raise ImageError(name, f"cannot read file ({e.strerror or e})", "unreadable") from None
    if len(data) > MAX_FILE_BYTES:
        raise ImageError(name, f"file is larger than any image this reads ({MAX_FILE_BYTES >> 20} MiB)", "too_large")
    return data


def _open_encoded(data: bytes, max_pixels: int | None, name: str) -> Image.Image:
    """Bytes -> a Pillow image whose header is parsed and no pixel decoded (ICO: see check_image_bytes)."""
    if not data:
        raise ImageError(name, "empty file (0 bytes)", "empty")
    check_image_bytes(data, max_pixels, name)
    try:
        with warnings.catch_warnings():
            # Pillow warns above Image.MAX_IMAGE_PIXELS (our own max_pixels check
            # is the limit that counts) and about damaged metadata.
            warnings.simplefilter("ignore")
            return Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except UnidentifiedImageError:
        raise ImageError(name, f"{_sniff(data)} (supported: JPEG, PNG, GIF, BMP, TIFF, WebP, PPM, ICO)",
                         "not_an_image") from None
    except Image.DecompressionBombError as e:
        raise _pillow_bomb(name, e) from None
    except (OSError, SyntaxError, ValueError, EOFError, struct_error) as e:
        raise ImageError(name, f"truncated or corrupt image header ({e})") from None


def _pillow_bomb(name: str, e: Exception) -> ImageError:
    return ImageError(name, f"image too large, refused before decoding ({e}; Pillow's limit "
                            f"PIL.Image.MAX_IMAGE_PIXELS)", "too_large")


def _oriented(im: Image.Image) -> Image.Image:
    """``im`` turned upright by its EXIF/XMP orientation (the same object when it has none: no copy)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns "Corrupt EXIF data"; the pixels are fine
            if im.getexif().get(0x0112, 1) not in (2, 3, 4, 5, 6, 7, 8):
                return im
            return ImageOps.exif_transpose(im) or im
    except Exception:  # noqa: BLE001 - an unreadable EXIF block: keep the stored orientation
        return im


def load_image(src: ImageInput, max_pixels: int | None = DEFAULT_MAX_PIXELS, name: str | None = None) -> Image.Image:
    """Decode any supported input into an 8-bit RGB Pillow image, in bounded time and memory.

    Args:
        src: a file path, encoded bytes, a PIL image or a uint8 array
            (HxW, HxWx1, HxWx3 RGB, HxWx4 RGBA).
        max_pixels: refuse images whose width x height exceeds this, or whose decoding would
            need more than max_pixels x DECODE_BYTES_PER_PIXEL bytes (decompression bombs);
            ``None`` disables both checks (the work limits of :func:`check_image_bytes` stay).
        name: how to call the input in error messages.

    Raises:
        ImageError: naming the source and the reason (missing, empty,
            not an image, truncated, too large, too costly to decode, ...).
    """
    name = name or describe_source(src)
    if isinstance(src, np.ndarray):
        im = _from_array(src, name)
        _check_pixels(im, max_pixels, name)
        return _to_rgb(im)
    if isinstance(src, Image.Image):
        im = src
    elif isinstance(src, (bytes, bytearray, memoryview)):
        im = _open_encoded(bytes(src), max_pixels, name)
    elif isinstance(src, (str, os.PathLike)):
        im = _open_encoded(read_image_file(src, name), max_pixels, name)
    else:
        raise ImageError(name, f"unsupported input type {type(src).__name__}; give a path, bytes, a PIL image or a "
                               f"uint8 array", "not_an_image")
    _check_pixels(im, max_pixels, name)
    _check_memory(im, max_pixels, name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if isinstance(src, Image.Image) and getattr(src, "tell", lambda: 0)() != 0:
                frame = src.tell()  # first frame, without moving the caller's image
                src.seek(0)
                im = src.copy()
                src.seek(frame)
            im.load()  # a freshly opened file is at its first frame
    except Image.DecompressionBombError as e:
        raise _pillow_bomb(name, e) from None
    except (OSError, SyntaxError, ValueError, EOFError, struct_error, IndexError) as e:
        raise ImageError(name, f"corrupt or truncated image data ({e})") from None
    im = _oriented(im)
    try:
        return _to_rgb(im)
    except (ValueError, OSError) as e:
        raise ImageError(name, f"cannot convert pixel mode {im.mode} to RGB ({e})") from None


def _sniff(data: bytes) -> str:
    """Why bytes that Pillow (restricted to SUPPORTED_FORMATS) could not open are not an image."""
    head = data[:512].lstrip().lower()
    if data[:6] == b"\x93NUMPY":
        return "a NumPy .npy array file, not an image"
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in data[:4096].lower()):
        return "an SVG (vector) file, not a raster image; convert it to PNG first"
    if head.startswith(b"<!doctype html") or head.startswith(b"<html") or b"<html" in head:
        return "an HTML page, not an image"
    if data[:4] == b"%PDF":
        return "a PDF document, not an image"
    if data[:4] == b"PK\x03\x04":
        return "a ZIP archive, not an image"
    return "not a recognised image format"


def _check_dims(w: int, h: int, max_pixels: int | None, name: str, what: str = "image") -> None:
    if w < 1 or h < 1:
        raise ImageError(name, f"{what} has no pixels ({w}x{h})", "corrupt")
    if max_pixels is not None and w * h > max_pixels:
        raise ImageError(
            name,
            f"{what} is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,} "
            f"(a decompression bomb, or raise max_pixels if the image is genuine)",
            "too_large",
        )


def _check_pixels(im: Image.Image, max_pixels: int | None, name: str) -> None:
    _check_dims(im.size[0], im.size[1], max_pixels, name)


#: Bytes per pixel of a decoded image in Pillow's storage (modes not listed: 4, e.g. RGB is stored as RGBX).
_STORED_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}


def decode_bytes(mode: str, size: tuple[int, int], transparency: bool = False) -> int:
    """Estimated peak bytes of decoding a ``mode`` image of ``size`` (w, h) and converting it to RGB.

    bytes = w x h x (stored bytes per pixel of ``mode`` + 4 for the RGB result unless the image
    is RGB without a colour key); band temporaries (CONVERT_CHUNK_PIXELS) come on top.
    """
    w, h = size
    per_pixel = _STORED_BYTES.get(mode, 4) + (0 if mode == "RGB" and not transparency else 4)
    return w * h * per_pixel


def _check_memory(im: Image.Image, max_pixels: int | None, name: str) -> None:
    if max_pixels is None:
        return
    need = decode_bytes(im.mode, im.size, "transparency" in im.info)
    budget = max_pixels * DECODE_BYTES_PER_PIXEL
    if need > budget:
        w, h = im.size
        raise ImageError(name, f"decoding this {w}x{h} {im.mode} image needs about {need / 2**20:,.0f} MiB, over "
                               f"the budget of {budget / 2**20:,.0f} MiB ({DECODE_BYTES_PER_PIXEL} bytes per allowed "
                               f"pixel); downscale it or convert it to 8-bit RGB", "too_large")


# --------------------------------------------------------------------------- decode work, from the bytes


_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: The end of a JPEG scan's entropy-coded data: 0xFF followed by anything but a stuffed 0x00, a
#: restart marker (RST0-7) or a fill byte.
_JPEG_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


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
    """Walk the marker segments of the first image (up to EOI); count segments and scans."""
    n, i, segments, scans, allowed = len(data), 2, 0, 0, MAX_JPEG_SCANS
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
        if m in _JPEG_SOF and i + 9 <= n and max_pixels is not None:
            pixels = int.from_bytes(data[i + 5 : i + 7], "big") * int.from_bytes(data[i + 7 : i + 9], "big")
            allowed = min(MAX_JPEG_SCANS, JPEG_SCAN_PASSES * max_pixels // max(pixels, 1))
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


def to_uint8_square(im: Image.Image, resize_size: int) -> np.ndarray:
    """Resize the shorter side to ``resize_size`` (bilinear) and center-crop a square.

    Returns uint8 [R, R, 3]. This is the form the training data cache stores.
    """
    if im.mode != "RGB":
        im = _to_rgb(im)
    w, h = im.size
    r = int(resize_size)
    if (w, h) != (r, r):
        if w <= h:
            new_w, new_h = r, max(r, int(r * h / w))
        else:
            new_w, new_h = max(r, int(r * w / h)), r
        if new_w * new_h > MAX_RESIZED_PIXELS:
            # extreme aspect ratio: resample only the crop window (bounded memory)
            left = int(round((new_w - r) / 2.0))
            top = int(round((new_h - r) / 2.0))
            sx, sy = w / new_w, h / new_h
            box = (left * sx, top * sy, (left + r) * sx, (top + r) * sy)
            return np.asarray(im.resize((r, r), Image.Resampling.BILINEAR, box=box), dtype=np.uint8)
        if (new_w, new_h) != (w, h):
            im = im.resize((new_w, new_h), Image.Resampling.BILINEAR)
    return center_crop_array(np.asarray(im, dtype=np.uint8), r)


def center_crop_array(arr: np.ndarray, size: int) -> np.ndarray:
    """Center crop of an [H, W, C] (or [..., H, W, C]) array, torchvision's rounding."""
    h, w = arr.shape[-3], arr.shape[-2]
    if h < size or w < size:
        raise ValueError(f"cannot center-crop {size}x{size} from {h}x{w}")
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return arr[..., top : top + size, left : left + size, :]


def to_chw_float(arr: np.ndarray) -> np.ndarray:
    """uint8 [..., H, W, 3] -> float32 [..., 3, H, W] in [0, 1]."""
    x = np.asarray(arr, dtype=np.float32) / np.float32(255.0)
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))


def preprocess(src: ImageInput, spec: PreprocessSpec, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               name: str | None = None) -> np.ndarray:
    """One image -> float32 [3, S, S] in [0, 1], the model's input contract."""
    im = load_image(src, max_pixels=max_pixels, name=name)
    sq = to_uint8_square(im, spec.resize_size)
    return to_chw_float(center_crop_array(sq, spec.input_size))

