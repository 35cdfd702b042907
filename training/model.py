"""The encoder (backbone + 128-d head + L2 norm) and its checkpoint format.

Input contract (shared with the ONNX export): float32 NCHW RGB in [0, 1];
the mean/std normalisation happens inside the module.  Output: [B, D] unit
rows (always float32, also under autocast).

Backbones by name (``ARCHS``): torchvision's ResNets and GoogLeNet
(Inception-V1, the paper's backbone for unseen categories).  The embedding
head sits on the global-pooled features ("pool5": 512-d ResNet18/34,
2048-d ResNet50+, 1024-d GoogLeNet).  GoogLeNet is built with
``aux_logits=False`` and ``transform_input=False`` (the ISFE normalisation
is inside EmbeddingNet; torchvision's own input transform must stay off or
the input would be normalised twice) and without its dropout, as the
authors' pool5 -> fc128 model.

Initialisation of a from-scratch backbone (``ModelConfig.init``, one of ``INITS``):

* ``"torchvision"`` (the default): what torchvision's constructors do.  ResNet:
  every Conv2d ``kaiming_normal_(mode="fan_out", nonlinearity="relu")``
  (std sqrt(2 / (C_out k_h k_w)), no bias), BatchNorm weight 1 / bias 0 and
  (its ``zero_init_residual=False``) nothing else; the CIFAR stem's 3x3 conv
  replaces torchvision's after construction, so it keeps PyTorch's default
  (below) -- exactly the models trained before this option existed.
  GoogLeNet: ``trunc_normal_(std=0.01, a=-2, b=2)`` for every conv and linear
  layer, BatchNorm 1 / 0.
* ``"authors"``: PyTorch's default layer initialisation for every layer of
  the backbone, as the authors' ``resnet_cifar.py`` keeps it (its explicit
  init is commented out): Conv2d and Linear ``kaiming_uniform_(a=sqrt(5))``,
  i.e. U(-b, b) with b = 1/sqrt(fan_in) (std b/sqrt(3), which is
  sqrt(C_out / (6 C_in)) times torchvision's: 1/sqrt(6) ~ 1/2.45 for a conv
  with C_in = C_out), their biases U(-b, b),
  BatchNorm weight 1 / bias 0.  (The authors ran PyTorch 0.4, whose
  BatchNorm drew its weight from U(0, 1); conv and linear layers had the
  same U(-1/sqrt(fan_in), 1/sqrt(fan_in)) as today.)

Both leave the embedding head at PyTorch's default (``nn.Linear``).  The
choice only matters for training from scratch: ``load_pretrained``
overwrites the whole backbone, and loading a checkpoint overwrites every
weight, so a checkpoint loads the same whatever its ``init`` says.

ImageNet weights (``load_pretrained``) come through torchvision's weights
API (downloaded into the torch hub cache where a network exists) or from a
local file; ``pretrained_preprocess`` gives the input normalisation those
weights were trained with.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from isfe_model.atomic import atomic_write
from isfe_model.packages import sha256_file as file_sha256  # the one file hash (export/ and tests use this name)
from isfe_model.preprocess import PreprocessSpec, signature_format

__all__ = [
    "ARCHS",
    "CHECKPOINT_FORMAT",
    "INITS",
    "CheckpointError",
    "EmbeddingNet",
    "ModelConfig",
    "PretrainedError",
    "build_encoder",
    "file_sha256",
    "load_checkpoint",
    "load_encoder",
    "load_pretrained",
    "pretrained_preprocess",
    "pytorch_default_init",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "isfe-checkpoint"
CHECKPOINT_VERSION = 1
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
ARCHS = RESNETS + ("googlenet",)
#: Backbone initialisations (``ModelConfig.init``): torchvision's constructors, or PyTorch's layer defaults as in
#: the authors' code.  Checkpoints written before the field existed are "torchvision".
INITS = ("torchvision", "authors")
#: Inputs up to this side get the CIFAR stem by default (CIFAR-10 32 px, STL-10 96 px as in the
#: authors' code); larger ones the standard ImageNet stem.
CIFAR_STEM_MAX_INPUT = 96
#: torchvision weights enum member per architecture (``--pretrained imagenet``).
IMAGENET_WEIGHTS = {
    "resnet18": "ResNet18_Weights.IMAGENET1K_V1",
    "resnet34": "ResNet34_Weights.IMAGENET1K_V1",
    "resnet50": "ResNet50_Weights.IMAGENET1K_V1",
    "resnet101": "ResNet101_Weights.IMAGENET1K_V1",
    "resnet152": "ResNet152_Weights.IMAGENET1K_V1",
    "googlenet": "GoogLeNet_Weights.IMAGENET1K_V1",
}
#: Input normalisation (mean, std) the ImageNet weights expect on [0, 1] RGB.  torchvision's
#: GoogLeNet weights (ported from TensorFlow) expect (x - 0.5) / 0.5: its transform_input maps
#: ImageNet-normalised input to exactly that, so with transform_input off the model applies it.
_IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
WEIGHTS_NORMALIZATION = {a: _IMAGENET_NORM for a in RESNETS} | {"googlenet": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, corrupt or not ISFE's."""


class PretrainedError(ValueError):
    """Pretrained weights that cannot be had (offline) or do not fit the backbone."""


@dataclass
class ModelConfig:
    """Architecture and preprocessing of an encoder (saved in every checkpoint).

    ``cifar_stem=None`` picks the CIFAR stem (3x3 stride-1 conv, no max-pool)
    for ResNets with inputs of at most ``CIFAR_STEM_MAX_INPUT`` (96) pixels
    and the standard ImageNet stem otherwise; GoogLeNet has only its standard
    stem.  ``init`` (one of ``INITS``) is how a from-scratch backbone is
    initialised: ``"torchvision"`` (torchvision's constructors; default) or
    ``"authors"`` (PyTorch's layer defaults, as the authors' code); see the
    module docstring.
    """

    arch: str = "resnet18"
    embedding_dim: int = 128
    cifar_stem: bool | None = None
    preprocess: PreprocessSpec = field(default_factory=PreprocessSpec)
    init: str = "torchvision"

    def __post_init__(self) -> None:
        if isinstance(self.preprocess, dict):
            self.preprocess = PreprocessSpec.from_dict(self.preprocess)
        if self.arch not in ARCHS:
            raise ValueError(f"unknown --arch {self.arch!r}; choose one of {', '.join(ARCHS)}")
        if int(self.embedding_dim) < 1:
            raise ValueError(f"--embedding-dim must be >= 1, got {self.embedding_dim}")
        if self.init not in INITS:
            raise ValueError(f"unknown --init {self.init!r}; choose one of {', '.join(INITS)} "
                             "(torchvision: torchvision's constructors; authors: PyTorch's layer defaults)")
        if self.arch == "googlenet":
            if self.cifar_stem:
                raise ValueError("googlenet has no CIFAR stem; use a resnet for small inputs or leave cifar_stem unset")
            self.cifar_stem = False
        if self.cifar_stem is None:
            self.cifar_stem = self.preprocess.input_size <= CIFAR_STEM_MAX_INPUT

    def to_dict(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "embedding_dim": int(self.embedding_dim),
            "cifar_stem": bool(self.cifar_stem),
            "preprocess": self.preprocess.to_dict(),
            "init": self.init,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        return cls(
            arch=d["arch"],
            embedding_dim=int(d["embedding_dim"]),
            cifar_stem=d.get("cifar_stem"),
            preprocess=PreprocessSpec.from_dict(d["preprocess"]),
            init=d.get("init", "torchvision"),  # checkpoints from before the field: torchvision's init
        )


def _backbone(cfg: ModelConfig) -> tuple[nn.Module, int]:
    """The torchvision network without its classifier -> (module giving [B, F] pooled features, F)."""
    if cfg.arch == "googlenet":
        backbone = torchvision.models.googlenet(
            weights=None, aux_logits=False, transform_input=False, init_weights=True
        )
        backbone.dropout = nn.Identity()  # the head sits directly on pool5 (no parameters change)
    else:
        backbone = getattr(torchvision.models, cfg.arch)(weights=None)
        if cfg.cifar_stem:
            backbone.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            backbone.maxpool = nn.Identity()
    feat_dim = backbone.fc.in_features
    backbone.fc = nn.Identity()
    if cfg.init == "authors":
        pytorch_default_init(backbone)
    return backbone, feat_dim


#: Layers whose ``reset_parameters`` is PyTorch's default initialisation of their weights.
_DEFAULT_INIT_LAYERS = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm)


def pytorch_default_init(module: nn.Module) -> nn.Module:
    """Re-initialise every conv, linear and batch-norm layer of ``module`` with PyTorch's defaults (in place).

    Conv / Linear weight W [C_out, C_in, *k]: U(-b, b), b = 1/sqrt(fan_in), fan_in = C_in * prod(k)
    (``kaiming_uniform_(a=sqrt(5))``), bias U(-b, b); BatchNorm: weight 1, bias 0, running stats reset.
    Returns ``module``.
    """
    for m in module.modules():
        if isinstance(m, _DEFAULT_INIT_LAYERS):
            m.reset_parameters()
    return module


class EmbeddingNet(nn.Module):
    """Backbone (ResNet or GoogLeNet) -> linear head -> L2 normalisation.

    forward: x float [B, 3, S, S] in [0, 1] -> [B, D] float32 unit rows.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        backbone, feat_dim = _backbone(cfg)
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


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module behind DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_checkpoint(
    path: str | os.PathLike, model: nn.Module, model_cfg: ModelConfig, config: dict[str, Any], **extra: Any
) -> Path:
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
        "torch_version": str(torch.__version__),
        **extra,
    }
    atomic_write(path, lambda f: torch.save(state, f))
    return path


#: First bytes of what torch.save writes: a zip archive (PyTorch >= 1.6), or a pickle (the legacy format).
_TORCH_FILE_MAGIC = (b"PK\x03\x04", b"\x80")


def _check_torch_file(path: Path) -> None:
    """CheckpointError unless ``path`` starts like a file of ``torch.save`` (an image, text, ... is named)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise CheckpointError(f"checkpoint {path}: cannot read it ({e.strerror or e}); check its permissions") from None
    if head.startswith(_TORCH_FILE_MAGIC):
        return
    fmt = signature_format(head)
    what = f"a {fmt} image" if fmt else "not a PyTorch file (neither the zip nor the pickle format of torch.save)"
    raise CheckpointError(f"checkpoint {path} is {what}; pass a checkpoint.pt written by `python -m training`")


def _corrupt(path: Path, e: Exception) -> CheckpointError:
    first = " ".join(str(e).splitlines()[0].split()) if str(e).strip() else ""
    first = first.split(". ")[0].rstrip(".")  # its first sentence (torch goes on with advice)
    return CheckpointError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}: {first}); "
                           f"retrain, or use an intact copy")


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and validate a checkpoint; raise :class:`CheckpointError` with the fix."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"checkpoint {path} does not exist; "
            "train one with `python -m training --out DIR` (it writes DIR/checkpoint.pt)"
        )
    if path.is_dir():
        if (path / "checkpoint.pt").exists():
            path = path / "checkpoint.pt"
        else:
            raise CheckpointError(
                f"{path} is a folder without checkpoint.pt; pass the checkpoint file or a run folder that has one"
            )
    if path.stat().st_size == 0:
        raise CheckpointError(
            f"checkpoint {path} is empty (0 bytes); the run that wrote it did not finish — retrain or resume it"
        )
    _check_torch_file(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" not in str(e).lower():
            raise _corrupt(path, e) from None
        # torch's own text suggests weights_only=False (running the file's code): never ours to advise
        raise CheckpointError(
            f"checkpoint {path} holds Python objects that a weights-only load refuses, so it was not written by "
            f"`python -m training`; pass a checkpoint.pt written by `python -m training`"
        ) from None
    except Exception as e:  # zip/pickle errors come in many types
        raise _corrupt(path, e) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not an ISFE checkpoint (no '{CHECKPOINT_FORMAT}' marker); "
            "pass a checkpoint.pt written by `python -m training`"
        )
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {state.get('version')} is not supported (expected {CHECKPOINT_VERSION})"
        )
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


# --------------------------------------------------------------------------- pretrained backbones


def pretrained_preprocess(arch: str, spec: PreprocessSpec) -> PreprocessSpec:
    """``spec`` with the input normalisation the ImageNet weights of ``arch`` were trained with."""
    mean, std = WEIGHTS_NORMALIZATION[arch]
    return dataclasses.replace(spec, mean=mean, std=std)


def _imagenet_state_dict(arch: str, progress: bool = True) -> dict[str, Tensor]:
    """torchvision's ImageNet weights for ``arch`` (torch hub cache, else download)."""
    enum_name, member = IMAGENET_WEIGHTS[arch].split(".")
    weights = getattr(getattr(torchvision.models, enum_name), member)
    try:
        return weights.get_state_dict(progress=progress, check_hash=True)
    except Exception as e:  # URLError, socket errors, hash mismatch of a partial download
        hub = Path(torch.hub.get_dir()) / "checkpoints"
        raise PretrainedError(
            f"could not get the ImageNet weights of {arch} "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            f"Without a network: download {weights.url} elsewhere and pass --pretrained PATH/{Path(weights.url).name} "
            f"(or put the file into {hub}/)"
        ) from None


def _read_state_dict_file(path: Path) -> dict[str, Tensor]:
    if not path.exists():
        raise PretrainedError(
            f"--pretrained {path}: no such file; pass 'imagenet' or the path of a state_dict (.pth) file"
        )
    if path.is_dir():
        raise PretrainedError(f"--pretrained {path} is a folder; pass the weights file itself (.pth)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip/pickle errors come in many types
        raise PretrainedError(
            f"--pretrained {path} is not a readable PyTorch weights file ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); "
            "pass a state_dict saved with torch.save, e.g. torchvision's .pth"
        ) from None
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT and isinstance(state.get("model"), dict):
        state = state["model"]  # an ISFE checkpoint: start from its backbone
    elif isinstance(state, dict):
        for key in ("state_dict", "model"):  # common wrappers
            if isinstance(state.get(key), dict) and not any(isinstance(v, Tensor) for v in state.values()):
                state = state[key]
                break
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise PretrainedError(
            f"--pretrained {path} does not hold a state_dict (a mapping of parameter names to tensors)"
        )
    return state


def _backbone_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Strip wrapper prefixes; drop classifier and auxiliary heads (and an ISFE embedding head)."""
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        if k.startswith("backbone."):
            k = k[len("backbone."):]
        elif k.startswith("head."):
            continue
        if k.split(".")[0] in ("fc", "aux1", "aux2"):
            continue
        out[k] = v
    return out


def load_pretrained(model: nn.Module, source: str | os.PathLike, progress: bool = True) -> str:
    """Load pretrained backbone weights into an EmbeddingNet (the embedding head keeps its init).

    Args:
        model: an :class:`EmbeddingNet` (or a wrapper of one).
        source: ``"imagenet"`` (torchvision's weights API: the torch hub
            cache, else a download) or the path of a weights file: a
            torchvision state_dict (classifier and auxiliary heads are
            ignored), optionally wrapped (``{"state_dict": ...}``, DDP
            ``module.`` prefixes), or an ISFE checkpoint (its backbone).

    Returns:
        A one-line description for the log.

    Raises:
        PretrainedError: offline without a cached copy, an unreadable file,
            or weights of another architecture / stem (names the mismatch).
    """
    net = unwrap(model)
    cfg: ModelConfig = net.cfg
    if str(source) == "imagenet":
        state, where = _imagenet_state_dict(cfg.arch, progress), f"torchvision {IMAGENET_WEIGHTS[cfg.arch]}"
    else:
        state, where = _read_state_dict_file(Path(source)), str(source)
    state = _backbone_keys(state)
    expected = net.backbone.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    what = f"{cfg.arch}" + (" with the CIFAR stem" if cfg.cifar_stem else "")
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise PretrainedError(
            f"the weights in {where} do not fit a {what} backbone: {', '.join(detail)} parameter names; "
            f"pass weights of the same architecture (--arch) or 'imagenet'"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            hint = (" — ImageNet weights need the standard stem: use an input size above "
                    f"{CIFAR_STEM_MAX_INPUT} px" if cfg.cifar_stem and k.startswith("conv1") else "")
            raise PretrainedError(
                f"the weights in {where} do not fit a {what} backbone: {k} has shape {tuple(v.shape)}, "
                f"the model needs {tuple(expected[k].shape)}{hint}"
            )
    net.backbone.load_state_dict(state, strict=False)  # only num_batches_tracked may be absent
    return f"loaded pretrained {cfg.arch} backbone weights from {where} ({len(state)} tensors)"
