"""The Secondary Capture overlay any viewer can show: every source pixel, at the
source's pixel spacing and viewing contrast, with the pipeline's overlay (the chest
pipeline's: the Grad-CAM heat-map of the flagged findings and the lung and region
contours), between burned-in text bands above and below; and the short "not
analysed" note.

Modality is the source's when the pipeline analyses that modality (CR, DX): OHIF
starts its cine player over the top of any OT or US image.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node.writers.common import (
    AI_DISCLAIMER,
    AlgorithmIdentity,
    OutputKind,
    check_result,
    complete_series,
    caveat_notice,
    check_source,
    content_inputs,
    copy_patient_orientation,
    flag_headline,
    instance_kwargs,
    segmented_findings,
    reference_of,
)
from dicom_node.writers.render import BannerText, overlay, text_card
from pipelines.base import Finding, ImageResult, OutputDescription, pixel_spacing

logger = logging.getLogger(__name__)


def _finding_item(finding: Finding) -> str:
    if finding.experimental:
        return f"{finding.display_name} {finding.probability:.2f}: experimental, never flagged"
    verdict = "FLAGGED" if finding.flagged else "not flagged"
    return f"{finding.display_name} {finding.probability:.2f} (threshold {finding.threshold:.2f}): {verdict}"


def banner_text(result: ImageResult, algorithm: AlgorithmIdentity, caveats: Sequence[str] = ()) -> BannerText:
    """Return the banner of ``result``: the flag, each finding (flagged first, then by score), model, marking
    and the gate's caveats."""
    output = algorithm.output
    findings = sorted(result.findings, key=lambda f: (not f.flagged, f.experimental, -f.probability))
    _, heat_legend = _shown_heat(result, output)
    legend = [*([heat_legend] if heat_legend else []), *(s.legend for s in output.segments),
              *([output.region_legend] if result.flagged else [])]
    return BannerText(
        headline=flag_headline(result, output),
        alert=bool(result.flagged),
        items=[_finding_item(f) for f in findings],
        notices=[AI_DISCLAIMER, *(caveat_notice(c, output) for c in caveats)],
        # one item per model, so that lines wrap between them rather than the text shrinking
        footer=[f"Model: {algorithm.software_versions[0]}", *algorithm.software_versions[1:], *legend],
    )


def _shown_heat(result: ImageResult, output: OutputDescription) -> tuple[np.ndarray | None, str]:
    """Return the heat-map to blend in and its legend.

    The pixel-wise maximum of the flagged findings' heat-maps; with none flagged, the
    heat-map of the highest-scoring non-experimental finding, so a reader always sees
    where the model looked. (None, "") when there is no such heat-map.
    """
    maps = [f.heatmap for f in result.flagged if f.heatmap is not None]
    if maps:
        heat = np.maximum.reduce([np.asarray(m, np.float32) for m in maps])
        return heat, f"Colour: {output.heatmap_name} of flagged findings"
    scored = [f for f in result.findings if not f.experimental and f.heatmap is not None]
    if not scored:
        return None, ""
    top = max(scored, key=lambda f: f.probability)
    return np.asarray(top.heatmap, np.float32), f"Colour: {output.heatmap_name} of {top.display_name} (not flagged)"


def _source_image_item(source: Dataset) -> Dataset:
    """Return the Source Image Sequence item referencing ``source`` as the image processed."""
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    purpose = codes.DCM.SourceImageForImageProcessingOperation
    item.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept.from_code(purpose)]
    return item


def _sc_image(source: Dataset, rgb: np.ndarray, algorithm: AlgorithmIdentity, kind: OutputKind, headline: str,
              content: Sequence[str], shows_source: bool) -> hd.sc.SCImage:
    """Return an RGB SC image in the source's study; with ``shows_source`` it also carries the
    source's orientation and pixel spacing and references it as its source image."""
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=reference_of(source),
        pixel_array=rgb,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        # highdicom accepts single letters only; replaced below by the source's value (or empty)
        patient_orientation=("L", "F"),
        pixel_spacing=pixel_spacing(source) if shows_source else None,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        **instance_kwargs(source, algorithm, kind, headline, content),
    )
    if source.get("Modality") in algorithm.modalities:
        sc.Modality = source.Modality
    if shows_source:
        copy_patient_orientation(source, sc)
        sc.SourceImageSequence = [_source_image_item(source)]
    else:
        sc.PatientOrientation = ""
    # Without these, dciodvfy cannot tell that the type 2C Laterality is not needed.
    for keyword in ("BodyPartExamined", "Laterality"):
        if keyword in source:
            sc[keyword] = source[keyword]
    sc.ConversionType = "WSD"
    sc.BurnedInAnnotation = "YES"
    complete_series(source, sc)
    sc.ImageComments = AI_DISCLAIMER
    return sc


def overlay_pixels(result: ImageResult, display: np.ndarray, algorithm: AlgorithmIdentity,
                   caveats: Sequence[str] = ()) -> np.ndarray:
    """Return the SC's RGB pixels: ``display`` with the pipeline's overlay, framed by the banner."""
    return overlay(algorithm.output.render, display, result.masks, _shown_heat(result, algorithm.output)[0],
                   [f.region for f in segmented_findings(result)], banner_text(result, algorithm, caveats))


def build_sc(source: Dataset, result: ImageResult, display: np.ndarray, algorithm: AlgorithmIdentity,
             caveats: Sequence[str] = ()) -> hd.sc.SCImage:
    """Return the RGB overlay SC of ``result`` at the source's pixel spacing, the gate's ``caveats`` in its banner.

    ``display`` is the windowed uint8 image (``ImageInput.display``). Raises ValueError
    if it or a mask does not match the source's Rows/Columns.
    """
    check_result(source, result, algorithm.output, display)
    rgb = overlay_pixels(result, display, algorithm, caveats)
    sc = _sc_image(source, rgb, algorithm, OutputKind.SC, flag_headline(result, algorithm.output),
                   content_inputs(result, caveats), shows_source=True)
    logger.debug("SC %s for %s", sc.SOPInstanceUID, source.SOPInstanceUID)
    return sc


def build_not_analysed(source: Dataset, reason: str, algorithm: AlgorithmIdentity) -> hd.sc.SCImage:
    """Return a small SC card saying that ``source`` was not analysed and why.

    Raises ValueError if ``reason`` is empty or ``source`` cannot be referenced.
    """
    check_source(source)
    if not reason.strip():
        raise ValueError("A reason is required for a 'not analysed' note.")
    prefix = algorithm.output.description_prefix
    headline = f"{prefix}not analysed: {reason.strip()}"
    card = text_card(BannerText(
        headline=f"{prefix}not analysed",
        alert=False,
        items=[f"Reason: {reason.strip()}"],
        notices=[AI_DISCLAIMER, f"Model: {algorithm.label}"],
    ))
    sc = _sc_image(source, card, algorithm, OutputKind.NOT_ANALYSED, headline, (f"reason={reason.strip()}",),
                   shows_source=False)
    logger.debug("not-analysed note %s for %s", sc.SOPInstanceUID, source.SOPInstanceUID)
    return sc
