"""OpenAPI request bodies of the endpoints (the handlers read the raw request, so FastAPI cannot infer them).

Each ``*_BODY`` is an ``openapi_extra`` dict for the route decorator; the
schemas document exactly what :mod:`serving.decoding` and
:mod:`serving.inputs` accept.  ``/docs`` (:mod:`serving.docs`) renders them.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ADMIN_RELOAD_BODY", "EMBED_BODY", "EMBEDDINGS_BODY", "SEARCH_BODY", "BEARER_SCHEME"]

_B64 = {"type": "string", "description": "image bytes, base64 (or a data: URI data:image/png;base64,...)"}
_K = {"type": "integer", "minimum": 1, "description": "number of hits per query (default --default-k, at most --max-k)"}


def _body(json_schema: dict[str, Any], multipart: dict[str, Any] | None = None,
          required: bool = True) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": json_schema}}
    if multipart is not None:
        content["multipart/form-data"] = {"schema": multipart}
    return {"requestBody": {"required": required, "content": content}}


EMBED_BODY = _body(
    {"type": "object", "title": "EmbedRequest", "properties": {
        "image": _B64, "images": {"type": "array", "items": _B64,
                                  "description": "several images (at most --max-images)"}}},
    {"type": "object", "title": "EmbedUpload", "properties": {
        "file": {"type": "string", "format": "binary", "description": "one image"},
        "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                  "description": "several images (repeat the field)"}}},
)

SEARCH_BODY = _body(
    {"type": "object", "title": "SearchRequest", "properties": {
        "image": _B64,
        "images": {"type": "array", "items": _B64,
                   "description": "several query images: one hit list per image (response 'results')"},
        "embedding": {"description": "query vector(s) instead of images: one list of D numbers, or a list of "
                                     "such lists (one hit list each). Any non-zero norm; vectors are L2-normalised "
                                     "before the cosine search. Wrong length, NaN/Infinity or a zero vector: 422.",
                      "oneOf": [{"type": "array", "items": {"type": "number"}},
                                {"type": "array", "items": {"type": "array", "items": {"type": "number"}}}]},
        "k": _K}},
    {"type": "object", "title": "SearchUpload", "properties": {
        "file": {"type": "string", "format": "binary", "description": "the query image"},
        "k": {"type": "string", "description": "hits to return (digits)"}}},
)

EMBEDDINGS_BODY = _body(
    {"type": "object", "title": "EmbeddingsRequest (OpenAI shape)", "required": ["input"], "properties": {
        "input": {"description": "one image or a list of images, each base64 or a data: URI (URLs are refused: "
                                 "the server fetches nothing)", "oneOf": [_B64, {"type": "array", "items": _B64}]},
        "model": {"type": "string", "description": "accepted and ignored; the response names the model served"},
        "encoding_format": {"type": "string", "enum": ["float", "base64"], "default": "float",
                            "description": "base64: the little-endian float32 bytes of each vector, base64-encoded"},
        "dimensions": {"type": "integer", "description": "if given, must equal the model's dimension"},
        "user": {"type": "string", "description": "ignored"}}},
)

ADMIN_RELOAD_BODY = _body(
    {"type": "object", "title": "ReloadRequest", "properties": {
        "path": {"type": "string",
                 "description": "gallery folder to serve from now on (default: reload the current path)"}}},
    required=False,
)

#: The security scheme shown in the schema when API keys are configured.
BEARER_SCHEME = {"bearerAuth": {"type": "http", "scheme": "bearer",
                                "description": "Authorization: Bearer <API key> on /v1/*"}}
