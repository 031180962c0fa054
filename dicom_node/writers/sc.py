"""The Secondary Capture overlay any viewer can show: every source pixel, at the
source's pixel spacing and viewing contrast, with the pipeline's overlay (the chest
pipeline's: the Grad-CAM heat-map of the flagged findings and the lung and region
contours), between burned-in text bands above and below; and the short "not
analysed" note.

Colour means "flagged": only flagged findings' heat-maps are drawn, and the banner's
legend says so, also when there is none. The banner lists experimental heads' scores
only where the site turns them on (the output description's ``show_experimental``);
the SR and the results always carry them.

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


def _listed(result: ImageResult, output: OutputDescription) -> list[Finding]:
    """Return the findings the banner lists, flagged first, then by score: experimental heads' only
    where the site shows them (``output.show_experimental``); the SR always has them."""
    shown = [f for f in result.findings if output.show_experimental or not f.experimental]
    return sorted(shown, key=lambda f: (not f.flagged, f.experimental, -f.probability))


def banner_text(result: ImageResult, algorithm: AlgorithmIdentity, caveats: Sequence[str] = ()) -> BannerText:
    """Return the banner of ``result``: the flag, the findings listed (see :func:`_listed`), model,
    what the colours mean and the gate's caveats."""
    output = algorithm.output
    legend = [_shown_heat(result, output)[1], *(s.legend for s in output.segments),
              *([output.region_legend] if result.flagged else [])]
    return BannerText(
        headline=flag_headline(result, output),
        alert=bool(result.flagged),
        items=[_finding_item(f) for f in _listed(result, output)],
        notices=[AI_DISCLAIMER, *(caveat_notice(c, output) for c in caveats)],
        # one item per model, so that lines wrap between them rather than the text shrinking
        footer=[f"Model: {algorithm.software_versions[0]}", *algorithm.software_versions[1:], *legend],
    )


def _shown_heat(result: ImageResult, output: OutputDescription) -> tuple[np.ndarray | None, str]:
    """Return the heat-map to blend in (None: none) and the legend that says what colour means.

    The pixel-wise maximum of the flagged findings' heat-maps only: each is scaled to its own
    peak, so an unflagged finding's (COVID-19 at 0.12 against a threshold of 0.91) would look
    as hot as a flagged one's and draw the eye to what the model does not suspect.
    """
    maps = [np.asarray(f.heatmap, np.float32) for f in result.flagged if f.heatmap is not None]
    if not maps:
        return None, f"No colour: {output.heatmap_name} is shown for flagged findings only"
    return np.maximum.reduce(maps), f"Colour: {output.heatmap_name} of flagged findings only"


def _sc_content(result: ImageResult, output: OutputDescription, caveats: Sequence[str] = ()) -> tuple[str, ...]:
    """Return what decides the SC's content, for its UIDs: :func:`content_inputs`, how heat is shown
    and whether experimental heads' scores are on the banner."""
    experimental = "shown" if output.show_experimental else "hidden"
    return (*content_inputs(result, caveats), f"heat=flagged only, experimental scores {experimental}")


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
                   _sc_content(result, algorithm.output, caveats), shows_source=True)
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
