"""A site's own model as a pipeline plug-in: what it accepts and how its results are shown and
coded all come from its manifest (:mod:`pipelines.site_model.manifest`), read when the node
configures it; torch is imported only when the pipeline is built."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from pydicom.sr.codedict import codes

from pipelines.base import (
    OutputDescription,
    OverlayRenderer,
    Pipeline,
    PipelineOptions,
    PipelinePlugin,
    Runtime,
    Segment,
)
from pipelines.site_model.manifest import ASSESSED, Manifest, read_manifest, verify_files

ASSESSED_COLOUR = (0, 160, 255)
REGION_COLOUR = (255, 0, 255)
#: Share of a segment's colour in the overlay's tint.
TINT = 0.4


class SiteModelOptions(PipelineOptions):
    """``pipelines.<name>.manifest``: the site model's manifest (required)."""

    manifest: Path


def _outline(mask: np.ndarray) -> np.ndarray:
    """Return the pixels of ``mask`` that touch a pixel outside it (4-neighbourhood, the image edge inside)."""
    padded = np.pad(mask, 1, mode="edge")
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def overlay_renderer(segments: Sequence[Segment]) -> OverlayRenderer:
    """Return the renderer of ``segments``: the display in grey, each segment's mask tinted in its colour
    (the whole-image assessed area is not drawn), flagged findings' regions outlined in magenta."""
    tinted = [segment for segment in segments if segment.name != ASSESSED]

    def render(display: np.ndarray, masks: Mapping[str, np.ndarray], heatmap: np.ndarray | None,
               regions: Sequence[np.ndarray]) -> np.ndarray:
        rgb = np.repeat(display[..., None], 3, axis=-1).astype(np.float32)
        for segment in tinted:
            mask = masks[segment.name]
            rgb[mask] = (1 - TINT) * rgb[mask] + TINT * np.asarray(segment.colour, np.float32)
        for region in regions:
            rgb[_outline(region)] = REGION_COLOUR
        return np.round(rgb).astype(np.uint8)

    return render


def output_description(manifest: Manifest) -> OutputDescription:
    """Return how the writers show and code the results of ``manifest``'s model.

    A model with classification heads reads the whole image, so its first segment is the
    whole-image "Assessed area" (a Spatial and Relational Concept, Image Region): the region
    its findings were assessed in, as the SR says of an unflagged finding. Its segmentation
    channels follow, in manifest order.
    """
    assessed = Segment(ASSESSED, "Assessed area", codes.SCT.SpatialAndRelationalConcept, codes.DCM.ImageRegion,
                       ASSESSED_COLOUR, "Whole image assessed by the model")
    segments = [assessed] if manifest.outputs.classification else []
    segments += [Segment(c.name, c.label, c.category.code(), c.property_type.code(), c.colour,
                         c.legend or f"Tint: {c.label}") for c in manifest.outputs.segmentation]
    label = "AI_" + re.sub(r"[^A-Z0-9_]", "_", manifest.name.upper())
    return OutputDescription(
        description_prefix=manifest.description_prefix or f"AI {manifest.name[:16].upper()}: ",
        content_label=label[:16],
        procedure=manifest.procedure.code(),
        segments=tuple(segments),
        finding_codes={head.name: head.code.code() for head in manifest.outputs.classification},
        finding_site=manifest.finding_site.code() if manifest.finding_site else None,
        region_category=codes.SCT.SpatialAndRelationalConcept,
        region_type=codes.DCM.ImageRegion,
        region_colour=REGION_COLOUR,
        region_legend="Magenta outline: region of a flagged finding",
        heatmap_name="score map",
        render=overlay_renderer(segments),
    )


class SiteModelPlugin(PipelinePlugin):
    """A site's TorchScript model or MONAI bundle, run as its manifest says (``pipelines.<name>.manifest``)."""

    name = "site_model"
    options_model = SiteModelOptions
    #: Set from the manifest by :meth:`configure`.
    sop_classes: frozenset[str] = frozenset()
    modalities: frozenset[str] = frozenset()

    def configure(self, options: SiteModelOptions) -> None:
        """Take the SOP classes, modalities and output description from the manifest (YAML only).

        Raises :class:`pipelines.errors.WeightsError` naming what is wrong with the manifest.
        """
        manifest, _ = read_manifest(options.manifest)
        self.sop_classes = frozenset(manifest.input.sop_classes)
        self.modalities = frozenset(manifest.input.modalities)
        self.output = output_description(manifest)

    def verify_weights(self, options: SiteModelOptions) -> None:
        """Check the model's files against their sha256 in the manifest; raises WeightsError naming the file."""
        manifest, _ = read_manifest(options.manifest)
        verify_files(manifest, options.manifest.parent)

    def build(self, options: SiteModelOptions, runtime: Runtime) -> Pipeline:
        """Return the :class:`SiteModelPipeline` of the manifest, its files checked and its model loaded."""
        from pipelines.site_model.pipeline import SiteModelPipeline  # torch: only when a pipeline is built

        return SiteModelPipeline.from_manifest(options.manifest, runtime)
