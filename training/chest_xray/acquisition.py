"""Training augmentations that mimic other acquisitions and processing chains.

Each transform takes and returns a (1, H, W) float image in [0, 1] (the network input) and
draws from a numpy generator that MONAI seeds (``set_random_state``). They change the image
only, never its masks: a contour must not move because the film was exposed differently, a
border collimated, a label burned in or a wire laid across the chest.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from functools import partial
from io import BytesIO

import numpy as np
import torch
from monai.transforms import MapTransform, RandomizableTransform
from PIL import Image, ImageDraw, ImageFilter

#: What :func:`acquisition_augmentations` does, for the manifest and the model card.
DESCRIPTION = (
    "exposure (gain and offset), unsharp masking, resampling from a lower resolution, JPEG re-encoding, "
    "collimation borders, burned-in text and markers, tubes and wires (bright and dark curves), "
    "haze over the lungs up to a white-out"
)


def _as_numpy(image: np.ndarray | torch.Tensor) -> np.ndarray:
    return image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)


def _like(result: np.ndarray, original: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    result = np.clip(result, 0.0, 1.0).astype(np.float32)
    return torch.as_tensor(result) if isinstance(original, torch.Tensor) else result


def _to_pil(plane: np.ndarray) -> Image.Image:
    return Image.fromarray(np.round(np.clip(plane, 0, 1) * 255).astype(np.uint8))


def _from_pil(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32) / 255.0


def exposure(plane: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """Another exposure and display window: a gain and an offset."""
    return plane * rng.uniform(0.75, 1.25) + rng.uniform(-0.12, 0.12)


def unsharp(plane: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """Vendor edge enhancement: unsharp masking of a random radius and strength."""
    blurred = _from_pil(_to_pil(plane).filter(ImageFilter.GaussianBlur(rng.uniform(1.0, 6.0))))
    return plane + rng.uniform(0.3, 1.5) * (plane - blurred)


def low_resolution(plane: np.ndarray, rng: np.random.RandomState, lowest: float = 0.25, highest: float = 0.7) -> np.ndarray:
    """An image that came at a lower resolution: down to ``lowest``-``highest`` of its size and back up."""
    height, width = plane.shape
    factor = rng.uniform(lowest, highest)
    small = _to_pil(plane).resize((max(8, int(width * factor)), max(8, int(height * factor))), Image.BILINEAR)
    return _from_pil(small.resize((width, height), Image.BILINEAR))


def reencoded(plane: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """Lossy re-encoding: JPEG at quality 30-90."""
    stream = BytesIO()
    _to_pil(plane).save(stream, format="JPEG", quality=int(rng.randint(30, 91)))
    stream.seek(0)
    with Image.open(stream) as decoded:
        return _from_pil(decoded.convert("L"))


def collimation(plane: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """Collimation: one to four borders set to a flat bright or dark level."""
    height, width = plane.shape
    result = plane.copy()
    level = rng.choice([rng.uniform(0.0, 0.1), rng.uniform(0.85, 1.0)])
    for side in rng.permutation(4)[: rng.randint(1, 5)]:
        depth = int(rng.uniform(0.02, 0.12) * (height if side < 2 else width))
        if side == 0:
            result[:depth] = level
        elif side == 1:
            result[height - depth :] = level
        elif side == 2:
            result[:, :depth] = level
        else:
            result[:, width - depth :] = level
    return result


def burned_in_text(plane: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """Burned-in annotations: a few lines of characters and a side marker, white or black."""
    height, width = plane.shape
    image = _to_pil(plane)
    draw = ImageDraw.Draw(image)
    alphabet = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 :/.-"))
    for _ in range(rng.randint(1, 5)):
        text = "".join(rng.choice(alphabet, rng.randint(3, 14)))
        x, y = rng.randint(0, max(1, width - 40)), rng.choice([rng.randint(0, height // 6), rng.randint(5 * height // 6, height)])
        draw.text((x, y), text, fill=int(rng.choice([0, 255])))
    marker = str(rng.choice(["R", "L", "AP", "PA"]))
    draw.text((rng.randint(0, width - 12), rng.randint(0, height - 12)), marker, fill=255)
    return _from_pil(image)


def tubes_and_wires(plane: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """Lines, tubes and ECG leads: one to four smooth curves, thin and bright or wider and faint."""
    height, width = plane.shape
    image = _to_pil(plane)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(1, 5)):
        anchors = rng.uniform(0, 1, (4, 2)) * (width, height)
        t = np.linspace(0, 1, 40)[:, None]
        curve = ((1 - t) ** 3 * anchors[0] + 3 * (1 - t) ** 2 * t * anchors[1]
                 + 3 * (1 - t) * t**2 * anchors[2] + t**3 * anchors[3])
        bright = rng.rand() < 0.7
        fill = int(rng.uniform(200, 255)) if bright else int(rng.uniform(0, 60))
        draw.line([tuple(point) for point in curve], fill=fill, width=int(rng.randint(1, 4)))
    if rng.rand() < 0.5:  # ECG electrodes: small bright discs
        for _ in range(rng.randint(1, 5)):
            x, y, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(2, 5)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    return _from_pil(image)


def haze(plane: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """Consolidation, fluid or soft-tissue haze: one to three smooth bright blobs, up to a white-out,
    so that opaque lung stays lung."""
    height, width = plane.shape
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    result = plane.copy()
    for _ in range(rng.randint(1, 4)):
        cy, cx = rng.uniform(0.3, 0.85) * height, rng.uniform(0.2, 0.8) * width
        sy, sx = rng.uniform(0.05, 0.18) * height, rng.uniform(0.05, 0.18) * width
        blob = np.exp(-(((ys - cy) / sy) ** 2 + ((xs - cx) / sx) ** 2) / 2)
        result = result + rng.uniform(0.15, 0.8) * blob * (1 - result)
    return result


#: Each kind with its probability per image: the lung UNet's augmentation.
KINDS = (
    (exposure, 0.5),
    (unsharp, 0.3),
    (low_resolution, 0.3),
    (reencoded, 0.3),
    (collimation, 0.25),
    (burned_in_text, 0.3),
    (tubes_and_wires, 0.3),
    (haze, 0.4),
)


#: The classifiers' kinds: the processing differences between the sets (a 224 px re-encoded copy against
#: 512 px originals), without haze (it would look like an opacity on a normal) or borders and text
#: (the input is the lung box). Pixels outside the lungs stay 0, as the node's classifier input has them.
CLASSIFIER_KINDS = (
    (unsharp, 0.3),
    (partial(low_resolution, lowest=0.5, highest=0.9), 0.4),
    (reencoded, 0.4),
    (tubes_and_wires, 0.2),
)
CLASSIFIER_DESCRIPTION = (
    "unsharp masking, resampling from 50-90 % resolution, JPEG re-encoding, tubes and wires; "
    "outside the lungs kept at 0"
)


class RandAcquisitiond(RandomizableTransform, MapTransform):
    """Apply each kind of ``kinds`` with its probability to the image under ``key``; with
    ``keep_background``, pixels that were 0 stay 0.
    """

    def __init__(self, key: str, kinds: Sequence[tuple] = KINDS, keep_background: bool = False) -> None:
        RandomizableTransform.__init__(self, prob=1.0)
        MapTransform.__init__(self, [key])
        self.key = key
        self.kinds = tuple(kinds)
        self.keep_background = keep_background

    def __call__(self, data: Mapping[Hashable, np.ndarray]) -> dict[Hashable, np.ndarray]:
        result = dict(data)
        original = result[self.key]
        planes = _as_numpy(original).astype(np.float32)
        background = planes == 0
        for kind, probability in self.kinds:
            if self.R.rand() < probability:
                planes = np.stack([np.clip(kind(plane, self.R), 0, 1) for plane in planes])
        if self.keep_background:
            planes[background] = 0
        result[self.key] = _like(planes, original)
        return result
