"""Training augmentation for a ``lung`` classifier input: the lung mask another segmenter would draw.

The node zeroes everything outside the (dilated) lung mask before a ``lung`` classifier sees the
image, so the mask's edge is part of the input. On other hospitals' images the UNet's edge sits a
few pixels in or out of where it sits on its training sets; a classifier that reads the edge then
scores the same lungs differently. This transform moves the edge at random during training.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.transforms import MapTransform, RandomizableTransform
from scipy import ndimage


def margin_text(margin: int) -> str:
    """Return what :class:`RandLungMargind` does at ``margin``, for the manifest."""
    return f"lung mask edge moved in or out by 0-{margin} px of the input (erosion or dilation) before masking"


class RandLungMargind(RandomizableTransform, MapTransform):
    """Mask the unmasked lung box under ``image`` with the mask under ``keep`` eroded or dilated by a
    uniformly drawn 0-``margin`` px (half of the time each way); ``keep`` is dropped from the result.
    """

    def __init__(self, image: str, keep: str, margin: int) -> None:
        RandomizableTransform.__init__(self, prob=1.0)
        MapTransform.__init__(self, [image, keep])
        self.image, self.keep, self.margin = image, keep, margin

    def __call__(self, data: Mapping[Hashable, np.ndarray]) -> dict[Hashable, np.ndarray]:
        result = dict(data)
        keep = np.asarray(result.pop(self.keep)) > 0
        steps = int(self.R.randint(0, self.margin + 1))
        if steps:
            move = ndimage.binary_dilation if self.R.rand() < 0.5 else ndimage.binary_erosion
            plane = ndimage.generate_binary_structure(2, 1)[None]  # (1, H, W): never across channels
            keep = move(keep, structure=plane, iterations=steps)
        image = result[self.image]
        masked = np.asarray(image, dtype=np.float32) * keep
        result[self.image] = torch.as_tensor(masked) if isinstance(image, torch.Tensor) else masked
        return result
