"""Training options: ``TrainConfig``, each option declared once on its field, and the resume rules.

Every option is one field of :class:`TrainConfig` whose metadata
(:func:`option`) holds its help text, its allowed values (``choices`` or a
:class:`Bound`), its command-line form (``kind``) and whether it may change
when a run is resumed.  Generated from those fields:

* the argparse parser (:func:`build_parser`; only options given on the
  command line override the preset or the resumed run);
* the per-option checks (:func:`option_problems`, run by
  :meth:`TrainConfig.validate`, which adds only the rules that span fields);
* :data:`RESUMABLE_CHANGES`, the options a ``--resume`` may change.

A configuration is a preset (:mod:`training.presets`) or a resumed run's
saved settings, with the command-line options merged over it
(:func:`config_from_args`).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from isfe_model.preprocess import DECODE_POLICIES
from training.augment import AugmentConfig
from training.model import ARCHS, INITS
from training.negatives import NEGATIVE_MODES
from training.positives import NN_FEATURES, POSITIVE_MODES
from training.presets import PRESETS, preset_for
from training.run_state import load_run_state

__all__ = ["UsageError", "TrainConfig", "Bound", "option", "option_problems", "RESUMABLE_CHANGES", "build_parser",
           "config_from_args", "flag_of", "step_milestones", "milestone_problems"]


class UsageError(ValueError):
    """A bad option or input: printed as one line, exit code 2."""


@dataclass(frozen=True)
class Bound:
    """``value >= limit`` (or ``>``) for a number; ``None`` passes where the option's default is ``None``."""

    op: str  # ">=" or ">"
    limit: float
    note: str = ""  # said after the bound: "seconds", "(0: ...)"

    def holds(self, value: float) -> bool:
        return value >= self.limit if self.op == ">=" else value > self.limit

    def describe(self) -> str:
        return f"{self.op} {self.limit:g}" + (f" {self.note}" if self.note else "")


def ge(limit: float, note: str = "") -> Bound:
    return Bound(">=", limit, note)


def gt(limit: float, note: str = "") -> Bound:
    return Bound(">", limit, note)


# Command-line forms (``kind``): "value" --flag VALUE (type from the annotation); "toggle" --flag / --no-flag;
# "switch" --flag sets True; "negated" --flag sets False; "augment" the augmentation flags (AUGMENT_OFF);
# "hidden" a developer option left out of --help.
KINDS = ("value", "toggle", "switch", "negated", "augment", "hidden")


def option(default: Any = MISSING, help: str | None = None, *, choices: tuple[str, ...] | None = None,
           bound: Bound | None = None, resumable: bool = False, kind: str = "value", flag: str | None = None,
           metavar: str | None = None, factory: Callable[[], Any] | None = None) -> Any:
    """A TrainConfig field with its option metadata (help, checks, command-line form, resume rule)."""
    assert kind in KINDS, kind
    meta = {"help": help, "choices": choices, "bound": bound, "resumable": resumable, "kind": kind, "flag": flag,
            "metavar": metavar}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Every training option (``python -m training --help`` lists them; one field each)."""

    data: str | None = option(None, "digits (embedded default), cifar10, an image folder with train/ and test/ class "
                                    "folders, a folder of unlabelled images (neither: no kNN monitor), or a "
                                    ".tar(.gz/.bz2/.xz) or .zip of either")
    epochs: int = option(200, bound=ge(1), resumable=True)
    batch_size: int = option(128, "images per step over all processes (2x views)",  # global batch (all ranks together)
                             bound=ge(2, "(each image needs other images as negatives)"))
    lr: float = option(0.03, bound=gt(0))
    momentum: float = option(0.9)
    weight_decay: float = option(5e-4)
    schedule: str = option("step", "step (paper: x0.1 at 60%%, x0.01 at 80%% of the epochs, or at --milestones), "
                                   "cosine or constant", choices=("step", "cosine", "constant"))
    milestones: str | None = option(None, "epochs of --schedule step's decays, x0.1 at each, e.g. 20,40 (the "
                                          "authors' unseen-category code); default: 60%% and 80%% of --epochs",
                                    metavar="E1,E2,...")  # training.config.step_milestones
    warmup_epochs: float = option(0.0, "linear learning-rate warm-up (epochs, may be fractional)")  # then the schedule
    temperature: float = option(0.1, bound=gt(0, "(the paper uses 0.1)"))
    neg_weight: float = option(1.0, "weight of the negatives (authors' negM)", bound=ge(0))
    detach_keys: bool = option(True, "let the gradient flow through the key side too (default: authors' detached keys)",
                               kind="negated", flag="--full-gradient")
    negatives: str = option("all", "all (default), hard (keep the 50%% most similar negatives), easy (the 50%% least "
                                   "similar) or hard-authors (the authors' released hard branch: N kept, weighted 0.5, "
                                   "loss divided by N + 1)", choices=NEGATIVE_MODES)  # the paper's Table 8 ablation
    embedding_dim: int = option(128, bound=ge(1))
    arch: str = option("resnet18", f"one of {', '.join(ARCHS)}", choices=tuple(ARCHS))
    init: str = option("torchvision", "initialisation of a from-scratch backbone: torchvision (its constructors; "
                                      "default) or authors (PyTorch's layer defaults, as the authors' resnet_cifar.py)",
                       choices=INITS)  # training.model.ModelConfig.init; the CIFAR/STL *-paper presets: authors
    input_size: int | None = option(None, "model input side (default: 16 digits, 32 CIFAR/small images, 224 large)",
                                    bound=ge(8))
    resize_size: int | None = option(None, "side images are resized to before cropping")
    decode: str = option("full", "JPEG decoding of the training images: full (every pixel; default) or draft "
                                 "(Pillow's DCT-domain downscaling where the resize size is at most half the shorter "
                                 "side: several times faster on camera photos); the exported model decodes alike",
                         choices=DECODE_POLICIES)  # isfe_model.preprocess.PreprocessSpec.decode; part of the cache key
    seed: int = option(0)
    eval_every: int = option(10, "kNN evaluation every N epochs (0: only before and after training)",
                             bound=ge(0, "(0 = only before and after training)"), resumable=True)
    knn_k: int = option(200, bound=ge(1), resumable=True)
    knn_sigma: float = option(0.1, bound=gt(0), resumable=True)
    device: str = option("auto", "auto (default), cpu, cuda, cuda:N", resumable=True)
    loss: str = option("auto", "auto (fused on CUDA), fused or reference", choices=("auto", "fused", "reference"),
                       resumable=True)
    amp: bool | None = option(None, "bf16 autocast for the encoder (default auto: on for CUDA; on a CPU with "
                                    "amx_bf16/avx512_bf16 a short timed trial decides, else off)", kind="toggle",
                              resumable=True)  # None: auto (training.step.resolve_speed / choose_by_trial)
    channels_last: bool | None = option(None, "channels-last memory format (default auto: as --amp)",
                                        kind="toggle", resumable=True)
    compile: bool | None = option(None, "torch.compile the encoder and augmentation (default: on for CUDA)",
                                  kind="toggle", resumable=True)
    sync_bn: bool = option(False, "synchronise BatchNorm statistics across processes (torchrun, CUDA)", kind="toggle")
    data_on_device: bool | None = option(None, "copy the decoded training images to the device once (default: when "
                                               "small)", kind="toggle", resumable=True)  # training.batches
    workers: int = option(4, "threads that prefetch batches when the images stay in host memory", bound=ge(1),
                          resumable=True)
    log_every: int | None = option(None, "read the loss back (and print it) every N steps (default: 50, progress bar "
                                         "only)", bound=ge(1), resumable=True)
    save_every: int = option(0, "also write last.pt every N epochs (it is always written at evaluations and at the "
                                "end)", bound=ge(0, "(0: at evaluations and at the end)"), resumable=True)
    time_limit: float | None = option(None, "stop after the epoch in which SECONDS have passed; evaluate and save",
                                      bound=gt(0, "seconds"), metavar="SECONDS", resumable=True)
    max_steps_per_epoch: int | None = option(None, bound=ge(1), kind="hidden")  # short test runs and smoke runs
    deterministic: bool = option(False, "deterministic algorithms (bit-exact resume on CPU; slower on CUDA)",
                                 kind="switch", resumable=True)
    tf32: bool | None = option(None, "TF32 tensor-core matrix products and convolutions on CUDA (default: on for "
                                     "CUDA; the *-paper presets: off, full float32)",
                               kind="toggle")  # training.train.resolve_tf32, full_fp32
    positive: str = option("aug", "aug (default: the image's other augmented view) or nn-or-aug (half the time its "
                                  "nearest neighbour in the current embedding, refreshed every epoch; the paper's "
                                  "CUB-200 setting)", choices=POSITIVE_MODES)
    nn_features: str = option("embedding", "neighbour bank of --positive nn-or-aug: embedding (default) or backbone "
                                           "(pooled features)", choices=NN_FEATURES)
    pretrained: str | None = option(None, "initial backbone weights: imagenet (torchvision's; downloaded where a "
                                          "network exists) or a weights file", metavar="imagenet|PATH")
    train_split: str = option("train", "train (default) or train+unlabeled (also the unlabeled/ images of a prepared "
                                       "STL-10 folder)", choices=("train", "train+unlabeled"))
    augment: dict[str, Any] = option(factory=lambda: AugmentConfig().to_dict(), kind="augment")
    out: str | None = option(None, "run folder (default runs/<timestamp>)", resumable=True)

    def validate(self) -> None:
        """Raise :class:`UsageError` for the first bad option: the per-option checks, then the rules across options."""
        problems = option_problems(self)
        warm = self.warmup_epochs
        if not 0 <= warm < self.epochs:
            problems.append(f"--warmup-epochs must be >= 0 and < --epochs ({self.epochs}), got {warm:g} "
                            f"(a preset may set it); pass a smaller --warmup-epochs, e.g. 0")
        if self.negatives != "all" and self.loss == "fused":
            problems.append(f"--negatives {self.negatives} is implemented in the reference loss only; "
                            f"drop --loss fused")
        if self.negatives == "hard-authors" and self.neg_weight != 1.0:
            problems.append(f"--negatives hard-authors weights the kept negatives 0.5 itself (the authors' negM); "
                            f"drop --neg-weight {self.neg_weight:g}")
        problems += milestone_problems(self)
        if self.resize_size is not None and self.input_size is not None and self.resize_size < self.input_size:
            problems.append(f"--resize-size ({self.resize_size}) must be >= --input-size ({self.input_size})")
        if problems:
            raise UsageError(problems[0])


def flag_of(f: dataclasses.Field) -> str:
    """The command-line flag of a TrainConfig field (``batch_size`` -> ``--batch-size``)."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def option_problems(cfg: TrainConfig) -> list[str]:
    """One message per option outside its ``choices`` or its ``bound``, in field order."""
    problems = []
    for f in fields(cfg):
        value, choices, bound = getattr(cfg, f.name), f.metadata.get("choices"), f.metadata.get("bound")
        if choices is not None and value not in choices:
            problems.append(f"{flag_of(f)} must be one of {', '.join(choices)}, got {value!r}")
        elif bound is not None and not (value is None and f.default is None) and not bound.holds(value):
            problems.append(f"{flag_of(f)} must be {bound.describe()}, got {value}")
    return problems


def _parse_milestones(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.replace(" ", "").split(","))


def milestone_problems(cfg: TrainConfig) -> list[str]:
    """``--milestones``: increasing whole epochs >= 1.  Only ``--schedule step`` reads them, and one at or past
    ``--epochs`` never fires, so a preset's milestones survive ``--schedule constant`` or a shorter ``--epochs``."""
    if cfg.milestones is None:
        return []
    try:
        ms = _parse_milestones(cfg.milestones)
    except ValueError:
        return [f"--milestones must be comma-separated whole epochs, e.g. 20,40; got {cfg.milestones!r}"]
    if not ms or any(b <= a for a, b in zip(ms, ms[1:])) or ms[0] < 1:
        return [f"--milestones must be increasing epochs >= 1, e.g. 20,40; got {cfg.milestones}"]
    return []


def step_milestones(cfg: TrainConfig) -> tuple[int, ...]:
    """Epochs at which ``--schedule step`` multiplies the learning rate by 0.1 (0-based epoch of the decayed steps).

    ``--milestones`` (e.g. ``(20, 40)``: the authors' unseen-category code, lr x0.1 from epoch 20, x0.01 from 40
    of 60) or the paper's 60% and 80% of ``--epochs`` (120 and 160 of 200).  Training epoch ``e + 1`` (our
    1-based count; the authors' 0-based ``epoch e``) runs at ``lr * 0.1 ** #{m : e >= m}``.
    """
    if cfg.milestones is not None:
        return _parse_milestones(cfg.milestones)
    return round(0.6 * cfg.epochs), round(0.8 * cfg.epochs)


# Options that may differ when a run is resumed; every other one must match the run.
RESUMABLE_CHANGES = frozenset(f.name for f in fields(TrainConfig) if f.metadata["resumable"])

# Augmentation ablations (paper Table 7): each flag's destination and the AugmentConfig switches it turns off.
AUGMENT_OFF = {f"no_{op}": (op,) for op in ("crop", "color_jitter", "grayscale", "flip")}
AUGMENT_OFF["no_augment"] = ("crop", "color_jitter", "grayscale", "flip")
_TYPES = {"int": int, "float": float, "str": str}


def _add_augment_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--crop-scale", type=float, nargs=2, metavar=("MIN", "MAX"),
                    help="RandomResizedCrop area range (paper: 0.2 1)")
    for dest in AUGMENT_OFF:
        what = "no augmentation at all" if dest == "no_augment" else f"disable {dest[3:].replace('_', ' ')}"
        ap.add_argument("--" + dest.replace("_", "-"), action="store_true", help=f"ablation: {what}")


def _add_option(ap: argparse.ArgumentParser, f: dataclasses.Field) -> None:
    """The argparse argument of one TrainConfig field (its metadata's kind, help and metavar)."""
    kind, help_text = f.metadata["kind"], f.metadata["help"]
    if kind == "augment":
        return _add_augment_options(ap)
    kw: dict[str, Any] = {"dest": f.name, "help": argparse.SUPPRESS if kind == "hidden" else help_text}
    if kind in ("value", "hidden"):
        kw["type"] = _TYPES[str(f.type).replace(" | None", "")]
        if f.metadata["metavar"]:
            kw["metavar"] = f.metadata["metavar"]
    else:
        actions = {"toggle": argparse.BooleanOptionalAction, "switch": "store_true", "negated": "store_false"}
        kw["action"] = actions[kind]
    ap.add_argument(flag_of(f), **kw)


def build_parser() -> argparse.ArgumentParser:
    """``python -m training`` options: --preset, --resume and one per TrainConfig field (unset ones stay unset)."""
    ap = argparse.ArgumentParser(prog="python -m training",
                                 description="Train an ISFE encoder without labels (InvaSpread loss).",
                                 argument_default=argparse.SUPPRESS)  # only options given override the preset
    ap.add_argument("--preset", default=None, help=f"named recipe: {', '.join(PRESETS)} (default: quickstart without "
                                                   f"--data, the paper's recipe with it)")
    ap.add_argument("--resume", metavar="RUN_DIR",
                    help="continue the run in RUN_DIR from its last.pt up to --epochs total")
    for f in fields(TrainConfig):
        _add_option(ap, f)
    return ap


def _merge(values: dict[str, Any], given: dict[str, Any]) -> TrainConfig:
    """Command-line options over a base (a preset or a resumed run's config) -> TrainConfig."""
    values, given = dict(values), dict(given)
    aug = dict(values.pop("augment", {}))
    for dest, ops in AUGMENT_OFF.items():
        if given.pop(dest, False):
            aug.update(dict.fromkeys(ops, False))
    if "crop_scale" in given:
        aug["crop_scale"] = tuple(given.pop("crop_scale"))
    values.update(given)
    try:
        values["augment"] = AugmentConfig.from_dict(aug).to_dict()
    except (TypeError, ValueError) as e:
        raise UsageError(f"augmentation: {e}") from None
    unknown = sorted(set(values) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise UsageError(f"unknown setting(s) {', '.join(unknown)} (from a newer version?); start a new run")
    return TrainConfig(**values)


def _check_resume_compatible(saved: TrainConfig, new: TrainConfig, run: str) -> None:
    """Refuse a resume whose options differ from the run's in anything but :data:`RESUMABLE_CHANGES`."""
    diffs = []
    for f in fields(TrainConfig):
        a, b = getattr(saved, f.name), getattr(new, f.name)
        if f.name not in RESUMABLE_CHANGES and a != b:
            name = "augmentation" if f.name == "augment" else "--" + f.name.replace("_", "-")
            diffs.append(f"{name} {b} (the run has {a})")
    if diffs:
        may = ", ".join("--" + k.replace("_", "-") for k in sorted(RESUMABLE_CHANGES - {"out"}))
        raise UsageError(f"cannot resume {run} with different settings: {'; '.join(diffs)}. Drop these options "
                         f"(only {may} may change), or start a new run with another --out")


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, dict[str, Any] | None]:
    """(config, resume state or None) from parsed options; the preset (or the resumed run) is the base."""
    given = dict(vars(args))
    preset = given.pop("preset", None)
    run = given.pop("resume", None)
    if run is None:
        try:
            values = preset_for(preset, "data" in given)
        except KeyError as e:
            raise UsageError(f"unknown --preset {e.args[0]!r}; choose one of {', '.join(PRESETS)}") from None
        return _merge(values, given), None
    if preset is not None:
        raise UsageError("--preset cannot be combined with --resume: the run's own settings are in its last.pt")
    state = load_run_state(run)
    run_dir = Path(run) if Path(run).is_dir() else Path(run).parent
    if "out" in given and Path(given["out"]).resolve() != run_dir.resolve():
        raise UsageError(f"--out {given['out']} differs from --resume {run}: a resumed run continues in its own "
                         f"folder; drop --out")
    saved_values = dict(state["train_config"])
    given["out"] = str(run_dir)
    cfg = _merge(saved_values, given)
    _check_resume_compatible(_merge(saved_values, {}), cfg, str(run_dir))
    done = int(state["epoch"])
    if cfg.epochs <= done and (run_dir / "checkpoint.pt").exists():
        raise UsageError(f"--resume {run_dir}: the run already finished {done} epochs; pass --epochs N with "
                         f"N > {done} to train further")
    return cfg, state
