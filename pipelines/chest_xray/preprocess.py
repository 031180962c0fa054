"""Turn DICOM data sets and PNG/JPEG files into :class:`ImageInput`, and images into network inputs.

DICOM: stored values → Modality LUT → VOI LUT or window (or a percentile window when
the data set has none) → MONOCHROME1 inversion, for any bit depth and every transfer
syntax pydicom can decode with the installed pylibjpeg/pyjpegls plugins. The networks
see the windowed ``display`` image, which is what their 8-bit training images are.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from monai.transforms import Resize, ScaleIntensityRangePercentiles
from PIL import Image
from pydicom import Dataset
from pydicom.pixels import apply_modality_lut
from scipy import ndimage

from pipelines.base import GateVerdict, ImageInput, pixel_spacing
from pipelines.errors import InputError, SkippedByGate, WeightsError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
PERCENTILES = (0.5, 99.5)


def load_dataset(dataset: Dataset) -> ImageInput:
    """Return the :class:`ImageInput` of a single-frame grayscale DICOM image.

    Raises :class:`InputError` when the pixel data are missing, undecodable, not
    single-frame grayscale, or constant.
    """
    photometric = str(dataset.get("PhotometricInterpretation", "")).upper()
    if photometric not in {"MONOCHROME1", "MONOCHROME2"}:
        raise InputError(f"photometric interpretation {photometric or 'missing'} is not grayscale")
    try:
        stored = dataset.pixel_array
    except Exception as exc:  # pydicom raises many types for missing plugins / bad data
        raise InputError(f"cannot decode pixel data: {type(exc).__name__}") from exc
    if stored.ndim != 2:
        raise InputError(f"expected one 2-D frame, got pixel array of shape {stored.shape}")
    pixels = np.asarray(apply_modality_lut(stored, dataset), dtype=np.float32)
    display = _dicom_display(pixels, dataset)
    if photometric == "MONOCHROME1":
        pixels = pixels.max() + pixels.min() - pixels
        display = 255 - display
    return ImageInput(
        sop_instance_uid=str(dataset.get("SOPInstanceUID", "")),
        pixels=pixels,
        display=display,
        pixel_spacing_mm=pixel_spacing(dataset),
    )


def load_image_file(path: Path) -> ImageInput:
    """Return the :class:`ImageInput` of a PNG or JPEG file (colour is converted to gray).

    The file stem stands in for the SOP Instance UID. Raises :class:`InputError` when
    the file cannot be read as an image.
    """
    try:
        with Image.open(path) as image:
            array = np.asarray(image)
            if array.ndim == 3 or image.mode not in {"L", "I;16", "I"}:
                array = np.asarray(image.convert("L"))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read image {path.name}: {exc}") from exc
    pixels = array.astype(np.float32)
    display = array.astype(np.uint8) if array.dtype == np.uint8 else window(pixels, *np.percentile(pixels, PERCENTILES))
    return ImageInput(sop_instance_uid=path.stem, pixels=pixels, display=display)


def load_path(path: Path, gate: Callable[[Dataset], GateVerdict] | None = None) -> tuple[ImageInput, GateVerdict]:
    """Return the :class:`ImageInput` of a DICOM, PNG or JPEG file (chosen by content/suffix) and
    the verdict of ``gate`` on a DICOM file (accepted when there is no gate, or for PNG/JPEG).

    Raises :class:`SkippedByGate` when the gate skips the data set, :class:`InputError` when the
    file is neither kind.
    """
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return load_image_file(path), GateVerdict.accept()
    try:
        dataset = pydicom.dcmread(path)
    except Exception as exc:
        raise InputError(f"{path.name} is neither a PNG/JPEG nor a readable DICOM file: {exc}") from exc
    verdict = gate(dataset) if gate is not None else GateVerdict.accept()
    if not verdict.accepted:
        raise SkippedByGate(verdict.reason)
    return load_dataset(dataset), verdict


def network_image(display: np.ndarray, size: int) -> np.ndarray:
    """Return the whole ``display`` image resized to ``size``² and scaled to [0, 1] by percentiles.

    Output: float32 array of shape (size, size).
    """
    image = Resize((size, size), mode="area")(display[None].astype(np.float32))
    image = ScaleIntensityRangePercentiles(*PERCENTILES, b_min=0.0, b_max=1.0, clip=True)(image)
    return np.asarray(image[0], dtype=np.float32)


def lung_box(lung_mask: np.ndarray, margin: float = 0.05) -> tuple[slice, slice]:
    """Return the (rows, cols) slices of the lungs' bounding box grown by ``margin`` of its size.

    Raises :class:`InputError` when the mask is empty.
    """
    rows = np.flatnonzero(lung_mask.any(axis=1))
    cols = np.flatnonzero(lung_mask.any(axis=0))
    if rows.size == 0:
        raise InputError("no lungs found in the image")
    pad_r = int(round((rows[-1] - rows[0] + 1) * margin))
    pad_c = int(round((cols[-1] - cols[0] + 1) * margin))
    height, width = lung_mask.shape
    return (
        slice(max(rows[0] - pad_r, 0), min(rows[-1] + pad_r + 1, height)),
        slice(max(cols[0] - pad_c, 0), min(cols[-1] + pad_c + 1, width)),
    )


REGIONS = ("lung", "lung-crop", "whole")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputSpec:
    """What a classifier sees: ``region`` (``lung``: lung box with everything outside the
    dilated lungs zeroed; ``lung-crop``: lung box; ``whole``: the whole image), resized
    to ``size``², ``channels`` 1 or 3 (gray repeated), and ``normalize`` ``percentiles``
    (0.5-99.5 % → [0, 1], of the lung pixels for lung regions) or ``imagenet``
    (display / 255, then ImageNet mean/std, as torchvision-trained models expect); ``smooth``: σ in
    input pixels of a Gaussian blur of the finished input (0: none; see :func:`smoothed`).
    """

    size: int
    region: str = "lung"
    channels: int = 1
    normalize: str = "percentiles"
    smooth: float = 0.0

    @classmethod
    def from_manifest(cls, spec: Mapping[str, Any]) -> InputSpec:
        """Return the spec of a manifest ``input`` mapping; raises :class:`WeightsError` when invalid."""
        size = spec.get("size")
        size = size[0] if isinstance(size, list) else size
        smooth = spec.get("smooth", 0.0)
        if isinstance(smooth, bool) or not isinstance(smooth, int | float):
            raise WeightsError(f"invalid input spec {dict(spec)}: smooth must be a number of pixels")
        made = cls(int(size or 0), spec.get("region", "lung"), int(spec.get("channels", 1)),
                   spec.get("normalize", "percentiles"), float(smooth))
        if made.size < 32 or made.region not in REGIONS or made.channels not in (1, 3) or made.normalize not in (
            "percentiles",
            "imagenet",
        ) or not 0.0 <= made.smooth <= made.size / 8:
            raise WeightsError(
                f"invalid input spec {dict(spec)}: size ≥ 32, region in {REGIONS}, channels 1 or 3, "
                "normalize percentiles or imagenet, smooth from 0 to size / 8"
            )
        return made

    def as_manifest(self) -> dict[str, Any]:
        """Return the manifest mapping of this spec (``smooth`` only when there is one)."""
        return {"size": self.size, "region": self.region, "channels": self.channels, "normalize": self.normalize,
                **({"smooth": self.smooth} if self.smooth else {})}


def smoothed(images: np.ndarray, sigma: float, masked: bool) -> np.ndarray:
    """Return classifier inputs (..., H, W) blurred by a Gaussian of ``sigma`` px within each plane; when
    ``masked`` (a ``lung`` input), the pixels that were 0 (outside its mask) stay 0. The same in training
    and in the node, so that no source's finer grain or sharper processing reaches the classifier.
    """
    planes = np.asarray(images, dtype=np.float32)
    blurred = ndimage.gaussian_filter(planes, (0,) * (planes.ndim - 2) + (sigma, sigma))
    return (blurred * (planes != 0) if masked else blurred).astype(np.float32)


def lung_keep(lung_mask: np.ndarray, box: tuple[slice, slice], size: int) -> np.ndarray:
    """Return the lung pixels of ``box`` at ``size``², dilated by ``size // 64`` px (at least 1): what a
    ``lung`` region keeps and what its percentiles are taken over.
    """
    mask = np.asarray(Resize((size, size), mode="nearest")(lung_mask[box][None].astype(np.float32))[0])
    return ndimage.binary_dilation(mask > 0.5, iterations=max(size // 64, 1))


def classifier_input(display: np.ndarray, lung_mask: np.ndarray, spec: InputSpec) -> tuple[np.ndarray, tuple[slice, slice]]:
    """Return a classifier's (channels, size, size) float32 input and the source box it covers.

    Raises :class:`InputError` when a lung region is asked for and the mask is empty.
    """
    box = lung_box(lung_mask) if spec.region != "whole" else (slice(0, display.shape[0]), slice(0, display.shape[1]))
    crop = np.asarray(Resize((spec.size, spec.size), mode="area")(display[box][None].astype(np.float32))[0])
    keep = lung_keep(lung_mask, box, spec.size) if spec.region != "whole" else np.ones(crop.shape, dtype=bool)
    if spec.normalize == "imagenet":
        unit = np.repeat(crop[None] / 255.0, spec.channels, axis=0)
        mean = np.asarray(IMAGENET_MEAN[: spec.channels])[:, None, None]
        std = np.asarray(IMAGENET_STD[: spec.channels])[:, None, None]
        image = (unit - mean) / std
    else:
        low, high = np.percentile(crop[keep], PERCENTILES)
        image = np.repeat(np.clip((crop - low) / max(high - low, 1e-6), 0.0, 1.0)[None], spec.channels, axis=0)
    if spec.region == "lung":
        image = image * keep
    if spec.smooth:
        image = smoothed(image, spec.smooth, masked=spec.region == "lung")
    return image.astype(np.float32), box


def _dicom_display(pixels: np.ndarray, dataset: Dataset) -> np.ndarray:
    """Return the VOI-transformed image as uint8 (MONOCHROME2 polarity not yet applied)."""
    if "VOILUTSequence" in dataset:
        return _voi_lut(pixels, dataset.VOILUTSequence[0])
    if "WindowCenter" in dataset and "WindowWidth" in dataset:
        center, width = _number(dataset.WindowCenter), _number(dataset.WindowWidth)
        function = str(dataset.get("VOILUTFunction", "LINEAR")).upper()
        if center is not None and width is not None and width > 0:
            return _voi_window(pixels, center, width, function)
        logger.warning("ignoring an unusable VOI window (a width of at most 0, or not a finite number); "
                       "using a percentile window")
    return window(pixels, *np.percentile(pixels, PERCENTILES))


def _voi_lut(pixels: np.ndarray, item: Dataset) -> np.ndarray:
    """Apply the first VOI LUT (PS3.3 C.11.2.1.1) and return uint8; raises :class:`InputError` if malformed."""
    try:
        entries, first, bits = (int(v) for v in item.LUTDescriptor)
        data = item.LUTData
    except (AttributeError, TypeError, ValueError) as exc:
        raise InputError(f"malformed VOI LUT: {type(exc).__name__}") from exc
    if isinstance(data, bytes):
        data = np.frombuffer(data, dtype=np.uint8 if bits <= 8 and len(data) == (entries or 65536) else np.uint16)
    lut = np.asarray(data, dtype=np.float32).ravel()
    index = np.clip(np.round(pixels) - first, 0, lut.size - 1).astype(np.int64)
    return window(lut[index], 0.0, float(2**bits - 1))


def _voi_window(pixels: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """Apply a DICOM VOI window (PS3.3 C.11.2.1.2) and return uint8."""
    if function == "SIGMOID":
        scaled = 1.0 / (1.0 + np.exp(-4.0 * (pixels - center) / width))
        return np.round(scaled * 255).astype(np.uint8)
    if function == "LINEAR_EXACT":
        return window(pixels, center - width / 2, center + width / 2)
    return window(pixels, center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2)


def window(pixels: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map [low, high] linearly onto 0..255 (clipped) and return uint8."""
    scaled = (pixels.astype(np.float32) - low) / max(float(high - low), 1e-6)
    return np.round(np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8)


def _number(value: object) -> float | None:
    """Return the first value of a DS/IS element as a finite float; None when it is not one."""
    first = value[0] if isinstance(value, pydicom.multival.MultiValue) and len(value) else value
    try:
        number = float(first)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


