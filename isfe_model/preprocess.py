"""Image decoding and preprocessing: the one definition shared by training and inference.

The training evaluation transform (``training.data``) and the ONNX inference
path (:class:`isfe_model.Encoder`) both call these functions, so an image is
turned into exactly the same array in both places.

Pipeline for one image (``PreprocessSpec`` holds the numbers)::

    bytes/path/PIL/array --load_image--> RGB PIL image
        (file size cap; check_image_bytes (isfe_model.decode_limits): decode work bounded from
        the bytes -- JPEG scans, PNG chunks, GIF blocks, every ICO frame's size; pixel limit and
        mode-aware memory budget from the header; with spec.decode == "draft" a JPEG whose
        shorter side is >= 2 R is decoded by libjpeg at 1/s scale, s = draft_scale(w, h, R)
        in {2, 4, 8} from the stored (pre-rotation) sides; then first frame, EXIF orientation,
        any mode -> RGB in bands, alpha on white)
    --to_uint8_square--> uint8 [R, R, 3]
        (resize the shorter side to R = resize_size, bilinear; center-crop R x R)
        [load_image + to_uint8_square = decode_square: the training cache's form]
    --center_crop_array--> uint8 [S, S, 3]  (S = input_size)
    --to_chw_float--> float32 [3, S, S] in [0, 1]

The model itself applies mean/std normalisation, so clients never do arithmetic.
Every function here is top level and every argument and error (ImageError) pickles, so a
process pool can run :func:`preprocess` with a time limit per image.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import os
import stat
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from struct import error as struct_error
from typing import Any, Callable, Iterator, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .decode_limits import (  # noqa: F401  (re-exported: these were defined here before decode_limits.py)
    DEFAULT_MAX_PIXELS,
    ERROR_KINDS,
    JPEG_SCAN_PASSES,
    MAX_GIF_BLOCKS,
    MAX_JPEG_SCANS,
    MAX_JPEG_SEGMENTS,
    MAX_PNG_CHUNKS,
    MAX_SLOW_FORMAT_BYTES,
    MAX_TIFF_ENTRIES,
    MAX_TIFF_STRIPS,
    PNG_BYTES_PER_CHUNK,
    ImageError,
    _check_dims,
    check_image_bytes,
    pillow_bomb_pixels,
    signature_format,
    truncated_header_reason,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ERROR_KINDS",
    "IMAGE_EXTENSIONS",
    "SUPPORTED_FORMATS",
    "BASE_FORMATS",
    "FORMAT_NAMES",
    "available_formats",
    "non_image_reason",
    "ImageError",
    "ImageInput",
    "PreprocessSpec",
    "DECODE_POLICIES",
    "center_crop_array",
    "check_image_bytes",
    "pillow_bomb_pixels",
    "signature_format",
    "truncated_header_reason",
    "decode_bytes",
    "decode_square",
    "draft_scale",
    "describe_source",
    "load_image",
    "preprocess",
    "read_image_file",
    "reuse_image_memory",
    "to_chw_float",
    "to_uint8_square",
]

#: Background that transparent pixels are composited on (white).
BACKGROUND = (255, 255, 255)
#: Pillow decoders that load_image uses (by Pillow format id), besides AVIF (see SUPPORTED_FORMATS).
#: Others that Pillow knows (EPS runs Ghostscript, PSD, FITS, ...) are refused: a hostile file
#: cannot reach them.  MPO (multi-picture JPEG from phones) opens through the JPEG decoder.
BASE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "DIB", "TIFF", "WEBP", "PPM", "ICO")


def available_formats(find_spec: Callable[[str], Any] = importlib.util.find_spec) -> tuple[str, ...]:
    """:data:`BASE_FORMATS`, plus AVIF where this Pillow has ``PIL.AvifImagePlugin`` (newer releases)."""
    try:
        avif = find_spec("PIL.AvifImagePlugin") is not None
    except (ImportError, ValueError):
        avif = False
    return BASE_FORMATS + (("AVIF",) if avif else ())


#: What ``Image.open(formats=...)`` is given.  Only formats this Pillow knows: naming an unknown
#: one raises KeyError for every file that no earlier format accepts (an older Pillow and "AVIF").
SUPPORTED_FORMATS = available_formats()
#: The supported formats as error messages name them (DIB is BMP's headerless form).
FORMAT_NAMES = ", ".join({"WEBP": "WebP"}.get(f, f) for f in SUPPORTED_FORMATS if f != "DIB")
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


#: Decode policies of PreprocessSpec.decode: "full" decodes every pixel (the default, and what a
#: model without the field gets); "draft" lets libjpeg downscale a JPEG in the DCT domain by 2, 4
#: or 8 while the shorter side stays >= resize_size (see draft_scale), then resizes as usual.
DECODE_POLICIES = ("full", "draft")
#: DCT scales of libjpeg's draft mode, largest first.
DRAFT_SCALES = (8, 4, 2)
#: Memory budget of one decode: max_pixels x this many bytes.  The estimate is mode-aware (the
#: decoded image in Pillow's storage: 1 byte per pixel for L/P/1, 2 for I;16, 4 for RGB, RGBA,
#: CMYK, I, F, ... plus the 4-byte RGB result for modes that are converted), so every mode fits
#: at the pixel limit and a wider one would be refused before it is decoded.
DECODE_BYTES_PER_PIXEL = 8
#: Conversions to RGB work on bands of about this many pixels (bounded temporaries).
CONVERT_CHUNK_PIXELS = 1 << 20

ImageInput = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]

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
        decode: ``"full"`` (every JPEG pixel decoded; the default, and what specs, checkpoints
            and models from before the field get) or ``"draft"`` (a JPEG whose shorter side is
            at least 2 R is decoded at 1/2, 1/4 or 1/8 scale by libjpeg, see :func:`draft_scale`;
            other formats decode fully).  :meth:`to_dict` leaves the field out when it is
            ``"full"``, so a spec and the dicts written before the field existed (checkpoints,
            package config.json, gallery manifests, cache keys) stay equal.
    """

    input_size: int = 32
    resize_size: int = 32
    mean: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
    std: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
    resize_policy: str = "shorter_side_center_crop"
    interpolation: str = "bilinear"
    decode: str = "full"

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
        if self.decode not in DECODE_POLICIES:
            raise ValueError(f"unknown decode policy {self.decode!r}; choose one of {', '.join(DECODE_POLICIES)}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        object.__setattr__(self, "input_size", int(self.input_size))
        object.__setattr__(self, "resize_size", int(self.resize_size))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        if self.decode == "full":
            del d["decode"]  # the default: dicts from before the field compare equal
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PreprocessSpec":
        names = ("input_size", "resize_size", "mean", "std", "resize_policy", "interpolation", "decode")
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


#: Freed image-memory blocks (Pillow's arena: 16 MiB each by default) that :func:`reuse_image_memory` lets Pillow
#: keep for the next image.  A 12 MP photo decodes into about 3 blocks; two decode threads hold about 6.
REUSED_IMAGE_BLOCKS = 8


def reuse_image_memory(blocks: int = REUSED_IMAGE_BLOCKS) -> int:
    """Let Pillow keep up to ``blocks`` freed image-memory blocks for the next image; returns the setting in effect.

    Pillow's default (0) returns every block to the system, so each full-size decode of a camera photo maps,
    zeroes and unmaps ~48 MB again (on 2 cores, 200 x 12 MP photos through ``isfe-index`` with full decoding:
    1.17x the images/s, ``benchmarks/results/photo_bench-cpu2-epyc-block-reuse.json``).  Process-wide
    (``PIL.Image.core.set_blocks_max``), so importing this package never changes it: the command-line tools
    and the server call it for their own processes.  The retained memory is at most ``blocks`` x Pillow's
    block size (128 MiB by default; isfe-index's peak RSS with full decoding went 368 -> 422 MiB).  Pillow's
    own ``PILLOW_BLOCKS_MAX`` environment variable, when set, is left in charge.
    """
    if int(blocks) < 0:
        raise ValueError(f"blocks must be >= 0, got {blocks}")
    if "PILLOW_BLOCKS_MAX" not in os.environ:
        Image.core.set_blocks_max(int(blocks))
    return int(Image.core.get_blocks_max())


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
        damaged = truncated_header_reason(data)  # starts like a supported format: damaged, not unsupported
        if damaged is not None:
            raise ImageError(name, f"{damaged}; copy or save it again", "corrupt") from None
        raise ImageError(name, f"{non_image_reason(data)} (supported: {FORMAT_NAMES})",
                         "not_an_image") from None
    except Image.DecompressionBombError as e:
        raise _pillow_bomb(name, e, max_pixels) from None
    except (OSError, SyntaxError, ValueError, EOFError, struct_error) as e:
        raise ImageError(name, f"truncated or corrupt image header ({e})") from None


def _pillow_bomb(name: str, e: Exception, max_pixels: int | None) -> ImageError:
    """Pillow's own refusal (over 2 x ``Image.MAX_IMAGE_PIXELS``, while opening) in the words of our pixel limit."""
    n = pillow_bomb_pixels(e)
    size = f"{n:,} pixels" if n is not None else "more pixels than Pillow allows"
    if max_pixels is not None and (n is None or n > max_pixels):
        return ImageError(name, f"image is {size}, over the limit of {max_pixels:,}; refused before decoding "
                                f"(a decompression bomb, or raise max_pixels if the image is genuine)", "too_large")
    hard = f" of {2 * Image.MAX_IMAGE_PIXELS:,}" if Image.MAX_IMAGE_PIXELS else ""
    return ImageError(name, f"image is {size}, over Pillow's own limit{hard} (2 x PIL.Image.MAX_IMAGE_PIXELS); "
                            f"refused before decoding (a decompression bomb, or, if the image is genuine, call "
                            f"isfe_model.preprocess.lift_pillow_pixel_limit(max_pixels) first)", "too_large")


def _oriented(im: Image.Image) -> Image.Image:
    """``im`` turned upright by its EXIF/XMP orientation (the same object when it has none: no copy)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns "Corrupt EXIF data"; the pixels are fine
            if _orientation(im) == 1:
                return im
            return ImageOps.exif_transpose(im) or im
    except Exception:  # noqa: BLE001 - an unreadable EXIF block: keep the stored orientation
        return im


def _orientation(im: Image.Image) -> int:
    """The EXIF/XMP orientation tag (2-8), 1 when there is none or it is not valid."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        o = im.getexif().get(0x0112, 1)
    return o if o in (2, 3, 4, 5, 6, 7, 8) else 1


def load_image(src: ImageInput, max_pixels: int | None = DEFAULT_MAX_PIXELS, name: str | None = None,
               draft_size: int | None = None) -> Image.Image:
    """Decode any supported input into an 8-bit RGB Pillow image, in bounded time and memory.

    Args:
        src: a file path, encoded bytes, a PIL image or a uint8 array
            (HxW, HxWx1, HxWx3 RGB, HxWx4 RGBA).
        max_pixels: refuse images whose width x height exceeds this, or whose decoding would
            need more than max_pixels x DECODE_BYTES_PER_PIXEL bytes (decompression bombs);
            ``None`` disables both checks (the work limits of :func:`check_image_bytes` stay).
        name: how to call the input in error messages.
        draft_size: None (decode every pixel) or R: an encoded JPEG (path or bytes) is decoded
            by libjpeg at 1/s scale, s = :func:`draft_scale` of its stored sides and R, so its
            shorter side stays >= R; the limits are those of the full-size image.  A side that
            is not a multiple of s ends in a partial scaled pixel (:func:`decode_square` resizes
            the exact region).

    Raises:
        ImageError: naming the source and the reason (missing, empty,
            not an image, truncated, too large, too costly to decode, ...).
    """
    return _load(src, max_pixels, name, draft_size)[0]


#: A region (left, top, right, bottom) of an image, in its pixels (fractional).
Box = tuple[float, float, float, float]


def _load(src: ImageInput, max_pixels: int | None, name: str | None,
          draft_size: int | None = None) -> tuple[Image.Image, Box | None, tuple[int, int]]:
    """:func:`load_image` -> (RGB image, the region of it that the full image maps to or None for all of it,
    the full-size upright (w, h)).  The region differs from the whole image only after a draft decode."""
    name = name or describe_source(src)
    if isinstance(src, np.ndarray):
        im = _from_array(src, name)
        _check_pixels(im, max_pixels, name)
        return _to_rgb(im), None, im.size
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
    full = im.size
    region = _draft(im, int(draft_size)) if draft_size is not None and im is not src else None  # not a caller's image
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
        raise _pillow_bomb(name, e, max_pixels) from None
    except (OSError, SyntaxError, ValueError, EOFError, struct_error, IndexError) as e:
        raise ImageError(name, f"corrupt or truncated image data ({e})") from None
    stored = im.size
    upright = _oriented(im)
    o = _orientation(im) if upright is not im else 1
    im = upright
    box = None if region is None else _oriented_box(region, stored, o)
    try:
        return _to_rgb(im), box, (full[1], full[0]) if o in (5, 6, 7, 8) else full
    except (ValueError, OSError) as e:
        raise ImageError(name, f"cannot convert pixel mode {im.mode} to RGB ({e})") from None


def draft_scale(w: int, h: int, resize_size: int) -> int:
    """DCT scale s of a draft decode of a w x h JPEG for resize size R; 1 means a full decode.

    Drafting happens only when R <= min(w, h) / 2; then s is the largest of 8, 4, 2 whose decoded
    shorter side ceil(min(w, h) / s) (libjpeg's scaled size) is still >= R (and s <= min(w, h)),
    so the usual bilinear resize to R follows.  (w, h) are the stored sides, before EXIF
    orientation: a rotation by 90 degrees swaps them and keeps min(w, h).
    """
    short, r = min(int(w), int(h)), int(resize_size)
    if 2 * r > short:
        return 1
    return next(s for s in DRAFT_SCALES if s <= short and -(-short // s) >= r)  # s = 2 always qualifies


def _draft(im: Image.Image, resize_size: int) -> tuple[float, float] | None:
    """Ask Pillow's JPEG decoder (not yet run) for the 1/s-scale decode of :func:`draft_scale`.

    Returns the full image's extent (w / s, h / s) in the scaled pixels (the decoder makes
    ceil(w / s) x ceil(h / s) of them), or None when nothing is drafted.
    """
    if im.format not in ("JPEG", "MPO"):
        return None
    w, h = im.size  # the stored sides: EXIF orientation is applied after the decode
    s = draft_scale(w, h, resize_size)
    if s == 1:
        return None
    # Pillow picks the largest of 8, 4, 2, 1 <= min(w // (w // s), h // (h // s)), which is s
    # (w // s >= 1 as s <= min(w, h); each quotient lies in [s, 2s)); "RGB" keeps the file's
    # colour mode (L, RGB, CMYK)
    if im.draft("RGB", (w // s, h // s)) is None:
        return None
    return w / s, h / s


def _oriented_box(region: tuple[float, float], size: tuple[int, int], orientation: int) -> Box:
    """Where the region (0, 0, bw, bh) of a stored image of ``size`` (dw, dh) lies after the EXIF transpose.

    The padding (dw - bw, dh - bh: the partial last scaled pixel) is at the right and bottom of
    the stored image; orientation 2 mirrors x, 4 mirrors y, 3 both, 5 swaps x and y, 6 (clockwise)
    maps (x, y) -> (dh - y, x), 7 -> (dh - y, dw - x), 8 (counter-clockwise) -> (y, dw - x).
    """
    (bw, bh), (dw, dh) = region, size
    px, py = dw - bw, dh - bh
    return {1: (0.0, 0.0, bw, bh), 2: (px, 0.0, dw, bh), 3: (px, py, dw, dh), 4: (0.0, py, bw, dh),
            5: (0.0, 0.0, bh, bw), 6: (py, 0.0, dh, bw), 7: (py, px, dh, dw), 8: (0.0, px, bh, dw)}[orientation]


def non_image_reason(data: bytes) -> str:
    """Why bytes that Pillow (restricted to SUPPORTED_FORMATS) could not open are not an image (SVG, HTML, PDF, ...)."""
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


def to_uint8_square(im: Image.Image, resize_size: int) -> np.ndarray:
    """Resize the shorter side to ``resize_size`` (bilinear) and center-crop a square.

    Returns uint8 [R, R, 3]. This is the form the training data cache stores.
    """
    if im.mode != "RGB":
        im = _to_rgb(im)
    return _square(im, int(resize_size), None, im.size)


def _square(im: Image.Image, r: int, box: Box | None, size: tuple[int, int]) -> np.ndarray:
    """:func:`to_uint8_square` of the image of ``size`` (w, h) that ``box`` of ``im`` (None: all of ``im``) shows.

    The resized size comes from (w, h): shorter side -> r, the other int(r x long / short).
    """
    w, h = size
    x0, y0, x1, y1 = box if box is not None else (0, 0, im.size[0], im.size[1])
    if w <= h:
        new_w, new_h = r, max(r, int(r * h / w))
    else:
        new_w, new_h = max(r, int(r * w / h)), r
    if new_w * new_h > MAX_RESIZED_PIXELS:
        # extreme aspect ratio: resample only the crop window (bounded memory)
        left = int(round((new_w - r) / 2.0))
        top = int(round((new_h - r) / 2.0))
        sx, sy = (x1 - x0) / new_w, (y1 - y0) / new_h
        window = (x0 + left * sx, y0 + top * sy, x0 + (left + r) * sx, y0 + (top + r) * sy)
        return np.asarray(im.resize((r, r), Image.Resampling.BILINEAR, box=window), dtype=np.uint8)
    if box is not None or (new_w, new_h) != im.size:
        im = im.resize((new_w, new_h), Image.Resampling.BILINEAR, box=box)
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


def decode_square(src: ImageInput, resize_size: int, decode: str = "full",
                  max_pixels: int | None = DEFAULT_MAX_PIXELS, name: str | None = None) -> np.ndarray:
    """One image -> uint8 [R, R, 3], R = ``resize_size``: :func:`load_image` then :func:`to_uint8_square`.

    ``decode`` is a spec's decode policy ("full", or "draft": JPEGs decoded at the 1/s scale of
    :func:`draft_scale`).  The training data cache (``training.data``) stores exactly these arrays
    and :func:`preprocess` crops them, so training and inference see the same pixels.
    """
    if decode not in DECODE_POLICIES:
        raise ValueError(f"unknown decode policy {decode!r}; choose one of {', '.join(DECODE_POLICIES)}")
    if decode == "full":
        return to_uint8_square(load_image(src, max_pixels=max_pixels, name=name), resize_size)
    im, box, size = _load(src, max_pixels, name, draft_size=int(resize_size))
    return _square(im, int(resize_size), box, size)


def preprocess(src: ImageInput, spec: PreprocessSpec, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               name: str | None = None) -> np.ndarray:
    """One image -> float32 [3, S, S] in [0, 1], the model's input contract (decoded as ``spec.decode`` says)."""
    sq = decode_square(src, spec.resize_size, spec.decode, max_pixels=max_pixels, name=name)
    return to_chw_float(center_crop_array(sq, spec.input_size))

