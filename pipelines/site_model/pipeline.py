"""A site model's pipeline: the manifest's tag gate, decoding, the content check, the TorchScript
model and the manifest's reading of its outputs.

The model takes a float32 (N, channels, rows, columns) batch and returns a tensor, or a tuple,
list or dict (in value order) of tensors: at most one 2-D (N, K) tensor that the classification
heads read by ``index``, and at most one 4-D (N, C, H, W) tensor that the segmentation channels
read by ``channel`` (resized back to the source image, then thresholded).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from pydicom import Dataset
from pydicom.pixels import apply_modality_lut

from pipelines.base import (
    Finding, GateVerdict, ImageInput, ImageResult, Runtime, pixel_spacing, resolve_device, sha256_file,
)
from pipelines.errors import InputError, WeightsError
from pipelines.site_model.manifest import (
    ASSESSED,
    Activation,
    Manifest,
    Normalize,
    model_input,
    read_manifest,
    verify_files,
)

logger = logging.getLogger(__name__)

GRAYSCALE = {"MONOCHROME1", "MONOCHROME2"}
#: The display window when the data set has no usable one: these percentiles of its pixels.
PERCENTILES = (0.5, 99.5)


def _text(dataset: Dataset, keyword: str) -> str:
    return str(dataset.get(keyword, "") or "").strip().upper()


def _number(dataset: Dataset, keyword: str) -> float | None:
    value = dataset.get(keyword)
    try:
        return float(value[0] if isinstance(value, Sequence) and not isinstance(value, str) else value)
    except (TypeError, ValueError, IndexError):
        return None


def display_image(pixels: np.ndarray, dataset: Dataset) -> np.ndarray:
    """Return ``pixels`` (after the Modality LUT) as uint8 for the overlay: through the data set's
    first linear window when it has a usable one, else its 0.5-99.5 percentile range."""
    center, width = _number(dataset, "WindowCenter"), _number(dataset, "WindowWidth")
    if center is not None and width is not None and np.isfinite([center, width]).all() and width > 0:
        low, high = center - width / 2, center + width / 2
    else:
        low, high = np.percentile(pixels, PERCENTILES)
    scaled = (pixels - low) / max(float(high - low), 1e-6)
    return np.round(np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def _activated(values: torch.Tensor, activation: Activation) -> torch.Tensor:
    """Return probabilities of raw outputs (classes or channels along dimension 1)."""
    if activation is Activation.SIGMOID:
        return torch.sigmoid(values)
    if activation is Activation.SOFTMAX:
        return torch.softmax(values, dim=1)
    return values.clamp(0.0, 1.0)


def _split(outputs: object) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Return the (N, K) class tensor and the (N, C, H, W) map tensor of a model's outputs (None: absent).

    Raises :class:`WeightsError` for outputs of any other form.
    """
    tensors = list(outputs.values()) if isinstance(outputs, dict) else (
        list(outputs) if isinstance(outputs, list | tuple) else [outputs])
    by_rank: dict[int, torch.Tensor] = {}
    for tensor in tensors:
        if not isinstance(tensor, torch.Tensor) or tensor.ndim not in (2, 4) or tensor.ndim in by_rank:
            raise WeightsError("the site model must return at most one (N, K) tensor and one (N, C, H, W) tensor, "
                               f"got {[getattr(t, 'shape', type(t).__name__) for t in tensors]}")
        by_rank[tensor.ndim] = tensor
    return by_rank.get(2), by_rank.get(4)


class SiteModelPipeline:
    """Implements :class:`pipelines.base.Pipeline` for a manifest's model; build it with :meth:`from_manifest`."""

    def __init__(self, manifest: Manifest, model: torch.jit.ScriptModule, *, size: tuple[int, int], channels: int,
                 device: torch.device, max_megapixels: float, model_versions: str) -> None:
        self.manifest = manifest
        self.model = model
        self.size = size
        self.channels = channels
        self.device = device
        self.max_megapixels = max_megapixels
        self.name = manifest.name
        self.version = manifest.version
        self.model_versions = model_versions

    @classmethod
    def from_manifest(cls, path: Path, runtime: Runtime) -> SiteModelPipeline:
        """Return the pipeline of the manifest at ``path``: its files checked, its model loaded on
        ``runtime.device`` and tried once on a blank batch.

        Raises :class:`WeightsError` when the manifest or a file is bad, or the model's outputs do not
        have the classes and channels the manifest reads.
        """
        manifest, manifest_digest = read_manifest(path)
        root = path.parent
        verify_files(manifest, root)
        size, channels = model_input(manifest, root)
        device = resolve_device(runtime.device)
        model_path = manifest.model.model_path(root)
        try:
            model = torch.jit.load(str(model_path), map_location=device).eval()
        except (RuntimeError, ValueError) as exc:
            raise WeightsError(f"site model file {model_path} is not a TorchScript model") from exc
        kind = "TorchScript" if manifest.model.torchscript is not None else "MONAI bundle"
        identity = (f"{manifest.name} {manifest.version} {kind} {sha256_file(model_path)[:12]} "
                    f"manifest {manifest_digest[:12]}")
        pipeline = cls(manifest, model, size=size, channels=channels, device=device,
                       max_megapixels=runtime.max_megapixels,
                       model_versions="; ".join([identity, *manifest.validation_lines()]))
        pipeline._check_outputs()
        logger.info("site model %s %s on %s, input %s x %d", manifest.name, manifest.version, device, size, channels)
        return pipeline

    def _check_outputs(self) -> None:
        """Raise :class:`WeightsError` unless the model's outputs hold every index and channel the manifest reads."""
        try:
            with torch.inference_mode():
                classes, maps = _split(self.model(torch.zeros(1, self.channels, *self.size, device=self.device)))
        except RuntimeError as exc:
            raise WeightsError(f"the site model {self.name} fails on a {self.channels} x {self.size} input "
                               f"({type(exc).__name__})") from exc
        outputs = self.manifest.outputs
        for head in outputs.classification:
            if classes is None or head.index >= classes.shape[1]:
                raise WeightsError(f"head {head.name} reads class {head.index}, but the model returns "
                                   f"{'no (N, K) tensor' if classes is None else f'{classes.shape[1]} classes'}")
        for channel in outputs.segmentation:
            if maps is None or channel.channel >= maps.shape[1]:
                raise WeightsError(f"channel {channel.name} reads map {channel.channel}, but the model returns "
                                   f"{'no (N, C, H, W) tensor' if maps is None else f'{maps.shape[1]} channels'}")

    def accepts(self, dataset: Dataset) -> GateVerdict:
        """Return the tag gate's verdict: the manifest's modalities, SOP classes and body parts (a stated
        other body part skips, a missing one does not), pixel data within the pixel budget, one grayscale frame."""
        spec = self.manifest.input
        modality = _text(dataset, "Modality")
        if modality not in spec.modalities:
            return GateVerdict.skip(f"modality {modality or 'missing'} is not one of {', '.join(spec.modalities)}")
        sop_class = str(dataset.get("SOPClassUID", "") or "")
        if sop_class not in spec.sop_classes:
            return GateVerdict.skip(f"SOP class {sop_class or 'missing'} is not one the model takes")
        body_part = _text(dataset, "BodyPartExamined")
        if spec.body_parts and body_part and body_part not in spec.body_parts:
            return GateVerdict.skip(f"body part {body_part} is not one of {', '.join(spec.body_parts)}")
        if "PixelData" not in dataset:
            return GateVerdict.skip("no pixel data")
        try:
            rows, columns = int(dataset.get("Rows") or 0), int(dataset.get("Columns") or 0)
            frames = int(dataset.get("NumberOfFrames") or 1)
        except (TypeError, ValueError):
            return GateVerdict.skip("Rows, Columns or NumberOfFrames is not a number")
        if rows * columns * max(frames, 1) / 1e6 > self.max_megapixels:
            return GateVerdict.skip(f"image of {rows} x {columns} x {frames} frame(s) exceeds the pixel budget of "
                                    f"{self.max_megapixels:g} megapixels (scp.max_image_megapixels); not decoded")
        if frames != 1:
            return GateVerdict.skip(f"{frames} frames; a single frame is required")
        photometric = _text(dataset, "PhotometricInterpretation")
        if photometric not in GRAYSCALE:
            return GateVerdict.skip(f"photometric interpretation {photometric or 'missing'} is not grayscale")
        return GateVerdict.accept()

    def load(self, dataset: Dataset) -> ImageInput:
        """Return the input of an accepted data set: pixels after the Modality LUT, MONOCHROME1 inverted
        (unless the manifest says not to), and a display image. Raises :class:`InputError` when undecodable."""
        try:
            stored = dataset.pixel_array
        except Exception as exc:  # pydicom raises many types for missing plugins or bad data
            raise InputError(f"cannot decode pixel data: {type(exc).__name__}") from exc
        pixels = np.asarray(apply_modality_lut(stored, dataset), dtype=np.float32)
        display = display_image(pixels, dataset)
        if _text(dataset, "PhotometricInterpretation") == "MONOCHROME1" and self.manifest.input.invert_monochrome1:
            pixels = pixels.max() + pixels.min() - pixels
            display = 255 - display
        return ImageInput(str(dataset.get("SOPInstanceUID", "")), pixels, display, pixel_spacing(dataset))

    def content_reason(self, pixels: np.ndarray) -> str | None:
        """Return why the model cannot read ``pixels``, or None: not one 2-D plane, smaller than the
        manifest's ``min_size``, values that are not finite, or one value everywhere."""
        minimum = self.manifest.input.min_size
        if pixels.ndim != 2:
            return f"image content: pixel array of shape {list(pixels.shape)} is not one 2-D plane"
        if min(pixels.shape) < minimum:
            return (f"image content: {pixels.shape[0]} x {pixels.shape[1]} pixels, "
                    f"the model needs {minimum} or more a side")
        if not np.isfinite(pixels).all():
            return "image content: pixel values that are not finite numbers"
        if pixels.max() == pixels.min():
            return "image content: every pixel has the same value"
        return None

    def model_image(self, pixels: np.ndarray) -> torch.Tensor:
        """Return the (channels, rows, columns) model input of ``pixels``: normalised as the manifest
        says, resized (bilinear, antialiased) to the model's size, the plane repeated per channel."""
        spec = self.manifest.input
        if spec.normalize is Normalize.MINMAX:
            image = (pixels - pixels.min()) / (pixels.max() - pixels.min())
        elif spec.normalize is Normalize.ZSCORE:
            image = (pixels - pixels.mean()) / max(float(pixels.std()), 1e-6)
        else:
            assert spec.window is not None
            low = spec.window.center - spec.window.width / 2
            image = np.clip((pixels - low) / spec.window.width, 0.0, 1.0)
        plane = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
        resized = torch.nn.functional.interpolate(plane, size=self.size, mode="bilinear", antialias=True,
                                                  align_corners=False)
        return resized[0].expand(self.channels, *self.size)

    def run(self, inputs: Sequence[ImageInput]) -> list[ImageResult]:
        """Return one result per input, in order: an image the model cannot read is skipped with the
        reason (:meth:`content_reason`); the others get the manifest's findings and masks."""
        results: list[ImageResult] = []
        readable: list[tuple[ImageInput, ImageResult]] = []
        for image in inputs:
            reason = self.content_reason(image.pixels)
            verdict = GateVerdict.skip(reason) if reason else GateVerdict.accept()
            result = ImageResult(image.sop_instance_uid, {}, verdict=verdict)
            results.append(result)
            if reason:
                logger.info("image %s skipped: %s", image.sop_instance_uid, reason)
            else:
                readable.append((image, result))
        if not readable:
            return results
        batch = torch.stack([self.model_image(image.pixels) for image, _ in readable]).to(self.device)
        with torch.inference_mode():
            classes, maps = _split(self.model(batch))
        outputs = self.manifest.outputs
        for row, (image, result) in enumerate(readable):
            shape = image.pixels.shape
            if outputs.classification:
                result.masks[ASSESSED] = np.ones(shape, dtype=bool)
            if outputs.segmentation:
                assert maps is not None
                probabilities = _activated(maps[row:row + 1].float(), outputs.segmentation_activation)
                resized = torch.nn.functional.interpolate(probabilities, size=shape, mode="bilinear",
                                                          align_corners=False)[0].cpu().numpy()
                for channel in outputs.segmentation:
                    result.masks[channel.name] = resized[channel.channel] > channel.threshold
            for head in outputs.classification:
                assert classes is not None
                probability = float(_activated(classes[row:row + 1].float(), head.activation)[0, head.index])
                flagged = not head.experimental and probability >= head.threshold
                region = result.masks.get(head.region) if flagged and head.region else None
                result.findings.append(Finding(
                    head.name, head.display_name, probability, head.threshold, flagged, head.experimental,
                    region=region if region is not None and region.any() else None))
        return results
