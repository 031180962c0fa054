"""The structured report of one analysed image: a TID 1500 Measurement Report in
a Comprehensive 3D SR.

The observer is the pipeline, as a device. The Image Library lists the source.
One TID 1410 planar ROI group per object, each outlined on the source image by
a closed POLYLINE box (an image-region SCOORD, which is what viewers such as
OHIF draw and list):

- each of the pipeline's segments (the chest's lungs): the box around its mask;
- each finding, whether flagged or not (one template for both): its probability
  and threshold (TID 300 numeric, no units, 4 decimals) and two qualitative
  evaluations from the node's local scheme, "AI flag" and "Experimental model"
  (Yes/No), for which no public code exists; outlined by the box around its
  localized region when flagged, else around the first segment, the region it
  assessed (the lungs).

The procedure reported, the finding codes and site are the pipeline's (see
:class:`pipelines.base.OutputDescription`).

The SEG's segments carry the Tracking UIDs of these groups (a group can reference
an image region or a segment, not both); the SEG is in the evidence. The document
is complete but unverified and preliminary, and ends with a Qualitative
Evaluations container holding the "not for diagnosis" marking.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.coding import Code
from pydicom.sr.codedict import codes
from pydicom.uid import SegmentationStorage, generate_uid

from dicom_node.writers.common import (
    AI_DISCLAIMER,
    UID_PREFIX,
    AlgorithmIdentity,
    OutputKind,
    check_result,
    complete_series,
    finding_code,
    flag_headline,
    content_inputs,
    instance_kwargs,
    local_code,
    local_scheme_item,
    tracking_uid,
    reference_of,
)
from pipelines.base import Finding, ImageResult, Segment

logger = logging.getLogger(__name__)

FLAG = local_code("FLAGGED", "AI flag")
EXPERIMENTAL = local_code("EXPERIMENTAL", "Experimental model")
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
SOURCE = Code("260753009", "SCT", "Source")
NO_UNITS = codes.UCUM.NoUnits

#: Decimals of the probabilities and thresholds written.
DECIMALS = 4


def _yes_no(value: bool) -> Code:
    return codes.SCT.Yes if value else codes.SCT.No


def _observation_context(algorithm: AlgorithmIdentity) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(UID_PREFIX, entropy_srcs=[algorithm.name, algorithm.version, "device"]),
        name=algorithm.name,
        manufacturer_name=algorithm.manufacturer,
        model_name=f"{algorithm.name} {algorithm.version}"[:64],
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(observer_type=codes.DCM.Device,
                                                      observer_identifying_attributes=device),
    )


def _outline(source: Dataset, mask: np.ndarray) -> hd.sr.ImageRegion:
    """Return the closed POLYLINE box around ``mask`` on ``source`` (pixel edges, column then row)."""
    rows, cols = np.nonzero(mask)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    corners = [(left, top), (right, top), (right, bottom), (left, bottom), (left, top)]
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=np.array(corners, dtype=np.float32),
        source_image=hd.sr.SourceImageForRegion.from_source_image(source),
    )


def _finding_group(source: Dataset, finding: Finding, assessed: np.ndarray,
                   algorithm: AlgorithmIdentity) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """Return the measurement group of ``finding``, outlined around its region when it has one, else
    around ``assessed`` (the pipeline's first segment), else (that segment empty) around the image."""
    output = algorithm.output
    region = (finding.region if finding.region is not None and finding.flagged and finding.region.any()
              else assessed if assessed.any() else np.ones_like(assessed, dtype=bool))
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid(source.SOPInstanceUID, algorithm, finding.name), identifier=finding.name,
        ),
        referenced_region=_outline(source, region),
        finding_type=finding_code(finding, output),
        algorithm_id=_algorithm_id(algorithm),
        finding_sites=[hd.sr.FindingSite(output.finding_site)] if output.finding_site is not None else None,
        measurements=[
            hd.sr.Measurement(name=codes.DCM.Probability, value=round(finding.probability, DECIMALS), unit=NO_UNITS),
            hd.sr.Measurement(name=codes.DCM.ThresholdValue, value=round(finding.threshold, DECIMALS), unit=NO_UNITS),
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(FLAG, _yes_no(finding.flagged)),
            hd.sr.QualitativeEvaluation(EXPERIMENTAL, _yes_no(finding.experimental)),
        ],
    )


def _insert_image_library(content: hd.sr.ContainerContentItem, source: Dataset) -> None:
    """Insert the TID 1600 Image Library listing ``source`` before the Imaging Measurements.

    highdicom's entry descriptors of a projection image need its Patient Orientation (two
    values) and Imager Pixel Spacing; a source without them is listed without descriptors.
    """
    reference = reference_of(source)
    if "ImagerPixelSpacing" in reference and len(reference.get("PatientOrientation") or []) == 2:
        library = hd.sr.ImageLibrary([reference])[0]
    else:
        image = hd.sr.ImageContentItem(
            name=SOURCE, referenced_sop_class_uid=source.SOPClassUID,
            referenced_sop_instance_uid=source.SOPInstanceUID, relationship_type="CONTAINS")
        group = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibraryGroup, relationship_type="CONTAINS")
        group.ContentSequence = [image]
        library = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibrary, relationship_type="CONTAINS")
        library.ContentSequence = [group]
    items = content.ContentSequence
    measurements = next(i for i, item in enumerate(items)
                        if item.ConceptNameCodeSequence[0].CodeValue == codes.DCM.ImagingMeasurements.value)
    items.insert(measurements, library)


def _algorithm_id(algorithm: AlgorithmIdentity) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(name=algorithm.name, version=algorithm.version)


def _segment_group(source: Dataset, segment: Segment, mask: np.ndarray, algorithm: AlgorithmIdentity,
                   ) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid(source.SOPInstanceUID, algorithm, segment.name), identifier=segment.name,
        ),
        referenced_region=_outline(source, mask),
        finding_type=segment.property_type,
        finding_category=segment.category,
        algorithm_id=_algorithm_id(algorithm),
    )


def _marking(caveats: Sequence[str]) -> hd.sr.ContainerContentItem:
    """Return the TID 1500 Qualitative Evaluations container holding the "not for diagnosis" comment
    and one comment per gate caveat ("age unknown")."""
    container = hd.sr.ContainerContentItem(name=QUALITATIVE_EVALUATIONS, relationship_type="CONTAINS")
    container.ContentSequence = [
        hd.sr.TextContentItem(name=codes.DCM.Comment, value=text, relationship_type="CONTAINS")
        for text in (AI_DISCLAIMER, *caveats)
    ]
    return container


def build_sr(source: Dataset, result: ImageResult, seg: Dataset, algorithm: AlgorithmIdentity,
             caveats: Sequence[str] = ()) -> hd.sr.Comprehensive3DSR:
    """Return the SR of ``result``, referencing ``source`` and the segments of ``seg`` (from :func:`build_seg`),
    with the gate's ``caveats`` as comments beside the "not for diagnosis" marking.

    Raises ValueError if ``seg`` is not a SEG of ``source`` or a mask does not match the source.
    """
    output = algorithm.output
    check_result(source, result, output)
    if seg.get("SOPClassUID") != SegmentationStorage:
        raise ValueError(f"seg must be a Segmentation, got SOP Class {seg.get('SOPClassUID')}.")
    referenced = {item.ReferencedSOPInstanceUID for series in seg.ReferencedSeriesSequence
                  for item in series.ReferencedInstanceSequence}
    if source.SOPInstanceUID not in referenced:
        raise ValueError(f"seg {seg.SOPInstanceUID} does not reference the source {source.SOPInstanceUID}.")

    # An empty segment has no region to outline: the SEG carries it, the SR has no group for it.
    groups = [_segment_group(source, s, result.masks[s.name], algorithm) for s in output.segments
              if result.masks[s.name].any()]
    assessed = result.masks[output.segments[0].name]
    groups += [_finding_group(source, f, assessed, algorithm) for f in result.findings]
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(algorithm),
        procedure_reported=output.procedure,
        imaging_measurements=groups,
    )
    _insert_image_library(report[0], source)
    report[0].ContentSequence.append(_marking(caveats))

    sr = hd.sr.Comprehensive3DSR(
        evidence=[reference_of(source), seg],
        content=report[0],
        is_complete=True,
        is_final=False,
        is_verified=False,
        coding_schemes=[local_scheme_item()],
        **instance_kwargs(source, algorithm, OutputKind.SR, flag_headline(result, output),
                                  content_inputs(result, caveats)),
    )
    complete_series(source, sr)
    logger.debug("SR %s for %s: %d groups", sr.SOPInstanceUID, source.SOPInstanceUID, len(groups))
    return sr
