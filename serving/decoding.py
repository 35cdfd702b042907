"""Parsing untrusted request bytes: image uploads and JSON bodies (no web framework here).

These functions run inside the decode worker processes of
:mod:`serving.decodepool` (so that a runaway decode can be killed) and are
plain functions of bytes, so the tests call them directly too.

* :func:`decode_image`: bytes -> float32 [3, S, S] (``isfe_model.preprocess``),
  classifying what is wrong: empty -> 400, not an image -> 415, too many
  pixels -> 413, corrupt -> 422.
* :func:`parse_json_body`: ``{"image": "<base64>"}`` / ``{"images": [...]}``
  (data URLs too) -> (uploads, fields); malformed -> 400, too many images -> 413.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import reprlib
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from isfe_model.preprocess import SUPPORTED_FORMATS, ImageError, PreprocessSpec, check_image_bytes, preprocess

from .errors import ApiError

__all__ = ["MAX_JSON_INT_DIGITS", "BoundedRepr", "Upload", "check_count", "decode_image", "parse_json_body"]

#: Longest integer literal accepted in a JSON body (Python refuses over 4,300 digits; no field needs more than a few).
MAX_JSON_INT_DIGITS = 100
#: JSON fields (besides the images) that the endpoints read; others are dropped where they were parsed.
JSON_FIELDS = ("k",)
#: How the accepted formats are named in error messages.
_FORMAT_NAMES = ", ".join(SUPPORTED_FORMATS)


@dataclass
class Upload:
    """One uploaded image: a display name (file name or ``images[i]``) and its bytes."""

    name: str
    data: bytes


class BoundedRepr:
    """Stands in for a large JSON value (list/object) sent back from a worker: only its short repr travels."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


def check_count(n: int, max_images: int) -> None:
    """400 when there is no image, 413 when there are more than ``max_images``."""
    if n == 0:
        raise ApiError(
            400,
            "missing_image",
            "no image in the request; send it as multipart file field 'file' (several: 'files') or JSON {\"image\": \"<base64>\"}",
        )
    if n > max_images:
        raise ApiError(413, "too_many_images", f"{n} images in one request, over the limit of {max_images}; split the request")


def _b64decode(text: Any, name: str) -> bytes:
    if not isinstance(text, str):
        raise ApiError(400, "bad_base64", f"{name} must be a base64 string, got {type(text).__name__}")
    if text.startswith("data:"):
        head, sep, rest = text.partition(",")
        if not sep or ";base64" not in head:
            raise ApiError(400, "bad_base64", f"{name}: data URL must be base64-encoded (data:<type>;base64,<data>)")
        text = rest
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, "bad_base64", f"{name} is not valid base64 ({e})") from None


def _json_int(text: str) -> int:
    """``parse_int`` hook for :func:`json.loads`: refuses absurdly long integers with a clear 400."""
    digits = len(text.lstrip("-"))
    if digits > MAX_JSON_INT_DIGITS:
        raise ApiError(400, "malformed_json",
                       f"request body has an integer with {digits:,} digits; numbers are limited to {MAX_JSON_INT_DIGITS} digits")
    return int(text)


def _small(value: Any) -> Any:
    """A field value that is cheap to send between processes: containers become their bounded repr."""
    return BoundedRepr(reprlib.repr(value)) if isinstance(value, (list, dict)) else value


def parse_json_body(raw: bytes, max_images: int) -> tuple[list[Upload], dict[str, Any]]:
    """JSON body bytes -> (uploads in request order, the fields in :data:`JSON_FIELDS`).

    Raises:
        ApiError: 400 for invalid/deeply nested JSON, a non-object body, bad
            base64 or no image; 413 for more than ``max_images`` images.
    """
    try:
        doc = json.loads(raw, parse_int=_json_int)
    except RecursionError:
        raise ApiError(
            400, "malformed_json", 'JSON body is nested too deeply; send a flat object like {"image": "<base64>"} or {"images": [...]}'
        ) from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError (both ValueErrors) and any other refusal of json.loads
        raise ApiError(400, "malformed_json", f"request body is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ApiError(400, "malformed_json", 'JSON body must be an object like {"image": "<base64>"} or {"images": [...]}')
    images: list[tuple[str, Any]] = []
    if "image" in doc:
        images.append(("image", doc["image"]))
    if "images" in doc:
        lst = doc["images"]
        if not isinstance(lst, list):
            raise ApiError(400, "malformed_json", '"images" must be a list of base64 strings')
        check_count(len(images) + len(lst), max_images)
        images.extend((f"images[{i}]", v) for i, v in enumerate(lst))
    check_count(len(images), max_images)
    uploads = [Upload(name, _b64decode(v, name)) for name, v in images]
    fields = {k: _small(doc[k]) for k in JSON_FIELDS if k in doc}
    return uploads, fields


# ImageError.kind of a refused structure -> (HTTP status, error code)
_STRUCTURE_STATUS = {
    "empty": (400, "empty_file"),
    "not_an_image": (415, "not_an_image"),
    "too_large": (413, "image_too_large"),
    "too_complex": (422, "image_too_complex"),
    "corrupt": (422, "corrupt_image"),
}


def decode_image(upload: Upload, spec: PreprocessSpec, max_pixels: int) -> np.ndarray:
    """Bytes -> float32 [3, S, S] via :func:`isfe_model.preprocess.preprocess`.

    Raises :class:`ApiError` with 400 (empty), 415 (not an image), 413 (too
    many pixels) or 422 (corrupt / undecodable); never anything else for bad bytes.
    """
    name, data = upload.name, upload.data
    if not data:
        raise ApiError(400, "empty_file", f"{name}: empty upload (0 bytes)")
    # The structure walk (scan, chunk, frame counts) comes before any Pillow parsing:
    # Image.open alone decodes an icon's embedded image and walks PNG/GIF/TIFF blocks.
    try:
        check_image_bytes(data, max_pixels, name)
    except ImageError as e:
        status, code = _STRUCTURE_STATUS.get(e.kind, (422, "corrupt_image"))
        raise ApiError(status, code, str(e)) from None
    # Classify from the header first (cheap, decodes no pixels), with the same
    # decoders as isfe_model.preprocess.load_image: no other Pillow plugin ever
    # parses an upload, and formats Pillow knows but we refuse are "not an image".
    try:
        with warnings.catch_warnings():
            # Pillow's DecompressionBombWarning (over Image.MAX_IMAGE_PIXELS): our
            # max_pixels check below is the limit that counts (see lift_pillow_pixel_limit).
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS) as im:
                w, h = im.size
    except UnidentifiedImageError:
        raise ApiError(415, "not_an_image", f"{name}: not a recognised image format (supported: {_FORMAT_NAMES})") from None
    except Image.DecompressionBombError as e:
        raise ApiError(413, "image_too_large", f"{name}: image too large ({e})") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure on untrusted bytes is the upload's fault
        raise ApiError(422, "corrupt_image", f"{name}: cannot read image header ({type(e).__name__}: {e})") from None
    if w * h > max_pixels:
        raise ApiError(
            413, "image_too_large", f"{name}: image is {w}x{h} = {w * h:,} pixels, over the server limit of {max_pixels:,}; downscale it"
        )
    try:
        return preprocess(data, spec, max_pixels=max_pixels, name=name)
    except ImageError as e:
        raise ApiError(422, "corrupt_image", str(e)) from None
    except MemoryError:
        raise ApiError(413, "image_too_large", f"{name}: decoding it needs more memory than the server allows per image; "
                                               f"downscale it or send a smaller file") from None
    except Exception as e:  # noqa: BLE001
        raise ApiError(422, "corrupt_image", f"{name}: cannot decode image ({type(e).__name__}: {e})") from None
