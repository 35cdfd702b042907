"""Hostile visitors and hostile galleries against the Gradio demo (issue 15, class 1).

Every case is generated here (a few KB on disk) and, where it concerns what a
visitor can reach, driven through a server launched on loopback: Gradio's
file route (``/gradio_api/file=PATH``), its upload route, and the demo's API.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

pytest.importorskip("gradio_client")
httpx = pytest.importorskip("httpx")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from tests.helpers_models import free_port, main_stderr  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def forge(src_gallery: Path, dst: Path, ids: list[str] | None = None, source: str | None = None) -> Path:
    """A copy of a gallery (written with the gallery API) with other ids and/or another manifest source."""
    from isfe_model import Gallery

    g = Gallery.load(src_gallery)
    items = [dict(it) for it in g.items]
    for it, new_id in zip(items, ids or []):
        it["id"] = new_id
    manifest = dict(g.manifest)
    if source is not None:
        manifest["source"] = source
    Gallery(g.embeddings, items, manifest).save(dst)
    return dst


@pytest.fixture(scope="module")
def world(tmp_path_factory, model):
    """images/ (a gallery's folder, with non-image files beside the images), outside/, index_root/, gallery/."""
    from isfe_model import Encoder, Gallery
    from tests.helpers_models import make_images

    root = tmp_path_factory.mktemp("hostile")
    images = root / "images"
    make_images(images, per_class=3, size=24, classes=("a", "b"))
    enc = Encoder(str(model.onnx_path))
    Gallery.build(enc, str(images)).save(root / "gallery")
    (images / "secret.txt").write_text("beside the gallery images")
    (images / "a" / "notes.txt").write_text("inside a class folder")
    # an image, not in the gallery
    (images / "b" / "not_indexed.png").write_bytes((images / "b" / "000.png").read_bytes())
    outside = root / "outside"
    make_images(outside, per_class=1, size=24, classes=("x",), seed=3)
    (outside / "secret.txt").write_text("outside the image folder")
    index_root = root / "index_root"
    make_images(index_root / "cats", per_class=2, size=24, classes=("c", "d"), seed=5)
    (index_root / "escape").symlink_to(outside, target_is_directory=True)  # a folder link out of ROOT
    make_images(index_root / "mixed", per_class=2, size=24, classes=("m",), seed=6)
    (index_root / "mixed" / "m" / "link.png").symlink_to(outside / "x" / "000.png")  # a file link out of the folder
    (root / "elsewhere").mkdir()
    return {"root": root, "images": images, "outside": outside, "index_root": index_root, "model": str(model.onnx_path),
            "gallery": root / "gallery", "encoder": enc}


def _start(world, *extra: str):
    from demo.__main__ import build_parser, start

    args = build_parser().parse_args(["--model", world["model"], "--gallery", str(world["gallery"]),
                                      "--port", str(free_port()), *extra])
    blocks, url = start(args, prevent_thread_lock=True, quiet=True)
    client = Client(url, verbose=False, analytics_enabled=False, download_files=str(world["root"] / "downloads"))
    return blocks, url, client


@pytest.fixture(scope="module")
def plain(world):
    """A demo started the default way (no --allow-indexing), with a 10 KiB upload limit."""
    blocks, url, client = _start(world, "--max-upload-mb", "0.01", "--examples", "2")
    try:
        yield {"blocks": blocks, "url": url, "client": client}
    finally:
        blocks.close()


@pytest.fixture(scope="module")
def indexing(world):
    blocks, url, client = _start(world, "--allow-indexing", str(world["index_root"]))
    try:
        yield {"blocks": blocks, "url": url, "client": client}
    finally:
        blocks.close()


def _get(url: str, path: str | Path) -> int:
    return httpx.get(f"{url}gradio_api/file={path}", timeout=30).status_code


def _run_main(argv: list[str]) -> tuple[int, str]:
    """``python -m demo`` in this process: (exit code, stderr)."""
    from demo.__main__ import main

    return main_stderr(main, argv)


# ----------------------------------------------------------------------------- start-up refusals


def test_unsafe_galleries_and_roots_are_refused_at_start(world, tmp_path):
    images, outside, g = world["images"], world["outside"], world["gallery"]
    linked = tmp_path / "linked_images"  # an image folder where one gallery file is a symlink to a file outside it
    linked.mkdir()
    for cls in ("a", "b"):
        (linked / cls).symlink_to(images / cls, target_is_directory=True)  # class folders linked out
    home = Path.home()
    cases = [
        (forge(g, tmp_path / "g_root", source="/"), [], "root of the file system"),
        (forge(g, tmp_path / "g_etc", source="/etc"), [], "system folder"),
        (g, ["--images-root", "/"], "root of the file system"),
        (forge(g, tmp_path / "g_dotdot", ids=["../outside/x/000.png"]), [], "'..' component"),
        (forge(g, tmp_path / "g_abs", ids=["/etc/passwd"]), [], "absolute path"),
        (forge(g, tmp_path / "g_deep", ids=["a/../../outside/secret.txt"]), [], "'..' component"),
        (forge(g, tmp_path / "g_link", source=str(linked)), [], "symlink"),
        (g, ["--allow-indexing", "/"], "root of the file system"),
        (g, ["--allow-indexing", str(tmp_path / "missing")], "no such folder"),
    ]
    if home.is_dir() and home.resolve() != Path("/"):
        cases.append((forge(g, tmp_path / "g_home", source=str(home)), [], "home folder"))
    for gallery, extra, needle in cases:
        t0 = time.perf_counter()
        code, err = _run_main(
            ["--model", world["model"], "--gallery", str(gallery), "--port", str(free_port()), *extra]
        )
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("demo: error:") and needle in lines[0], (
            extra, err)
        assert time.perf_counter() - t0 < 30  # refused, not served
    # the message names the bad id and the fix
    code, err = _run_main(
        ["--model", world["model"], "--gallery", str(tmp_path / "g_dotdot"), "--port", str(free_port())]
    )
    assert "../outside/x/000.png" in err and "--images-root" in err and str(outside) not in err


def test_check_gallery_ids_and_contained(world, tmp_path):
    from demo.paths import UnsafePathError, check_gallery_ids, contained

    root = world["images"].resolve()
    assert contained(root, "a/000.png") == root / "a" / "000.png"
    (root / "a" / "inner_link.png").symlink_to(root / "b" / "000.png")  # a link that stays inside is fine
    try:
        assert contained(root, "a/inner_link.png") == root / "b" / "000.png"
        assert check_gallery_ids(["a/000.png", "a/inner_link.png", "b/001.jpg"], root, "g") == 3
    finally:
        (root / "a" / "inner_link.png").unlink()
    for bad in ("", "/etc/passwd", "../x.png", "a/../../x.png", "~root/x.png", "a\x00.png", 7, None):
        with pytest.raises(UnsafePathError):
            contained(root, bad)
    with pytest.raises(UnsafePathError, match=r"2 of 3 item ids"):
        check_gallery_ids(["a/000.png", "../a.png", "/b.png"], root, "g")


def test_broad_folders(tmp_path):
    from demo.paths import broad_reason

    assert broad_reason(Path("/")) == "is the root of the file system"
    for p in ("/etc", "/usr", "/tmp", "/home", "/var"):
        assert broad_reason(Path(p)) is not None, p
    home = Path.home().resolve()
    assert broad_reason(home) is not None and (home == Path("/") or broad_reason(home.parent) is not None)
    assert broad_reason(tmp_path.resolve()) is None
    assert broad_reason(Path("/data/images")) is None


# ----------------------------------------------------------------------------- what the file route serves


def test_file_route_serves_only_the_published_gallery_images(plain, world):
    url, images, blocks = plain["url"], world["images"], plain["blocks"]
    examples = [Path(p) for p in blocks.allowed_paths]
    assert len(examples) == 2 and all(p.is_relative_to(images.resolve()) for p in examples)
    for p in examples:  # the example images the UI shows work
        r = httpx.get(f"{url}gradio_api/file={p}", timeout=30)
        assert r.status_code == 200 and r.content == p.read_bytes()
    everything = sorted(p for p in world["root"].rglob("*") if p.is_file() and "downloads" not in p.parts)
    refused = [p for p in everything if p.resolve() not in examples]
    assert len(refused) >= 15
    codes = {str(p): _get(url, p) for p in refused}
    assert set(codes.values()) <= {403, 404}, {k: v for k, v in codes.items() if v not in (403, 404)}
    for trick in (f"{images}/a/../secret.txt", f"{images}//secret.txt", f"{images}/a/%2e%2e/secret.txt",
                  f"{examples[0]}/../../secret.txt", "/etc/passwd", "../../../../etc/passwd",
                  str(world["gallery"] / "manifest.json"), world["model"]):
        assert _get(url, trick) in (403, 404), trick


def test_example_picker_stays_in_the_image_root(world, tmp_path):
    from demo.app import pick_examples

    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    png = (world["images"] / "a" / "000.png").read_bytes()
    (root / "a" / "ok.png").write_bytes(png)
    (root / "a" / "out.png").symlink_to(world["outside"] / "x" / "000.png")
    (root / "a" / "txt.png").symlink_to(world["outside"] / "secret.txt")  # named .png, really a .txt outside
    (root / "a" / "inside_txt.png").symlink_to(world["images"] / "secret.txt")
    (root / "notes.html").write_text("<script>alert(1)</script>")

    class G:  # the picker only reads .items
        items = [{"id": i, "label": "a"} for i in ("../../outside/x/000.png", "/etc/passwd", "a/out.png", "a/txt.png",
                                                   "a/inside_txt.png", "notes.html", "a/ok.png", "a/missing.png")]

    assert pick_examples(G(), root, n=10) == [str((root / "a" / "ok.png").resolve())]


# ----------------------------------------------------------------------------- indexing and saving


def test_indexing_is_off_by_default(plain, world):
    client = plain["client"]
    before = client.predict(handle_file(str(world["images"] / "a" / "000.png")), 3, api_name="/search")[1]
    for folder, save in ((str(world["index_root"] / "cats"), ""),
                         (str(world["images"]), str(world["root"] / "elsewhere" / "g"))):
        with pytest.raises(AppError, match="indexing is off.*--allow-indexing ROOT"):
            client.predict(folder, save, False, api_name="/build_gallery")
    assert not (world["root"] / "elsewhere" / "g").exists()
    after = client.predict(handle_file(str(world["images"] / "a" / "000.png")), 3, api_name="/search")[1]
    assert after["gallery"] == before["gallery"]


def test_indexing_only_under_root(indexing, world):
    client, ir, root = indexing["client"], world["index_root"], world["root"]
    fingerprint = client.predict(
        handle_file(str(world["images"] / "a" / "000.png")), 1, api_name="/search"
    )[1]["gallery"]
    refusals = [
        ((str(world["images"]), ""), "not under"),  # an existing folder outside ROOT
        ((str(root / "nowhere"), ""), "not under"),  # a missing one: the same message (no existence oracle)
        (("../images", ""), "not under"),  # relative, climbing out
        ((f"{ir}/cats/../../images", ""), "not under"),
        (("escape", ""), "not under"),  # a symlinked folder inside ROOT that points outside
        (("/", ""), "not under"),
        (("mixed", ""), "symlinks to files outside"),  # a folder holding a file link out
        (("cats", str(root / "elsewhere" / "g")), "not below"),  # saving outside ROOT
        (("cats", "../elsewhere/g"), "not below"),
        (("cats", "escape/g"), "not below"),  # saving through a symlink out of ROOT
        (("cats", str(ir)), "not below"),  # ROOT itself
        (("cats", "."), "not below"),
        (("nope", ""), "not a folder"),
    ]
    for (folder, save), needle in refusals:
        with pytest.raises(AppError, match=needle):
            client.predict(folder, save, False, api_name="/build_gallery")
    assert not (root / "elsewhere" / "g").exists() and not any((world["outside"]).glob("g*"))
    assert client.predict(
        handle_file(str(world["images"] / "a" / "000.png")), 1, api_name="/search"
    )[1]["gallery"] == fingerprint
    # inside ROOT it works, relative or absolute, and saves below ROOT
    msg, info, _ = client.predict("cats", "saved/cats_gallery", False, api_name="/build_gallery")
    assert info["gallery"]["count"] == 4 and info["gallery"]["image_root"] == str((ir / "cats").resolve())
    assert (ir / "saved" / "cats_gallery" / "manifest.json").is_file()
    msg, info, _ = client.predict(str(ir / "cats" / "c"), "", False, api_name="/build_gallery")
    assert info["gallery"]["count"] == 2


# ----------------------------------------------------------------------------- uploads


def test_upload_limit(plain, world, tmp_path):
    url, client = plain["url"], plain["client"]
    big = tmp_path / "big.png"
    big.write_bytes((world["images"] / "a" / "000.png").read_bytes() + os.urandom(12 << 10))  # 12 KiB > 10 KiB
    r = httpx.post(f"{url}gradio_api/upload", files={"files": ("big.png", big.read_bytes(), "image/png")}, timeout=30)
    assert r.status_code == 413 and "size" in r.text.lower()
    # gradio_client checks the limit it reads from the server
    with pytest.raises(ValueError, match="maximum file size"):
        client.predict(handle_file(str(big)), 2, api_name="/search")
    small = world["images"] / "a" / "000.png"
    assert client.predict(handle_file(str(small)), 2, api_name="/search")[1]["count"] == 2


def test_size_checked_before_decoding(world, tmp_path):
    from demo.app import DemoError, DemoState
    from isfe_model import Gallery

    enc = world["encoder"]
    state = DemoState(
        enc, Gallery.load(world["gallery"], encoder=enc), world["images"].resolve(), "t", max_upload_bytes=1000
    )
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 2000)  # would be a decode error, but the size comes first
    with pytest.raises(DemoError, match=r"the image is 2 KiB; this demo takes images up to 1 KiB \(--max-upload-mb\)"):
        state.search(str(big), 3)
    small = world["images"] / "a" / "000.png"
    assert small.stat().st_size < 1000 and state.search(str(small), 2)[1]["count"] == 2


def _call(url: str, api: str, data: list) -> str:
    """The raw queue API: POST the call, read its event stream; returns the stream text."""
    r = httpx.post(f"{url}gradio_api/call/{api}", json={"data": data}, timeout=30)
    r.raise_for_status()
    return httpx.get(f"{url}gradio_api/call/{api}/{r.json()['event_id']}", timeout=60).text


def test_query_must_be_an_uploaded_file(plain, world):
    url = plain["url"]
    good = world["images"] / "a" / "000.png"
    stream = _call(
        url, "search", [{"path": str(world["outside"] / "x" / "000.png"), "meta": {"_type": "gradio.FileData"}}, 2]
    )
    assert "event: error" in stream and "hits" not in stream
    data_url = "data:image/png;base64," + base64.b64encode(good.read_bytes()).decode()
    stream = _call(url, "search", [{"path": None, "url": data_url, "meta": {"_type": "gradio.FileData"}}, 2])
    assert "event: error" in stream and "hits" not in stream


# ----------------------------------------------------------------------------- binding, temporary files


def test_bind_warning():
    from demo.paths import bind_warning

    for host in ("127.0.0.1", "127.3.2.1", "::1", "localhost"):
        assert bind_warning(host) is None, host
    for host in ("0.0.0.0", "::", "10.1.2.3", "192.168.0.7"):
        w = bind_warning(host)
        assert w and "--host 127.0.0.1" in w and "anyone" in w, host
    assert "/srv/pics" in bind_warning("0.0.0.0", Path("/srv/pics"))


def test_start_warns_before_binding_all_interfaces(world, caplog):
    """`--host 0.0.0.0` logs the warning before launching; the port is taken here, so nothing is ever served."""
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        port = taken.getsockname()[1]
        with caplog.at_level("WARNING", logger="demo"):
            code, err = _run_main(["--model", world["model"], "--gallery", str(world["gallery"]), "--host", "0.0.0.0",
                                   "--port", str(port), "--allow-indexing", str(world["index_root"])])
    assert code == 2 and err.startswith("demo: error:"), err
    warnings = [r.getMessage() for r in caplog.records if r.name == "demo" and r.levelname == "WARNING"]
    assert len(warnings) == 1 and "all network interfaces" in warnings[0] and str(world["index_root"]) in warnings[0]


def _wait_up(url: str, proc: subprocess.Popen, limit: float = 120) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "exited"
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.3)
    raise AssertionError("the demo did not start")


def test_temporary_files_are_removed(world, tmp_path):
    """A real `python -m demo` process: uploads age out while it runs; its private temp folder is gone after SIGTERM."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "GRADIO_TEMP_DIR"}
    env.update(TMPDIR=str(tmp), GRADIO_ANALYTICS_ENABLED="False", PYTHONPATH=str(REPO))
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    proc = subprocess.Popen([sys.executable, "-m", "demo", "--model", world["model"],
                             "--gallery", str(world["gallery"]),
                             "--port", str(port), "--temp-minutes", "0.03", "--threads", "1"],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_up(url, proc)
        private = [p for p in tmp.iterdir() if p.name.startswith("isfe-demo-")]
        assert len(private) == 1 and (private[0].stat().st_mode & 0o077) == 0  # one private folder, 0700
        query = world["images"] / "b" / "001.jpg"
        r = httpx.post(
            f"{url}gradio_api/upload", files={"files": ("q.jpg", query.read_bytes(), "image/jpeg")}, timeout=30
        )
        uploaded = Path(r.json()[0])
        assert uploaded.is_relative_to(private[0]) and uploaded.is_file()
        client = Client(url, verbose=False, analytics_enabled=False, download_files=str(tmp_path / "dl"))
        assert client.predict(handle_file(str(query)), 3, api_name="/search")[1]["count"] == 3
        t0 = time.monotonic()
        # --temp-minutes 0.03: older than ~2 s, checked every ~2 s
        while uploaded.exists() and time.monotonic() - t0 < 20:
            time.sleep(0.5)
        assert not uploaded.exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    err = proc.stderr.read().decode()
    assert code == 0, err
    assert not [p for p in tmp.iterdir() if p.name.startswith("isfe-demo-")], list(tmp.iterdir())
    assert "WARNING" not in err  # loopback: no bind warning


def test_search_still_matches_isfe_model(plain, world):
    """The hardening leaves results unchanged: hits equal Gallery.search(Encoder.embed(...))."""
    from isfe_model import Gallery

    enc = world["encoder"]
    gallery = Gallery.load(world["gallery"], encoder=enc)
    q = world["images"] / "b" / "002.png"
    _, result = plain["client"].predict(handle_file(str(q)), 4, api_name="/search")
    ref = gallery.search(enc.embed([str(q)]), 4).hits(0)
    assert [h["id"] for h in result["hits"]] == [h["id"] for h in ref]
    np.testing.assert_allclose([h["score"] for h in result["hits"]], [h["score"] for h in ref], atol=1e-5)
    assert json.dumps(result)  # plain JSON
