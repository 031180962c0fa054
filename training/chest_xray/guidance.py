"""Opacity guidance: a training loss that moves a classifier's class activation map onto
annotated opacities, so that its Grad-CAM points where the finding is.

For a network whose last feature map ``A`` (Grad-CAM layer ``class_layers.relu``) is
average-pooled into one linear output, Grad-CAM of that layer is proportional to the
class activation map ``Σ_k w_k A_k``. The loss treats a softmax of that map over the
lung cells as where the network points, and maximises the share it puts on opacity:
``-log Σ_c p_c · o_c``, ``o_c`` the opacity fraction of the lung in cell ``c``. It is
blind to the map's scale and offset, so it does not pull against the classification loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GUIDED_LAYER = "class_layers.relu"
LUNG_CELL = 0.05  # a cell takes part when at least this fraction of it is lung


class ActivationMap:
    """Captures the last feature map of a MONAI ``DenseNet`` and returns its class activation map."""

    def __init__(self, network: nn.Module, output: int = 0) -> None:
        self.network = network
        self.output = output
        self.features: torch.Tensor | None = None
        self._hook = network.get_submodule(GUIDED_LAYER).register_forward_hook(self._keep)

    def _keep(self, _module: nn.Module, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        self.features = output

    def last(self, count: int) -> torch.Tensor:
        """Return the (count, h, w) class activation maps of the last ``count`` images of the latest forward pass."""
        if self.features is None:
            raise RuntimeError("no forward pass has been captured yet")
        weight = self.network.get_submodule("class_layers.out").weight[self.output]
        return torch.einsum("nchw,c->nhw", self.features[-count:], weight)

    def close(self) -> None:
        """Remove the forward hook."""
        self._hook.remove()


def pointing_loss(cam: torch.Tensor, opacity: torch.Tensor, lung: torch.Tensor) -> torch.Tensor:
    """Return the mean ``-log`` share of the lung-restricted softmax of ``cam`` (N, h, w) that lies on opacity.

    ``opacity`` and ``lung`` are (N, 1, H, W) masks of the network input, pooled here
    onto the cells of ``cam``. Images with no opacity left in their lungs are skipped
    (the loss is zero when none has).
    """
    cells = cam.shape[-2:]
    lung_share = F.adaptive_avg_pool2d(lung.float(), cells)[:, 0]
    opacity_share = F.adaptive_avg_pool2d((opacity * lung).float(), cells)[:, 0]
    inside = lung_share >= LUNG_CELL
    on_opacity = torch.where(inside, opacity_share / lung_share.clamp_min(1e-6), torch.zeros_like(cam)).flatten(1)
    scores = cam.masked_fill(~inside, float("-inf")).flatten(1)
    keep = (on_opacity.sum(1) > 0) & inside.flatten(1).any(1)
    if not keep.any():
        return cam.sum() * 0.0
    share = (torch.softmax(scores[keep], dim=1) * on_opacity[keep]).sum(1)
    return -torch.log(share.clamp_min(1e-6)).mean()
