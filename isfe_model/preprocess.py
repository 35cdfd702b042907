"""Image decoding and preprocessing: the one definition shared by training and inference.

The training evaluation transform (``training.data``) and the ONNX inference
path (:class:`isfe_model.Encoder`) both call these functions, so an image is
turned into exactly the same array in both places.

Pipeline for one image (``PreprocessSpec`` holds the numbers)::

    bytes/path/PIL/array --load_image--> RGB PIL image
        (first frame, EXIF orientation, any mode -> RGB, alpha on white, pixel limit)
    --to_uint8_square--> uint8 [R, R, 3]
        (resize the shorter side to R = resize_size, bilinear; center-crop R x R)
    --center_crop_array--> uint8 [S, S, 3]  (S = input_size)
    --to_chw_float--> float32 [3, S, S] in [0, 1]

The model itself applies mean/std normalisation, so clients never do arithmetic.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from struct import error as struct_error
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "SUPPORTED_FORMATS",
    "ImageError",
    "ImageInput",
    "PreprocessSpec",
    "center_crop_array",
    "describe_source",
    "load_image",
    "preprocess",
    "preprocess_batch",
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

ImageInput = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]


class ImageError(ValueError):
    """An input that is not a usable image. ``str()`` names the source and the reason."""

    def __init__(self, source: str, reason: str):
        self.source = source
        self.reason = reason
        super().__init__(f"{source}: {reason}")


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
        known = {k: d[k] for k in ("input_size", "resize_size", "mean", "std", "resize_policy", "interpolation") if k in d}
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
        raise ImageError(name, f"arrays must be uint8 (got {arr.dtype}); scale to 0..255 and cast with .astype(np.uint8)")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(arr), "L")
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        return Image.fromarray(np.ascontiguousarray(arr), "RGB" if arr.shape[2] == 3 else "RGBA")
    raise ImageError(name, f"arrays must be HxW, HxWx1, HxWx3 or HxWx4 uint8, got shape {tuple(arr.shape)}")


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; transparency is composited on white."""
    mode = im.mode
    if mode in ("L", "RGB", "1") and "transparency" in im.info:
        im = im.convert("RGBA")  # a tRNS colour key: transparent like an alpha channel
        mode = "RGBA"
    if mode == "RGB":
        return im
    if mode.startswith("I") or mode.startswith("F"):
        arr = np.asarray(im).astype(np.float64)
        if mode == "F":
            # float images: [0, 1] if they look normalised, else 0..255
            arr = arr * 255.0 if arr.size and np.nanmax(arr) <= 1.0 else arr
        elif mode.startswith("I;16") or (arr.size and arr.max() > 255):
            arr = arr / 257.0  # 16-bit -> 8-bit
        arr = np.nan_to_num(arr, nan=0.0, posinf=255.0, neginf=0.0)
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode == "P" or mode == "PA":
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "1":
        return im.convert("L").convert("RGB")
    return im.convert("RGB")  # L, CMYK, YCbCr, LAB, HSV, RGBX, ...


def lift_pillow_pixel_limit(max_pixels: int | None) -> None:
    """Make ``max_pixels`` the pixel limit that counts in this process (``None``: no limit).

    Pillow refuses images over 2 x ``Image.MAX_IMAGE_PIXELS`` (about 179 M pixels) on
    its own; a larger ``max_pixels`` raises Pillow's limit to it (never lowers it).
    """
    if max_pixels is None:
        Image.MAX_IMAGE_PIXELS = None
    elif Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = int(max_pixels)


def _read_image_file(path: Path, name: str) -> bytes:
    """The bytes of an image file; refuses before opening what is not a regular file or is too large."""
    try:
        st = path.stat()  # follows symlinks: a link to a photo is a photo
    except FileNotFoundError:
        raise ImageError(name, "no such file" if not path.is_symlink() else "a symlink to a missing file") from None
    except OSError as e:
        raise ImageError(name, f"cannot read file ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(name, "is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):  # a FIFO would block forever, /dev/zero never ends
        kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode)
                or stat.S_ISBLK(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "a special file")
        raise ImageError(name, f"is {kind}, not a regular image file")
    if st.st_size > MAX_FILE_BYTES:
        raise ImageError(name, f"file of {st.st_size / 2**20:,.0f} MiB is larger than any image this reads "
                               f"({MAX_FILE_BYTES >> 20} MiB)")
    try:
        with open(path, "rb") as f:  # no file handle stays open
            data = f.read(MAX_FILE_BYTES + 1)  # a file that grows while it is read stops here too
    except OSError as e:
        raise ImageError(name, f"cannot read file ({e.strerror or e})") from None
    if len(data) > MAX_FILE_BYTES:
        raise ImageError(name, f"file is larger than any image this reads ({MAX_FILE_BYTES >> 20} MiB)")
    return data


def load_image(src: ImageInput, max_pixels: int | None = DEFAULT_MAX_PIXELS, name: str | None = None) -> Image.Image:
    """Decode any supported input into an 8-bit RGB Pillow image.

    Args:
        src: a file path, encoded bytes, a PIL image or a uint8 array
            (HxW, HxWx1, HxWx3 RGB, HxWx4 RGBA).
        max_pixels: refuse images whose width x height exceeds this
            (decompression bombs); ``None`` disables the check.
        name: how to call the input in error messages.

    Raises:
        ImageError: naming the source and the reason (missing, empty,
            not an image, truncated, too large, ...).
    """
    name = name or describe_source(src)
    if isinstance(src, np.ndarray):
        im = _from_array(src, name)
        _check_pixels(im, max_pixels, name)
        return _to_rgb(im)
    if isinstance(src, Image.Image):
        im = src
    else:
        if isinstance(src, (bytes, bytearray, memoryview)):
            data = bytes(src)
        elif isinstance(src, (str, os.PathLike)):
            data = _read_image_file(Path(src), name)
        else:
            raise ImageError(name, f"unsupported input type {type(src).__name__}; give a path, bytes, a PIL image or a uint8 array")
        if not data:
            raise ImageError(name, "empty file (0 bytes)")
        try:
            with warnings.catch_warnings():
                # Pillow warns above Image.MAX_IMAGE_PIXELS (our own max_pixels check
                # below is the limit that counts) and about damaged metadata.
                warnings.simplefilter("ignore")
                im = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
        except UnidentifiedImageError:
            raise ImageError(name, f"{_sniff(data)} (supported: JPEG, PNG, GIF, BMP, TIFF, WebP, PPM, ICO)") from None
        except Image.DecompressionBombError as e:
            raise ImageError(name, f"image too large, refused before decoding ({e}; Pillow's limit PIL.Image.MAX_IMAGE_PIXELS)") from None
        except (OSError, SyntaxError, ValueError, EOFError, struct_error) as e:
            raise ImageError(name, f"truncated or corrupt image header ({e})") from None
    _check_pixels(im, max_pixels, name)
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
        raise ImageError(name, f"image too large, refused before decoding ({e}; Pillow's limit PIL.Image.MAX_IMAGE_PIXELS)") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct_error, IndexError) as e:
        raise ImageError(name, f"corrupt or truncated image data ({e})") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns "Corrupt EXIF data"; the pixels are fine
            im = ImageOps.exif_transpose(im) or im
    except Exception:  # noqa: BLE001 - an unreadable EXIF block: keep the stored orientation
        pass
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


def _check_pixels(im: Image.Image, max_pixels: int | None, name: str) -> None:
    w, h = im.size
    if w < 1 or h < 1:
        raise ImageError(name, f"image has no pixels ({w}x{h})")
    if max_pixels is not None and w * h > max_pixels:
        raise ImageError(
            name,
            f"image is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,} "
            f"(a decompression bomb, or raise max_pixels if the image is genuine)",
        )


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


def preprocess(src: ImageInput, spec: PreprocessSpec, max_pixels: int | None = DEFAULT_MAX_PIXELS, name: str | None = None) -> np.ndarray:
    """One image -> float32 [3, S, S] in [0, 1], the model's input contract."""
    im = load_image(src, max_pixels=max_pixels, name=name)
    sq = to_uint8_square(im, spec.resize_size)
    return to_chw_float(center_crop_array(sq, spec.input_size))


def preprocess_batch(srcs: list[ImageInput], spec: PreprocessSpec, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Several images -> float32 [B, 3, S, S]. Raises ImageError naming the first bad input."""
    out = np.empty((len(srcs), 3, spec.input_size, spec.input_size), dtype=np.float32)
    for i, src in enumerate(srcs):
        out[i] = preprocess(src, spec, max_pixels=max_pixels, name=describe_source(src, i))
    return out
