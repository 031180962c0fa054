"""Grad-CAM localization (``monai.visualize.GradCAM``) restricted to the lungs, at source resolution."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.transforms import Resize
from monai.visualize import GradCAM
from torch import nn

GRADCAM_LAYER = "class_layers.relu"
REGION_LEVEL = 0.5


class LungGradCAM:
    """Grad-CAM of one output of a classifier, mapped back into the source image and masked to the lungs."""

    def __init__(self, network: nn.Module, layer: str = GRADCAM_LAYER, class_index: int = 0) -> None:
        self.cam = GradCAM(nn_module=network, target_layers=layer)
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
