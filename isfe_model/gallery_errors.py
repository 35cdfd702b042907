"""GalleryError: the one error class of the gallery modules (isfe_model.gallery, gallery_files, walk).

Its own module so that the folder walk (:mod:`isfe_model.walk`), the file format
(:mod:`isfe_model.gallery_files`) and the Gallery class (:mod:`isfe_model.gallery`,
which re-exports it) raise the same class without importing each other in a circle.
"""

from __future__ import annotations

__all__ = ["GalleryError"]


class GalleryError(ValueError):
    """A gallery that is missing, damaged, or built with another model; the message says the fix."""
