"""The DICOM Segmentation (BINARY) of one analysed image: the lungs, then the
localized region of each flagged finding.

Projection radiographs (CR, DX) have no Image Position/Orientation (Patient), so
highdicom writes the SEG without a patient coordinate system: one frame per
segment, mapped pixel for pixel onto the source through the Derivation Image
Sequence. Two consequences handled here:

- Patient Orientation becomes a type 2C attribute of the SEG; it is copied from
  the source.
- Pixel Measures: highdicom would copy the source's Pixel Spacing, even an
  invalid ``0\\0`` (as in RG1), and its own reader then rejects the file, as it
  does any Pixel Measures item without Slice Thickness, which a projection image
  does not have. The standard does not require Pixel Measures in a SEG without a
  frame of reference, and the source image keeps the calibrated spacing, so the
  SEG carries none: the source is handed to highdicom without Pixel Spacing.
"""

from __future__ import annotations

import logging

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.coding import Code

from dicom_node.writers.common import (
    ABNORMAL_STRUCTURE,
    AI_DISCLAIMER,
    ANATOMICAL_STRUCTURE,
    LUNG,
    LUNGS,
    AlgorithmIdentity,
    OutputKind,
    algorithm_sequence,
    check_result,
    copy_patient_orientation,
    finding_code,
    flag_headline,
    instance_kwargs,
    segmented_findings,
    tracking_uid,
    reference_of,
)
from pipelines.base import ImageResult
from pipelines.chest_xray.overlay import LUNG_COLOUR, REGION_COLOUR

logger = logging.getLogger(__name__)

#: Segment number of the lungs; flagged findings follow from 2.
LUNG_SEGMENT = 1


def _segment(number: int, name: str, label: str, category: Code, prop_type: Code, algorithm: AlgorithmIdentity,
             source_uid: str, colour: tuple[int, int, int], anatomic_regions: list[Code] | None = None,
             ) -> hd.seg.SegmentDescription:
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label[:64],
        segmented_property_category=category,
        segmented_property_type=prop_type,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm_sequence(algorithm),
        tracking_uid=tracking_uid(source_uid, algorithm, name),
        tracking_id=name[:64],
        anatomic_regions=anatomic_regions,
        display_color=hd.color.CIELabColor.from_rgb(*colour),
    )


def build_seg(source: Dataset, result: ImageResult, algorithm: AlgorithmIdentity) -> hd.seg.Segmentation:
    """Return the SEG of ``result``: segment 1 the lungs, then each flagged finding with a region.

    Raises ValueError if a mask does not match the source's Rows/Columns.
    """
    check_result(source, result)
    uid = source.SOPInstanceUID
    findings = segmented_findings(result)
    unlocalized = [f.name for f in result.flagged if f.region is None]
    if unlocalized:
        logger.warning("flagged findings without a region get no segment in the SEG of %s: %s", uid, unlocalized)
    descriptions = [_segment(LUNG_SEGMENT, LUNGS, "Lungs", ANATOMICAL_STRUCTURE, LUNG, algorithm, uid, LUNG_COLOUR)]
    descriptions += [
        _segment(n, f.name, f.display_name, ABNORMAL_STRUCTURE, finding_code(f), algorithm, uid, REGION_COLOUR, [LUNG])
        for n, f in enumerate(findings, start=LUNG_SEGMENT + 1)
    ]
    masks = np.stack([result.lung_mask, *(f.region for f in findings)], axis=-1).astype(bool)

    reference = reference_of(source)
    if "ImagePositionPatient" not in reference and "PixelSpacing" in reference:
        del reference.PixelSpacing  # see the module docstring: no Pixel Measures for projection images

    seg = hd.seg.Segmentation(
        source_images=[reference],
        pixel_array=masks[np.newaxis],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        device_serial_number=algorithm.version,  # software has no serial number; its version stands in
        content_label="AI_CXR",
        content_description=AI_DISCLAIMER,
        omit_empty_frames=False,
        **instance_kwargs(source, algorithm, OutputKind.SEG, flag_headline(result)),
    )
    if "ImagePositionPatient" not in source:
        copy_patient_orientation(source, seg)
    seg.ImageComments = AI_DISCLAIMER
    logger.debug("SEG %s for %s: %d segments", seg.SOPInstanceUID, uid, len(descriptions))
    return seg
