"""Named training recipes (``--preset NAME``); explicit options override them.

With no ``--preset`` and no ``--data``, ``quickstart`` applies (the embedded
digits); with ``--data`` and no preset, the paper's CIFAR recipe applies (with
the default speed switches and initialisation).

Every ``*-paper`` preset trains as the authors did, in float32 throughout
(:data:`PAPER_FP32`: no bf16 autocast, no TF32, no ``torch.compile``, no
channels-last, the reference loss; the kNN monitor then runs in float32 too, and
``python -m training.evaluate`` evaluates such a checkpoint in float32); the
from-scratch CIFAR-recipe ResNets (``cifar10-paper``, ``stl10-paper``) start
from the authors' initialisation (PyTorch's layer defaults, ``--init authors``).
``cifar10-fast`` keeps every speed switch and torchvision's initialisation.
"""

from __future__ import annotations

from typing import Any

#: The numerics of the authors' runs: float32 everywhere (explicit options override it).  channels_last is off too:
#: it changes only the memory layout, but left to "auto" a CPU with bf16 instructions would pick it by a timed
#: trial, so two runs of one preset could differ; in float32 without TF32 it gains little on CUDA either.
PAPER_FP32: dict[str, Any] = {"amp": False, "tf32": False, "compile": False, "channels_last": False,
                              "loss": "reference"}

PAPER_CIFAR: dict[str, Any] = {
    "epochs": 200,
    "batch_size": 128,
    "lr": 0.03,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "schedule": "step",  # x0.1 at epoch 120, x0.01 at epoch 160
    "temperature": 0.1,
    "neg_weight": 1.0,
    "embedding_dim": 128,
    "arch": "resnet18",
    "eval_every": 10,
    "augment": {},  # the paper's augmentation (AugmentConfig defaults)
}

# The paper's unseen-category protocol (Sec. 4.2): ImageNet-pretrained Inception-V1 (torchvision's
# GoogLeNet), a 128-d fully connected layer + L2 normalisation on pool5; images resized to 256x256
# (`python -m training.prepare` squashes them), random 227x227 crops with horizontal flips for training
# (no colour augmentation; a fixed-size crop = RandomResizedCrop with area (227/256)^2 and ratio 1),
# a single center crop for testing; SGD momentum 0.9, lr 0.001, tau 0.1, batch 64.
# Not in the paper, taken from the authors' code (demo_unseen.py): 60 epochs, weight decay 5e-4, the
# lr x0.1 from (0-based) epoch 20 and x0.01 from epoch 40 (--schedule step --milestones 20,40; the
# paper's text has no decay: --schedule constant), and the neighbour bank on the pool5 features.
# The nearest-neighbour positive is the paper's CUB-200 setting ("since the pre-trained network
# performs well on CUB200"); the authors' code uses it for CUB-200 only, so Cars196 and Products
# train with the augmented view alone.
PAPER_UNSEEN: dict[str, Any] = {
    "arch": "googlenet",
    "pretrained": "imagenet",
    "input_size": 227,
    "resize_size": 256,
    "epochs": 60,
    "batch_size": 64,
    "lr": 0.001,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "schedule": "step",
    "milestones": "20,40",
    "temperature": 0.1,
    "neg_weight": 1.0,
    "embedding_dim": 128,
    "eval_every": 5,
    "augment": {
        "crop_scale": ((227 / 256) ** 2,) * 2,  # a 227 x 227 window, position uniform
        "crop_ratio": (1.0, 1.0),
        "color_jitter": False,
        "grayscale": False,
        "flip": True,
    },
    "positive": "aug",
    "nn_features": "backbone",
    **PAPER_FP32,
}

PRESETS: dict[str, dict[str, Any]] = {
    # 1-3 minutes on 2 CPU cores: digits are small, centred and not mirror-symmetric,
    # so crops keep at least half the image and flips are off.
    "quickstart": {
        "data": None,
        "epochs": 6,
        "batch_size": 64,
        "lr": 0.03,
        "eval_every": 2,
        "augment": {"crop_scale": (0.5, 1.0), "flip": False},
    },
    "cifar10-paper": {"data": "cifar10", **PAPER_CIFAR, **PAPER_FP32, "init": "authors"},
    # Time-to-accuracy on one GPU: 4x the paper's batch with the learning rate scaled
    # linearly (0.03 x 512/128 = 0.12), 5 warm-up epochs, then cosine to 0.  The speed
    # switches are "auto": on CUDA that is bf16 autocast, channels_last, torch.compile
    # and the fused Triton loss (on a CPU they fall back to float32 eager / reference).
    "cifar10-fast": {
        "data": "cifar10",
        **PAPER_CIFAR,
        "batch_size": 512,
        "lr": 0.12,
        "schedule": "cosine",
        "warmup_epochs": 5.0,
        "eval_every": 20,
        "amp": None,
        "channels_last": None,
        "compile": None,
        "loss": "auto",
    },
    # ---- the paper's second protocol: unseen test categories (Sec. 4.2, Tables 3-6) and STL-10 (Table 2).
    # Prepare the data first (python -m training.prepare ...; it writes data/<name> by default in the README).
    "cub200-paper": {"data": "data/cub200", **PAPER_UNSEEN, "positive": "nn-or-aug"},
    "cars196-paper": {"data": "data/cars196", **PAPER_UNSEEN},
    "sop-paper": {"data": "data/sop", **PAPER_UNSEEN},
    # Table 6: ResNet18 from scratch on Products.  Only "from scratch" is in the paper; the rest follows
    # the authors' code for non-Inception backbones (224 random crops of the 256 images + flips) with the
    # other unseen-protocol settings -- unverified, the paper does not list them.  Its ResNet (the authors'
    # models/resnet.py) initialises its convs normal(0, sqrt(2 / (k^2 C_out))), BatchNorm 1 / 0: what
    # torchvision's constructor does, so --init stays torchvision here.
    "sop-scratch-paper": {
        "data": "data/sop",
        **PAPER_UNSEEN,
        "arch": "resnet18",
        "pretrained": None,
        "input_size": 224,
        "augment": {**PAPER_UNSEEN["augment"], "crop_scale": ((224 / 256) ** 2,) * 2},
    },
    # Table 2: STL-10, ResNet18 from scratch on 96x96 images, the CIFAR recipe (the authors' code trains STL
    # with the CIFAR script: same augmentation, lr 0.03, batch 128; its ResNet has the CIFAR stem, which
    # ModelConfig picks for inputs <= 96 px), on train+unlabeled (105K images; --train-split train for 5K).
    "stl10-paper": {"data": "data/stl10", **PAPER_CIFAR, **PAPER_FP32, "init": "authors", "input_size": 96,
                    "resize_size": 96, "train_split": "train+unlabeled"},
}


def preset_for(name: str | None, data_given: bool) -> dict[str, Any]:
    """The preset's settings; ``None`` picks quickstart (no --data) or the paper recipe."""
    if name is None:
        return dict(PAPER_CIFAR) if data_given else dict(PRESETS["quickstart"])
    if name not in PRESETS:
        raise KeyError(name)
    return dict(PRESETS[name])
