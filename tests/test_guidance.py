"""Opacity guidance trains the map that Grad-CAM shows, towards the opacity."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import DenseNet

from pipelines.chest_xray.gradcam import LungGradCAM
from pipelines.chest_xray.preprocess import InputSpec
from training.chest_xray.guidance import GUIDED_LAYER, ActivationMap, pointing_loss
from training.chest_xray.train import _guide_batches


def _network() -> DenseNet:
    torch.manual_seed(0)
    return DenseNet(2, 1, 1, init_features=8, growth_rate=4, block_config=(2, 2, 2, 2)).eval()


def test_the_guided_map_is_what_gradcam_shows() -> None:
    """The node's lung heat-map of the guided layer is the rectified, upsampled activation map
    scaled to a maximum of 1: high where the evidence is (MONAI's default scaling flips it)."""
    network = _network()
    images = torch.rand(2, 1, 64, 64)
    activations = ActivationMap(network)
    network(images)
    cam = activations.last(2).detach()
    activations.close()
    expected = F.interpolate(F.relu(cam)[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    expected = expected / expected.amax(dim=(1, 2), keepdim=True)
    whole = (slice(0, 64), slice(0, 64))
    shown = LungGradCAM(network, GUIDED_LAYER).heatmaps(images, [whole, whole], [np.ones((64, 64), bool)] * 2)
    assert np.allclose(np.stack(shown), expected.numpy(), atol=1e-4)


def test_the_loss_is_lower_when_the_map_points_at_the_opacity() -> None:
    lung = torch.ones(1, 1, 8, 8)
    opacity = torch.zeros(1, 1, 8, 8)
    opacity[..., 4:, :4] = 1  # the lower-left cell of a 2 × 2 map
    on = torch.tensor([[[0.0, 0.0], [5.0, 0.0]]])
    off = torch.tensor([[[5.0, 0.0], [0.0, 0.0]]])
    assert pointing_loss(on, opacity, lung) < 0.1 < pointing_loss(off, opacity, lung)


def test_descending_the_loss_moves_the_peak_onto_the_opacity_inside_the_lungs() -> None:
    lung = torch.zeros(1, 1, 8, 8)
    lung[..., :, 4:] = 1  # the lungs are the right half: the left cells do not count
    opacity = torch.zeros(1, 1, 8, 8)
    opacity[..., 4:, :] = 1
    cam = torch.tensor([[[9.0, 1.0], [9.0, 0.0]]], requires_grad=True)
    optimizer = torch.optim.SGD([cam], lr=1.0)
    for _ in range(20):
        optimizer.zero_grad()
        pointing_loss(cam, opacity, lung).backward()
        optimizer.step()
    inside = cam.detach()[0, :, 1]
    assert int(inside.argmax()) == 1
    assert torch.equal(cam.detach()[0, :, 0], torch.tensor([9.0, 9.0]))  # outside the lungs: no gradient


def test_images_without_opacity_in_their_lungs_add_nothing() -> None:
    lung = torch.ones(2, 1, 8, 8)
    opacity = torch.zeros(2, 1, 8, 8)
    cam = torch.randn(2, 2, 2, requires_grad=True)
    loss = pointing_loss(cam, opacity, lung)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(cam.grad) == 0


def test_guide_batches_flip_image_and_masks_together() -> None:
    """The few guidance images are also seen mirrored, with their opacity and lung masks mirrored alike."""
    image = np.zeros((8, 64, 64), dtype=np.uint8)
    image[:, :, :16] = 255  # bright where the opacity is: the left quarter
    opacity = (image > 0).astype(np.uint8)
    guide = {"images": image, "opacity": opacity, "lung": np.ones_like(opacity), "split": np.array(["train"] * 8)}
    batches = _guide_batches(guide, workers=0, spec=InputSpec(64))
    sides = set()
    for _ in range(6):
        batch = next(batches)
        for pixels, mask in zip(batch["image"][:, 0], batch["opacity"][:, 0], strict=True):
            left, right = mask[:, :32].sum(), mask[:, 32:].sum()
            sides.add("left" if left > right else "right")
            assert mask.any() and pixels[mask > 0].mean() > pixels[mask == 0].mean()  # the image moved with its mask
    assert sides == {"left", "right"}
