"""Camera-sized JPEGs through isfe_model: full vs draft decoding, streaming memory (issue 18, Measure).

Photos: a reproducible set made from the two real photographs scikit-learn ships
(``sklearn.datasets.load_sample_images()``: china.jpg and flower.jpg, 640 x 427): photo ``k`` is
a seeded random crop (55-100 % of the picture, random flip) upscaled bicubically to the camera
size (default 4000 x 3000 = 12 MP), with seeded sensor-like noise (uniform integer, +-8 levels: about
2.2 MB per 12 MP photo),
saved as JPEG quality 90 (4:2:0, like a camera).  :func:`camera_photo` and :func:`write_camera_jpeg`
are used by the tests too (several subsampling modes, progressive, CMYK, EXIF-rotated).

Measured in one run, same photos, same model (a seeded ResNet18 exported by the project's export
code, ``tests.helpers_models.make_model``; ``--input-size``/``--resize-size``, default 32/32):

* ``isfe-index`` end to end (a subprocess: start, model load, walk, decode, ONNX Runtime, save),
  images/s, for a model with ``decode: full`` and the same model with ``decode: draft``, and a
  third arm, ``full_without_block_reuse``: the full model with Pillow's block reuse off
  (``PILLOW_BLOCKS_MAX=0``), i.e. full decoding as it ran before the CLI turned it on
  (``isfe_model.preprocess.reuse_image_memory``);
* preprocessing alone (``isfe_model.preprocess.preprocess`` over the files, ``--decode-threads``
  threads), images/s, for the same three arms;
* peak RSS of ``isfe-index`` (draft) over folders of two file counts (hard links to the photos,
  cycled), which must not grow with the count beyond the output array (N x D x 4 bytes);
* cosine between the draft-decoded and full-decoded embeddings of every photo (mean, min), and
  the mean absolute difference of the uint8 arrays after the resize.

    python benchmarks/photo_bench.py                       # 200 x 12 MP, RSS 200 vs 2,000 files
    python benchmarks/photo_bench.py --quick               # smoke test: 8 small photos, RSS 40 vs 120
    python benchmarks/photo_bench.py --photos 50 --rss-counts 200,600 --shared-cores \\
        --out benchmarks/results/photo_bench-cpu-2core.json

The result JSON (benchmarks.common.write_result) holds the CPU model, core count and load average.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/photo_bench.py`: the project's packages are importable
    sys.path.insert(0, str(ROOT))

__all__ = ["camera_photo", "main", "sample_photographs", "write_camera_jpeg"]

#: Camera sizes: 12 MP (4000 x 3000, a 4:3 phone or compact camera).
CAMERA_SIZE = (4000, 3000)
QUALITY = 90
NOISE_LEVELS = 8


def sample_photographs() -> list[np.ndarray]:
    """scikit-learn's two sample photographs (china.jpg, flower.jpg), uint8 [427, 640, 3] each."""
    from sklearn.datasets import load_sample_images

    return [np.asarray(im, dtype=np.uint8) for im in load_sample_images().images]


def camera_photo(seed: int, size: tuple[int, int] = CAMERA_SIZE, noise: int = NOISE_LEVELS,
                 sources: list[np.ndarray] | None = None) -> Image.Image:
    """Photo ``seed`` of the set: a seeded crop of a sample photograph, upscaled to ``size`` (w, h), noise added.

    crop: 55-100 % of each side at a random place, mirrored for odd draws; upscale: bicubic;
    noise: uniform integers in [-noise, noise] per pixel and channel (sensor-like grain, so the JPEG
    has real high-frequency content).  Deterministic for (seed, size, noise).
    """
    rng = np.random.default_rng(seed)
    sources = sources if sources is not None else sample_photographs()
    src = sources[seed % len(sources)]
    h, w = src.shape[:2]
    cw, ch = int(w * rng.uniform(0.55, 1.0)), int(h * rng.uniform(0.55, 1.0))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    crop = Image.fromarray(src[y0 : y0 + ch, x0 : x0 + cw])
    if rng.integers(0, 2):
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    big = np.asarray(crop.resize(size, Image.Resampling.BICUBIC))
    if noise:
        out = np.empty_like(big)
        step = 256  # rows per band: bounded temporaries for 12 MP
        for y in range(0, big.shape[0], step):
            band = big[y : y + step].astype(np.int16)
            band += rng.integers(-noise, noise + 1, size=band.shape, dtype=np.int16)
            out[y : y + step] = np.clip(band, 0, 255)
        big = out
    return Image.fromarray(big)


def write_camera_jpeg(path: str | os.PathLike, seed: int, size: tuple[int, int] = CAMERA_SIZE,
                      quality: int = QUALITY, subsampling: int = 2, progressive: bool = False, mode: str = "RGB",
                      orientation: int | None = None, sources: list[np.ndarray] | None = None) -> Path:
    """:func:`camera_photo` saved as a JPEG: ``subsampling`` 0 (4:4:4), 1 (4:2:2) or 2 (4:2:0), optionally
    progressive, in ``mode`` "RGB", "L" or "CMYK", with an EXIF ``orientation`` tag (1-8; the stored pixels are
    the sensor's, the viewer rotates them)."""
    path = Path(path)
    im = camera_photo(seed, size, sources=sources)
    if mode != "RGB":
        im = im.convert(mode)
    kw: dict[str, Any] = {"quality": quality, "progressive": progressive}
    if mode != "L":
        kw["subsampling"] = subsampling
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = int(orientation)
        kw["exif"] = exif.tobytes()
    im.save(path, "JPEG", **kw)
    return path


# --------------------------------------------------------------------------- the measurements


def make_photo_set(folder: Path, n: int, size: tuple[int, int], quality: int, threads: int) -> list[Path]:
    """``folder/photo-NNNN.jpg`` for k < n (4:2:0, quality ``quality``), written by ``threads`` threads."""
    from concurrent.futures import ThreadPoolExecutor

    folder.mkdir(parents=True, exist_ok=True)
    sources = sample_photographs()
    paths = [folder / f"photo-{k:04d}.jpg" for k in range(n)]
    with ThreadPoolExecutor(max(1, threads)) as pool:
        list(pool.map(lambda k: write_camera_jpeg(paths[k], seed=k, size=size, quality=quality, sources=sources),
                      range(n)))
    return paths


def linked_folder(folder: Path, photos: list[Path], count: int) -> Path:
    """``count`` hard links to ``photos`` (cycled) in ``folder``: many files, the same bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        os.link(photos[k % len(photos)], folder / f"img-{k:05d}.jpg")
    return folder


#: Runs isfe-index and, at exit, prints its own peak RSS (VmHWM of this exec'd process; the ru_maxrss that wait4
#: reports would include the benchmark's pages at fork time).
_INDEX_WITH_PEAK = ("import atexit, sys\n"
                    "def _peak():\n"
                    "    for line in open('/proc/self/status'):\n"
                    "        if line.startswith('VmHWM:'):\n"
                    "            sys.stderr.write('PEAK_RSS_KB ' + line.split()[1] + '\\n')\n"
                    "atexit.register(_peak)\n"
                    "import isfe_model.cli as cli\n"
                    "if sys.argv.pop(1) == 'on':  # --spinning-ab: the CLI's encoder with ONNX Runtime's spinning\n"
                    "    _E = cli.Encoder\n"
                    "    cli.Encoder = lambda *a, **k: _E(*a, **{**k, 'spinning': True})\n"
                    "sys.exit(cli.index_main(sys.argv[1:]))\n")


#: How the isfe-index processes get their bytecode (stored in the result).
BYTECODE = ("cached, as in an installed package: every isfe-index process reads and writes compiled modules under "
            "the work folder (PYTHONPYCACHEPREFIX), even where PYTHONDONTWRITEBYTECODE=1 is set (that would "
            "recompile isfe_model's modules, about 35 ms, in every process)")


def run_index(model: Path, folder: Path, out: Path, decode_threads: int, batch_size: int,
              spinning: bool = False, block_reuse: bool = True) -> dict[str, float]:
    """isfe-index (``isfe_model.cli.index_main``) in a fresh process -> {"wall_s", "max_rss_mib"}; a failure raises.

    ``spinning=True`` overrides the CLI's ``spinning=False`` (for the --spinning-ab comparison).
    Compiled modules are cached in ``out``'s folder (see :data:`BYTECODE`).  ``block_reuse=False`` runs it as
    before Pillow's block reuse (``PILLOW_BLOCKS_MAX=0``, which the CLI leaves in charge)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONPYCACHEPREFIX": str(out.parent / "pycache")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.pop("PILLOW_BLOCKS_MAX", None)
    if not block_reuse:
        env["PILLOW_BLOCKS_MAX"] = "0"
    cmd = [sys.executable, "-c", _INDEX_WITH_PEAK, "on" if spinning else "off",
           str(model), str(folder), "-o", str(out), "--overwrite", "-q",
           "--no-progress", "--decode-threads", str(decode_threads), "--batch-size", str(batch_size)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"isfe-index exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
    peak = [int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS_KB ")]
    return {"wall_s": round(wall, 3), "max_rss_mib": round(peak[-1] / 1024, 1)}


def preprocess_rate(files: list[Path], spec: Any, threads: int, block_reuse: bool = True) -> float:
    """Images/s of isfe_model.preprocess.preprocess over ``files`` with ``threads`` threads, with Pillow's block
    reuse as the CLI sets it (or off)."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from isfe_model.preprocess import REUSED_IMAGE_BLOCKS, preprocess

    before = Image.core.get_blocks_max()
    Image.core.set_blocks_max(REUSED_IMAGE_BLOCKS if block_reuse else 0)
    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            for _ in pool.map(lambda f: preprocess(f, spec), files):
                pass
        return len(files) / (time.perf_counter() - t0)
    finally:
        Image.core.set_blocks_max(before)


def decode_alone_ms(files: list[Path], resize_size: int, rounds: int = 3) -> dict[str, Any]:
    """ms per photo on one thread of Pillow's JPEG decode alone (no resize): at the draft scale of
    ``resize_size`` and at full size, best of ``rounds`` over ``files`` (bytes already in memory, block reuse on).

    The draft figure is the floor of draft preprocessing: libjpeg still entropy-decodes every coefficient.
    """
    import io

    from PIL import Image

    from isfe_model.preprocess import REUSED_IMAGE_BLOCKS, draft_scale

    datas = [f.read_bytes() for f in files]
    before = Image.core.get_blocks_max()
    Image.core.set_blocks_max(REUSED_IMAGE_BLOCKS)

    def one(data: bytes, draft: bool) -> None:
        im = Image.open(io.BytesIO(data))
        if draft:
            s = draft_scale(*im.size, resize_size)
            im.draft("RGB", (im.size[0] // s, im.size[1] // s))
        im.load()

    out: dict[str, Any] = {"photos": len(datas), "rounds": rounds, "threads": 1}
    try:
        for key, draft in (("draft_ms", True), ("full_ms", False)):
            best = float("inf")
            for _ in range(rounds):
                t0 = time.perf_counter()
                for d in datas:
                    one(d, draft)
                best = min(best, (time.perf_counter() - t0) / len(datas))
            out[key] = round(best * 1000, 2)
    finally:
        Image.core.set_blocks_max(before)
    return out


def agreement(full_model: Path, draft_model: Path, files: list[Path]) -> dict[str, Any]:
    """Draft vs full: embedding cosine (mean, min) and the uint8 [R, R, 3] mean absolute difference (mean, max)."""
    from isfe_model import Encoder
    from isfe_model.preprocess import decode_square

    full, draft = Encoder(full_model), Encoder(draft_model)
    cos = np.sum(full.embed(files) * draft.embed(files), axis=1)
    r = full.spec.resize_size
    mad = [float(np.abs(decode_square(f, r, "full").astype(np.int16) - decode_square(f, r, "draft")).mean())
           for f in files]
    return {"cosine_mean": round(float(cos.mean()), 6), "cosine_min": round(float(cos.min()), 6),
            "uint8_mean_abs_diff_mean": round(float(np.mean(mad)), 4),
            "uint8_mean_abs_diff_max": round(float(np.max(mad)), 4)}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python benchmarks/photo_bench.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=200, help="distinct photos (default 200)")
    ap.add_argument("--size", default="4000x3000", help="photo size WxH (default 4000x3000 = 12 MP)")
    ap.add_argument("--quality", type=int, default=QUALITY)
    ap.add_argument("--input-size", type=int, default=32)
    ap.add_argument("--resize-size", type=int, default=32)
    ap.add_argument("--embedding-dim", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--decode-threads", type=int, default=None, help="default: the cores available")
    ap.add_argument("--repeats", type=int, default=3,
                    help="rounds, each measuring every policy in turn; per policy the fastest round counts (default 3)")
    ap.add_argument("--rss-counts", default="200,2000", help="file counts for the peak-RSS runs (default 200,2000)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 8 photos of 1200x900, RSS 40 vs 120 files")
    ap.add_argument("--spinning-ab", action="store_true",
                    help="also time isfe-index with ONNX Runtime's spinning on vs off (the CLI's), --repeats rounds")
    ap.add_argument("--shared-cores", action="store_true", help="say in the result that other work shared the cores")
    ap.add_argument("--out", default=None, help="result JSON (default benchmarks/results/photo_bench-<cpuN>.json)")
    ap.add_argument("--workdir", default=None, help="where the photos go (default: a temporary folder, removed)")
    return ap


#: The third arm: full decoding as it ran before the CLI let Pillow reuse freed image blocks.
NO_REUSE = "full_without_block_reuse"


def _measure_policies(models: dict[str, Path], spec: dict[str, Any], photos: list[Path], one: Path, work: Path,
                      threads: int, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """Every decode policy: preprocessing images/s, isfe-index end to end and its startup (one photo).

    The policies alternate within each of --repeats rounds (full, draft, full, draft, ...), so that a
    host whose speed drifts slows both alike; per policy the best round counts, and the per-round
    draft/full ratios are returned too.
    """
    startup: dict[str, list[float]] = {p: [] for p in models}
    rates: dict[str, list[float]] = {p: [] for p in models}
    index: dict[str, list[dict[str, float]]] = {p: [] for p in models}
    reuse = {p: p != NO_REUSE for p in models}
    for _ in range(args.repeats):
        for p in models:
            startup[p].append(run_index(models[p], one, work / f"gal-one-{p}", threads, args.batch_size,
                                        block_reuse=reuse[p])["wall_s"])
        for p in models:
            rates[p].append(preprocess_rate(photos, spec[p], threads, block_reuse=reuse[p]))
        for p in models:
            index[p].append(run_index(models[p], work / "photos", work / f"gal-{p}", threads, args.batch_size,
                                      block_reuse=reuse[p]))
    runs = {}
    for p in models:
        best = min(index[p], key=lambda r: r["wall_s"])
        print(f"{p:5s}: preprocess {max(rates[p]):7.2f} img/s   isfe-index {len(photos) / best['wall_s']:7.2f} "
              f"img/s ({best['wall_s']:.1f} s, peak RSS {best['max_rss_mib']:.0f} MiB)", flush=True)
        runs[p] = {"preprocess_images_per_s": round(max(rates[p]), 2),
                   "preprocess_rounds": [round(r, 2) for r in rates[p]],
                   "index_images_per_s": round(len(photos) / best["wall_s"], 2),
                   "index_wall_s": best["wall_s"], "index_max_rss_mib": best["max_rss_mib"],
                   "index_one_photo_wall_s": min(startup[p]),
                   "index_images_per_s_after_startup": round((len(photos) - 1) / max(best["wall_s"] - min(startup[p]),
                                                                                     1e-9), 2),
                   "index_runs": index[p]}
    def speedups(slow: str, fast: str) -> list[float]:  # per round: isfe-index wall of ``slow`` / of ``fast``
        return [round(a["wall_s"] / b["wall_s"], 2) for a, b in zip(index[slow], index[fast])]

    per_round = {"isfe_index": speedups("full", "draft"),
                 "preprocess": [round(d / f, 2) for f, d in zip(rates["full"], rates["draft"])],
                 "isfe_index_vs_full_without_block_reuse": speedups(NO_REUSE, "draft"),
                 "full_block_reuse_speedup": speedups(NO_REUSE, "full")}
    return runs, per_round


def _measure_spinning(models: dict[str, Path], photos: list[Path], work: Path, threads: int,
                      args: argparse.Namespace) -> dict[str, Any]:
    """isfe-index with ONNX Runtime's spinning on (its default) vs off (the CLI's), alternating in each round."""
    walls: dict[str, dict[str, list[float]]] = {p: {"on": [], "off": []} for p in models}
    for _ in range(args.repeats):
        for p in models:
            for mode in ("on", "off"):
                r = run_index(models[p], work / "photos", work / f"gal-spin-{p}", threads, args.batch_size,
                              spinning=mode == "on")
                walls[p][mode].append(r["wall_s"])
    out = {p: {"wall_s_on": w["on"], "wall_s_off": w["off"],
               "off_speedup_per_round": [round(a / b, 3) for a, b in zip(w["on"], w["off"])]} for p, w in walls.items()}
    for p, o in out.items():
        print(f"spinning {p:5s}: on {min(o['wall_s_on']):.2f} s, off {min(o['wall_s_off']):.2f} s "
              f"(off speedup per round {o['off_speedup_per_round']})", flush=True)
    return out


def _measure_rss(model: Path, photos: list[Path], counts: list[int], work: Path, threads: int,
                 args: argparse.Namespace) -> dict[str, Any]:
    """Peak RSS of isfe-index over folders of ``counts`` files (hard links to the photos, cycled)."""
    rss: dict[str, Any] = {}
    for c in counts:
        folder = linked_folder(work / f"links-{c}", photos, c)
        rss[str(c)] = run_index(model, folder, work / f"gal-links-{c}", threads, args.batch_size)
        rss[str(c)]["output_array_mib"] = round(c * args.embedding_dim * 4 / 2**20, 3)
        print(f"RSS: {c:6d} files -> peak {rss[str(c)]['max_rss_mib']:.0f} MiB ({rss[str(c)]['wall_s']:.1f} s)",
              flush=True)
        shutil.rmtree(folder)
    return rss


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.quick:
        args.photos, args.size, args.rss_counts, args.repeats = 8, "1200x900", "40,120", 1
    from benchmarks.common import RESULTS, cores, device_tag, write_result
    from isfe_model.encoder import default_decode_threads
    from tests.helpers_models import make_model, with_props

    size = tuple(int(v) for v in args.size.lower().split("x"))
    counts = [int(v) for v in args.rss_counts.split(",")]
    threads = args.decode_threads or default_decode_threads()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="photo_bench-"))
    try:
        t0 = time.perf_counter()
        photos = make_photo_set(work / "photos", args.photos, size, args.quality, threads)
        made_s = time.perf_counter() - t0
        files = make_model(work / "model", input_size=args.input_size, resize_size=args.resize_size,
                           embedding_dim=args.embedding_dim, name="full")
        models = {"full": files.onnx_path, "draft": with_props(files.onnx_path, work / "model" / "draft.onnx",
                                                                decode="draft"), NO_REUSE: files.onnx_path}
        from isfe_model.preprocess import PreprocessSpec

        spec = {k: PreprocessSpec(args.input_size, args.resize_size, decode="draft" if k == "draft" else "full")
                for k in models}
        one = linked_folder(work / "one", photos, 1)
        runs, per_round = _measure_policies(models, spec, photos, one, work, threads, args)
        policies = {k: models[k] for k in ("full", "draft")}
        spinning = _measure_spinning(policies, photos, work, threads, args) if args.spinning_ab else None
        rss = _measure_rss(models["draft"], photos, counts, work, threads, args)
        agree = agreement(models["full"], models["draft"], photos)
        decode = decode_alone_ms(photos[:10], args.resize_size)
        print(f"decode alone, one thread: draft {decode['draft_ms']:.1f} ms, full {decode['full_ms']:.1f} ms per photo",
              flush=True)
        print(f"draft vs full: cosine mean {agree['cosine_mean']:.6f} min {agree['cosine_min']:.6f}; uint8 mean abs "
              f"diff {agree['uint8_mean_abs_diff_mean']:.3f} (max {agree['uint8_mean_abs_diff_max']:.3f})", flush=True)
        lo, hi = str(min(counts)), str(max(counts))
        payload = {
            "benchmark": "photo_bench",
            "photos": {"count": len(photos), "size": list(size), "megapixels": round(size[0] * size[1] / 1e6, 1),
                       "quality": args.quality, "subsampling": "4:2:0",
                       "mean_bytes": int(np.mean([p.stat().st_size for p in photos])),
                       "made_from": "sklearn.datasets.load_sample_images() (china.jpg, flower.jpg): seeded crop "
                                    "55-100 %,"
                                    f" flip, bicubic upscale, uniform noise +-{NOISE_LEVELS}",
                       "made_in_s": round(made_s, 1)},
            "model": {"arch": "resnet18 (seeded, untrained; tests.helpers_models.make_model)",
                      "input_size": args.input_size, "resize_size": args.resize_size,
                      "embedding_dim": args.embedding_dim, "batch_size": args.batch_size},
            "decode_threads": threads, "cores": cores(), "repeats": args.repeats, "quick": args.quick,
            "bytecode": BYTECODE,
            "runs": runs,
            "speedup_draft_over_full": {
                "isfe_index": round(runs["draft"]["index_images_per_s"] / runs["full"]["index_images_per_s"], 2),
                "isfe_index_after_startup": round(runs["draft"]["index_images_per_s_after_startup"]
                                                  / runs["full"]["index_images_per_s_after_startup"], 2),
                "preprocess": round(runs["draft"]["preprocess_images_per_s"]
                                    / runs["full"]["preprocess_images_per_s"], 2),
                "isfe_index_vs_full_without_block_reuse": round(runs["draft"]["index_images_per_s"]
                                                                / runs[NO_REUSE]["index_images_per_s"], 2),
                "full_block_reuse_speedup": round(runs["full"]["index_images_per_s"]
                                                  / runs[NO_REUSE]["index_images_per_s"], 2),
                "per_round": per_round,
                "median_of_rounds": {k: round(float(np.median(v)), 2) for k, v in per_round.items()}},
            "spinning_ab": spinning,
            "peak_rss_by_file_count": rss,
            "peak_rss_growth_mib": round(rss[hi]["max_rss_mib"] - rss[lo]["max_rss_mib"], 1),
            "agreement_draft_vs_full": agree,
            "decode_alone_one_thread": decode,
            "note": ("cores shared with other engineers' work while measured: compare within this run (ratios), "
                     "not absolute numbers") if args.shared_cores else "",
        }
        out = Path(args.out) if args.out else RESULTS / f"photo_bench-{device_tag()}.json"
        write_result(out, payload)
        print(f"wrote {out}")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
