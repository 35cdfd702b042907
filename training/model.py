"""The encoder (ResNet + 128-d head + L2 norm) and its checkpoint format.

Input contract (shared with the ONNX export): float32 NCHW RGB in [0, 1];
the mean/std normalisation happens inside the module.  Output: [B, D] unit
rows (always float32, also under autocast).
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from isfe_model.preprocess import PreprocessSpec

__all__ = [
    "ARCHS",
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "EmbeddingNet",
    "ModelConfig",
    "build_encoder",
    "file_sha256",
    "load_checkpoint",
    "load_encoder",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "isfe-checkpoint"
CHECKPOINT_VERSION = 1
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, corrupt or not ISFE's."""


@dataclass
class ModelConfig:
    """Architecture and preprocessing of an encoder (saved in every checkpoint).

    ``cifar_stem=None`` picks the CIFAR stem (3x3 stride-1 conv, no max-pool)
    for inputs of at most 64 pixels and the standard ImageNet stem otherwise.
    """

    arch: str = "resnet18"
    embedding_dim: int = 128
    cifar_stem: bool | None = None
    preprocess: PreprocessSpec = field(default_factory=PreprocessSpec)

    def __post_init__(self) -> None:
        if isinstance(self.preprocess, dict):
            self.preprocess = PreprocessSpec.from_dict(self.preprocess)
        if self.arch not in ARCHS:
            raise ValueError(f"unknown --arch {self.arch!r}; choose one of {', '.join(ARCHS)}")
        if int(self.embedding_dim) < 1:
            raise ValueError(f"--embedding-dim must be >= 1, got {self.embedding_dim}")
        if self.cifar_stem is None:
            self.cifar_stem = self.preprocess.input_size <= 64

    def to_dict(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "embedding_dim": int(self.embedding_dim),
            "cifar_stem": bool(self.cifar_stem),
            "preprocess": self.preprocess.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        return cls(
            arch=d["arch"],
            embedding_dim=int(d["embedding_dim"]),
            cifar_stem=d.get("cifar_stem"),
            preprocess=PreprocessSpec.from_dict(d["preprocess"]),
        )


class EmbeddingNet(nn.Module):
    """ResNet backbone -> linear head -> L2 normalisation.

    forward: x float [B, 3, S, S] in [0, 1] -> [B, D] float32 unit rows.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        backbone = getattr(torchvision.models, cfg.arch)(weights=None)
        if cfg.cifar_stem:
            backbone.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            backbone.maxpool = nn.Identity()
        feat_dim = backbone.fc.in_features
        backbone.fc = nn.Identity()
        self.backbone = backbone
        self.head = nn.Linear(feat_dim, cfg.embedding_dim)
        spec = cfg.preprocess
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def features(self, x: Tensor) -> Tensor:
        """[B, 3, S, S] in [0, 1] -> [B, F] backbone features (before the head)."""
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return self.backbone(x)

    def forward(self, x: Tensor) -> Tensor:
        z = self.head(self.features(x))
        return F.normalize(z.float(), dim=1)


def build_encoder(cfg: ModelConfig) -> EmbeddingNet:
    return EmbeddingNet(cfg)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module behind DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_checkpoint(path: str | os.PathLike, model: nn.Module, model_cfg: ModelConfig, config: dict[str, Any], **extra: Any) -> Path:
    """Write a checkpoint atomically (temporary file in the same folder, then rename).

    The file holds only tensors and plain Python values, so
    ``torch.load(path, weights_only=True)`` reads it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
        "model_config": model_cfg.to_dict(),
        "config": config,
        "torch_version": torch.__version__,
        **extra,
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and validate a checkpoint; raise :class:`CheckpointError` with the fix."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; train one with `python -m training --out DIR` (it writes DIR/checkpoint.pt)")
    if path.is_dir():
        if (path / "checkpoint.pt").exists():
            path = path / "checkpoint.pt"
        else:
            raise CheckpointError(f"{path} is a folder without checkpoint.pt; pass the checkpoint file or a run folder that has one")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); the run that wrote it did not finish — retrain or resume it")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # zip/pickle errors come in many types
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"retrain, or use an intact copy"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an ISFE checkpoint (no '{CHECKPOINT_FORMAT}' marker); pass a checkpoint.pt written by `python -m training`")
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {state.get('version')} is not supported (expected {CHECKPOINT_VERSION})")
    for key in ("model", "model_config"):
        if key not in state:
            raise CheckpointError(f"{path}: checkpoint lacks '{key}'; it is damaged — retrain")
    state["path"] = str(path)
    return state


def load_encoder(checkpoint_path: str | os.PathLike, map_location: str | torch.device = "cpu") -> EmbeddingNet:
    """The trained encoder in eval mode: float32 [B,3,S,S] in [0,1] -> [B,D] unit rows."""
    state = load_checkpoint(checkpoint_path, map_location)
    try:
        cfg = ModelConfig.from_dict(state["model_config"])
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{checkpoint_path}: unreadable model_config ({e})") from None
    model = build_encoder(cfg)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(
            f"{checkpoint_path}: weights do not fit a {cfg.arch} encoder with embedding_dim={cfg.embedding_dim} "
            f"({str(e).splitlines()[0]})"
        ) from None
    model.checkpoint_sha256 = file_sha256(state["path"])  # type: ignore[attr-defined]
    model.checkpoint = {k: v for k, v in state.items() if k not in ("model", "optimizer", "scheduler", "rng")}  # type: ignore[attr-defined]
    return model.to(map_location).eval()
