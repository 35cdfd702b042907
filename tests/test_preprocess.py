"""isfe_model.preprocess: real files of every kind, hostile files, and parity with training's evaluation transform."""

from __future__ import annotations

import importlib
import importlib.util
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from isfe_model.preprocess import ImageError, PreprocessSpec, load_image, preprocess, to_uint8_square
from tests.helpers_models import photo, write_image

pp = importlib.import_module("isfe_model.preprocess")  # the module (isfe_model.preprocess is also the function)

SPEC = PreprocessSpec(input_size=16, resize_size=20)


def _check_out(x: np.ndarray, spec: PreprocessSpec = SPEC) -> None:
    assert x.dtype == np.float32 and x.shape == (3, spec.input_size, spec.input_size)
    assert np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0


# --------------------------------------------------------------------------- unusual but valid files


def _unusual_files(d: Path) -> dict[str, Path]:
    """Real files of the kinds the issue lists, written with Pillow."""
    rgb = photo(48, 32, seed=1)
    d.mkdir(parents=True, exist_ok=True)
    f: dict[str, Path] = {}
    f["cmyk_jpeg"] = d / "cmyk.jpg"
    Image.fromarray(rgb).convert("CMYK").save(f["cmyk_jpeg"], quality=95)
    f["png16"] = d / "gray16.png"
    Image.fromarray((np.linspace(0, 65535, 40 * 30).reshape(30, 40)).astype(np.uint16)).save(f["png16"])
    f["palette_gif"] = d / "palette.gif"
    Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=32).save(f["palette_gif"])
    frames = [Image.new("RGB", (30, 20), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    f["animated_gif"] = d / "anim.gif"
    frames[0].save(f["animated_gif"], save_all=True, append_images=frames[1:], duration=50, loop=0)
    rgba = np.dstack([rgb, np.tile(np.linspace(0, 255, 48).astype(np.uint8), (32, 1))])
    f["transparent_png"] = d / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(f["transparent_png"])
    f["la_png"] = d / "la.png"
    Image.fromarray(rgba, "RGBA").convert("LA").save(f["la_png"])
    f["one_pixel"] = write_image(d / "one.png", np.full((1, 1, 3), 77, np.uint8))
    f["strip_2000x1"] = write_image(d / "strip.png", photo(2000, 1, seed=2))
    f["webp"] = write_image(d / "img.webp", rgb, quality=90)
    f["bmp"] = write_image(d / "img.bmp", rgb)
    f["tiff"] = write_image(d / "img.tiff", rgb)
    f["jpeg_named_png"] = d / "actually_jpeg.png"
    Image.fromarray(rgb).save(f["jpeg_named_png"], format="JPEG", quality=90)
    f["bilevel"] = d / "bits.png"
    Image.fromarray(rgb).convert("1").save(f["bilevel"])
    f["exif_rotated"] = _exif_jpeg(d / "rotated.jpg", rgb, orientation=6)
    f["ppm"] = write_image(d / "img.ppm", rgb)
    return f


def _exif_jpeg(path: Path, rgb: np.ndarray, orientation: int) -> Path:
    im = Image.fromarray(rgb)
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    im.save(path, quality=95, exif=exif.tobytes())
    return path


def test_unusual_valid_images_are_decoded(tmp_path):
    files = _unusual_files(tmp_path)
    for kind, path in files.items():
        im = load_image(path)
        assert im.mode == "RGB", kind
        _check_out(preprocess(path, SPEC))


def test_mode_conversions_have_the_documented_values(tmp_path):
    files = _unusual_files(tmp_path)
    # 16-bit gray: v16 -> round(v16 / 257), replicated to RGB
    a16 = np.asarray(Image.open(files["png16"])).astype(np.float64)
    got = np.asarray(load_image(files["png16"]))
    assert np.array_equal(got[..., 0], np.rint(a16 / 257).astype(np.uint8))
    assert np.array_equal(got[..., 0], got[..., 2])
    # transparency composited on white: alpha 0 -> white, alpha 255 -> the colour
    rgba = np.asarray(Image.open(files["transparent_png"]))
    got = np.asarray(load_image(files["transparent_png"])).astype(int)
    a = rgba[..., 3:4] / 255.0
    expect = rgba[..., :3] * a + 255 * (1 - a)
    assert np.abs(got - expect).max() <= 1
    assert (got[:, 0] == 255).all()  # first column fully transparent
    # animated GIF: the first frame (red)
    first = np.asarray(load_image(files["animated_gif"]))
    assert (first == [255, 0, 0]).all()
    # CMYK JPEG comes back close to the RGB it was made from (JPEG loss only)
    back = np.asarray(load_image(files["cmyk_jpeg"])).astype(int)
    assert np.abs(back - photo(48, 32, seed=1)).mean() < 6
    # a JPEG named .png decodes as the JPEG it is
    assert np.abs(np.asarray(load_image(files["jpeg_named_png"])).astype(int) - photo(48, 32, seed=1)).mean() < 4


def test_trns_colour_key_transparency(tmp_path):
    arr = np.zeros((4, 4, 3), np.uint8)
    arr[0, 0] = (10, 20, 30)
    p = tmp_path / "trns.png"
    Image.fromarray(arr).save(p, transparency=(0, 0, 0))  # black is transparent
    got = np.asarray(load_image(p))
    assert tuple(got[0, 0]) == (10, 20, 30)
    assert (got[1:, :] == 255).all()


def test_exif_orientation_is_applied(tmp_path):
    rgb = photo(40, 20, seed=3)
    rgb[:, :10] = (255, 0, 0)  # a red band on the left edge
    plain = _exif_jpeg(tmp_path / "o1.jpg", rgb, orientation=1)
    rot = _exif_jpeg(tmp_path / "o6.jpg", rgb, orientation=6)
    a, b = load_image(plain), load_image(rot)
    assert a.size == (40, 20) and b.size == (20, 40)  # orientation 6: rotate 90 deg clockwise
    expect = np.asarray(a.transpose(Image.Transpose.ROTATE_270)).astype(int)
    assert np.abs(np.asarray(b).astype(int) - expect).max() <= 2
    assert (np.asarray(b)[:8, :, 0] > 200).all()  # the left band is now on top


def test_broken_exif_block_keeps_the_image(tmp_path):
    rgb = photo(20, 10, seed=4)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", exif=b"Exif\x00\x00II*\x00\xff\xff\xff\x7f garbage")
    im = load_image(buf.getvalue())
    assert im.size == (20, 10)


def test_input_kinds_give_identical_arrays(tmp_path):
    rgb = photo(30, 26, seed=5)
    path = write_image(tmp_path / "x.png", rgb)
    ref = preprocess(path, SPEC)
    assert np.array_equal(preprocess(path.read_bytes(), SPEC), ref)
    assert np.array_equal(preprocess(bytearray(path.read_bytes()), SPEC), ref)
    assert np.array_equal(preprocess(memoryview(path.read_bytes()), SPEC), ref)
    assert np.array_equal(preprocess(str(path), SPEC), ref)
    assert np.array_equal(preprocess(Image.open(path), SPEC), ref)
    assert np.array_equal(preprocess(rgb, SPEC), ref)
    assert np.array_equal(preprocess(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]), SPEC), ref)
    gray = rgb[..., 0]
    assert np.array_equal(preprocess(gray, SPEC), preprocess(gray[..., None], SPEC))
    with pytest.raises(ImageError, match="uint8"):
        preprocess(rgb.astype(np.float32), SPEC)
    with pytest.raises(ImageError, match="shape"):
        preprocess(np.zeros((4, 4, 5), np.uint8), SPEC)
    with pytest.raises(ImageError, match="unsupported input type"):
        preprocess(12345, SPEC)  # type: ignore[arg-type]


def test_pil_animation_first_frame_without_moving_callers_image(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    p = tmp_path / "a.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=50)
    im = Image.open(p)
    im.seek(1)
    got = np.asarray(load_image(im))
    assert (got == [255, 0, 0]).all()
    assert im.tell() == 1


# --------------------------------------------------------------------------- hostile files


def _png_header_only(w: int, h: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def hostile_files(d: Path) -> dict[str, tuple[Path, str]]:
    """{kind: (path, regex the error reason must match)}."""
    d.mkdir(parents=True, exist_ok=True)
    jpg = io.BytesIO()
    Image.fromarray(photo(64, 64, seed=6)).save(jpg, format="JPEG")
    png = io.BytesIO()
    Image.fromarray(photo(64, 64, seed=7)).save(png, format="PNG")
    out: dict[str, tuple[Path, str]] = {}

    def put(kind: str, name: str, data: bytes, reason: str) -> None:
        p = d / name
        p.write_bytes(data)
        out[kind] = (p, reason)

    put("bomb_png", "bomb.png", _png_header_only(100_000, 100_000), r"pixels|too large")
    put("truncated_jpeg", "truncated.jpg", jpg.getvalue()[: len(jpg.getvalue()) // 2], r"truncated|corrupt")
    put("truncated_png", "truncated.png", png.getvalue()[: len(png.getvalue()) // 2], r"truncated|corrupt")
    put("html", "page.jpg", b"<!DOCTYPE html><html><body>not an image</body></html>", r"HTML")
    put("svg", "vector.svg", b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
        r"SVG")
    npy = io.BytesIO()
    np.save(npy, np.zeros((4, 4)))
    put("npy", "array.npy", npy.getvalue(), r"NumPy")
    put("empty", "empty.png", b"", r"empty")
    put("text", "notes.txt", b"hello world\n" * 10, r"not a recognised image")
    put("eps", "doc.eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", r"not a recognised image")
    put("random", "noise.jpg", np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes(),
        r"not a recognised image|corrupt|cannot")
    put("png_garbage_body", "garbage.png", png.getvalue()[:60] + b"\x00" * 400, r"truncated|corrupt|cannot")
    (d / "a_folder").mkdir(exist_ok=True)
    out["directory"] = (d / "a_folder", r"directory")
    out["missing"] = (d / "does_not_exist.jpg", r"no such file")
    (d / "dangling.jpg").symlink_to(d / "gone.jpg")
    out["dangling_symlink"] = (d / "dangling.jpg", r"symlink to a missing file")
    if hasattr(os, "mkfifo"):  # reading a FIFO would block forever: refused before it is opened
        os.mkfifo(d / "pipe.png")
        out["fifo"] = (d / "pipe.png", r"named pipe")
    if Path("/dev/zero").exists():  # a device never ends: refused before it is read
        (d / "zero.png").symlink_to("/dev/zero")
        out["device"] = (d / "zero.png", r"a device")
    return out


TRUNCATED_HEADERS = {  # bytes that start like a supported format, cut inside the header
    "JPEG": b"\xff\xd8\xff",
    "PNG": b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIH",
    "GIF": b"GIF89a\x10\x00",
    "WebP": b"RIFF\x10\x00\x00\x00WEBP",
    "TIFF": b"II*\x00\x08\x00\x00\x00",
}


@pytest.mark.parametrize("fmt", sorted(TRUNCATED_HEADERS))
def test_a_truncated_header_is_called_corrupt_not_unsupported(fmt):
    """A file cut inside its header is a damaged JPEG/PNG/..., not "not a recognised image format"."""
    data = TRUNCATED_HEADERS[fmt]
    with pytest.raises(ImageError) as ei:
        preprocess(data, SPEC, name="cut")
    assert ei.value.kind == "corrupt", ei.value
    assert str(ei.value) == f"cut: a {fmt} file whose header is truncated or corrupt ({len(data)} bytes); " \
                            f"copy or save it again"
    for other in (b"hello world", b"BM", b"\x00\x00\x01\x00"):  # no signature, or too weak to count: still unsupported
        with pytest.raises(ImageError, match="not a recognised image format") as ei:
            preprocess(other, SPEC, name="x")
        assert ei.value.kind == "not_an_image"


def test_formats_are_only_those_this_pillow_knows(monkeypatch):
    """A Pillow without the AVIF plugin (older releases, still allowed by pillow>=10) must not be asked for AVIF:
    Image.open(formats=...) raises KeyError('AVIF') for every file that no earlier format accepts."""
    pp = importlib.import_module("isfe_model.preprocess")
    assert pp.available_formats(lambda name: None) == pp.BASE_FORMATS
    has_avif = importlib.util.find_spec("PIL.AvifImagePlugin") is not None
    assert ("AVIF" in pp.SUPPORTED_FORMATS) == has_avif
    assert pp.SUPPORTED_FORMATS[: len(pp.BASE_FORMATS)] == pp.BASE_FORMATS
    # simulate such a Pillow: AVIF unregistered
    Image.init()
    monkeypatch.delitem(Image.OPEN, "AVIF", raising=False)
    monkeypatch.setattr(Image, "ID", [f for f in Image.ID if f != "AVIF"])
    with pytest.raises(KeyError):  # the failure this guards against
        Image.open(io.BytesIO(b"hello world"), formats=pp.BASE_FORMATS + ("AVIF",))
    monkeypatch.setattr(pp, "SUPPORTED_FORMATS", pp.available_formats(lambda name: None))
    with pytest.raises(ImageError, match="not a recognised image format") as ei:
        preprocess(b"hello world", SPEC, name="notes")
    assert ei.value.kind == "not_an_image"
    assert preprocess(_encode_png(), SPEC).shape == (3, SPEC.input_size, SPEC.input_size)


def _encode_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(photo(20, 24, seed=3)).save(buf, format="PNG")
    return buf.getvalue()


def test_oversized_files_are_refused_before_they_are_read(tmp_path, monkeypatch):
    pp = importlib.import_module("isfe_model.preprocess")  # the package's `preprocess` is the function
    monkeypatch.setattr(pp, "MAX_FILE_BYTES", 1000)
    big = tmp_path / "big.png"
    Image.fromarray(photo(64, 64, seed=8)).save(big)
    assert big.stat().st_size > 1000
    with pytest.raises(ImageError, match=r"larger than any image this reads"):
        preprocess(big, SPEC)


def test_hostile_files_raise_image_error_naming_file_and_reason(tmp_path):
    for kind, (path, reason) in hostile_files(tmp_path).items():
        with pytest.raises(ImageError) as ei:
            preprocess(path, SPEC)
        e = ei.value
        assert e.source == str(path), kind
        assert str(path) in str(e), kind
        import re

        assert re.search(reason, e.reason), f"{kind}: {e.reason}"


def test_decompression_bomb_is_refused_before_decoding():
    data = _png_header_only(100_000, 100_000)  # 10^10 pixels announced, ~100 bytes of data
    # Pillow's hard limit (2 x MAX_IMAGE_PIXELS) fires while opening, before our check: the message is still ours
    with pytest.raises(ImageError, match=r"image is 10,000,000,000 pixels, over the limit of 50,000,000; refused "
                                         r"before decoding \(a decompression bomb, or raise max_pixels") as ei:
        load_image(data)
    assert ei.value.kind == "too_large" and "exceeds limit" not in str(ei.value)
    with pytest.raises(ImageError, match=r"10,000,000,000 pixels, over Pillow's own limit of [\d,]+ \(2 x PIL.Image."
                                         r"MAX_IMAGE_PIXELS\).*lift_pillow_pixel_limit") as ei:
        load_image(data, max_pixels=None)  # no limit of our own: still refused, never a 30 GB allocation
    assert ei.value.kind == "too_large"
    data = _png_header_only(10_000, 6_000)  # 6e7 pixels: over our default limit, under Pillow's
    with pytest.raises(ImageError, match="60,000,000 pixels, over the limit of 50,000,000"):
        load_image(data)


def test_max_pixels_is_configurable():
    data = io.BytesIO()
    Image.fromarray(photo(100, 100)).save(data, format="PNG")
    with pytest.raises(ImageError, match="10,000 pixels, over the limit of 5,000"):
        load_image(data.getvalue(), max_pixels=5_000)
    assert load_image(data.getvalue(), max_pixels=10_000).size == (100, 100)
    with pytest.raises(ImageError, match="over the limit"):
        load_image(photo(100, 100), max_pixels=9_999)  # arrays too


# --------------------------------------------------------------------------- resize / crop semantics


def test_resize_and_crop_equal_torchvision_on_many_sizes():
    """The slow twin: torchvision's Resize(R) + CenterCrop(R) + CenterCrop(S) on the PIL image."""
    from torchvision.transforms import CenterCrop, InterpolationMode, Resize

    rng = np.random.default_rng(0)
    for _ in range(60):
        r = int(rng.choice([8, 16, 20, 32, 40]))
        s = int(rng.integers(1, r + 1))
        w, h = int(rng.integers(1, 120)), int(rng.integers(1, 120))
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ref = CenterCrop(s)(CenterCrop(r)(Resize(r, interpolation=InterpolationMode.BILINEAR)(im)))
        got = pp.center_crop_array(to_uint8_square(im, r), s)
        assert np.array_equal(got, np.asarray(ref)), (w, h, r, s)


def test_crop_window_resize_matches_full_resize(monkeypatch):
    """Extreme aspect ratios resample only the crop window; compare with the full resize (within 1/255)."""
    rng = np.random.default_rng(1)
    cases = [(2000, 1, 32), (3, 700, 20), (900, 7, 16), (1, 1500, 24)]
    for w, h, r in cases:
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        full = to_uint8_square(im, r)  # below the threshold: full resize + crop
        monkeypatch.setattr(pp, "MAX_RESIZED_PIXELS", 10)
        window = to_uint8_square(im, r)
        monkeypatch.undo()
        diff = np.abs(full.astype(int) - window.astype(int))
        assert window.shape == (r, r, 3)
        # on noise a misaligned window would differ by up to 255; float rounding of the window's
        # coordinates moves a few values by one step
        assert diff.max() <= 1, (w, h, r, diff.max(), diff.mean())


def test_extreme_strip_stays_small():
    """10^7 x 1 pixels resized to 256 would be 2.56e9 x 256 pixels; the window path needs kilobytes."""
    im = Image.new("L", (10_000_000, 1), 90)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    x = preprocess(buf.getvalue(), PreprocessSpec(input_size=224, resize_size=256))
    assert x.shape == (3, 224, 224)
    assert np.allclose(x, 90 / 255.0)


# --------------------------------------------------------------------------- parity with training


def _training_folder(root: Path) -> list[Path]:
    """train/ and test/ class folders; test/ holds images of many sizes and modes."""
    write_image(root / "train" / "a" / "t0.png", photo(20, 20, seed=10))
    write_image(root / "train" / "b" / "t1.png", photo(20, 20, seed=11))
    test = root / "test"
    files = [
        write_image(test / "a" / "big.jpg", photo(64, 48, seed=12), quality=90),
        write_image(test / "a" / "exact.png", photo(24, 24, seed=13)),
        write_image(test / "a" / "tall.png", photo(17, 61, seed=14)),
        write_image(test / "a" / "tiny.png", photo(3, 2, seed=15)),
        write_image(test / "b" / "wide.bmp", photo(101, 23, seed=16)),
        write_image(test / "b" / "strip.png", photo(300, 1, seed=17)),
    ]
    cmyk = test / "b" / "cmyk.jpg"
    Image.fromarray(photo(40, 30, seed=18)).convert("CMYK").save(cmyk)
    rgba = test / "b" / "alpha.png"
    Image.fromarray(np.dstack([photo(30, 30, seed=19), np.full((30, 30), 100, np.uint8)]), "RGBA").save(rgba)
    g16 = test / "c" / "g16.png"
    g16.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.arange(35 * 25).reshape(25, 35) * 70).astype(np.uint16)).save(g16)
    rot = _exif_jpeg(test / "c" / "rot.jpg", photo(40, 26, seed=20), orientation=6)
    files += [cmyk, rgba, g16, rot]
    # load_split's order: classes sorted, then files sorted within a class
    return sorted(files, key=lambda p: (p.parent.name, p.name))


def test_preprocess_equals_training_evaluation_pipeline(tmp_path, monkeypatch):
    data = pytest.importorskip("training.data", reason="training.data (the lead's loader) is not in this checkout")
    evaluate = pytest.importorskip("training.evaluate", reason="training.evaluate is not in this checkout")
    monkeypatch.setenv("ISFE_CACHE", str(tmp_path / "cache"))
    files = _training_folder(tmp_path / "data")
    spec = PreprocessSpec(input_size=20, resize_size=24)  # S < R: both crops matter
    ds = data.load_split(str(tmp_path / "data"), "test", resize_size=spec.resize_size)
    assert ds.images.shape == (len(files), 24, 24, 3)
    ref = evaluate.eval_tensors(ds.images, spec).numpy()  # torch float [N, 3, 20, 20]
    ours = np.stack([preprocess(f, spec) for f in files])
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    assert np.abs(ours - ref).max() == 0.0  # exact (the issue allows 1/255)
    # and the same through the cache on a second load
    ds2 = data.load_split(str(tmp_path / "data"), "test", resize_size=24)
    assert np.array_equal(np.asarray(ds2.images), np.asarray(ds.images))


# --------------------------------------------------------------------------- Pillow's block reuse


@pytest.fixture
def pillow_blocks():
    """Pillow's arena settings, restored after the test (1 MiB blocks here: small images span several)."""
    size, blocks = Image.core.get_block_size(), Image.core.get_blocks_max()
    Image.core.set_blocks_max(0)
    Image.core.set_block_size(1 << 20)
    yield
    Image.core.set_blocks_max(0)  # frees what the test left cached
    Image.core.set_block_size(size)
    Image.core.set_blocks_max(blocks)


def test_reused_image_blocks_decode_the_same_arrays(pillow_blocks, tmp_path):
    """The slow twin of reuse_image_memory: every array equals the one decoded with reuse off (Pillow's
    reused blocks are not zeroed: a decode that left pixels unwritten would show the previous image)."""
    files = []
    for k, (w, h) in enumerate([(900, 700), (700, 900), (640, 640), (1200, 300)]):
        rgb = photo(w, h, seed=k)
        files.append(write_image(tmp_path / f"p{k}.jpg", rgb, quality=90))
        rgba = np.dstack([rgb, (np.arange(w)[None, :].repeat(h, 0) % 256).astype(np.uint8)])
        files.append(write_image(tmp_path / f"p{k}.png", rgba))
    spec = PreprocessSpec(64, 72)
    truncated = (tmp_path / "p0.jpg").read_bytes()[:-5000]

    def run():
        out = [preprocess(f, spec) for f in files]
        with pytest.raises(ImageError, match="truncated|corrupt"):
            load_image(truncated)
        return out + [preprocess(f, spec) for f in reversed(files)]

    off = run()
    assert pp.reuse_image_memory(8) == 8 and Image.core.get_blocks_max() == 8
    before = Image.core.get_stats()["reused_blocks"]
    on = run()
    assert Image.core.get_stats()["reused_blocks"] > before  # the blocks were really reused
    for a, b in zip(off, on):
        np.testing.assert_array_equal(a, b)


def test_reuse_image_memory_leaves_pillows_environment_variable_in_charge():
    import subprocess
    import sys

    code = "from isfe_model.preprocess import reuse_image_memory as r; print(r(), r(5))"
    env = {k: v for k, v in os.environ.items() if k != "PILLOW_BLOCKS_MAX"}
    default = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert default.stdout.split() == ["8", "5"]
    pinned = subprocess.run([sys.executable, "-c", code], env={**env, "PILLOW_BLOCKS_MAX": "3"},
                            capture_output=True, text=True, check=True)
    assert pinned.stdout.split() == ["3", "3"]
    with pytest.raises(ValueError, match="blocks must be >= 0"):
        pp.reuse_image_memory(-1)
