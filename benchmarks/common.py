"""What every benchmark records about the machine it ran on, and how it writes its result.

A number without its machine means little: ``host_info()`` is the CPU model,
its relevant ISA flags (AVX2 / AVX-512 / BF16 / AMX), the core count, the
1/5/15-minute load average (other work sharing the cores) and the versions of
python, numpy, onnxruntime and torch (read from the installed package
metadata, so asking never imports torch).  ``write_result(path, payload)``
adds it under ``"host"`` and writes strict JSON atomically
(:func:`isfe_model.jsonsafe.write_json`: NaN/Inf become ``null``).

    from benchmarks.common import device_name, load_average, slug, write_result
    write_result(RESULTS / f"my_bench-{slug(device_name())}.json", {"benchmark": "my_bench", ...})
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/x.py`: the project's packages are importable
    sys.path.insert(0, str(ROOT))

from isfe_model.jsonsafe import write_json  # noqa: E402

__all__ = ["RESULTS", "ROOT", "cores", "cpu_flags", "cpu_model", "device_name", "device_tag", "host_info",
           "load_average", "package_version", "result_header", "slug", "write_result"]

RESULTS = ROOT / "benchmarks" / "results"

# ISA extensions that change the speed of the kernels we time (oneDNN / ONNX Runtime / numpy BLAS pick by them)
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
             "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_bf16", "amx_int8", "amx_tile", "asimd", "sve")
PACKAGES = ("numpy", "onnxruntime", "torch", "torchvision", "triton", "pillow", "faiss-cpu")


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def cpu_model() -> str:
    """The CPU's marketing name (``model name`` in /proc/cpuinfo; else ``platform``), e.g. "Intel(R) Xeon(R) ..."."""
    for line in _cpuinfo():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def cpu_flags() -> list[str]:
    """The :data:`ISA_FLAGS` this CPU reports (``flags``/``Features`` in /proc/cpuinfo), in that order."""
    for line in _cpuinfo():
        if line.startswith(("flags", "Features")):
            present = set(line.split(":", 1)[1].split())
            return [f for f in ISA_FLAGS if f in present]
    return []


def cores() -> int:
    """Cores this process may run on (the affinity mask where the OS has one, else ``os.cpu_count()``)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def device_name(device: Any = None) -> str:
    """Readable name of the device timed: the CUDA name for a CUDA torch device, else "<CPU model> (<N> cores)".

    ``device`` is a ``torch.device`` or a string such as ``"cuda:0"``/``"cpu"`` (torch is imported
    only for a CUDA device).
    """
    if device is not None and str(getattr(device, "type", device)).startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return f"{cpu_model()} ({cores()} cores)"


def slug(name: str) -> str:
    """``name`` as a file-name part: lower case, runs of other characters -> "-" ("NVIDIA H200" -> "nvidia-h200")."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def device_tag(device: Any = None) -> str:
    """Short file-name tag of the device: the slug of its CUDA name ("nvidia-h200"), else "cpu<cores>" ("cpu2")."""
    if device is not None and str(getattr(device, "type", device)).startswith("cuda"):
        return slug(device_name(device))
    return f"cpu{cores()}"


def load_average() -> list[float]:
    """The 1, 5 and 15-minute load averages (runnable processes; ~0 means the cores were ours), [] where unknown."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return []


def package_version(package: str) -> str | None:
    """The installed version of ``package`` (its ``__version__`` if already imported, else the metadata), or None."""
    module = sys.modules.get(package)
    if module is not None and isinstance(getattr(module, "__version__", None), str):
        return module.__version__
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _gpu() -> str | None:
    torch = sys.modules.get("torch")  # only when the benchmark already imported it
    try:
        return torch.cuda.get_device_name() if torch is not None and torch.cuda.is_available() else None
    except Exception:  # a broken driver must not lose the result being written  # noqa: BLE001
        return None


def host_info() -> dict[str, Any]:
    """The machine and software: cpu, cpu_flags, cores, load_average, platform, python, versions, gpu."""
    return {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores": cores(),
        "cpu_count": os.cpu_count(),
        "load_average": load_average(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {p: v for p in PACKAGES if (v := package_version(p)) is not None},
        "gpu": _gpu(),
    }


def result_header(benchmark: str, device: str) -> dict[str, Any]:
    """The first keys of a result: benchmark, device, cpu_count, platform, processor (kept for older readers)."""
    return {
        "benchmark": benchmark,
        "device": device,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }


def write_result(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` plus ``"host": host_info()`` (kept if the payload has one) as strict JSON, atomically."""
    doc = dict(payload)
    doc.setdefault("host", host_info())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_json(path, doc, indent=2)


def main(argv: list[str] | None = None) -> int:
    """``python benchmarks/common.py`` prints this machine's host_info as JSON."""
    import argparse

    from isfe_model.jsonsafe import dumps

    argparse.ArgumentParser(prog="python benchmarks/common.py", description=main.__doc__).parse_args(argv)
    print(dumps(host_info(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
