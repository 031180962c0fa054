"""Render a result over its image: heat-map, lung contour, optional second contour."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

LUNG_COLOUR = (0, 255, 0)
REGION_COLOUR = (255, 255, 0)
ALPHA = 0.45


def _jet(values: np.ndarray) -> np.ndarray:
    """Return an (..., 3) uint8 jet-like colour map of values in [0, 1]."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    red = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    green = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    blue = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return np.round(np.concatenate([red, green, blue], axis=-1) * 255).astype(np.uint8)


def contour(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """Return the boolean outline (``width`` pixels, inside the mask) of a boolean mask."""
    return mask & ~ndimage.binary_erosion(mask, iterations=width)


def render_overlay(
    display: np.ndarray,
    lung_mask: np.ndarray,
    heatmap: np.ndarray | None = None,
    outline: np.ndarray | None = None,
) -> np.ndarray:
    """Return an RGB uint8 image: ``display`` with the heat-map blended where it is > 0,
    the lung contour in green and ``outline`` (e.g. a finding's region or a reference mask) in yellow.
    """
    rgb = np.repeat(display[..., None], 3, axis=-1).astype(np.float32)
    if heatmap is not None:
        hot = heatmap > 0
        rgb[hot] = (1 - ALPHA) * rgb[hot] + ALPHA * _jet(heatmap[hot])
    width = max(1, round(max(display.shape) / 400))
    rgb[contour(lung_mask, width)] = LUNG_COLOUR
    if outline is not None:
        rgb[contour(outline, width)] = REGION_COLOUR
    return np.round(rgb).astype(np.uint8)
