"""The DICOM Segmentation of one analysed image: the pipeline's segments (the chest
pipeline's lungs), then the localized region of each flagged finding (its Grad-CAM
region, labelled with the finding).

Projection radiographs (CR, DX) have no Image Position/Orientation (Patient), so
highdicom writes the SEG without a patient coordinate system: one frame per
segment, mapped pixel for pixel onto the source through the Derivation Image
Sequence. What viewers need beyond that, and how it is met:

- FRACTIONAL (occupancy 0 or 255), RLE Lossless: OHIF's reader (dcmjs) rejects the
  pad byte of 1-bit BINARY frames, and Orthanc refuses to cut 1-bit frames whose
  width is not a multiple of 8. RLE keeps a frame of 3.6 MB to some 20 kB.
- Pixel Measures, from the source's Pixel Spacing or else its Imager Pixel Spacing
  (never an invalid ``0\\0``, which highdicom would copy), with a nominal Slice
  Thickness: OHIF destructures the item and highdicom's reader requires the
  thickness; without a frame of reference neither has spatial meaning beyond the
  pixel size. A source with no valid spacing gives a SEG without Pixel Measures.
- Plane Orientation ``1\\0\\0\\0\\1\\0`` (rows along x, columns along y): the
  frames lie in the image plane, which OHIF checks before drawing them.
- Patient Orientation, a type 2C attribute of such a SEG, copied from the source.
"""

from __future__ import annotations

import logging

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import RLELossless

from dicom_node.writers.common import (
    AI_DISCLAIMER,
    DEVICE_SERIAL_NUMBER,
    AlgorithmIdentity,
    OutputKind,
    algorithm_sequence,
    check_result,
    complete_series,
    content_inputs,
    copy_patient_orientation,
    flag_headline,
    instance_kwargs,
    segmented_findings,
    tracking_uid,
    reference_of,
)
from pipelines.base import ImageResult, pixel_spacing

logger = logging.getLogger(__name__)

#: Slice Thickness of the Pixel Measures of a projection image (see the module docstring).
NOMINAL_THICKNESS_MM = 1.0


def _image_plane() -> Dataset:
    item = Dataset()
    item.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    return item


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
    """Return the SEG of ``result``: the pipeline's segments from 1 (the chest's lungs), then each
    flagged finding with a region.

    Raises ValueError if a mask does not match the source's Rows/Columns or the pipeline's segments.
    """
    output = algorithm.output
    check_result(source, result, output)
    uid = source.SOPInstanceUID
    findings = segmented_findings(result)
    unlocalized = [f.name for f in result.flagged if f.region is None]
    if unlocalized:
        logger.warning("flagged findings without a region get no segment in the SEG of %s: %s", uid, unlocalized)
    descriptions = [_segment(n, s.name, s.label, s.category, s.property_type, algorithm, uid, s.colour)
                    for n, s in enumerate(output.segments, start=1)]
    sites = [output.finding_site] if output.finding_site is not None else None
    descriptions += [
        _segment(n, f.name, f.display_name, output.region_category, output.region_type, algorithm, uid,
                 output.region_colour, sites)
        for n, f in enumerate(findings, start=len(output.segments) + 1)
    ]
    masks = np.stack([*(result.masks[s.name] for s in output.segments), *(f.region for f in findings)],
                     axis=-1).astype(bool)

    reference = reference_of(source)
    projection = "ImagePositionPatient" not in reference
    spacing = pixel_spacing(source)
    if projection and "PixelSpacing" in reference:
        del reference.PixelSpacing  # given explicitly below, or not at all

    seg = hd.seg.Segmentation(
        source_images=[reference],
        pixel_array=masks[np.newaxis].astype(np.float32),
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
        fractional_type=hd.seg.SegmentationFractionalTypeValues.OCCUPANCY,
        segment_descriptions=descriptions,
        device_serial_number=DEVICE_SERIAL_NUMBER,
        content_label=output.content_label,
        content_description=AI_DISCLAIMER,
        omit_empty_frames=False,
        transfer_syntax_uid=RLELossless,
        pixel_measures=(hd.PixelMeasuresSequence(pixel_spacing=spacing, slice_thickness=NOMINAL_THICKNESS_MM)
                        if projection and spacing else None),
        **instance_kwargs(source, algorithm, OutputKind.SEG, flag_headline(result, output),
                                  content_inputs(result)),
    )
    if projection:
        copy_patient_orientation(source, seg)
        seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence = [_image_plane()]
    complete_series(source, seg)
    seg.ImageComments = AI_DISCLAIMER
    logger.debug("SEG %s for %s: %d segments", seg.SOPInstanceUID, uid, len(descriptions))
    return seg
