"""ISFE HTTP serving: FastAPI app with micro-batched ONNX Runtime inference.

Run ``python -m serving --model MODEL.onnx --gallery GALLERY_DIR``; see
:mod:`serving.app` for the endpoints and :mod:`serving.batcher` for batching.
"""
