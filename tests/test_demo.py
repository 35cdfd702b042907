"""Tests for the Gradio demo (demo/): launched on loopback, driven with gradio_client."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from tests.helpers_models import free_port, main_stderr  # noqa: E402


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    from isfe_model import Encoder, Gallery
    from tests.helpers_models import build_model, make_images

    root = tmp_path_factory.mktemp("demo")
    model = build_model(root / "model.onnx", arch="resnet18", embedding_dim=32, input_size=16)
    make_images(root / "images", per_class=6, size=24)
    make_images(root / "other_images", per_class=3, size=24, seed=7, classes=("a", "b"))
    enc = Encoder(str(model))
    Gallery.build(enc, str(root / "images")).save(root / "gallery")
    return {"root": root, "model": str(model), "gallery": str(root / "gallery"), "images": root / "images",
            "encoder": enc}


@pytest.fixture(scope="module")
def demo(artifacts):
    from demo.__main__ import build_parser, start

    port = free_port()
    args = build_parser().parse_args(["--model", artifacts["model"], "--gallery", artifacts["gallery"],
                                      "--port", str(port), "--max-k", "20", "--concurrency", "3",
                                      # the Gallery tab indexes (and saves) only under this folder: pytest's base temp
                                      "--allow-indexing", str(artifacts["root"].parent)])
    blocks, url = start(args, prevent_thread_lock=True, quiet=True)
    try:
        assert url.startswith(f"http://127.0.0.1:{port}")
        client = Client(url, verbose=False, analytics_enabled=False,
                        download_files=str(artifacts["root"] / "downloads"))
        yield {"blocks": blocks, "client": client, "url": url}
    finally:
        blocks.close()


def _reference(artifacts, path: Path, k: int, gallery=None):
    from isfe_model import Gallery

    enc = artifacts["encoder"]
    gallery = gallery or Gallery.load(artifacts["gallery"], encoder=enc)
    return gallery.search(enc.embed([str(path)]), k).hits(0)


def test_api_lists_search_endpoint_and_analytics_off(demo):
    api = demo["client"].view_api(print_info=False, return_format="dict")
    assert "/search" in api["named_endpoints"] and "/build_gallery" in api["named_endpoints"]
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
    assert demo["blocks"]._queue.default_concurrency_limit > 1


def test_search_equals_isfe_model(demo, artifacts):
    client = demo["client"]
    paths = sorted(artifacts["images"].rglob("*.*"))
    for path, k in zip(paths[::4], (1, 3, 5, 18, 8)):
        grid, result = client.predict(handle_file(str(path)), k, api_name="/search")
        ref = _reference(artifacts, path, k)
        assert result["k"] == k and result["count"] == len(ref) == min(k, 18)
        assert [h["id"] for h in result["hits"]] == [h["id"] for h in ref]
        assert [h["label"] for h in result["hits"]] == [h["label"] for h in ref]
        np.testing.assert_allclose([h["score"] for h in result["hits"]], [h["score"] for h in ref], atol=1e-5)
        assert len(grid) == len(ref)
        for cell, hit in zip(grid, ref):
            assert hit["id"] in cell["caption"] and f"#{hit['rank']}" in cell["caption"]
            assert Path(cell["image"]).is_file()  # the thumbnail was served


def test_several_users_at_once(demo, artifacts):
    client = demo["client"]
    paths = sorted(artifacts["images"].rglob("*.*"))[:6]
    jobs = [client.submit(handle_file(str(p)), 4, api_name="/search") for p in paths]
    for p, job in zip(paths, jobs):
        _, result = job.result(timeout=120)
        assert [h["id"] for h in result["hits"]] == [h["id"] for h in _reference(artifacts, p, 4)]


def test_bad_inputs_give_clear_errors(demo, artifacts, tmp_path):
    client = demo["client"]
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    good = sorted(artifacts["images"].rglob("*.png"))[0]
    with pytest.raises(AppError, match="not a recognised image format"):
        client.predict(handle_file(str(text)), 3, api_name="/search")
    with pytest.raises(AppError, match="upload an image"):
        client.predict(None, 3, api_name="/search")
    with pytest.raises(AppError, match="minimum"):
        client.predict(handle_file(str(good)), 0, api_name="/search")  # gradio's slider bounds
    with pytest.raises(AppError, match="k must be a whole number"):
        client.predict(handle_file(str(good)), 2.5, api_name="/search")
    with pytest.raises(AppError, match="not a folder"):
        client.predict(str(tmp_path / "missing"), "", False, api_name="/build_gallery")
    # still serving
    _, result = client.predict(handle_file(str(good)), 2, api_name="/search")
    assert result["count"] == 2


def test_build_gallery_from_folder_replaces_and_saves(demo, artifacts, tmp_path):
    from isfe_model import Gallery

    client = demo["client"]
    other = artifacts["root"] / "other_images"
    save = tmp_path / "new_gallery"
    msg, info, header = client.predict(str(other), str(save), False, api_name="/build_gallery")
    assert "6 images" in msg and str(save) in msg
    assert info["gallery"]["count"] == 6 and info["gallery"]["image_root"] == str(other.resolve())
    saved = Gallery.load(save, encoder=artifacts["encoder"])
    assert len(saved) == 6
    query = sorted(other.rglob("*.*"))[0]
    try:
        _, result = client.predict(handle_file(str(query)), 4, api_name="/search")
        ref = _reference(artifacts, query, 4, gallery=saved)
        assert [h["id"] for h in result["hits"]] == [h["id"] for h in ref]
        assert result["hits"][0]["id"] == "a/000.png"
        # saving over an existing gallery needs the overwrite box
        with pytest.raises(AppError, match="overwrite"):
            client.predict(str(other), str(save), False, api_name="/build_gallery")
    finally:
        # put the original gallery back for the other tests
        client.predict(str(artifacts["images"]), "", False, api_name="/build_gallery")
    _, result = client.predict(handle_file(str(query)), 1, api_name="/search")
    assert "/" in result["hits"][0]["id"]  # class folders again


def _run_main(argv: list[str]) -> tuple[int, str]:
    """``python -m demo`` in this process: (exit code, stderr)."""
    from demo.__main__ import main

    return main_stderr(main, argv)


def test_startup_errors(artifacts, tmp_path):
    # a gallery whose manifest names no image folder needs --images-root
    g = tmp_path / "gallery"
    shutil.copytree(artifacts["gallery"], g)
    manifest = json.loads((g / "manifest.json").read_text())
    manifest.pop("source", None)
    (g / "manifest.json").write_text(json.dumps(manifest))
    port = str(free_port())
    cases = [
        (["--model", artifacts["model"], "--gallery", str(g), "--port", port], "--images-root"),
        (["--model", artifacts["model"], "--gallery", str(g), "--images-root", str(tmp_path / "nope"), "--port", port],
         "not a folder"),
        (["--model", str(tmp_path / "missing.onnx"), "--gallery", artifacts["gallery"], "--port", port],
         "no such file"),
        (["--model", artifacts["model"], "--gallery", str(tmp_path / "missing"), "--port", port], "no such folder"),
    ]
    for argv, needle in cases:
        code, err = _run_main(argv)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("demo: error:") and needle in lines[0], err


def test_resolve_image_root_variants(artifacts, tmp_path):
    from demo.app import DemoError, resolve_image_root

    class G:
        def __init__(self, source):
            self.manifest = {"source": source} if source is not None else {}

    images = artifacts["images"]
    assert resolve_image_root(G(str(images)), None) == images.resolve()
    assert resolve_image_root(G(f"12 files under {images}"), None) == images.resolve()
    # next to the gallery
    assert resolve_image_root(G("images"), None, artifacts["root"] / "gallery") == images.resolve()
    assert resolve_image_root(G(None), str(images)) == images.resolve()
    with pytest.raises(DemoError, match="--images-root"):
        resolve_image_root(G(None), None)
    with pytest.raises(DemoError, match="not a folder"):
        resolve_image_root(G(str(tmp_path / "gone")), None)


def test_a_busy_port_is_one_line_before_the_model_loads(tmp_path, capsys):
    from demo.__main__ import main
    from tests.helpers_models import busy_port_argv

    code, port = busy_port_argv(main, tmp_path)
    assert code == 2
    err = capsys.readouterr().err
    assert err.endswith(f"demo: error: 127.0.0.1:{port} is already in use (another server?); stop it or choose "
                        f"another --port\n"), err
