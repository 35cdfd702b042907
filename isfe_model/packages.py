"""Model packages: a trained encoder as a self-describing folder (or an installed wheel) that loads by name.

A package folder (written by ``python -m export --checkpoint C --package DIR``)::

    config.json        format "isfe-model-package", name, version, dim, fingerprint, preprocessing,
                       precisions {"fp32": {file, sha256, bytes, quantization, parity}, "int8": {...}},
                       files {relative path: {sha256, bytes}}, training summary
    model.onnx         fp32 ONNX (ISFE metadata)      model-int8.onnx   INT8 QDQ, when its parity gate passed
    README.md          model card (Hugging Face front matter)      curves.png, metrics.jsonl, parity/*.json

A model wheel (``--wheel DIST``, distribution ``isfe-model-<name>``) installs
that folder as a package and registers it in the entry point group
``isfe_model.models`` (``<name> = "isfe_model_<name>:model_dir"``), so
``Encoder("<name>")`` finds it.  ``hf:ORG/REPO[@REVISION]`` downloads a
package folder from the Hugging Face Hub (optional ``huggingface_hub``).

Precision: ``"fp32"``, ``"int8"`` or ``"auto"`` = INT8 when the first
execution provider is the CPU and the package holds an INT8 model that passed
its gate, fp32 otherwise.  Every fp32/INT8 file of a package shares the
training checkpoint's fingerprint, so a gallery built with either precision
is accepted by the other (the gallery's manifest records which file built it:
``model_sha256``); see the README for the measured agreement.

Loading a file of a package checks its size and sha256 against config.json and
config.json against the file's ONNX metadata; any disagreement is a
:class:`ModelError` naming the file and the fix.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

from .metadata import ModelError, ModelMetadata, short_repr

__all__ = [
    "CONFIG_FILE", "ENTRY_POINT_GROUP", "HF_PREFIX", "PACKAGE_FORMAT", "PACKAGE_FORMAT_VERSION", "PRECISION_FILES",
    "ModelPackage", "distribution_name", "installed_models", "is_package_dir", "list_models", "locate", "models_main",
    "module_name", "sha256_file", "validate_name",
]

PACKAGE_FORMAT = "isfe-model-package"
PACKAGE_FORMAT_VERSION = "1"
CONFIG_FILE = "config.json"
ENTRY_POINT_GROUP = "isfe_model.models"
HF_PREFIX = "hf:"
#: File of each precision inside a package, and the ``isfe.quantization`` its ONNX metadata must say.
PRECISION_FILES = {"fp32": "model.onnx", "int8": "model-int8.onnx"}
QUANTIZATION = {"fp32": "none", "int8": "int8-qdq"}
PRECISION_CHOICES = ("auto", *PRECISION_FILES)
#: config.json larger than this is not a package's (it holds a few kB).
MAX_CONFIG_BYTES = 1 << 20
NAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,62}[A-Za-z0-9])?")
REEXPORT = ("re-export the package with `python -m export --checkpoint CHECKPOINT --package DIR` "
            "(or reinstall its wheel)")


def validate_name(name: str) -> str:
    """A package name: 1-64 letters, digits, '.', '_', '-' (starting and ending with a letter or digit)."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ValueError(f"model package name {short_repr(name)} is not valid: use 1-64 letters, digits, '.', '_' or "
                         "'-', starting and ending with a letter or digit (e.g. quickstart, isfe-resnet18-128d)")
    return name


def _normal(name: str) -> str:
    """PEP 503 normalisation: case and runs of '-', '_', '.' do not matter."""
    return re.sub(r"[-_.]+", "-", name).lower()


def distribution_name(name: str) -> str:
    """The wheel's distribution name: ``isfe-model-<name>``."""
    return "isfe-model-" + _normal(validate_name(name))


def module_name(name: str) -> str:
    """The importable package in the wheel: ``isfe_model_<name>`` (lower case, '_' for '-' and '.')."""
    return "isfe_model_" + _normal(validate_name(name)).replace("-", "_")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of the file's bytes, read in 1 MiB chunks (models, checkpoints, package files)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_package_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder whose config.json says it is an ISFE model package."""
    cfg = Path(path) / CONFIG_FILE
    try:
        if not cfg.is_file() or cfg.stat().st_size > MAX_CONFIG_BYTES:
            return False
        doc = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(doc, dict) and doc.get("format") == PACKAGE_FORMAT


@dataclass(frozen=True)
class ModelPackage:
    """A package folder and its parsed config.json (see the module docstring)."""

    path: Path
    config: dict[str, Any]

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "ModelPackage":
        """Read and check ``folder/config.json``; ModelError naming the file and the fix."""
        folder = Path(folder)
        cfg = folder / CONFIG_FILE
        if not cfg.is_file():
            raise ModelError(f"model {folder} is a folder but not a model package (no {CONFIG_FILE}); pass the .onnx "
                             "file inside it, or a folder written by `python -m export --package DIR`")
        size = cfg.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ModelError(f"model package {cfg} is {size:,} bytes; a package's {CONFIG_FILE} holds a few kB — it is "
                             f"damaged or not a package's; {REEXPORT}")
        try:
            doc = json.loads(cfg.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as e:
            raise ModelError(f"model package {cfg} is not readable JSON ({str(e)[:200]}); {REEXPORT}") from None
        if not isinstance(doc, dict) or doc.get("format") != PACKAGE_FORMAT:
            raise ModelError(f"model {folder}: {cfg} is not an ISFE model package config (format "
                             f"{short_repr(doc.get('format') if isinstance(doc, dict) else doc)}, expected "
                             f"{PACKAGE_FORMAT!r}); pass the .onnx file, or a folder written by `python -m export "
                             "--package DIR`")
        if str(doc.get("format_version")) != PACKAGE_FORMAT_VERSION:
            raise ModelError(f"model package {cfg} has format version {short_repr(doc.get('format_version'))}; this "
                             f"isfe_model reads version {PACKAGE_FORMAT_VERSION!r}: upgrade isfe-model or {REEXPORT}")
        precisions = doc.get("precisions")
        if not isinstance(precisions, dict) or "fp32" not in precisions or not all(
                p in PRECISION_FILES and isinstance(e, dict) for p, e in precisions.items()):
            raise ModelError(f"model package {cfg}: 'precisions' is {short_repr(precisions)}; it must map fp32 (and "
                             f"optionally int8) to their files; {REEXPORT}")
        for key in ("name", "version", "fingerprint"):
            if not isinstance(doc.get(key), str):
                raise ModelError(f"model package {cfg}: {key!r} is {short_repr(doc.get(key))}, not a string; "
                                 f"{REEXPORT}")
        if not isinstance(doc.get("dim"), int) or isinstance(doc.get("dim"), bool):
            raise ModelError(f"model package {cfg}: 'dim' is {short_repr(doc.get('dim'))}, not an integer; {REEXPORT}")
        return cls(folder, doc)

    @property
    def name(self) -> str:
        return str(self.config["name"])

    @property
    def version(self) -> str:
        return str(self.config["version"])

    @property
    def dim(self) -> int:
        return int(self.config["dim"])

    def precisions(self) -> list[str]:
        """The precisions this package can load: those whose file is listed and whose parity gate passed."""
        return [p for p, e in self.config["precisions"].items() if (e.get("parity") or {}).get("passed") is True]

    def choose(self, precision: str, cpu_first: bool) -> str:
        """``precision`` checked against the package; "auto" -> int8 when ``cpu_first`` and available, else fp32."""
        if precision not in PRECISION_CHOICES:
            raise ModelError(f"precision {short_repr(precision)} is not known; choose one of "
                             f"{', '.join(PRECISION_CHOICES)}")
        have = self.precisions()
        if precision == "auto":
            return "int8" if cpu_first and "int8" in have else "fp32"
        if precision not in have:
            raise ModelError(f"model package {self.path} ({self.name}) has no {precision} model (it has "
                             f"{', '.join(have) or 'none'}); use precision='auto' or one of those, or re-export it "
                             "with --int8 for an INT8 model")
        return precision

    def model_file(self, precision: str) -> Path:
        """The ONNX file of ``precision``; ModelError when it is missing or not the size config.json records."""
        entry = self.config["precisions"][precision]
        rel = entry.get("file")
        if rel != PRECISION_FILES[precision]:
            raise ModelError(f"model package {self.path / CONFIG_FILE}: the {precision} file is {short_repr(rel)}, "
                             f"expected {PRECISION_FILES[precision]!r}; {REEXPORT}")
        path = self.path / rel
        try:
            st = path.stat()
        except OSError:
            raise ModelError(f"model package {self.path}: {rel} is missing (config.json lists it for "
                             f"{precision}); {REEXPORT}") from None
        if not stat.S_ISREG(st.st_mode):
            raise ModelError(f"model package {self.path}: {rel} is not a regular file; {REEXPORT}")
        recorded = entry.get("bytes")
        if st.st_size != recorded:
            shown = f"{recorded:,}" if isinstance(recorded, int) and not isinstance(recorded, bool) else \
                short_repr(recorded)
            raise ModelError(f"model package {self.path}: {rel} is {st.st_size:,} bytes but config.json records "
                             f"{shown} — the file is damaged, truncated or was replaced; {REEXPORT}")
        return path

    def check_sha256(self, precision: str, path: Path, sha256: str) -> None:
        """The file about to be loaded is the one config.json describes."""
        recorded = self.config["precisions"][precision].get("sha256")
        if sha256 != recorded:
            raise ModelError(f"model package {self.path}: {path.name} has sha256 {sha256[:16]}… but config.json "
                             f"records {str(recorded)[:16]}… — the file is damaged or was replaced; {REEXPORT}")

    def check_metadata(self, precision: str, path: Path, metadata: ModelMetadata) -> None:
        """config.json agrees with the file's ONNX metadata: dim, fingerprint, name, version, preprocess, precision."""
        cfg, entry = self.config, self.config["precisions"][precision]
        checks = (("dim", cfg.get("dim"), metadata.embedding_dim),
                  ("fingerprint", cfg.get("fingerprint"), metadata.fingerprint),
                  ("name", cfg.get("name"), metadata.model_name),
                  ("version", cfg.get("version"), metadata.model_version),
                  ("preprocess", cfg.get("preprocess"), metadata.preprocess.to_dict()),
                  (f"precisions.{precision}.quantization", entry.get("quantization"), metadata.quantization))
        for key, said, actual in checks:
            if said != actual or (key.endswith("quantization") and actual != QUANTIZATION[precision]):
                raise ModelError(f"model package {self.path}: config.json says {key} {short_repr(said)} but "
                                 f"{path.name}'s ONNX metadata says {short_repr(actual)}; the folder mixes files of "
                                 f"different exports — {REEXPORT}")

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "dim": self.dim, "precisions": self.precisions(),
                "path": str(self.path)}


# --------------------------------------------------------------------------- installed packages and the Hub


def installed_models() -> dict[str, EntryPoint]:
    """Entry points of the group ``isfe_model.models``, by package name."""
    import importlib.metadata  # here, not at the top: it costs every start ~35 ms (email, zipfile, ...)

    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def _installed_folder(ep: EntryPoint) -> Path:
    try:
        target = ep.load()
        folder = Path(target() if callable(target) else target)
    except Exception as e:  # a broken install raises whatever its import raises
        dist = getattr(ep.dist, "name", "?")
        raise ModelError(f"installed model {ep.name!r} ({dist}) cannot be loaded ({type(e).__name__}: {str(e)[:200]}); "
                         f"reinstall it: pip install --force-reinstall {dist}") from None
    return folder


def list_models() -> list[dict[str, Any]]:
    """The installed model packages: [{"name", "version", "dim", "precisions", "path", "distribution"}], by name.

    A package that cannot be read is listed with an ``"error"`` instead of its dim and precisions.
    """
    out = []
    for name, ep in sorted(installed_models().items()):
        row: dict[str, Any] = {"name": name, "distribution": getattr(ep.dist, "name", None),
                               "version": getattr(ep.dist, "version", None)}
        try:
            row.update(ModelPackage.load(_installed_folder(ep)).summary())
        except ModelError as e:
            row["error"] = str(e)
        out.append(row)
    return out


def _find_installed(name: str) -> Path | None:
    models = installed_models()
    hits = [ep for n, ep in models.items() if _normal(n) == _normal(name)]
    return _installed_folder(hits[0]) if hits else None


def _hub_folder(ref: str) -> Path:
    """``hf:ORG/REPO[@REVISION]`` -> the downloaded (or cached) package folder."""
    spec = ref[len(HF_PREFIX):]
    repo, _, revision = spec.partition("@")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        raise ModelError(f"model {ref!r}: a Hub model is hf:ORG/REPO or hf:ORG/REPO@REVISION")
    try:
        import huggingface_hub
    except ImportError:
        raise ModelError(f"model {ref!r} is on the Hugging Face Hub, which needs huggingface_hub: "
                         f"pip install \"isfe-model[hub]\" (or pip install huggingface_hub)") from None
    try:
        return Path(huggingface_hub.snapshot_download(repo_id=repo, revision=revision or None))
    except Exception as e:  # offline, missing repo or revision, auth: huggingface_hub has many error types
        kind = type(e).__name__
        if kind in ("LocalEntryNotFoundError", "OfflineModeIsEnabled") or "Connect" in str(e):
            fix = ("the Hub cannot be reached (offline, or HF_HUB_OFFLINE=1) and the model is not in the local cache: "
                   "download it once while online, or pass the local package folder")
        elif kind in ("RepositoryNotFoundError", "RevisionNotFoundError", "GatedRepoError"):
            fix = "the repository or revision does not exist or is private (log in: `hf auth login`); check the name"
        else:
            fix = "check the name, the network and your Hub credentials"
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise ModelError(f"model {ref!r}: cannot download it from the Hugging Face Hub ({kind}: {first}); "
                         f"{fix}") from None


def locate(model: str | os.PathLike) -> Path | ModelPackage:
    """A model reference -> the .onnx file to load, or the package holding the files.

    ``model`` is a path to a .onnx file, a package folder, ``hf:ORG/REPO[@REV]``
    or the name of an installed model wheel.  Raises ModelError for a folder
    that is not a package or a name that is neither a path nor installed
    (listing the installed names).
    """
    text = os.fspath(model)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if text.startswith(HF_PREFIX):
        return ModelPackage.load(_hub_folder(text))
    path = Path(text)
    if path.is_dir():
        return ModelPackage.load(path)
    if path.exists() or path.is_symlink() or os.sep in text or "/" in text or path.suffix.lower() == ".onnx":
        return path
    folder = _find_installed(text)
    if folder is not None:
        return ModelPackage.load(folder)
    names = sorted(installed_models())
    raise ModelError(f"model {text!r}: no such file, folder or installed model package (installed: "
                     f"{', '.join(names) if names else 'none'}); pass a .onnx file, a package folder, hf:ORG/REPO, or "
                     f"pip install the model's wheel (isfe-model-{text})")


# --------------------------------------------------------------------------- python -m isfe_model models


def models_main(argv: Sequence[str] | None = None) -> int:
    """``python -m isfe_model models [--json]``: the installed model packages; exit 0."""
    p = argparse.ArgumentParser(prog="isfe-models", description="List the installed ISFE model packages "
                                "(wheels registering the entry point group isfe_model.models).")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    try:
        args = p.parse_args(None if argv is None else list(argv))
    except SystemExit as e:
        return int(e.code) if isinstance(e.code, int) else 2
    models = list_models()
    if args.json:
        print(json.dumps({"models": models}, indent=2))
        return 0
    if not models:
        print("no model packages installed (pip install a model wheel, e.g. isfe_model_quickstart-1-py3-none-any.whl)")
        return 0
    rows = [("name", "version", "dim", "precisions", "path")]
    for m in models:
        rows.append((m["name"], str(m.get("version")), str(m.get("dim", "?")), ",".join(m.get("precisions", [])) or "-",
                     m.get("path") or m.get("error", "")))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4])
    return 0


if __name__ == "__main__":
    sys.exit(models_main())
