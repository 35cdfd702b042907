"""ISFE HTTP serving: FastAPI app with micro-batched ONNX Runtime inference.

Run ``python -m serving --model MODEL.onnx --gallery GALLERY_DIR``; see
:mod:`serving.app` for the endpoints, :mod:`serving.batcher` for batching,
:mod:`serving.reload` for gallery reload, :mod:`serving.auth` for API keys and
:mod:`serving.metrics` for the Prometheus metrics (also across ``--workers``).
"""
