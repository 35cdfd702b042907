"""Decoding in bounded time and memory (issue 15 class 2): hostile files built here, each refused
(or decoded) by isfe_model.preprocess before it can burn seconds or gigabytes.

Measured before the checks (Intel Xeon, 2 shared cores): the 4 MP progressive JPEG with 1,000
extra scans below decoded in 2.2 s, a PNG of 200,000 empty chunks in 0.4 s (12 MB: 8.7 s), a GIF
with 20,000 comment blocks in 14.6 s, an icon holding a 9000 x 9000 PNG decoded 81 MP (344 MiB)
before the pixel limit refused it, and a 49 MP 16-bit PNG peaked at 1.28 GiB.
"""

from __future__ import annotations

import importlib
import io
import pickle
import struct
import time
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image

from isfe_model.preprocess import ImageError, check_image_bytes, load_image
from tests.helpers_models import photo

pp = importlib.import_module("isfe_model.preprocess")


def _chunk(kind: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _refused(data: bytes, kind: str, match: str, **kw) -> ImageError:
    t0 = time.perf_counter()
    with pytest.raises(ImageError, match=match) as ei:
        load_image(data, name="hostile", **kw)
    assert ei.value.kind == kind and ei.value.source == "hostile"
    assert time.perf_counter() - t0 < 0.5, "refused, but only after decoding"
    return ei.value


# --------------------------------------------------------------------------- JPEG scans


def _jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each segment; an SOS segment includes its entropy-coded data (slow twin of the walk)."""
    out, i = [], 2
    while i < len(data):
        m = data[i + 1]
        if m == 0xD9:
            return out + [(m, i, i + 2)]
        j = i + 2 + struct.unpack(">H", data[i + 2 : i + 4])[0]
        if m == 0xDA:
            while True:
                k = data.index(b"\xff", j)
                if data[k + 1] == 0 or 0xD0 <= data[k + 1] <= 0xD7:
                    j = k + 2
                    continue
                j = k
                break
        out.append((m, i, j))
        i = j
    return out


def _many_scans(side: int, extra: int) -> tuple[bytes, int]:
    """A progressive JPEG whose last scan (a refinement pass over the whole image) is repeated ``extra`` times."""
    data = _encode(Image.new("L", (side, side), 128), "JPEG", progressive=True, quality=90)
    scans = [s for s in _jpeg_segments(data) if s[0] == 0xDA]
    _, start, end = scans[-1]
    return data[:end] + data[start:end] * extra + data[end:], len(scans)


def test_progressive_jpeg_with_thousands_of_scans_is_refused_before_decoding():
    data, normal = _many_scans(2000, 1000)  # 30 KB; decoded in 2.2 s before the check
    assert 4 <= normal <= 12 and len(data) < 40_000
    e = _refused(data, "too_complex", r"JPEG of more than 250 scans")
    assert "baseline JPEG or PNG" in e.reason
    # the allowance is JPEG_SCAN_PASSES passes over the largest allowed image: a small image may have more scans
    small, _ = _many_scans(64, 300)
    assert load_image(small).size == (64, 64)
    over, _ = _many_scans(64, pp.MAX_JPEG_SCANS)
    _refused(over, "too_complex", r"more than 1,000 scans", max_pixels=None)  # the absolute cap, without a pixel limit


def _one_scan_repeated(im: Image.Image, extra: int, components_in_scan: int | None = None) -> bytes:
    """A baseline JPEG whose single scan is repeated ``extra`` times; with ``components_in_scan`` the
    scan header is rewritten to code only that many of the frame's components (a non-interleaved scan)."""
    data = _encode(im, "JPEG", quality=90)
    scans = [s for s in _jpeg_segments(data) if s[0] == 0xDA]
    assert len(scans) == 1
    _, start, end = scans[0]
    scan = data[start:end]
    if components_in_scan is not None:
        head_len = struct.unpack(">H", scan[2:4])[0]
        k = components_in_scan
        selectors, spectral = scan[5 : 5 + 2 * k], scan[5 + 2 * scan[4] : 2 + head_len]
        head = b"\xff\xda" + struct.pack(">HB", 6 + 2 * k, k) + selectors + spectral
        scan = head + scan[2 + head_len :]
    return data[:start] + scan * (1 + extra) + data[end:]


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_a_baseline_jpeg_with_its_one_scan_repeated_fails_after_one_pass(mode):
    """SOF0 and a first scan of every component: libjpeg knows the image has one scan and stops with an
    error at the next SOS, so the walk need not search the scan's data (most of a photo's bytes)."""
    im = Image.fromarray(photo(64, 64, seed=2)).convert(mode)
    many = _one_scan_repeated(im, 5000)  # ~10 MB of scans
    check_image_bytes(many)  # nothing to refuse: the extra scans are never decoded
    t0 = time.perf_counter()
    with pytest.raises(ImageError, match="broken data stream") as ei:
        load_image(many, name="hostile")
    assert ei.value.kind == "corrupt"
    assert time.perf_counter() - t0 < 0.5, "failed, but only after decoding the extra scans"


def test_a_sequential_jpeg_whose_first_scan_lacks_components_still_has_its_scans_counted():
    """Ns < Nf: libjpeg expects more scans and decodes every one, so they are counted as in a progressive file."""
    im = Image.fromarray(photo(64, 64, seed=2))
    over = _one_scan_repeated(im, pp.MAX_JPEG_SCANS, components_in_scan=1)
    _refused(over, "too_complex", r"JPEG of more than 1,000 scans")
    fine = _one_scan_repeated(im, 2, components_in_scan=1)
    check_image_bytes(fine)


def test_normal_progressive_and_baseline_jpegs_decode():
    rgb = photo(300, 200, seed=1)
    for kw in ({"progressive": True}, {}, {"progressive": True, "subsampling": 0}):
        data = _encode(Image.fromarray(rgb), "JPEG", quality=90, **kw)
        check_image_bytes(data)
        assert np.abs(np.asarray(load_image(data)).astype(int) - rgb).mean() < 6
    cmyk = _encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", progressive=True)
    assert load_image(cmyk).size == (300, 200)


def test_jpeg_of_thousands_of_marker_segments_is_refused():
    data = _encode(Image.new("RGB", (16, 16)), "JPEG")
    comments = b"\xff\xfe\x00\x03x" * 5000  # 5,000 COM segments, Pillow parses each in Python
    _refused(data[:2] + comments + data[2:], "too_complex", r"more than 4,000 marker segments")


# --------------------------------------------------------------------------- PNG chunks


def _png_with(n: int, chunk: bytes, where: str = "before") -> bytes:
    d = _encode(Image.new("RGB", (8, 8), (1, 2, 3)), "PNG")
    i = d.index(b"IDAT") - 4 if where == "before" else len(d) - 12
    return d[:i] + chunk * n + d[i:]


@pytest.mark.parametrize("chunk,where", [(_chunk(b"abCd"), "before"), (_chunk(b"IDAT"), "before"),
                                         (_chunk(b"tEXt"), "after")])
def test_png_of_many_empty_chunks_is_refused(chunk, where):
    data = _png_with(200_000, chunk, where)  # 2.4 MB, 0.1-0.4 s of Pillow's Python before the check (12 MB: 8.7 s)
    _refused(data, "too_complex", r"PNG of more than [\d,]+ chunks")


def test_png_split_into_small_idat_chunks_still_decodes():
    rgb = photo(200, 150, seed=2)
    d = _encode(Image.fromarray(rgb), "PNG", compress_level=0)  # ~90 KB of image data
    chunks, pos = [], 8
    while pos < len(d):
        n = struct.unpack(">I", d[pos : pos + 4])[0]
        chunks.append((d[pos + 4 : pos + 8], d[pos + 8 : pos + 8 + n]))
        pos += 12 + n
    idat = b"".join(body for kind, body in chunks if kind == b"IDAT")
    small = [_chunk(b"IDAT", idat[k : k + 1024]) for k in range(0, len(idat), 1024)]
    rechunked = d[:8] + _chunk(*chunks[0]) + b"".join(small) + _chunk(b"IEND")
    assert rechunked.count(b"IDAT") > 80
    assert np.array_equal(np.asarray(load_image(rechunked)), rgb)


# --------------------------------------------------------------------------- GIF, BMP, PNM


def _gif_with_comment(blocks: int, size: int = 255) -> bytes:
    g = _encode(Image.new("P", (8, 8)), "GIF")
    i = 13 + 3 * 2 ** ((g[10] & 7) + 1) if g[10] & 0x80 else 13
    return g[:i] + b"!\xfe" + (bytes([size]) + b"x" * size) * blocks + b"\x00" + g[i:]


def test_gif_comment_of_many_blocks_is_refused():
    _refused(_gif_with_comment(20_000), "too_complex", r"more than 4,096 extension blocks")  # was 14.6 s
    _refused(_gif_with_comment(300_000, 1), "too_complex", r"extension blocks")
    assert load_image(_gif_with_comment(10)).size == (8, 8)


def test_gif_first_frame_larger_than_its_screen_meets_the_pixel_limit():
    g = (b"GIF89a" + struct.pack("<HHBBB", 10, 10, 0, 0, 0) + b"," + struct.pack("<HHHHB", 0, 0, 3000, 3000, 0)
         + b"\x02\x02\x44\x01\x00;")
    _refused(g, "too_large", r"3000x3000 = 9,000,000 pixels, over the limit of 1,000,000", max_pixels=1_000_000)


def _rle8_bmp(w: int, h: int) -> bytes:
    pix = (b"\x01\x05" * w + b"\x00\x00") * h + b"\x00\x01"  # one pixel per run: the slowest RLE
    hdr = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 8, 1, len(pix), 2835, 2835, 256, 0)
    off = 14 + 40 + 1024
    return b"BM" + struct.pack("<IHHI", off + len(pix), 0, 0, off) + hdr + b"\x00" * 1024 + pix


def test_python_decoded_formats_are_size_capped():
    _refused(_rle8_bmp(1500, 1500), "too_complex", r"run-length compressed BMP of 4\.3 MiB")
    assert load_image(_rle8_bmp(40, 30)).size == (40, 30)
    plain = b"P3\n900 900\n255\n" + b"0 " * (900 * 900 * 3)
    _refused(plain, "too_complex", r"plain-text \(ASCII\) PNM")
    assert load_image(b"P3\n2 1\n255\n255 0 0 0 0 255\n").getpixel((1, 0)) == (0, 0, 255)


def _tiff_of_strips(n: int, big_endian: bool = False) -> bytes:
    """An uncompressed 1 x n gray TIFF with one row per strip (n strips)."""
    o = ">" if big_endian else "<"
    entries = [(256, 4, 1, 1), (257, 4, 1, n), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1), (273, 4, n, 0),
               (277, 3, 1, 1), (278, 4, 1, 1), (279, 4, n, 0)]
    offsets = 8 + 2 + 12 * len(entries) + 4
    counts, pixels = offsets + 4 * n, offsets + 8 * n
    entries[5], entries[8] = (273, 4, n, offsets), (279, 4, n, counts)
    ifd = struct.pack(o + "H", len(entries)) + b"".join(_tiff_entry(o, *e) for e in entries)
    head = (b"MM\x00*" if big_endian else b"II*\x00") + struct.pack(o + "I", 8)
    return (head + ifd + b"\0\0\0\0" + np.arange(pixels, pixels + n, dtype=o + "u4").tobytes()
            + np.ones(n, o + "u4").tobytes() + bytes(range(256)) * (n // 256) + bytes(n % 256))


def _tiff_entry(o: str, tag: int, kind: int, count: int, value: int) -> bytes:
    if kind == 3 and count == 1:  # a SHORT value sits left-justified in the 4-byte field
        return struct.pack(o + "HHIHH", tag, kind, count, value, 0)
    return struct.pack(o + "HHII", tag, kind, count, value)


def test_tiff_of_a_million_strips_is_refused():
    _refused(_tiff_of_strips(1_000_000), "too_complex", r"TIFF of 1,000,000 strips or tiles")  # was 11 s, 420 MiB
    _refused(_tiff_of_strips(100_000, big_endian=True), "too_complex", r"TIFF of 100,000 strips")
    small = load_image(_tiff_of_strips(3000))  # a tall image with a strip per row is fine
    assert small.size == (1, 3000) and np.asarray(small)[:256, 0, 0].tolist() == list(range(256))
    deflated = _encode(Image.fromarray(photo(300, 200, seed=9)), "TIFF", compression="tiff_deflate")
    assert load_image(deflated).size == (300, 200)


# --------------------------------------------------------------------------- ICO


def _ico(frames: list[bytes], sides: list[int]) -> bytes:
    head = struct.pack("<HHH", 0, 1, len(frames))
    offset, entries = 6 + 16 * len(frames), b""
    for data, side in zip(frames, sides):
        entries += struct.pack("<BBBBHHII", side % 256, side % 256, 0, 0, 1, 32, len(data), offset)
        offset += len(data)
    return head + entries + b"".join(frames)


def test_icon_embedded_png_is_checked_before_pillow_decodes_it():
    big = _encode(Image.new("RGB", (1200, 1000)), "PNG")  # the directory says 16 x 16
    e = _refused(_ico([big], [16]), "too_large", r"icon image #1 is 1200x1000 = 1,200,000 pixels", max_pixels=1_000_000)
    assert "over the limit of 1,000,000" in e.reason
    small = _encode(Image.new("RGB", (16, 16), (9, 8, 7)), "PNG")
    _refused(_ico([small, big], [16, 32]), "too_large", r"icon image #2", max_pixels=1_000_000)  # every frame
    bomb = _png_with(200_000, _chunk(b"abCd"))
    _refused(_ico([bomb], [8]), "too_complex", r"chunks")


def test_icon_dib_frame_with_huge_header_is_refused():
    dib = struct.pack("<IiiHHIIiiII", 40, 30000, 60000, 1, 32, 0, 0, 0, 0, 0, 0) + b"\x00" * 64
    _refused(_ico([dib], [0]), "too_large", r"icon image #1 is 30000x60000")


def test_genuine_icons_decode():
    ico = _encode(Image.fromarray(photo(64, 64, seed=3)), "ICO", sizes=[(16, 16), (32, 32), (64, 64)])
    check_image_bytes(ico)
    assert load_image(ico).size == (64, 64)


# --------------------------------------------------------------------------- memory: banded conversion, budget


def _mode_images() -> dict[str, Image.Image]:
    rng = np.random.default_rng(4)
    rgb = photo(130, 97, seed=5)
    alpha = rng.integers(0, 256, rgb.shape[:2], dtype=np.uint8)
    f = rng.random(rgb.shape[:2], dtype=np.float32)
    f[3, 5], f[7, 1], f[9, 9] = np.nan, np.inf, -np.inf
    out = {
        "I;16": Image.fromarray(rng.integers(0, 65536, rgb.shape[:2], dtype=np.uint16)),
        "I": Image.fromarray(rng.integers(-10, 3000, rgb.shape[:2]).astype(np.int32)),
        "I small": Image.fromarray(rng.integers(0, 200, rgb.shape[:2]).astype(np.int32)),
        "F normalised": Image.fromarray(f),
        "F 0..255": Image.fromarray(f * 255),
        "RGBA": Image.fromarray(np.dstack([rgb, alpha]), "RGBA"),
        "LA": Image.fromarray(np.dstack([rgb, alpha]), "RGBA").convert("LA"),
        "P": Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=50),
        "1": Image.fromarray(rgb).convert("1"),
        "CMYK": Image.fromarray(rgb).convert("CMYK"),
    }
    trns = Image.fromarray(rgb)
    trns.info["transparency"] = tuple(int(v) for v in rgb[0, 0])
    out["RGB tRNS"] = trns
    pal = out["P"].copy()
    pal.info["transparency"] = 3
    out["P tRNS"] = pal
    return out


def test_banded_conversion_equals_converting_the_whole_image(monkeypatch):
    """The slow twin: one band (the whole image) against bands of 7 rows."""
    for kind, im in _mode_images().items():
        whole = np.asarray(pp._to_rgb(im))
        monkeypatch.setattr(pp, "CONVERT_CHUNK_PIXELS", 130 * 7)
        banded = np.asarray(pp._to_rgb(im))
        monkeypatch.undo()
        assert banded.shape == (97, 130, 3) and np.array_equal(banded, whole), kind


def test_integer_conversion_equals_the_float_formula():
    """The slow twin of the integer path: every 16-bit value, and int32 values around 0..65535 and beyond."""
    rng = np.random.default_rng(8)
    v16 = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    v32 = np.concatenate([np.arange(-600, 70_000), rng.integers(-(2**31), 2**31 - 1, 10_000)]).astype(np.int32)
    for arr in (v16, v32.reshape(1, -1)):
        for op in ("/257", "none"):
            fast = np.asarray(pp._gray_to_rgb(Image.fromarray(arr), op))
            slow = np.asarray(pp._gray_to_rgb_float(arr, op))
            assert np.array_equal(fast, slow), (arr.dtype, op)


def test_16_bit_png_conversion_memory_is_bounded():
    """numpy temporaries of the 16-bit conversion (tracemalloc sees them): 96 MB for 4 MP before, one band now."""
    data = _encode(Image.fromarray(np.full((2000, 2000), 1000, np.uint16)), "PNG")
    tracemalloc.start()
    try:
        im = load_image(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert im.getpixel((5, 5)) == (4, 4, 4)  # round(1000 / 257)
    assert peak < 40e6, peak


def test_decode_memory_budget_is_mode_aware(monkeypatch):
    assert pp.decode_bytes("RGB", (100, 10)) == 4_000  # Pillow stores RGB in 4 bytes; no conversion
    assert pp.decode_bytes("I;16", (100, 10)) == 6_000  # 2 decoded + 4 for the RGB result
    assert pp.decode_bytes("RGBA", (100, 10)) == pp.decode_bytes("F", (100, 10)) == 8_000
    assert pp.decode_bytes("RGB", (100, 10), transparency=True) == 8_000
    rgb, rgba = photo(100, 100, seed=6), np.zeros((100, 100, 4), np.uint8)
    monkeypatch.setattr(pp, "DECODE_BYTES_PER_PIXEL", 5)  # a tighter budget: RGB fits, RGBA does not
    assert load_image(_encode(Image.fromarray(rgb), "PNG"), max_pixels=10_000).size == (100, 100)
    e = _refused(_encode(Image.fromarray(rgba, "RGBA"), "PNG"), "too_large", r"100x100 RGBA image needs about",
                 max_pixels=10_000)
    assert "bytes per allowed pixel" in e.reason


def test_image_without_orientation_is_not_copied():
    im = Image.open(io.BytesIO(_encode(Image.fromarray(photo(20, 10, seed=7)), "JPEG")))
    assert pp._oriented(im) is im


# --------------------------------------------------------------------------- errors


def test_image_errors_pickle_with_their_kind():
    """A process pool sends errors back pickled; the kind says which status to answer."""
    with pytest.raises(ImageError) as ei:
        load_image(b"")
    e = pickle.loads(pickle.dumps(ei.value))
    assert (e.source, e.reason, e.kind, str(e)) == (ei.value.source, "empty file (0 bytes)", "empty", str(ei.value))
    for data, kind in ((b"hello world", "not_an_image"), (_encode(Image.new("RGB", (200, 200)), "PNG"), "too_large")):
        with pytest.raises(ImageError) as ei:
            load_image(data, max_pixels=100)
        assert ei.value.kind == kind
        assert ei.value.kind in pp.ERROR_KINDS
