"""Turning an HTTP request into preprocessed images, with limits and precise errors.

Two request shapes are accepted:

* ``multipart/form-data`` with the image(s) as file field ``file`` (one) or
  ``files`` (several, repeated), plus plain fields such as ``k``;
* ``application/json`` ``{"image": "<base64>"}`` or ``{"images": ["<base64>", ...]}``
  (data URLs ``data:image/png;base64,...`` are accepted too), plus e.g. ``"k": 5``.

The request body has already been read whole (and its size checked) by
:class:`serving.guard.GuardedApp`; it is replayed here in small pieces, so that
the multipart parser gives the event loop a turn between pieces.  JSON bodies
are parsed by ``json_parser`` (in the server: a decode worker process, see
:mod:`serving.decodepool`), never on the event loop.  The image and JSON
decoders themselves live in :mod:`serving.decoding` (re-exported here).
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request

from isfe_model.preprocess import lift_pillow_pixel_limit

from .decoding import Upload, check_count, decode_image, parse_json_body
from .errors import ApiError

__all__ = ["Limits", "ParsedRequest", "Upload", "decode_image", "lift_pillow_pixel_limit", "parse_k", "parse_request"]

FILE_FIELDS = ("file", "files")
#: ``json_parser(raw, max_images) -> (uploads, fields)``, awaited (e.g. in a worker process).
JsonParser = Callable[[bytes, int], Awaitable[tuple[list[Upload], dict[str, Any]]]]


@dataclass(frozen=True)
class Limits:
    """Per-request limits (all configurable from the command line)."""

    max_body_bytes: int = 20 * 1024 * 1024
    max_images: int = 32
    max_pixels: int = 50_000_000
    max_k: int = 100


@dataclass
class ParsedRequest:
    uploads: list[Upload]
    fields: dict[str, Any] = field(default_factory=dict)


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def parse_request(request: Request, limits: Limits, max_images: int | None = None,
                        json_parser: JsonParser | None = None, json_max_images: int | None = None) -> ParsedRequest:
    """Read the image uploads and plain fields of a request (multipart or JSON).

    ``json_parser`` parses JSON bodies (default: :func:`serving.decoding.parse_json_body`
    in this thread; the server passes its decode pool's).  ``max_images`` bounds
    a multipart body's images, ``json_max_images`` (default: the same) a JSON body's.

    Raises:
        ApiError: 415 for other content types, 400 for malformed bodies or a
            missing image, 413 when there are more than ``max_images`` images.
    """
    max_images = limits.max_images if max_images is None else max_images
    media = _media_type(request)
    if media == "multipart/form-data":
        return await _parse_multipart(request, max_images)
    if media == "application/json":
        raw = await request.body()
        n = max_images if json_max_images is None else json_max_images
        if json_parser is None:
            uploads, fields = parse_json_body(raw, n)
        else:
            uploads, fields = await json_parser(raw, n)
        return ParsedRequest(uploads, fields)
    raise ApiError(
        415,
        "unsupported_content_type",
        f"content type {media or '(none)'!r} is not accepted; send multipart/form-data with the image "
        f"as file field 'file' (or several as 'files'), or JSON {{\"image\": \"<base64>\"}}",
    )


async def _parse_multipart(request: Request, max_images: int) -> ParsedRequest:
    try:
        # max_files + 1 so that one image too many is reported by check_count (413)
        form = await request.form(max_files=max_images + 1, max_fields=32)
    except HTTPException as e:
        detail = str(e.detail)
        if "Too many files" in detail:
            raise ApiError(413, "too_many_images",
                           f"more than {max_images} images in one request; split the request") from None
        raise ApiError(400, "malformed_multipart", f"cannot parse the multipart body: {detail}") from None
    uploads: list[Upload] = []
    fields: dict[str, Any] = {}
    try:
        for key, value in form.multi_items():
            if key in FILE_FIELDS:
                if not isinstance(value, UploadFile):
                    raise ApiError(400, "not_a_file", f"field {key!r} must be a file upload (multipart filename=...), "
                                                      f"got a plain text value")
                uploads.append(Upload(value.filename or f"{key}[{len(uploads)}]", b""))
                uploads[-1].data = await value.read()
            elif isinstance(value, UploadFile):
                raise ApiError(400, "unexpected_file_field",
                               f"unexpected file field {key!r}; send images as 'file' or 'files'")
            else:
                fields[key] = value
    finally:
        await form.close()
    check_count(len(uploads), max_images)
    return ParsedRequest(uploads, fields)


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
