"""The chest X-ray pipeline as a plug-in: its options, weights check, accepted images and
how the node's writers show and code its results (lungs, Grad-CAM regions, SNOMED CT
findings, "AI CXR")."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field
from pydicom import Dataset
from pydicom.sr.coding import Code
from pydicom.sr.codedict import codes
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
)

from pipelines.base import (
    GateVerdict, ImageInput, OutputDescription, Pipeline, PipelineOptions, PipelinePlugin, Runtime, Segment,
)
from pipelines.chest_xray.gate import AGE_UNKNOWN, PROJECTION_MODALITIES, UnknownAge, is_chest
from pipelines.chest_xray.legend import LUNG_COLOUR, LUNGS, REGION_COLOUR
from pipelines.errors import WeightsError
from pipelines.site_override import newest_override, override_folder, read_override

#: The bundled weights manifest: ``weights/`` of the source tree, linked here so that the wheel carries it.
DEFAULT_MANIFEST = Path(__file__).resolve().parent / "weights" / "manifest.yaml"

#: SNOMED CT codes of the findings the bundled manifest's heads report, by ``Finding.name``.
FINDING_CODES: dict[str, Code] = {
    "covid19": Code("840539006", "SCT", "COVID-19"),
    "pneumonia": Code("233604007", "SCT", "Pneumonia"),
    "pneumothorax": Code("36118008", "SCT", "Pneumothorax"),
}


class ChestXrayOptions(PipelineOptions):
    """The chest pipeline's options; ``gate`` and ``pipeline.manifest`` of the node's settings
    give their defaults (see :meth:`ChestXrayPlugin.options`)."""

    min_patient_age_years: float = Field(18, ge=0)
    unknown_age: UnknownAge = UnknownAge.ANALYSE
    enable_flags: tuple[str, ...] = Field(
        (), description="experimental findings a site has validated and allows to be flagged")
    show_experimental: bool = Field(
        False, description="also show experimental heads' scores on the overlay's banner (always in the SR)")
    site_override: Path | None = Field(
        None, description="the site's thresholds (dicom-node calibrate --write); default: the newest "
        "state_dir/site/<pipeline>/override-vN.yaml, null: the manifest's")

    @property
    def manifest_path(self) -> Path:
        return self.manifest or DEFAULT_MANIFEST


def render(display: np.ndarray, masks: Mapping[str, np.ndarray], heatmap: np.ndarray | None,
           regions: Sequence[np.ndarray]) -> np.ndarray:
    """Return the chest overlay: heat-map within the lungs, lung contour green, regions magenta."""
    from pipelines.chest_xray.overlay import render_overlay

    return render_overlay(display, masks[LUNGS], heatmap, regions)


class ChestXrayPlugin(PipelinePlugin):
    """Frontal adult chest CR/DX: lung segmentation, image content check, findings with Grad-CAM."""

    name = "chest_xray"
    options_model = ChestXrayOptions
    sop_classes = frozenset({ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation,
                             DigitalXRayImageStorageForProcessing})
    modalities = frozenset(PROJECTION_MODALITIES)
    output = OutputDescription(
        description_prefix="AI CXR: ",
        content_label="AI_CXR",
        procedure=Code("399208008", "SCT", "Plain chest X-ray"),
        segments=(Segment(LUNGS, "Lungs", codes.SCT.AnatomicalStructure, codes.SCT.Lung, LUNG_COLOUR,
                          "Green: lungs"),),
        finding_codes=FINDING_CODES,
        finding_site=codes.SCT.Lung,
        # A finding's localized region is where the model's Grad-CAM map is high, not a delineated
        # lesion: category Spatial and Relational Concept (CID 7150), type Gradient-weighted class
        # activation (CID 217 Visual Explanation). The finding itself names the segment.
        region_category=codes.SCT.SpatialAndRelationalConcept,
        region_type=codes.DCM.GradientWeightedClassActivation,
        region_colour=REGION_COLOUR,
        region_legend="Magenta: localized region",
        heatmap_name="Grad-CAM",
        render=render,
        caveat_notices={AGE_UNKNOWN: "Patient age unknown: the models were validated on adults only"},
    )

    def options(self, settings: Mapping[str, Any]) -> ChestXrayOptions:
        """Return the options of ``pipelines.chest_xray``, over the defaults of the node's ``gate``
        section, ``pipeline.manifest`` and the newest site override in ``state_dir`` (see
        :mod:`pipelines.site_override`). Raises pydantic's ValidationError."""
        gate = {key: value for key, value in (settings.get("gate") or {}).items()
                  if key in ChestXrayOptions.model_fields}
        legacy = {**gate, "manifest": (settings.get("pipeline") or {}).get("manifest")}
        if settings.get("state_dir") is not None:
            legacy["site_override"] = newest_override(override_folder(Path(settings["state_dir"]), self.name))
        return ChestXrayOptions.model_validate({**legacy, **self.own_settings(settings)})

    def configure(self, options: ChestXrayOptions) -> None:
        """Take whether the overlay's banner shows experimental heads' scores into :attr:`output`."""
        self.output = replace(type(self).output, show_experimental=options.show_experimental)

    def verify_weights(self, options: ChestXrayOptions) -> None:
        """Check the manifest's lung, content check and finding weights against their sha256."""
        from pipelines.chest_xray.models import read_manifest, verified_path

        manifest = read_manifest(options.manifest_path)
        for entry in [manifest["lung"], manifest.get("content_check") or {}, *manifest["findings"]]:
            verified_path(entry, options.manifest_path.parent)
        if options.site_override is not None:
            read_override(options.site_override)

    def build(self, options: ChestXrayOptions, runtime: Runtime) -> Pipeline:
        """Return the :class:`ChestXrayPipeline` of the manifest, its weights checked and loaded, with
        the thresholds of the site override when there is one. Raises :class:`WeightsError`, also for
        an override of other weights or of a finding the manifest lacks."""
        from pipelines.chest_xray.pipeline import ChestXrayPipeline  # torch: only when a pipeline is built

        pipeline = ChestXrayPipeline.from_manifest(
            options.manifest_path, device=runtime.device, min_age_years=options.min_patient_age_years,
            unknown_age=options.unknown_age, enable_flags=options.enable_flags,
            max_megapixels=runtime.max_megapixels)
        if options.site_override is not None:
            override = read_override(options.site_override)
            override.check_models(pipeline.model_versions)
            classifiers = {classifier.name: classifier for classifier in pipeline.classifiers}
            unknown = sorted(set(override.thresholds) - set(classifiers))
            if unknown:
                raise WeightsError(f"site override {override.path} names findings the manifest lacks: {unknown}")
            for name, threshold in override.thresholds.items():
                classifiers[name].threshold = threshold
        return pipeline

    def addresses(self, dataset: Dataset) -> bool:
        """Return whether ``dataset`` says it shows the chest (a skipped one then gets a note)."""
        return is_chest(dataset)

    def load_path(self, pipeline: Pipeline, path: Path) -> tuple[ImageInput, GateVerdict]:
        """Return the input of a DICOM, PNG or JPEG file and the gate's verdict on a DICOM one."""
        from pipelines.chest_xray.preprocess import load_path

        return load_path(path, gate=pipeline.accepts)
