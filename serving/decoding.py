"""Parsing untrusted request bytes: image uploads and JSON bodies (no web framework here).

These functions run inside the decode worker processes of
:mod:`serving.decodepool` (so that a runaway decode can be killed) and are
plain functions of bytes, so the tests call them directly too.

* :func:`decode_image`: bytes -> float32 [3, S, S] (``isfe_model.preprocess``),
  classifying what is wrong: empty -> 400, not an image -> 415, too many
  pixels -> 413, corrupt -> 422; :func:`read_header` is its first half (the
  structure walk and the header) and :func:`decodes_inline` says which small
  uploads the server decodes itself, without a worker.
* :func:`parse_json_body`: ``{"image": "<base64>"}`` / ``{"images": [...]}``
  (data URLs too) or, for search, ``{"embedding": [...]}`` -> (uploads, fields);
  malformed -> 400, too many images -> 413.
* :func:`parse_openai_body`: the OpenAI embeddings request shape (``input``).
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

from isfe_model.preprocess import (
    FORMAT_NAMES,
    SUPPORTED_FORMATS,
    ImageError,
    PreprocessSpec,
    check_image_bytes,
    non_image_reason,
    pillow_bomb_pixels,
    preprocess,
    truncated_header_reason,
)

from .errors import ApiError

__all__ = ["MAX_JSON_INT_DIGITS", "BoundedRepr", "Upload", "check_count", "decode_image", "parse_json_body",
           "parse_openai_body", "parse_vectors"]

#: Longest integer literal accepted in a JSON body (Python refuses over 4,300 digits; no field needs more than a few).
MAX_JSON_INT_DIGITS = 100
#: JSON fields (besides the images) that the endpoints read; others are dropped where they were parsed.
JSON_FIELDS = ("k",)


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
            "no image in the request; send it as multipart file field 'file' (several: 'files') or JSON {\"image\": "
            "\"<base64>\"}",
        )
    if n > max_images:
        raise ApiError(413, "too_many_images",
                       f"{n} images in one request, over the limit of {max_images}; split the request")


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
                       f"request body has an integer with {digits:,} digits; numbers are limited to "
                       f"{MAX_JSON_INT_DIGITS} digits")
    return int(text)


def _small(value: Any) -> Any:
    """A field value that is cheap to send between processes: containers become their bounded repr."""
    return BoundedRepr(reprlib.repr(value)) if isinstance(value, (list, dict)) else value


def _load_json(raw: bytes) -> dict[str, Any]:
    """Body bytes -> a JSON object (400 ``malformed_json`` for anything else)."""
    try:
        doc = json.loads(raw, parse_int=_json_int)
    except RecursionError:
        raise ApiError(
            400, "malformed_json",
            'JSON body is nested too deeply; send a flat object like {"image": "<base64>"} or {"images": [...]}'
        ) from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError (both ValueErrors), any other json.loads refusal
        raise ApiError(400, "malformed_json", f"request body is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ApiError(400, "malformed_json",
                       'JSON body must be an object like {"image": "<base64>"} or {"images": [...]}')
    return doc


def parse_json_body(raw: bytes, max_images: int, vectors: bool = False) -> tuple[list[Upload], dict[str, Any]]:
    """JSON body bytes -> (uploads in request order, the fields in :data:`JSON_FIELDS`).

    With ``vectors`` (``/v1/search``), ``{"embedding": [x0, ..., x(D-1)]}`` or
    ``{"embedding": [[...], ...]}`` may stand instead of images: no uploads, and
    ``fields["embedding"]`` is a float64 array [D] or [Q, D] (see :func:`parse_vectors`).

    Raises:
        ApiError: 400 for invalid/deeply nested JSON, a non-object body, bad
            base64 or no image; 413 for more than ``max_images`` images.
    """
    doc = _load_json(raw)
    fields = {k: _small(doc[k]) for k in JSON_FIELDS if k in doc}
    if vectors and "embedding" in doc:
        if "image" in doc or "images" in doc:
            raise ApiError(400, "ambiguous_query", 'send either "embedding" or "image"/"images", not both')
        fields["embedding"] = parse_vectors(doc["embedding"], max_images)
        return [], fields
    images: list[tuple[str, Any]] = []
    if "image" in doc:
        images.append(("image", doc["image"]))
    if "images" in doc:
        lst = doc["images"]
        if not isinstance(lst, list):
            raise ApiError(400, "malformed_json", '"images" must be a list of base64 strings')
        check_count(len(images) + len(lst), max_images)
        images.extend((f"images[{i}]", v) for i, v in enumerate(lst))
        fields["batch"] = True
    check_count(len(images), max_images)
    uploads = [Upload(name, _b64decode(v, name)) for name, v in images]
    return uploads, fields


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def parse_vectors(value: Any, max_vectors: int) -> np.ndarray:
    """``embedding`` -> float64 [D] (one vector) or [Q, D] (a list of vectors; Q <= ``max_vectors``).

    Only the structure is checked here (numbers, equal lengths); the dimension,
    NaN/Inf and zero norm are checked by the endpoint, which knows the model.
    """
    shape_hint = "a list of numbers (one vector) or a list of such lists (several)"
    if not isinstance(value, list) or not value:
        raise ApiError(422, "invalid_embedding", f"embedding must be {shape_hint}, got {reprlib.repr(value)}")
    if all(_is_number(x) for x in value):
        return np.asarray(value, dtype=np.float64)
    if not all(isinstance(v, list) for v in value):
        raise ApiError(422, "invalid_embedding", f"embedding must be {shape_hint}; mixed numbers and lists are not")
    if len(value) > max_vectors:
        raise ApiError(413, "too_many_queries",
                       f"{len(value)} vectors in one request, over the limit of {max_vectors}; split the request")
    for i, v in enumerate(value):
        if not v or not all(_is_number(x) for x in v):
            raise ApiError(422, "invalid_embedding",
                           f"embedding[{i}] must be a non-empty list of numbers, got {reprlib.repr(v)}")
        if len(v) != len(value[0]):
            raise ApiError(422, "invalid_embedding",
                           f"embedding[{i}] has {len(v)} numbers but embedding[0] has {len(value[0])}; "
                           f"every vector needs the model's dimension")
    return np.asarray(value, dtype=np.float64)


#: ``encoding_format`` values of the OpenAI embeddings API.
ENCODING_FORMATS = ("float", "base64")


def parse_openai_body(raw: bytes, max_images: int) -> tuple[list[Upload], dict[str, Any]]:
    """An OpenAI-shaped embeddings request -> (uploads, fields).

    Body: ``{"input": "<base64 image or data: URI>" | [...], "model": str,
    "encoding_format": "float" | "base64", "dimensions": int, "user": str}``.
    URLs are refused (the server fetches nothing); ``fields`` holds
    ``encoding_format``, ``model``, ``dimensions`` and ``batch`` (input was a list).
    """
    doc = _load_json(raw)
    if "input" not in doc:
        raise ApiError(400, "missing_input",
                       'no "input": send {"input": "<base64 image>"} or {"input": ["<base64>", ...]}')
    inp = doc["input"]
    batch = isinstance(inp, list)
    items = inp if batch else [inp]
    if not items:  # check_count's hint names /v1/embed's fields; this endpoint has only "input"
        raise ApiError(400, "missing_image", 'no image in the request: "input" is an empty list; send '
                                             '{"input": ["<base64 image>", ...]} with at least one image')
    check_count(len(items), max_images)
    uploads = []
    for i, v in enumerate(items):
        name = f"input[{i}]" if batch else "input"
        if isinstance(v, str) and v[:8].lower().startswith(("http://", "https://")):
            raise ApiError(400, "url_not_supported", f"{name} is a URL; this server fetches nothing from the network: "
                                                     f"send the image itself as base64 or a data: URI")
        if not isinstance(v, str):
            raise ApiError(400, "bad_input",
                           f"{name} must be a base64 image string or data: URI (token arrays are for text "
                           f"models), got {type(v).__name__}")
        uploads.append(Upload(name, _b64decode(v, name)))
    fmt = doc.get("encoding_format") or "float"
    if fmt not in ENCODING_FORMATS:
        raise ApiError(400, "invalid_encoding_format",
                       f"encoding_format must be 'float' or 'base64', got {reprlib.repr(fmt)}")
    model, dims = doc.get("model"), doc.get("dimensions")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "invalid_model", f"model must be a string, got {type(model).__name__}")
    if dims is not None and not (isinstance(dims, int) and not isinstance(dims, bool)):
        raise ApiError(400, "invalid_dimensions", f"dimensions must be an integer, got {reprlib.repr(dims)}")
    return uploads, {"encoding_format": fmt, "model": (model or "")[:200], "dimensions": dims, "batch": batch}


# ImageError.kind of a refused structure -> (HTTP status, error code)
_STRUCTURE_STATUS = {
    "empty": (400, "empty_file"),
    "not_an_image": (415, "not_an_image"),
    "too_large": (413, "image_too_large"),
    "too_complex": (422, "image_too_complex"),
    "corrupt": (422, "corrupt_image"),
}


#: Uploads this small (bytes and pixels), PNG or baseline JPEG, decode in the server process
#: (:func:`decodes_inline`): their work is bounded by their size (a 40 KB 256 x 256 JPEG: 1.1-1.6 ms
#: on a 2-core Xeon), so they need no killable worker.  Anything else goes to the time-limited worker processes.
INLINE_MAX_BYTES = 64 * 1024
INLINE_MAX_PIXELS = 256 * 256


@dataclass(frozen=True)
class ImageHeader:
    """What the header says about an upload (nothing decoded yet)."""

    format: str
    width: int
    height: int
    progressive: bool


def read_header(upload: Upload, max_pixels: int) -> ImageHeader:
    """The structure walk and the header of an upload; raises :class:`ApiError` (400/413/415/422) as decode_image."""
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
                (w, h), fmt = im.size, str(im.format)
                progressive = bool(im.info.get("progressive") or im.info.get("progression"))
    except UnidentifiedImageError:
        damaged = truncated_header_reason(data)  # starts like a supported format: damaged, not unsupported
        if damaged is not None:
            raise ApiError(422, "corrupt_image", f"{name}: {damaged}; send the whole file") from None
        raise ApiError(415, "not_an_image",
                       f"{name}: {non_image_reason(data)} (supported: {FORMAT_NAMES})") from None
    except Image.DecompressionBombError as e:
        n = pillow_bomb_pixels(e)  # Pillow refuses over 2 x its own limit while opening, before our check below
        raise ApiError(413, "image_too_large",
                       f"{name}: image is {f'{n:,}' if n is not None else 'too many'} pixels, over the server limit "
                       f"of {max_pixels:,}; downscale it") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure on untrusted bytes is the upload's fault
        raise ApiError(422, "corrupt_image", f"{name}: cannot read image header ({type(e).__name__}: {e})") from None
    if w * h > max_pixels:
        raise ApiError(
            413, "image_too_large",
            f"{name}: image is {w}x{h} = {w * h:,} pixels, over the server limit of {max_pixels:,}; downscale it"
        )
    return ImageHeader(fmt, w, h, progressive)


def decodes_inline(upload: Upload, header: ImageHeader) -> bool:
    """True for uploads the server decodes itself, without a worker: at most INLINE_MAX_BYTES and
    INLINE_MAX_PIXELS, PNG or a sequential JPEG of at most 4 scans.  Such a decode is bounded by its size, so it
    needs no time limit (a 40 KB 256 x 256 JPEG: 1.1-1.6 ms at 32-224 px on a 2-core Xeon)."""
    data = upload.data
    if len(data) > INLINE_MAX_BYTES or header.width * header.height > INLINE_MAX_PIXELS:
        return False
    # a JPEG's scans are its passes over the image: at most one per component (no entropy-coded 0xFF is
    # followed by 0xDA: the encoder stuffs 0x00 after each, so every FF DA is an SOS marker)
    return header.format == "PNG" or (header.format == "JPEG" and not header.progressive
                                      and data.count(b"\xff\xda") <= 4)


def decode_image(upload: Upload, spec: PreprocessSpec, max_pixels: int,
                 header: ImageHeader | None = None) -> np.ndarray:
    """Bytes -> float32 [3, S, S] via :func:`isfe_model.preprocess.preprocess`.

    Raises :class:`ApiError` with 400 (empty), 415 (not an image), 413 (too
    many pixels) or 422 (corrupt / undecodable); never anything else for bad bytes.
    ``header``: the upload's :func:`read_header`, when the caller has it already.
    """
    name, data = upload.name, upload.data
    if header is None:
        read_header(upload, max_pixels)
    try:
        return preprocess(data, spec, max_pixels=max_pixels, name=name)
    except ImageError as e:
        raise ApiError(422, "corrupt_image", str(e)) from None
    except MemoryError:
        raise ApiError(413, "image_too_large",
                       f"{name}: decoding it needs more memory than the server allows per image; "
                       f"downscale it or send a smaller file") from None
    except Exception as e:  # noqa: BLE001
        raise ApiError(422, "corrupt_image", f"{name}: cannot decode image ({type(e).__name__}: {e})") from None
