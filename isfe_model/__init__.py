"""isfe_model: torch-free inference for ISFE image embeddings (ONNX Runtime).

>>> from isfe_model import Encoder, Gallery
>>> enc = Encoder("model.onnx")                    # reads dim + preprocessing from the model
>>> enc = Encoder.from_pretrained("quickstart")    # an installed model wheel, a package folder or hf:ORG/REPO
>>> x = enc.embed(["a.jpg", "b.png"])              # float32 [2, D], unit rows
>>> gal = Gallery.build(enc, "photos/")            # ids = relative paths, labels = class folders
>>> gal.save("photos.gallery"); gal = Gallery.load("photos.gallery", encoder=enc)
>>> gal.search(enc.embed("query.jpg"), k=5).hits()  # [{"rank", "id", "score", "label", "metadata"}, ...]

Depends only on numpy, pillow and onnxruntime (or onnxruntime-gpu); never
imports torch or the training/export/serving code.
"""

from ._version import __version__
from .encoder import Encoder, ModelError, runtime_info
from .gallery import Gallery, GalleryError, SearchResult
from .metadata import MetadataError, ModelMetadata
from .packages import ModelPackage, list_models
from .preprocess import DEFAULT_MAX_PIXELS, ImageError, PreprocessSpec, load_image, preprocess

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "Encoder",
    "Gallery",
    "GalleryError",
    "ImageError",
    "MetadataError",
    "ModelError",
    "ModelMetadata",
    "ModelPackage",
    "PreprocessSpec",
    "SearchResult",
    "list_models",
    "load_image",
    "preprocess",
    "runtime_info",
    "__version__",
]
