"""isfe_model: torch-free inference for ISFE image embeddings (ONNX Runtime)."""

from .metadata import MetadataError, ModelMetadata
from .preprocess import ImageError, PreprocessSpec, load_image, preprocess

__version__ = "0.1.0"

__all__ = ["ImageError", "MetadataError", "ModelMetadata", "PreprocessSpec", "load_image", "preprocess", "__version__"]
