"""The structured report of one analysed image: a TID 1500 Measurement Report in
a Comprehensive 3D SR.

The observer is the pipeline, as a device. One measurement group per object:

- the lungs: a TID 1410 planar ROI group referencing SEG segment 1;
- each finding: its probability and threshold (TID 300 numeric, no units) and two
  qualitative evaluations from the node's local scheme, "AI flag" and
  "Experimental model" (Yes/No); a finding with a SEG segment is a TID 1410 group
  referencing that segment, any other a TID 1501 group referencing the source image.

The document is complete but unverified and preliminary, and ends with a
Qualitative Evaluations container holding the "not for diagnosis" marking.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.coding import Code
from pydicom.sr.codedict import codes
from pydicom.uid import SegmentationStorage, generate_uid

from dicom_node.writers.common import (
    AI_DISCLAIMER,
    ANATOMICAL_STRUCTURE,
    LUNG,
    LUNGS,
    UID_PREFIX,
    AlgorithmIdentity,
    OutputKind,
    check_result,
    finding_code,
    flag_headline,
    instance_kwargs,
    local_code,
    local_scheme_item,
    segmented_findings,
    tracking_uid,
    reference_of,
)
from dicom_node.writers.seg import LUNG_SEGMENT
from pipelines.base import Finding, ImageResult

logger = logging.getLogger(__name__)

FLAG = local_code("FLAGGED", "AI flag")
EXPERIMENTAL = local_code("EXPERIMENTAL", "Experimental model")
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
PLAIN_CHEST_XRAY = Code("399208008", "SCT", "Plain chest X-ray")
NO_UNITS = codes.UCUM.NoUnits

Group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations | hd.sr.MeasurementsAndQualitativeEvaluations


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


def _segment_reference(source: Dataset, seg: Dataset, segment: int) -> hd.sr.ReferencedSegmentationFrame:
    """Return the reference to ``segment`` of ``seg`` by segment number only.

    The Image SOP Instance Reference macro forbids a Referenced Frame Number beside
    a Referenced Segment Number, and highdicom's ``from_segmentation`` would also
    give the single-frame source image a frame number.
    """
    reference = hd.sr.ReferencedSegmentationFrame(
        sop_class_uid=seg.SOPClassUID,
        sop_instance_uid=seg.SOPInstanceUID,
        frame_number=segment,  # one frame per segment; removed below
        segment_number=segment,
        source_image=hd.sr.SourceImageForSegmentation.from_source_image(source),
    )
    del reference[0].ReferencedSOPSequence[0].ReferencedFrameNumber
    return reference


def _finding_group(source: Dataset, seg: Dataset, finding: Finding, segment: int | None,
                   algorithm: AlgorithmIdentity) -> Group:
    """Return the measurement group of ``finding``: planar ROI on SEG ``segment``, image-level without one."""
    common = {
        "tracking_identifier": hd.sr.TrackingIdentifier(
            uid=tracking_uid(source.SOPInstanceUID, algorithm, finding.name), identifier=finding.name,
        ),
        "finding_type": finding_code(finding),
        "algorithm_id": _algorithm_id(algorithm),
        "finding_sites": [hd.sr.FindingSite(LUNG)],
        "measurements": [
            hd.sr.Measurement(name=codes.DCM.Probability, value=finding.probability, unit=NO_UNITS),
            hd.sr.Measurement(name=codes.DCM.ThresholdValue, value=finding.threshold, unit=NO_UNITS),
        ],
        "qualitative_evaluations": [
            hd.sr.QualitativeEvaluation(FLAG, _yes_no(finding.flagged)),
            hd.sr.QualitativeEvaluation(EXPERIMENTAL, _yes_no(finding.experimental)),
        ],
    }
    if segment is not None:
        return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            referenced_segment=_segment_reference(source, seg, segment), **common,
        )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)], **common,
    )


def _algorithm_id(algorithm: AlgorithmIdentity) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(name=algorithm.name, version=algorithm.version)


def _lung_group(source: Dataset, seg: Dataset, algorithm: AlgorithmIdentity,
                ) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid(source.SOPInstanceUID, algorithm, LUNGS), identifier=LUNGS,
        ),
        referenced_segment=_segment_reference(source, seg, LUNG_SEGMENT),
        finding_type=LUNG,
        finding_category=ANATOMICAL_STRUCTURE,
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
    check_result(source, result)
    if seg.get("SOPClassUID") != SegmentationStorage:
        raise ValueError(f"seg must be a Segmentation, got SOP Class {seg.get('SOPClassUID')}.")
    referenced = {item.ReferencedSOPInstanceUID for series in seg.ReferencedSeriesSequence
                  for item in series.ReferencedInstanceSequence}
    if source.SOPInstanceUID not in referenced:
        raise ValueError(f"seg {seg.SOPInstanceUID} does not reference the source {source.SOPInstanceUID}.")

    segments = {f.name: n for n, f in enumerate(segmented_findings(result), start=LUNG_SEGMENT + 1)}
    groups = [_lung_group(source, seg, algorithm)]
    groups += [_finding_group(source, seg, f, segments.get(f.name), algorithm) for f in result.findings]
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(algorithm),
        procedure_reported=PLAIN_CHEST_XRAY,
        imaging_measurements=groups,
    )
    report[0].ContentSequence.append(_marking(caveats))

    sr = hd.sr.Comprehensive3DSR(
        evidence=[reference_of(source), seg],
        content=report[0],
        is_complete=True,
        is_final=False,
        is_verified=False,
        coding_schemes=[local_scheme_item()],
        **instance_kwargs(source, algorithm, OutputKind.SR, flag_headline(result)),
    )
    logger.debug("SR %s for %s: %d groups", sr.SOPInstanceUID, source.SOPInstanceUID, len(groups))
    return sr
