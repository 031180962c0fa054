"""What every result object shares: algorithm identity, deterministic UIDs and
series numbers, the flag in SeriesDescription, Contributing Equipment, codes,
and the checks of a writer's arguments. What is particular to a pipeline (its
segments, codes, wording) comes from its :class:`~pipelines.base.OutputDescription`.

UIDs are derived from everything that decides an object's content: the source
SOP Instance UID, the pipeline's name, version and weights digests, the writers'
version, each finding's threshold, the gate's caveats and the output kind. A
re-run on the same inputs gives the same UIDs, and replaces the objects in the
PACS; any change gives new ones, never a different object under a known UID.
Series numbers depend on the source and pipeline only, so they stay put.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from datetime import datetime
from collections.abc import Sequence
from enum import StrEnum
from typing import Any

import highdicom as hd
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom import Dataset, config
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue
from pydicom.sr.coding import Code
from pydicom.sr.codedict import codes
from pydicom.tag import BaseTag, Tag
from pydicom.uid import PYDICOM_ROOT_UID, generate_uid
from pydicom.valuerep import IS, VR, DSfloat, PersonName, validate_value

from dicom_node import __version__ as WRITERS_VERSION
from pipelines.base import Finding, ImageResult, OutputDescription, Pipeline, PipelinePlugin

logger = logging.getLogger(__name__)

#: Root of every UID the writers derive (pydicom's root, which it offers for this use).
UID_PREFIX = PYDICOM_ROOT_UID
#: The marking carried by every object (ASCII: the sources' character sets may be Latin-1).
AI_DISCLAIMER = "AI result - not for diagnosis"
#: Private coding scheme for the concepts no public terminology has (flag, experimental head).
LOCAL_SCHEME = "99DCMNODE"
#: Device Serial Number (type 1 in the SEG's Enhanced General Equipment): software has none.
DEVICE_SERIAL_NUMBER = "NONE (SOFTWARE)"

@dataclass(frozen=True)
class AlgorithmIdentity:
    """Who made the result: the pipeline and its models, as written into every object; how its
    results are shown and coded (``output``) and the source ``modalities`` its SC overlay takes over
    (its plug-in's; neither takes part in UIDs)."""

    name: str
    version: str
    model_versions: str
    output: OutputDescription = field(compare=False, repr=False, kw_only=True)
    modalities: frozenset[str] = field(default=frozenset(), compare=False, kw_only=True)
    manufacturer: str = "dicom-node"

    def __post_init__(self) -> None:
        for attribute in ("name", "version", "manufacturer"):
            value = getattr(self, attribute)
            if not value or len(value) > 64:
                raise ValueError(f"AlgorithmIdentity.{attribute} must be 1 to 64 characters, got {value!r}")

    @classmethod
    def of(cls, pipeline: Pipeline, plugin: PipelinePlugin) -> AlgorithmIdentity:
        """Return the identity of ``pipeline`` (its name, version and model versions), its results
        described as its ``plugin`` says."""
        return cls(name=pipeline.name, version=pipeline.version, model_versions=pipeline.model_versions,
                   output=plugin.output, modalities=plugin.modalities)

    @property
    def software_versions(self) -> tuple[str, ...]:
        """Return the Software Versions values: the pipeline, then each model."""
        models = [m.strip()[:64] for m in self.model_versions.split(";") if m.strip()]
        return (f"{self.name} {self.version}"[:64], *models)

    @property
    def label(self) -> str:
        """Return ``name version (models)`` for banners and texts."""
        base = f"{self.name} {self.version}"
        return f"{base} ({self.model_versions})" if self.model_versions else base


class OutputKind(StrEnum):
    """The result objects written for one image; the value takes part in UID derivation."""

    SC = "sc"
    SEG = "seg"
    SR = "sr"
    NOT_ANALYSED = "not-analysed"


_KIND_DIGIT = {OutputKind.SC: 1, OutputKind.SEG: 2, OutputKind.SR: 3, OutputKind.NOT_ANALYSED: 4}
_KIND_LABEL = {OutputKind.SC: "overlay", OutputKind.SEG: "SEG", OutputKind.SR: "SR", OutputKind.NOT_ANALYSED: "note"}


def content_inputs(result: ImageResult, caveats: Sequence[str] = ()) -> tuple[str, ...]:
    """Return what, beside the source and the algorithm, decides the content of a result's objects:
    each finding's threshold (and whether its head is experimental) and the gate's caveats."""
    findings = (f"{f.name}={f.threshold!r}{' experimental' if f.experimental else ''}" for f in result.findings)
    return (*findings, *(f"caveat={c}" for c in caveats))


def derive_uid(source_uid: str, algorithm: AlgorithmIdentity, kind: OutputKind, role: str,
               content: Sequence[str] = ()) -> str:
    """Return the UID for ``role`` ("series", "instance") of one output whose ``content`` inputs
    are those of :func:`content_inputs` (or, for a note, its reason).

    The same arguments always give the same UID; any change gives another.
    """
    sources = [source_uid, algorithm.name, algorithm.version, algorithm.model_versions, WRITERS_VERSION,
               kind.value, role, *content]
    return str(generate_uid(UID_PREFIX, entropy_srcs=sources))


def tracking_uid(source_uid: str, algorithm: AlgorithmIdentity, name: str) -> str:
    """Return the tracking UID of the object ``name`` (a segment's or a finding's) in one image,
    shared by its SEG segment and its SR measurement group."""
    sources = [source_uid, algorithm.name, algorithm.version, "tracking", name]
    return str(generate_uid(UID_PREFIX, entropy_srcs=sources))


def series_number(source_uid: str, algorithm: AlgorithmIdentity, kind: OutputKind) -> int:
    """Return a stable six-digit series number whose last digit names the kind (1 SC, 2 SEG, 3 SR, 4 note).

    The first five digits come from the source image and pipeline, so the outputs
    of two images of one study get different numbers (barring a 1 in 90 000 clash).
    """
    digest = hashlib.sha256(f"{source_uid}|{algorithm.name}|{algorithm.version}".encode()).digest()
    return 100_000 + int.from_bytes(digest[:8], "big") % 90_000 * 10 + _KIND_DIGIT[kind]


def flag_headline(result: ImageResult, output: OutputDescription) -> str:
    """Return ``AI CXR: SUSPECTED COVID-19 (0.93)`` (the description prefix, flagged findings, highest
    first) or the no-flag text."""
    flagged = sorted(result.flagged, key=lambda f: f.probability, reverse=True)
    if not flagged:
        return f"{output.description_prefix}no flagged finding"
    return output.description_prefix + "SUSPECTED " + ", ".join(
        f"{f.display_name.upper()} ({f.probability:.2f})" for f in flagged)


def series_description(headline: str, kind: OutputKind) -> str:
    """Return ``headline [kind]`` cut to the 64 characters of a LO, keeping the kind label."""
    suffix = f" [{_KIND_LABEL[kind]}]"
    return headline[: 64 - len(suffix)].rstrip() + suffix


def finding_code(finding: Finding, output: OutputDescription) -> Code:
    """Return the pipeline's code of ``finding``, or a code of the local scheme for names it does not code."""
    if finding.name in output.finding_codes:
        return output.finding_codes[finding.name]
    logger.debug("no code for finding %r: coded in %s", finding.name, LOCAL_SCHEME)
    return Code(finding.name[:16], LOCAL_SCHEME, finding.display_name[:64])


def caveat_notice(caveat: str, output: OutputDescription) -> str:
    """Return the banner line of a gate caveat (the caveat itself when the pipeline has no longer wording)."""
    return output.caveat_notices.get(caveat, caveat)


def local_code(value: str, meaning: str) -> Code:
    """Return a code of the node's private scheme :data:`LOCAL_SCHEME`."""
    return Code(value, LOCAL_SCHEME, meaning)


def local_scheme_item() -> CodingSchemeIdentificationItem:
    """Return the Coding Scheme Identification item that declares :data:`LOCAL_SCHEME`."""
    return CodingSchemeIdentificationItem(
        designator=LOCAL_SCHEME, name="dicom-node local codes", responsible_organization="dicom-node"
    )


def algorithm_sequence(algorithm: AlgorithmIdentity) -> hd.AlgorithmIdentificationSequence:
    """Return the Algorithm Identification Sequence (family: Artificial Intelligence)."""
    return hd.AlgorithmIdentificationSequence(
        name=algorithm.name, version=algorithm.version, family=codes.DCM.ArtificialIntelligence,
        source=algorithm.manufacturer,
    )


def contributing_equipment(algorithm: AlgorithmIdentity) -> hd.ContributingEquipment:
    """Return the IHE AI Results Contributing Equipment item: the algorithm as Processing Equipment."""
    return hd.ContributingEquipment(
        manufacturer=algorithm.manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=algorithm.name,
        software_versions=list(algorithm.software_versions),
        contribution_description=f"AI analysis: {AI_DISCLAIMER}",
        contribution_datetime=datetime.now().astimezone(),
    )


def instance_kwargs(source: Dataset, algorithm: AlgorithmIdentity, kind: OutputKind,
                    headline: str, content: Sequence[str]) -> dict[str, Any]:
    """Return the highdicom constructor arguments every output shares: identity, UIDs (from
    ``content``, see :func:`derive_uid`), series, equipment, character set."""
    source_uid = source.SOPInstanceUID
    return {
        "series_instance_uid": derive_uid(source_uid, algorithm, kind, "series", content),
        "series_number": series_number(source_uid, algorithm, kind),
        "sop_instance_uid": derive_uid(source_uid, algorithm, kind, "instance", content),
        "instance_number": 1,
        "manufacturer": algorithm.manufacturer,
        "manufacturer_model_name": algorithm.name,
        "software_versions": list(algorithm.software_versions),
        "series_description": series_description(headline, kind),
        "contributing_equipment": [contributing_equipment(algorithm)],
        "specific_character_set": CHARACTER_SET,
    }


def complete_series(source: Dataset, output: Dataset) -> None:
    """Set what highdicom leaves out of an output: Series Date and Time (its content's), and the
    source's Study Description and Timezone Offset From UTC, when it has them."""
    output.SeriesDate, output.SeriesTime = output.ContentDate, output.ContentTime
    for keyword in ("StudyDescription", "TimezoneOffsetFromUTC"):
        if source.get(keyword):
            output[keyword] = source[keyword]


def copy_patient_orientation(source: Dataset, target: Dataset) -> None:
    """Copy Patient Orientation verbatim (type 2C in projection images: empty when unknown)."""
    target.PatientOrientation = source.get("PatientOrientation", "")


def check_source(source: Dataset) -> tuple[int, int]:
    """Return the source's (Rows, Columns); raise ValueError if it cannot be referenced."""
    required = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Rows", "Columns")
    missing = [keyword for keyword in required if not source.get(keyword)]
    if missing:
        raise ValueError(f"The source data set lacks {', '.join(missing)}.")
    return int(source.Rows), int(source.Columns)


def _check_array(label: str, array: np.ndarray | None, shape: tuple[int, int]) -> None:
    if array is not None and np.shape(array) != shape:
        raise ValueError(f"{label} has shape {np.shape(array)}, expected the source's Rows x Columns {shape}.")


def check_result(source: Dataset, result: ImageResult, output: OutputDescription,
                 display: np.ndarray | None = None) -> None:
    """Raise ValueError unless ``result`` (and ``display``) fit ``source`` and ``output``: same image, same
    geometry, a mask for each of the pipeline's segments and no other, scores in [0, 1], unique finding
    names (other than the segments'), no flagged experimental finding, not skipped."""
    shape = check_source(source)
    if not result.verdict.accepted:
        raise ValueError(f"The image was skipped ({result.verdict.reason}): it yields no result objects.")
    if result.sop_instance_uid != source.SOPInstanceUID:
        raise ValueError(
            f"The result is for {result.sop_instance_uid}, not for the source {source.SOPInstanceUID}.")
    segments = output.segment_names()
    if sorted(result.masks) != sorted(segments):
        raise ValueError(f"The result's masks are {sorted(result.masks)}, the pipeline's segments {segments}.")
    for name, mask in result.masks.items():
        _check_array(f"mask {name!r}", mask, shape)
    if display is not None:
        _check_array("display", display, shape)
        if display.dtype != np.uint8:
            raise ValueError(f"display must be uint8, got {display.dtype}.")
    names = [f.name for f in result.findings]
    if len(set(names)) != len(names) or set(names) & set(segments):
        raise ValueError(f"Finding names must be unique and other than the segments' {segments}, got {names}.")
    for f in result.findings:
        if not f.name:
            raise ValueError("Every finding needs a name.")
        for label, value in (("probability", f.probability), ("threshold", f.threshold)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"Finding {f.name!r}: {label} {value} is outside [0, 1].")
        if f.flagged and f.experimental:
            raise ValueError(f"Finding {f.name!r} is experimental and cannot be flagged.")
        _check_array(f"Finding {f.name!r} heatmap", f.heatmap, shape)
        _check_array(f"Finding {f.name!r} region", f.region, shape)


def segmented_findings(result: ImageResult) -> list[Finding]:
    """Return the flagged findings that have a region, in result order: the SEG's segments after the pipeline's."""
    return [f for f in result.findings if f.flagged and f.region is not None]


#: The Type 2 attributes of the Patient and General Study modules: present in every object,
#: empty when the source does not know them (anonymised feeds omit several) or states them invalidly.
PATIENT_STUDY_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                       "ReferringPhysicianName", "StudyID", "AccessionNumber")
#: The character set of every object the writers make (UTF-8), whatever the source's: copied text is
#: decoded from the source's character set, leniently (an unknown one as pydicom's default, with a warning).
CHARACTER_SET = "ISO_IR 192"
SPECIFIC_CHARACTER_SET = Tag("SpecificCharacterSet")
#: Copied attributes whose values are enumerated (highdicom refuses any other).
ENUMERATED = {"PatientSex": ("M", "F", "O")}
#: The values that pydicom keeps as text and checks against their VR (numbers in binary VRs always fit).
_TEXT_VALUES = (str, PersonName, DSfloat, IS)


def _valid(element: DataElement) -> bool:
    """Return whether every value of ``element`` is valid for its VR (and enumerated values allowed)."""
    values = element.value if isinstance(element.value, MultiValue) else [element.value]
    allowed = ENUMERATED.get(element.keyword)
    try:
        for value in values:
            if isinstance(value, _TEXT_VALUES):
                validate_value(element.VR, str(value), config.RAISE)
                if allowed and value and value not in allowed:
                    return False
    except ValueError:
        return False
    return True


def _decoded(dataset: Dataset, tag: BaseTag, invalid: list[str]) -> DataElement | None:
    """Return ``dataset``'s element ``tag`` with its text decoded (sequence items too), or None, naming it
    in ``invalid``, when its value cannot be read or is invalid for its VR."""
    try:
        element = dataset[tag]  # a raw element is converted here: text decoded with the data set's set
    except (ValueError, TypeError, UnicodeError):
        element = None
    if element is not None and element.VR == VR.SQ:
        items = []
        for item in element.value:
            copy = Dataset()
            for item_tag in item.keys():
                if (nested := _decoded(item, item_tag, invalid)) is not None:
                    copy.add(nested)
            items.append(copy)
        return DataElement(tag, VR.SQ, items)
    if element is None or not _valid(element):
        invalid.append(keyword_for_tag(tag) or str(tag))
        return None
    return element


def reference_of(source: Dataset) -> Dataset:
    """Return what the writers copy from ``source``: its attributes without pixel data (which may be
    compressed), text decoded into :data:`CHARACTER_SET`, those whose values are invalid for their VR
    left out (a PatientBirthDate ``01.02.1970``, a PixelSpacing ``a\\b``), and each attribute of
    :data:`PATIENT_STUDY_TYPE2` present (empty when absent or invalid)."""
    meta = Dataset()
    meta.file_meta = getattr(source, "file_meta", Dataset())
    invalid: list[str] = []
    for tag in source.keys():
        if tag.group != 0x7FE0 and tag != SPECIFIC_CHARACTER_SET:
            if (element := _decoded(source, tag, invalid)) is not None:
                meta.add(element)
    meta.SpecificCharacterSet = CHARACTER_SET
    for keyword in PATIENT_STUDY_TYPE2:
        if keyword not in meta:
            setattr(meta, keyword, None)
    if invalid:
        logger.debug("source %s: attributes with invalid values not copied (type 2 left empty): %s",
                    source.SOPInstanceUID, ", ".join(invalid))
    return meta
