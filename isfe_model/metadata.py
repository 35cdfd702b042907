"""The self-description an exported ISFE model carries (ONNX ``metadata_props``).

``export`` writes these keys; :class:`isfe_model.Encoder` reads them, so a
model file is enough to embed images correctly.  All values are strings;
lists and dicts are JSON.
"""

from __future__ import annotations

import json
import math
import reprlib
from dataclasses import dataclass, field
from typing import Any, Mapping

from .preprocess import DECODE_POLICIES, PreprocessSpec

__all__ = ["FORMAT", "FORMAT_VERSION", "MAX_EMBEDDING_DIM", "MAX_IMAGE_SIDE", "MetadataError", "ModelError",
           "ModelMetadata",
           "REQUIRED_KEYS"]

FORMAT = "isfe-embedding-model"
FORMAT_VERSION = "1"

#: Largest input / resize side (pixels) a model may declare.  Every image is resized to R x R-ish
#: before the crop, so an absurd value (a damaged or hand-edited file) would make each image
#: allocate gigabytes; models larger than this are refused at load.
MAX_IMAGE_SIDE = 4096
#: Largest embedding size a model may declare.
MAX_EMBEDDING_DIM = 65536
#: Longest accepted ``isfe.checkpoint_sha256`` (the fingerprint; a sha256 has 64 hex digits).
MAX_FINGERPRINT_LEN = 256

#: Keys every ISFE ONNX model has.
REQUIRED_KEYS = (
    "isfe.format",
    "isfe.format_version",
    "isfe.embedding_dim",
    "isfe.input_size",
    "isfe.resize_size",
    "isfe.resize_policy",
    "isfe.interpolation",
    "isfe.mean",
    "isfe.std",
    "isfe.input_name",
    "isfe.output_name",
    "isfe.checkpoint_sha256",
)


class MetadataError(ValueError):
    """The model file lacks, or has unreadable, ISFE metadata."""


class ModelError(ValueError):
    """A model file or package that is missing, corrupt, not ONNX or not an ISFE model; the message says the fix."""


_repr = reprlib.Repr()
_repr.maxstring = 80
_repr.maxother = 80


def short_repr(value: object) -> str:
    """A bounded repr for error messages (metadata values can be huge or deeply nested)."""
    return _repr.repr(value)


@dataclass(frozen=True)
class ModelMetadata:
    """Parsed ISFE model metadata.

    ``fingerprint`` (the sha256 of the training checkpoint the model was
    exported from) identifies the *weights*: an fp32 ONNX file, its INT8
    version and a TensorRT engine of the same checkpoint share it, and a
    gallery records it so that queries are only compared with embeddings of
    the same model.
    """

    embedding_dim: int
    preprocess: PreprocessSpec
    checkpoint_sha256: str
    input_name: str = "image"
    output_name: str = "embedding"
    model_name: str = "isfe"
    model_version: str = ""
    arch: str = ""
    quantization: str = "none"
    train_config: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return self.checkpoint_sha256

    def to_props(self) -> dict[str, str]:
        """Serialise to ONNX ``metadata_props`` (all values strings)."""
        p = self.preprocess
        props = {
            "isfe.format": FORMAT,
            "isfe.format_version": FORMAT_VERSION,
            "isfe.embedding_dim": str(self.embedding_dim),
            "isfe.input_size": str(p.input_size),
            "isfe.resize_size": str(p.resize_size),
            "isfe.resize_policy": p.resize_policy,
            "isfe.interpolation": p.interpolation,
            "isfe.decode": p.decode,
            "isfe.mean": json.dumps(list(p.mean)),
            "isfe.std": json.dumps(list(p.std)),
            "isfe.input_name": self.input_name,
            "isfe.output_name": self.output_name,
            "isfe.checkpoint_sha256": self.checkpoint_sha256,
            "isfe.model_name": self.model_name,
            "isfe.model_version": self.model_version,
            "isfe.arch": self.arch,
            "isfe.quantization": self.quantization,
            "isfe.train_config": json.dumps(self.train_config, sort_keys=True, default=str),
        }
        props.update(self.extra)
        return props

    @classmethod
    def from_props(cls, props: Mapping[str, str], source: str = "model") -> "ModelMetadata":
        """Parse ONNX ``metadata_props``; raise :class:`MetadataError` naming what is missing."""
        missing = [k for k in REQUIRED_KEYS if k not in props]
        if missing:
            raise MetadataError(
                f"{source} is not an ISFE model: metadata keys missing: {', '.join(missing)}. "
                f"Export it with `python -m export --checkpoint CHECKPOINT --onnx MODEL.onnx`."
            )
        if props["isfe.format"] != FORMAT:
            raise MetadataError(f"{source}: metadata isfe.format is {props['isfe.format']!r}, expected {FORMAT!r}")
        if props["isfe.format_version"] != FORMAT_VERSION:
            raise MetadataError(
                f"{source}: model metadata format version {props['isfe.format_version']!r} is not supported "
                f"by this isfe_model (supports {FORMAT_VERSION!r}); upgrade isfe-model or re-export the model"
            )
        fix = FIX
        sizes, norm, decode = _sizes(props, source), _normalisation(props, source), _decode_policy(props, source)
        try:
            spec = PreprocessSpec(
                input_size=sizes["isfe.input_size"],
                resize_size=sizes["isfe.resize_size"],
                mean=norm["isfe.mean"],
                std=norm["isfe.std"],
                resize_policy=props["isfe.resize_policy"],
                interpolation=props["isfe.interpolation"],
                decode=decode,
            )
        except (ValueError, TypeError) as e:
            raise MetadataError(f"{source}: unreadable ISFE metadata ({e}); {fix}") from None
        dim = sizes["isfe.embedding_dim"]
        train_config = _json(props.get("isfe.train_config", "{}") or "{}", "isfe.train_config", source)
        sha = props["isfe.checkpoint_sha256"]
        if not isinstance(sha, str) or not sha.strip() or len(sha) > MAX_FINGERPRINT_LEN or not sha.isprintable():
            raise MetadataError(
                f"{source}: metadata isfe.checkpoint_sha256 (the model's fingerprint) is "
                f"{'empty' if not (isinstance(sha, str) and sha.strip()) else short_repr(sha)}; it must be the "
                "training checkpoint's sha256 (galleries use it to tell models apart) — re-export the model from its "
                "checkpoint with `python -m export --checkpoint CHECKPOINT --onnx MODEL.onnx`"
            )
        known = set(REQUIRED_KEYS) | {"isfe.model_name", "isfe.model_version", "isfe.arch", "isfe.quantization",
                                      "isfe.train_config", "isfe.decode"}
        return cls(
            embedding_dim=dim,
            preprocess=spec,
            checkpoint_sha256=sha,
            input_name=props["isfe.input_name"],
            output_name=props["isfe.output_name"],
            model_name=props.get("isfe.model_name", "isfe"),
            model_version=props.get("isfe.model_version", ""),
            arch=props.get("isfe.arch", ""),
            quantization=props.get("isfe.quantization", "none"),
            train_config=train_config if isinstance(train_config, dict) else {},
            extra={k: v for k, v in props.items() if k not in known},
        )


FIX = "re-export the model with `python -m export`"


def _json(text: str, key: str, source: str) -> Any:
    """``json.loads`` of a metadata value; MetadataError naming the key when it is not JSON."""
    try:
        return json.loads(text)
    except RecursionError:
        raise MetadataError(f"{source}: metadata {key} is nested too deeply to be read; {FIX}") from None
    except (ValueError, TypeError) as e:
        raise MetadataError(f"{source}: metadata {key} is not JSON ({e}); {FIX}") from None


def _decode_policy(props: Mapping[str, str], source: str) -> str:
    """``isfe.decode``: "full" or "draft"; absent (models exported before the field) -> "full", as they were made."""
    value = props.get("isfe.decode", "full")
    if value not in DECODE_POLICIES:
        raise MetadataError(f"{source}: metadata isfe.decode is {short_repr(value)}; it must be one of "
                            f"{', '.join(DECODE_POLICIES)} (how JPEGs are decoded); {FIX}")
    return value


def _sizes(props: Mapping[str, str], source: str) -> dict[str, int]:
    """input_size, resize_size (1..MAX_IMAGE_SIDE) and embedding_dim (1..MAX_EMBEDDING_DIM) as integers."""
    sizes = {}
    for key in ("isfe.input_size", "isfe.resize_size", "isfe.embedding_dim"):
        limit = MAX_EMBEDDING_DIM if key == "isfe.embedding_dim" else MAX_IMAGE_SIDE
        raw = props[key]
        try:
            value = int(raw)
        except (ValueError, TypeError):
            raise MetadataError(f"{source}: metadata {key} is {short_repr(raw)}, not an integer; {FIX}") from None
        if not 1 <= value <= limit:
            what = "pixels per side" if limit == MAX_IMAGE_SIDE else "dimensions"
            raise MetadataError(f"{source}: metadata {key} is {value}; it must be between 1 and {limit} {what} "
                                f"(the file is damaged or was edited); {FIX}")
        sizes[key] = value
    return sizes


def _normalisation(props: Mapping[str, str], source: str) -> dict[str, tuple[float, ...]]:
    """mean (3 finite numbers) and std (3 positive numbers), one per RGB channel."""
    norm = {}
    for key in ("isfe.mean", "isfe.std"):
        values = _json(props[key], key, source)
        if (not isinstance(values, list) or len(values) != 3
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
                or (key == "isfe.std" and not all(v > 0 for v in values))):
            need = "3 positive numbers" if key == "isfe.std" else "3 finite numbers"
            raise MetadataError(f"{source}: metadata {key} is {short_repr(props[key])}; it must be a JSON list of "
                                f"{need} (one per RGB channel); {FIX}")
        norm[key] = tuple(float(v) for v in values)
    return norm
