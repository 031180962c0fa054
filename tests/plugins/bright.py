"""A second, small pipeline: mammograms (MG), the mask of their bright pixels and their mean
brightness as a score. It imports nothing but :mod:`pipelines.base`, as any plug-in may."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from pydantic import Field
from pydicom import Dataset
from pydicom.sr.coding import Code
from pydicom.sr.codedict import codes
from pydicom.uid import DigitalMammographyXRayImageStorageForPresentation

from pipelines.base import (
    Finding, GateVerdict, ImageInput, ImageResult, OutputDescription, PipelineOptions, PipelinePlugin, Runtime,
    Segment, pixel_spacing,
)
from pipelines.errors import InputError, WeightsError

BRIGHT = "bright"
BRIGHT_COLOUR = (255, 160, 0)
MEAN = "mean_brightness"


class BrightOptions(PipelineOptions):
    threshold: float = Field(0.3, ge=0, le=1, description="mean brightness from which an image is flagged")
    bright_level: int = Field(200, ge=1, le=255, description="display grey level from which a pixel is bright")


def render(display: np.ndarray, masks: Mapping[str, np.ndarray], heatmap: np.ndarray | None,
           regions: Sequence[np.ndarray]) -> np.ndarray:
    """Return ``display`` in grey with the bright pixels painted orange."""
    rgb = np.repeat(display[..., None], 3, axis=-1)
    rgb[masks[BRIGHT]] = BRIGHT_COLOUR
    return rgb


class BrightPipeline:
    name = "bright"
    version = "0.1"
    model_versions = "threshold"

    def __init__(self, options: BrightOptions, runtime: Runtime) -> None:
        self.options = options
        self.max_megapixels = runtime.max_megapixels

    def accepts(self, dataset: Dataset) -> GateVerdict:
        if str(dataset.get("Modality", "")).upper() != "MG":
            return GateVerdict.skip("modality is not MG")
        if int(dataset.get("Rows", 0)) * int(dataset.get("Columns", 0)) / 1e6 > self.max_megapixels:
            return GateVerdict.skip("image exceeds the pixel budget")
        return GateVerdict.accept()

    def load(self, dataset: Dataset) -> ImageInput:
        try:
            pixels = dataset.pixel_array.astype(np.float32)
        except Exception as exc:
            raise InputError(f"cannot decode: {exc}") from exc
        low, high = float(pixels.min()), float(pixels.max())
        display = np.round((pixels - low) * 255 / max(high - low, 1)).astype(np.uint8)
        return ImageInput(dataset.SOPInstanceUID, pixels, display, pixel_spacing(dataset))

    def run(self, inputs: Sequence[ImageInput]) -> list[ImageResult]:
        results = []
        for image in inputs:
            mask = image.display >= self.options.bright_level
            if not mask.any():
                results.append(ImageResult(image.sop_instance_uid, {BRIGHT: mask},
                                           verdict=GateVerdict.skip("image content: no bright pixels")))
                continue
            score = float(image.display.mean() / 255)
            flagged = score >= self.options.threshold
            finding = Finding(MEAN, "Mean brightness", score, self.options.threshold, flagged, False,
                              region=mask if flagged else None)
            results.append(ImageResult(image.sop_instance_uid, {BRIGHT: mask}, [finding]))
        return results


class BrightPlugin(PipelinePlugin):
    name = "bright"
    options_model = BrightOptions
    sop_classes = frozenset({DigitalMammographyXRayImageStorageForPresentation})
    modalities = frozenset({"MG"})
    output = OutputDescription(
        description_prefix="AI BRIGHT: ",
        content_label="AI_BRIGHT",
        procedure=codes.SCT.Mammography,
        segments=(Segment(BRIGHT, "Bright pixels", codes.SCT.Tissue, codes.SCT.Tissue, BRIGHT_COLOUR,
                          "Orange: bright pixels"),),
        finding_codes={MEAN: Code("MEANBRIGHT", "99DCMNODE", "Mean brightness")},
        finding_site=codes.SCT.Breast,
        region_category=codes.SCT.Tissue,
        region_type=codes.SCT.Tissue,
        region_colour=(0, 200, 255),
        region_legend="Blue: flagged region",
        heatmap_name="brightness",
        render=render,
    )

    def verify_weights(self, options: BrightOptions) -> None:
        if options.manifest is not None and not options.manifest.is_file():
            raise WeightsError(f"weights manifest not found: {options.manifest}")

    def build(self, options: BrightOptions, runtime: Runtime) -> BrightPipeline:
        self.verify_weights(options)
        return BrightPipeline(options, runtime)
