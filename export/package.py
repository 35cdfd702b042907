"""Model packages: the verified export as a versioned, self-describing folder (and a pip wheel of it).

``python -m export --checkpoint C --package DIR [--name NAME] [--version V] [--int8] [--wheel DIST]``
runs the gated stages of :mod:`export.cli` inside a temporary folder beside
DIR, then adds::

    config.json      the ISFE metadata as plain JSON: name, version, dim, preprocessing, fingerprint,
                     precisions (file, sha256, bytes, parity verdict), every file's sha256, training summary
    README.md        model card (Hugging Face front matter: library_name, tags, pipeline_tag, license)
    parity/*.json    the parity report of every model file
    metrics.jsonl    curves.png   from the run folder, when it has them

and renames the folder to DIR (an older package there is replaced; any other
existing folder is refused).  ``--wheel DIST`` builds, with setuptools via
``python -m build --no-isolation`` on a generated project, the wheel
``isfe_model_<name>-<version>-py3-none-any.whl``: distribution
``isfe-model-<name>``, the folder as the package ``isfe_model_<name>``, entry
point ``<name> = "isfe_model_<name>:model_dir"`` in the group
``isfe_model.models`` and ``Requires-Dist: isfe-model>=<this version>``.
Rebuild a wheel from an existing folder with ``python -m export.package DIR --wheel DIST``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

from isfe_model._version import __version__ as ISFE_MODEL_VERSION
from isfe_model.atomic import replace_directory
from isfe_model.jsonsafe import json_safe, write_json
from isfe_model.metadata import ModelError
from isfe_model.packages import (
    CONFIG_FILE,
    ENTRY_POINT_GROUP,
    PACKAGE_FORMAT,
    PACKAGE_FORMAT_VERSION,
    PRECISION_FILES,
    QUANTIZATION,
    ModelPackage,
    distribution_name,
    is_package_dir,
    module_name,
    sha256_file,
    validate_name,
)
from isfe_model.walk import walk

from .common import ExportError, publish
from .model_card import model_card
from .to_onnx import library_versions

__all__ = ["assemble", "build_wheel", "check_package_target", "check_wheel_target", "export_package", "main",
           "package_config", "read_run"]

RUN_FILES = ("metrics.jsonl", "curves.png")
PARITY_DIR = "parity"


def check_package_target(package: str, wheel: str | None, name: str | None, version: str) -> None:
    """Bad --package/--wheel/--name/--version -> ExportError (exit 2), before anything is built."""
    target = Path(package)
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise ExportError(f"--package {target}: parent directory {parent} does not exist; "
                          f"create it (mkdir -p {parent})")
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            raise ExportError(f"--package {target} exists and is not a folder; give a new folder name")
        if any(target.iterdir()) and not is_package_dir(target):
            raise ExportError(f"--package {target} exists and is not a model package (no {CONFIG_FILE} of format "
                              f"{PACKAGE_FORMAT!r}); it is never replaced: give a new folder or remove it yourself")
    if name is not None:
        try:
            validate_name(name)
        except ValueError as e:
            raise ExportError(f"--name: {e}") from None
    if wheel is not None:
        check_wheel_target(wheel, version)


def check_wheel_target(wheel: str, version: str) -> None:
    """Bad --wheel DIST or a --version that is not PEP 440 -> ExportError (exit 2)."""
    from packaging.version import InvalidVersion, Version  # packaging comes with build/setuptools

    try:
        Version(version)
    except InvalidVersion:
        raise ExportError(f"--version {version!r} is not a PEP 440 version (e.g. 1, 1.2, 2.0.1), "
                          "which a wheel needs") from None
    dist = Path(wheel)
    if dist.exists() and not dist.is_dir():
        raise ExportError(f"--wheel {dist} is a file; give the folder the wheel goes to (e.g. dist/)")
    if not dist.exists() and not (dist.parent if str(dist.parent) else Path(".")).is_dir():
        raise ExportError(f"--wheel {dist}: parent directory {dist.parent} does not exist; create it first")
    if importlib.util.find_spec("build") is None or importlib.util.find_spec("setuptools") is None:
        raise ExportError("--wheel needs the build and setuptools packages: pip install build setuptools")


def read_run(checkpoint: str | os.PathLike) -> tuple[Path, list[dict[str, Any]]]:
    """(the run folder of a checkpoint, the rows of its metrics.jsonl; [] when it has none)."""
    ckpt = Path(checkpoint)
    run = ckpt if ckpt.is_dir() else ckpt.parent
    rows: list[dict[str, Any]] = []
    try:
        for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    except (OSError, UnicodeDecodeError):
        pass
    return run, rows


def export_package(o: Any, run: Callable[[Any], Any]) -> tuple[Path, Path | None, Any]:
    """Run the export (``run(options) -> Context``) in a staging folder, assemble the package, rename it to DIR.

    Returns (package folder, wheel path or None, the export Context).  A failed
    ONNX fp32 gate leaves no package; its report is kept as ``<DIR>-model.onnx.parity.json``.
    """
    target = Path(o.package)
    state: dict[str, Any] = {}

    def fill(tmp: Path) -> None:
        inner = dataclasses.replace(o, onnx=o.onnx or str(tmp / PRECISION_FILES["fp32"]),
                                    int8=str(tmp / PRECISION_FILES["int8"]) if o.int8 == "" else o.int8)
        try:
            ctx = run(inner)
        except ExportError as e:
            raise type(e)(_keep_reports(tmp, target, str(e))) from None
        state["ctx"] = ctx
        config = assemble(tmp, ctx, o.checkpoint)
        if o.wheel is not None:
            state["wheel"] = build_wheel(tmp, o.wheel, config["name"], config["version"], staged=True)

    def fill_noting(tmp: Path) -> None:
        state["tmp"] = tmp
        fill(tmp)

    replace_directory(target, fill_noting, may_replace=is_package_dir)
    _point_at_package(state["ctx"], state["tmp"], target)
    wheel = state.get("wheel")
    if wheel is not None:
        wheel = publish(wheel, Path(o.wheel) / wheel.name)
        shutil.rmtree(Path(state["wheel"]).parent, ignore_errors=True)
    return target, wheel, state["ctx"]


def _point_at_package(ctx: Any, tmp: Path, target: Path) -> None:
    """Artifacts and failure messages name the package's files, not the staging folder's."""
    for a in ctx.artifacts:
        if Path(a.path).parent == tmp:
            a.path = str(target / Path(a.path).name)
    report = f"{PRECISION_FILES['int8']}.parity.json"  # a failed INT8 gate's report is kept under parity/
    ctx.failures[:] = [m.replace(f"{tmp}{os.sep}{report}", str(target / PARITY_DIR / report))
                       .replace(f"{tmp}{os.sep}", f"{target}{os.sep}") for m in ctx.failures]


def _keep_reports(tmp: Path, target: Path, message: str) -> str:
    """Copy the parity reports out of the staging folder (beside DIR, prefixed DIR-) and point the message at them."""
    for report in tmp.glob("*.parity.json"):
        shutil.copyfile(report, target.parent / f"{target.name}-{report.name}")
    return message.replace(f"{tmp}{os.sep}", f"{target}-")


def assemble(folder: Path, ctx: Any, checkpoint: str) -> dict[str, Any]:
    """Copy the verified models, reports and run files into ``folder``; write config.json and README.md.

    Returns the config as written.
    """
    models: dict[str, Any] = {}
    (folder / PARITY_DIR).mkdir()
    for artifact in ctx.artifacts:
        precision = {"onnxruntime-fp32": "fp32", "onnxruntime-int8": "int8"}.get(artifact.backend or "")
        if artifact.report is None:
            continue
        src = Path(artifact.path)
        name = PRECISION_FILES[precision] if precision else src.name
        write_json(folder / PARITY_DIR / f"{name}.parity.json", artifact.report.to_json())
        if src.parent == folder:  # written by the stage beside the model; the package keeps it under parity/
            Path(f"{src}.parity.json").unlink(missing_ok=True)
        if precision and artifact.passed:
            if src.resolve() != (folder / name).resolve():
                shutil.copyfile(src, folder / name)
            models[precision] = artifact
        elif precision:
            models.setdefault(f"{precision}-failed", artifact)
    run, rows = read_run(checkpoint)
    for rel in RUN_FILES:
        if (run / rel).is_file():
            shutil.copyfile(run / rel, folder / rel)
    safe = json_safe(package_config(folder, ctx, models, rows))  # the card reads the config as it is written
    (folder / "README.md").write_text(model_card(safe, rows, failed=[k[:-7] for k in models if k.endswith("-failed")],
                                                                     curves=(folder / "curves.png").is_file()),
                                      encoding="utf-8")
    safe["files"] = _file_table(folder)
    write_json(folder / CONFIG_FILE, safe)
    ModelPackage.load(folder)  # what loaders will check, checked now
    return safe


def _file_table(folder: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {sha256, bytes}} of every file of the package (:func:`isfe_model.walk.walk`'s order).

    The folder is the one being assembled: a path the walk would leave out (a link to a folder,
    a FIFO, a path over PATH_MAX) would be missing from the table, so it is refused.  Hidden
    names (an editor's or a file browser's, e.g. ``.DS_Store``) are not part of a package.
    """
    walked = walk(folder)
    if walked.left_out:
        lo = walked.left_out[0]
        raise ExportError(f"{lo.path}: {lo.message}; a package holds plain files only — remove it and export again")
    return {rel: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for rel, p in zip(walked.names, walked.files) if p.name != CONFIG_FILE}


def package_config(folder: Path, ctx: Any, models: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """config.json (without "files"): the model's metadata, its precisions and their proofs, the training summary."""
    meta = ctx.meta
    precisions = {}
    for precision in PRECISION_FILES:
        artifact = models.get(precision)
        if artifact is None:
            continue
        path = folder / PRECISION_FILES[precision]
        precisions[precision] = {
            "file": PRECISION_FILES[precision], "sha256": sha256_file(path), "bytes": path.stat().st_size,
            "quantization": QUANTIZATION[precision],
            "parity": {"backend": artifact.backend, "passed": bool(artifact.passed), "images": artifact.report.images,
                       "n_images": artifact.report.n_images,
                       "report": f"{PARITY_DIR}/{PRECISION_FILES[precision]}.parity.json",
                       "metrics": artifact.report.metrics},
        }
    train = dict((getattr(ctx.model, "checkpoint", None) or {}).get("config") or {})
    evals = [r for r in rows if any(k.startswith(("knn_", "recall@")) for k in r)]
    return {
        "format": PACKAGE_FORMAT, "format_version": PACKAGE_FORMAT_VERSION,
        "name": meta.model_name, "version": meta.model_version, "dim": meta.embedding_dim, "arch": meta.arch,
        "fingerprint": meta.checkpoint_sha256, "preprocess": meta.preprocess.to_dict(),
        "input_name": meta.input_name, "output_name": meta.output_name,
        "requires": f"isfe-model>={ISFE_MODEL_VERSION}",
        "precisions": precisions,
        "training": {
            "data": train.get("data"), "epochs": train.get("epochs"), "batch_size": train.get("batch_size"),
            "lr": train.get("lr"), "temperature": train.get("temperature"), "preset": train.get("preset"),
            "loss": train.get("loss"), "seed": train.get("seed"),
            "first_eval": evals[0] if evals else None, "final_eval": evals[-1] if evals else None,
            "recipe": meta.train_config,
        },
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "exported_with": library_versions(),
    }


# --------------------------------------------------------------------------- the wheel


def _project(folder: Path, proj: Path, name: str, version: str) -> None:
    """A setuptools project whose one package is the model folder."""
    mod = module_name(name)
    shutil.copytree(folder, proj / mod)
    shutil.copyfile(folder / "README.md", proj / "README.md")
    (proj / mod / "__init__.py").write_text(
        f'"""ISFE model package {name} {version}: isfe_model.Encoder.from_pretrained({name!r}) loads it."""\n\n'
        "from pathlib import Path\n\n"
        f"NAME = {name!r}\nVERSION = {version!r}\n\n\n"
        "def model_dir() -> Path:\n"
        '    """The folder holding model.onnx, config.json and the model card."""\n'
        "    return Path(__file__).resolve().parent\n", encoding="utf-8")
    summary = f"ISFE image-embedding model {name} {version} (ONNX) for isfe-model: Encoder.from_pretrained(\"{name}\")"
    (proj / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=77"]\nbuild-backend = "setuptools.build_meta"\n\n'
        f"[project]\nname = {json.dumps(distribution_name(name))}\nversion = {json.dumps(version)}\n"
        f"description = {json.dumps(summary)}\nreadme = \"README.md\"\nrequires-python = \">=3.10\"\n"
        f"dependencies = [{json.dumps(f'isfe-model>={ISFE_MODEL_VERSION}')}]\n\n"
        f'[project.entry-points.{json.dumps(ENTRY_POINT_GROUP)}]\n{json.dumps(name)} = "{mod}:model_dir"\n\n'
        f"[tool.setuptools]\npackages = [{json.dumps(mod)}]\ninclude-package-data = false\n\n"
        f'[tool.setuptools.package-data]\n{mod} = ["*", "{PARITY_DIR}/*"]\n', encoding="utf-8")


def build_wheel(folder: str | os.PathLike, dist: str | os.PathLike, name: str, version: str,
                staged: bool = False) -> Path:
    """Build the model wheel of a package folder into ``dist`` (created if missing); returns the wheel.

    ``staged``: leave it in a temporary folder inside ``dist`` (the caller
    renames it into place once the package itself is in place).
    """
    folder, dist = Path(folder), Path(dist)
    dist.mkdir(exist_ok=True)
    # absolute: the build runs in its own working folder, where a relative --outdir would land elsewhere
    out = Path(tempfile.mkdtemp(prefix=".wheel.", suffix=".tmp", dir=dist)).resolve()
    try:
        with tempfile.TemporaryDirectory(prefix="isfe-model-wheel.") as work:
            proj = Path(work) / "project"
            _project(folder, proj, name, version)
            cmd = [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--skip-dependency-check",
                   "--outdir", str(out), str(proj)]
            env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=work, env=env)
        wheels = sorted(out.glob("*.whl"))
        if r.returncode != 0 or len(wheels) != 1:
            tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-15:])
            raise ExportError(f"--wheel: building the wheel of {folder} failed (python -m build, exit "
                              f"{r.returncode}):\n{tail}")
        if staged:
            return wheels[0]
        final = publish(wheels[0], dist / wheels[0].name)
        shutil.rmtree(out, ignore_errors=True)
        return final
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m export.package PACKAGE_DIR --wheel DIST``: (re)build the wheel of an existing package folder."""
    p = argparse.ArgumentParser(prog="python -m export.package",
                                description="Build the pip wheel of a model package folder.")
    p.add_argument("package", help="a folder written by `python -m export --package DIR`")
    p.add_argument("--wheel", required=True, metavar="DIST", help="folder the wheel goes to")
    args = p.parse_args(argv)
    try:
        try:
            pkg = ModelPackage.load(args.package)
        except ModelError as e:
            raise ExportError(str(e)) from None
        check_wheel_target(args.wheel, pkg.version)
        wheel = build_wheel(pkg.path, args.wheel, pkg.name, pkg.version)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {wheel} ({wheel.stat().st_size / 1e6:.1f} MB): pip install {wheel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
