"""What the chest X-ray pipeline segments and draws, by name and colour: shared by the
pipeline, its overlay and its plug-in's output description."""

from __future__ import annotations

#: Tracking name of the lung segment, the key of its mask in ``ImageResult.masks``.
LUNGS = "lungs"
LUNG_COLOUR = (0, 255, 0)
REGION_COLOUR = (255, 0, 255)
