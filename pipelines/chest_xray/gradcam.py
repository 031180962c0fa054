"""Grad-CAM localization (``monai.visualize.GradCAM``) restricted to the lungs, at source resolution."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.transforms import Resize
from monai.visualize import GradCAM
from scipy import ndimage
from torch import nn

GRADCAM_LAYER = "class_layers.relu"
REGION_LEVEL = 0.5
PEAK_LEVEL = 0.7  # fixed before the opacity-guided covid19 model was scored (weights/MODEL_CARD.md)


def _unscaled(maps: torch.Tensor) -> torch.Tensor:
    return maps


class LungGradCAM:
    """Grad-CAM of one output of a classifier, mapped back into the source image and masked to the lungs."""

    def __init__(self, network: nn.Module, layer: str = GRADCAM_LAYER, class_index: int = 0) -> None:
        # MONAI's default post-processing maps (min, max) to (1, 0), flipping the map: keep the
        # rectified activation as it is and scale it inside the lungs below.
        self.cam = GradCAM(nn_module=network, target_layers=layer, postprocessing=_unscaled)
        self.class_index = class_index

    def heatmaps(
        self,
        batch: torch.Tensor,
        boxes: Sequence[tuple[slice, slice]],
        lung_masks: Sequence[np.ndarray],
    ) -> list[np.ndarray]:
        """Return one float32 heat-map per image: source resolution, in [0, 1], zero outside the lungs.

        ``boxes`` are the source regions the inputs of ``batch`` were cropped from.
        Each map is rescaled so that its maximum inside the lungs is 1 (all zero when
        the class activation is zero everywhere in the lungs).
        """
        with torch.enable_grad():
            maps = self.cam(x=batch, class_idx=self.class_index).detach().float().cpu()
        results = []
        for cam, box, mask in zip(maps, boxes, lung_masks, strict=True):
            full = np.zeros(mask.shape, dtype=np.float32)
            height, width = box[0].stop - box[0].start, box[1].stop - box[1].start
            full[box] = np.asarray(Resize((height, width), mode="bilinear")(cam), dtype=np.float32)[0]
            full *= mask
            peak = float(full.max())
            results.append(full / peak if peak > 0 else full)
        return results


def region(heatmap: np.ndarray, level: float = REGION_LEVEL) -> np.ndarray:
    """Return the boolean region where ``heatmap`` reaches ``level`` (inside the lungs by construction)."""
    return heatmap >= level


def peak(heatmap: np.ndarray, level: float = PEAK_LEVEL) -> tuple[int, int]:
    """Return the (row, column) ``heatmap`` points at: the centroid of its strongest connected
    region at ``level`` of its maximum (by summed heat), moved onto that region when it falls outside.

    Not the plain arg-max: upsampling a coarse activation map holds its outer cells constant
    up to the edge of the box, and the first pixel of such a plateau lies on the lung border.
    """
    top = heatmap >= level * float(heatmap.max())
    labels, count = ndimage.label(top)
    strongest = 1 + int(np.argmax(ndimage.sum(heatmap, labels, range(1, count + 1))))
    component = labels == strongest
    row, column = (int(round(c)) for c in ndimage.center_of_mass(component))
    if not component[row, column]:
        _, nearest = ndimage.distance_transform_edt(~component, return_indices=True)
        row, column = (int(i) for i in nearest[:, row, column])
    return row, column
