"""Turning an HTTP request into preprocessed images, with limits and precise errors.

Two request shapes are accepted:

* ``multipart/form-data`` with the image(s) as file field ``file`` (one) or
  ``files`` (several, repeated), plus plain fields such as ``k``;
* ``application/json`` ``{"image": "<base64>"}`` or ``{"images": ["<base64>", ...]}``
  (data URLs ``data:image/png;base64,...`` are accepted too), plus e.g. ``"k": 5``.

:func:`decode_image` classifies what is wrong with an upload:
empty -> 400, not an image -> 415, too many pixels -> 413, corrupt -> 422.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import reprlib
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request

from isfe_model.preprocess import SUPPORTED_FORMATS, ImageError, PreprocessSpec, lift_pillow_pixel_limit, preprocess

from .errors import ApiError

__all__ = ["Limits", "ParsedRequest", "Upload", "decode_image", "lift_pillow_pixel_limit", "parse_k", "parse_request"]

FILE_FIELDS = ("file", "files")
#: Longest integer literal accepted in a JSON body (Python refuses over 4,300 digits; no field needs more than a few).
MAX_JSON_INT_DIGITS = 100
#: How the accepted formats are named in error messages.
_FORMAT_NAMES = ", ".join(SUPPORTED_FORMATS)


@dataclass(frozen=True)
class Limits:
    """Per-request limits (all configurable from the command line)."""

    max_body_bytes: int = 20 * 1024 * 1024
    max_images: int = 32
    max_pixels: int = 50_000_000
    max_k: int = 100


@dataclass
class Upload:
    """One uploaded image: a display name (file name or ``images[i]``) and its bytes."""

    name: str
    data: bytes


@dataclass
class ParsedRequest:
    uploads: list[Upload]
    fields: dict[str, Any] = field(default_factory=dict)


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def parse_request(request: Request, limits: Limits, max_images: int | None = None) -> ParsedRequest:
    """Read the image uploads and plain fields of a request (multipart or JSON).

    Raises:
        ApiError: 415 for other content types, 400 for malformed bodies or a
            missing image, 413 when there are more than ``max_images`` images.
    """
    max_images = limits.max_images if max_images is None else max_images
    media = _media_type(request)
    if media == "multipart/form-data":
        return await _parse_multipart(request, max_images)
    if media == "application/json":
        return await _parse_json(request, max_images)
    raise ApiError(
        415,
        "unsupported_content_type",
        f"content type {media or '(none)'!r} is not accepted; send multipart/form-data with the image "
        f"as file field 'file' (or several as 'files'), or JSON {{\"image\": \"<base64>\"}}",
    )


def _check_count(n: int, max_images: int) -> None:
    if n == 0:
        raise ApiError(
            400,
            "missing_image",
            "no image in the request; send it as multipart file field 'file' (several: 'files') or JSON {\"image\": \"<base64>\"}",
        )
    if n > max_images:
        raise ApiError(413, "too_many_images", f"{n} images in one request, over the limit of {max_images}; split the request")


async def _parse_multipart(request: Request, max_images: int) -> ParsedRequest:
    try:
        # max_files + 1 so that one image too many is reported by _check_count (413)
        form = await request.form(max_files=max_images + 1, max_fields=32)
    except HTTPException as e:
        detail = str(e.detail)
        if "Too many files" in detail:
            raise ApiError(413, "too_many_images", f"more than {max_images} images in one request; split the request") from None
        raise ApiError(400, "malformed_multipart", f"cannot parse the multipart body: {detail}") from None
    uploads: list[Upload] = []
    fields: dict[str, Any] = {}
    try:
        for key, value in form.multi_items():
            if key in FILE_FIELDS:
                if not isinstance(value, UploadFile):
                    raise ApiError(400, "not_a_file", f"field {key!r} must be a file upload (multipart filename=...), got a plain text value")
                uploads.append(Upload(value.filename or f"{key}[{len(uploads)}]", b""))
                uploads[-1].data = await value.read()
            elif isinstance(value, UploadFile):
                raise ApiError(400, "unexpected_file_field", f"unexpected file field {key!r}; send images as 'file' or 'files'")
            else:
                fields[key] = value
    finally:
        await form.close()
    _check_count(len(uploads), max_images)
    return ParsedRequest(uploads, fields)


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


async def _parse_json(request: Request, max_images: int) -> ParsedRequest:
    raw = await request.body()
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
        _check_count(len(images) + len(lst), max_images)
        images.extend((f"images[{i}]", v) for i, v in enumerate(lst))
    _check_count(len(images), max_images)
    uploads = [Upload(name, _b64decode(v, name)) for name, v in images]
    fields = {k: v for k, v in doc.items() if k not in ("image", "images")}
    return ParsedRequest(uploads, fields)


def decode_image(upload: Upload, spec: PreprocessSpec, max_pixels: int) -> np.ndarray:
    """Bytes -> float32 [3, S, S] via :func:`isfe_model.preprocess.preprocess`.

    Runs in a worker thread (decoding is CPU work). Raises :class:`ApiError`
    with 400 (empty), 415 (not an image), 413 (too many pixels) or 422
    (corrupt / undecodable); never anything else for bad bytes.
    """
    name, data = upload.name, upload.data
    if not data:
        raise ApiError(400, "empty_file", f"{name}: empty upload (0 bytes)")
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
    except Exception as e:  # noqa: BLE001
        raise ApiError(422, "corrupt_image", f"{name}: cannot decode image ({type(e).__name__}: {e})") from None


def parse_k(fields: dict[str, Any], query: dict[str, str], default: int, max_k: int) -> int:
    """k from the body fields or the query string; 422 unless 1 <= k <= max_k.

    Accepted: ASCII decimal digits (form field or query string, surrounding
    blanks allowed), a JSON integer, or a JSON number with no fraction (2.0).
    """
    raw = fields.get("k", query.get("k", default))
    shown = reprlib.repr(raw)  # bounded: a huge or deeply nested value cannot blow up the message
    bad = ApiError(422, "invalid_k", f"k must be an integer between 1 and {max_k} written with digits 0-9, got {shown}")
    if isinstance(raw, bool):
        raise bad
    if isinstance(raw, str):
        text = raw.strip(" \t\r\n")
        # str.isdigit / int() also take "1_0", "٣" and other Unicode digits: ASCII only
        if not text or not text.isascii() or not text.isdigit():
            raise bad
        if len(text) > 18:
            raise ApiError(422, "invalid_k", f"k={shown} is out of range; use 1 <= k <= {max_k}")
        raw = int(text)
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)
    if not isinstance(raw, int):
        raise bad
    if not 1 <= raw <= max_k:
        raise ApiError(422, "invalid_k", f"k={reprlib.repr(raw)} is out of range; use 1 <= k <= {max_k}")
    return raw
