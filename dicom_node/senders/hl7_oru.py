"""One HL7 v2.5 ORU^R01 for one analysed study, built from the node's structured reports.

The findings are read back from the SRs the node wrote (:mod:`dicom_node.writers.sr`):
each TID 1410 group with a probability is one finding on one image, with its code,
probability, threshold and the "AI flag" evaluation. The patient, accession number and
procedure are the SR's, copied from the source. The message (see docs/hl7.md)::

    MSH  ORU^R01^ORU_R01, version 2.5, UTF-8
    PID  patient id (with its issuer), name, birth date, sex, as the source had them
    ORC  RE, accession number as placer and filler order number, priority in ORC-7.6
    OBR  accession number, procedure (OBR-4), observation time, result status F (OBR-25),
         priority in OBR-27.6
    TQ1  priority (TQ1-9): S (stat) when a finding is flagged, else R (routine)
    NTE  "AI result - not for diagnosis"
    OBX  per finding per image: NM, the finding's code (OBX-3), the image's number (OBX-4),
         the score (OBX-5), "<threshold" as reference range (OBX-7), A when flagged (OBX-8)
    NTE  after the OBX of an experimental model's finding, which is never flagged

Values from the source (names, ids) are escaped; nothing from them is logged.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import highdicom as hd
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Group, Message
from hl7apy.factories import datatype_factory
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import Comprehensive3DSRStorage

from dicom_node.writers.common import AI_DISCLAIMER
from dicom_node.writers.sr import EXPERIMENTAL, FLAG

logger = logging.getLogger(__name__)

VERSION = "2.5"
#: Table 0485 priorities: a flagged study is stat, so that a worklist sorts it first.
STAT, ROUTINE = "S", "R"
#: Length of MSH-10 in HL7 2.5.
CONTROL_ID_LENGTH = 20
#: DICOM Patient's Sex → HL7 table 0001.
SEX = {"M": "M", "F": "F", "O": "O"}
EXPERIMENTAL_NOTE = "Experimental model: score only, never flagged"


class ReportError(ValueError):
    """A file is not a structured report of the node, or lacks what the RIS needs (fixed texts)."""


@dataclass(frozen=True)
class Observation:
    """One finding on one image: its code, score and threshold, and whether it is flagged."""

    code: Code
    score: float
    threshold: float
    flagged: bool
    experimental: bool


@dataclass(frozen=True)
class Report:
    """What one SR says: the patient and order of its study, and its findings."""

    sop_instance_uid: str
    study_instance_uid: str
    patient: Dataset
    accession_number: str
    procedure: Code
    observed_at: str
    observations: tuple[Observation, ...]


def read_report(path: Path) -> Report:
    """Return what the SR at ``path`` reports.

    Raises :class:`ReportError` when it is not a readable Comprehensive 3D SR with a
    TID 1500 report of the node's findings, or its study has no patient id or accession number.
    """
    try:
        dataset = dcmread(path)
    except (OSError, InvalidDicomError) as exc:
        raise ReportError("not a readable DICOM file") from exc
    if dataset.get("SOPClassUID") != Comprehensive3DSRStorage:
        raise ReportError("not a structured report of the node")
    try:
        sr = hd.sr.Comprehensive3DSR.from_dataset(dataset)
    except (AttributeError, KeyError, IndexError, TypeError, ValueError) as exc:
        raise ReportError("not a structured report of the node") from exc
    if not isinstance(sr.content, hd.sr.MeasurementReport):
        raise ReportError("not a structured report of the node")
    if not str(sr.get("PatientID") or "").strip():
        raise ReportError("the study has no patient ID")
    if not str(sr.get("AccessionNumber") or "").strip():
        raise ReportError("the study has no accession number: the RIS cannot match its order")
    try:
        return Report(
            sop_instance_uid=sr.SOPInstanceUID,
            study_instance_uid=sr.StudyInstanceUID,
            patient=sr,
            accession_number=str(sr.AccessionNumber).strip(),
            procedure=_procedure(sr),
            observed_at=f"{sr.ContentDate}{sr.ContentTime}"[:14],
            observations=tuple(_observations(sr.content)),
        )
    except (AttributeError, KeyError, IndexError, StopIteration, TypeError, ValueError) as exc:
        raise ReportError("a structured report without the node's findings") from exc


def _procedure(sr: Dataset) -> Code:
    item = next(i for i in sr.ContentSequence
                if i.ConceptNameCodeSequence[0].CodeValue == codes.DCM.ProcedureReported.value)
    code = item.ConceptCodeSequence[0]
    return Code(code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning)


def _observations(report: hd.sr.MeasurementReport) -> list[Observation]:
    """Return the findings of ``report``: its groups with a probability (a segment's group has none)."""
    found = []
    for group in report.get_planar_roi_measurement_groups():
        probability = group.get_measurements(name=codes.DCM.Probability)
        if not probability:
            continue
        threshold = group.get_measurements(name=codes.DCM.ThresholdValue)
        answers = {e.name.value: e.value.value == codes.SCT.Yes.value
                   for e in group.get_qualitative_evaluations()}
        found.append(Observation(
            code=Code(group.finding_type.value, group.finding_type.scheme_designator,
                      group.finding_type.meaning),
            score=float(probability[0].value),
            threshold=float(threshold[0].value),
            flagged=answers.get(FLAG.value, False),
            experimental=answers.get(EXPERIMENTAL.value, False),
        ))
    return found


@dataclass(frozen=True)
class Parties:
    """MSH-3 to MSH-6: who sends (application, facility) and who receives."""

    sending_application: str
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""


def control_id(reports: Sequence[Report]) -> str:
    """Return the MSH-10 of the message of ``reports``: derived from their SR UIDs, so that a
    message sent again carries the id of the first try and the RIS can tell the duplicate."""
    digest = hashlib.sha256("|".join(sorted(r.sop_instance_uid for r in reports)).encode())
    return digest.hexdigest()[:CONTROL_ID_LENGTH].upper()


def is_flagged(reports: Sequence[Report]) -> bool:
    """Return whether any finding of ``reports`` is flagged."""
    return any(o.flagged for r in reports for o in r.observations)


def build_oru(reports: Sequence[Report], parties: Parties, now: datetime) -> Message:
    """Return the ORU^R01 of ``reports``, the SRs of one study (OBX-4 numbers their images).

    Raises ValueError when ``reports`` is empty or spans several studies.
    """
    if not reports:
        raise ValueError("At least one report is required.")
    if len({r.study_instance_uid for r in reports}) > 1:
        raise ValueError("The reports must be of one study.")
    message = Message("ORU_R01", version=VERSION, validation_level=VALIDATION_LEVEL.STRICT)
    _msh(message, parties, control_id(reports), now)
    result = message.add_group("ORU_R01_PATIENT_RESULT")
    _pid(result.add_group("ORU_R01_PATIENT"), reports[0].patient)
    _order(result.add_group("ORU_R01_ORDER_OBSERVATION"), reports, STAT if is_flagged(reports) else ROUTINE)
    return message


def _text(value: str, datatype: str = "ST"):
    """Return ``value`` as an HL7 datatype, its delimiters escaped when written."""
    return datatype_factory(datatype, value, version=VERSION)


def _msh(message: Message, parties: Parties, control: str, now: datetime) -> None:
    msh = message.msh
    msh.msh_3 = parties.sending_application
    msh.msh_4 = parties.sending_facility
    msh.msh_5 = parties.receiving_application
    msh.msh_6 = parties.receiving_facility
    msh.msh_7 = now.strftime("%Y%m%d%H%M%S")
    msh.msh_9 = "ORU^R01^ORU_R01"
    msh.msh_10 = control
    msh.msh_11 = "P"
    msh.msh_12 = VERSION
    msh.msh_18 = "UNICODE UTF-8"


def _pid(patient: Group, source: Dataset) -> None:
    pid = patient.add_segment("PID")
    pid.pid_1 = "1"
    pid.pid_3.cx_1 = _text(str(source.PatientID).strip())
    if source.get("IssuerOfPatientID"):
        pid.pid_3.cx_4.hd_1 = _text(str(source.IssuerOfPatientID), "IS")
    name = source.get("PatientName")
    if name:
        # DICOM PN family^given^middle^prefix^suffix → XPN family^given^middle^suffix^prefix
        xpn = pid.pid_5
        for part, value in (("xpn_1.fn_1", name.family_name), ("xpn_2", name.given_name),
                            ("xpn_3", name.middle_name), ("xpn_4", name.name_suffix),
                            ("xpn_5", name.name_prefix)):
            if value:
                component, _, sub = part.partition(".")
                target = getattr(xpn, component) if sub else xpn
                setattr(target, sub or component, _text(value))
    if source.get("PatientBirthDate"):
        pid.pid_7 = str(source.PatientBirthDate)
    if source.get("PatientSex") in SEX:
        pid.pid_8 = SEX[source.PatientSex]


def _order(order: Group, reports: Sequence[Report], priority: str) -> None:
    first = reports[0]
    accession = _text(first.accession_number, "ST")
    orc = order.add_segment("ORC")
    orc.orc_1 = "RE"
    orc.orc_2.ei_1 = accession
    orc.orc_3.ei_1 = accession
    orc.orc_5 = "CM"
    orc.orc_7.tq_6 = priority
    obr = order.add_segment("OBR")
    obr.obr_1 = "1"
    obr.obr_2.ei_1 = accession
    obr.obr_3.ei_1 = accession
    _coded(obr.obr_4, first.procedure)
    obr.obr_7 = first.observed_at
    obr.obr_22 = first.observed_at
    obr.obr_24 = "RAD"
    obr.obr_25 = "F"
    obr.obr_27.tq_6 = priority
    order.add_group("ORU_R01_TIMING_QTY").add_segment("TQ1").tq1_9 = f"{priority}^^HL70485"
    _note(order, 1, AI_DISCLAIMER)
    set_id = 0
    for image, report in enumerate(reports, start=1):
        for observation in report.observations:
            set_id += 1
            _obx(order.add_group("ORU_R01_OBSERVATION"), set_id, image, observation, report.observed_at)


def _obx(group: Group, set_id: int, image: int, observation: Observation, observed_at: str) -> None:
    obx = group.add_segment("OBX")
    obx.obx_1 = str(set_id)
    obx.obx_2 = "NM"
    _coded(obx.obx_3, observation.code)
    obx.obx_4 = str(image)
    obx.obx_5 = f"{observation.score:.4f}"
    obx.obx_7 = f"<{observation.threshold:g}"
    if observation.flagged:
        obx.obx_8 = "A"
    obx.obx_11 = "F"
    obx.obx_14 = observed_at
    if observation.experimental:
        _note(group, 1, EXPERIMENTAL_NOTE)


def _coded(field, code: Code) -> None:
    """Fill a CE field: identifier, text, coding system (DICOM's designators: SCT is also HL7's)."""
    field.ce_1 = _text(code.value)
    field.ce_2 = _text(code.meaning)
    field.ce_3 = _text(code.scheme_designator, "ID")


def _note(parent: Group, set_id: int, text: str) -> None:
    nte = parent.add_segment("NTE")
    nte.nte_1 = str(set_id)
    nte.nte_2 = "L"
    nte.nte_3 = _text(text, "FT")
