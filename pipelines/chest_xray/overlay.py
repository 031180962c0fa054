"""Drawing a result over its image: the heat-map as a colour map, and mask contours.

Shared by the evaluation PNGs, ``dicom-node analyze`` and the node's Secondary
Capture writer, so every picture of a result looks the same.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from pipelines.chest_xray.legend import LUNG_COLOUR, REGION_COLOUR

#: Heat below this is left transparent; above it the colour map fades in up to MAX_ALPHA.
HEAT_FLOOR = 0.2
MAX_ALPHA = 0.55

# A jet-like map: blue, cyan, yellow, red.
_ANCHORS = np.array([0.0, 0.35, 0.65, 1.0])
_COLOURS = np.array([(0, 0, 255), (0, 255, 255), (255, 255, 0), (255, 0, 0)], dtype=np.float32)
_LUT = np.stack([np.interp(np.linspace(0, 1, 256), _ANCHORS, _COLOURS[:, i]) for i in range(3)],
                axis=-1).astype(np.float32)


#: Rows blended at a time: the float temporaries of a band stay a few MiB at any image size.
BLEND_ROWS = 256


def blend_heatmap(rgb: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """Return ``rgb`` (uint8, H x W x 3) with ``heat`` ([0, 1], H x W) blended in as a colour map."""
    blended = np.empty_like(rgb)
    for top in range(0, rgb.shape[0], BLEND_ROWS):
        rows = slice(top, top + BLEND_ROWS)
        band = np.asarray(heat[rows], np.float32)
        alpha = (np.clip((band - HEAT_FLOOR) / (1.0 - HEAT_FLOOR), 0.0, 1.0) * MAX_ALPHA)[..., None]
        colours = _LUT[np.round(np.clip(band, 0.0, 1.0) * 255).astype(np.uint8)]
        blended[rows] = np.round(rgb[rows] * (1.0 - alpha) + colours * alpha)
    return blended


def draw_contour(rgb: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> None:
    """Draw the inner boundary of ``mask`` on ``rgb`` in place, about 0.3 % of the image wide."""
    width = max(2, round(0.003 * min(mask.shape)))
    mask = mask.astype(bool)
    rgb[mask & ~ndimage.binary_erosion(mask, iterations=width)] = colour


def render_overlay(
    display: np.ndarray,
    lung_mask: np.ndarray,
    heatmap: np.ndarray | None = None,
    outlines: Sequence[np.ndarray] = (),
) -> np.ndarray:
    """Return an RGB uint8 image: ``display`` with the heat-map blended within the lungs,
    the lung contour in green and each of ``outlines`` (findings' regions or reference
    masks) in magenta.
    """
    rgb = np.repeat(display[..., None], 3, axis=-1)
    if heatmap is not None:
        rgb = blend_heatmap(rgb, np.where(lung_mask, heatmap, 0.0))
    draw_contour(rgb, lung_mask, LUNG_COLOUR)
    for outline in outlines:
        draw_contour(rgb, outline, REGION_COLOUR)
    return rgb
